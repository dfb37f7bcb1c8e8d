"""PROXY v2 encoder: byte-exact against hand-built vectors from the HAProxy spec, and round trips through the backend's decoder."""

import pytest

from tests.lab.proxyv2_decoder import parse_proxy_v2
from gateway.proxyv2 import PP2_TYPE_AUTHORITY, encode_local_v2, encode_proxy_v2

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # spec 2.2: \r\n\r\n\0\r\nQUIT\n


def test_ipv4_vector_byte_exact():
    got = encode_proxy_v2(("192.0.2.1", 56324), ("198.51.100.2", 25))
    want = SIG + bytes.fromhex(
        "21"  # version 2, PROXY
        "11"  # AF_INET, STREAM
        "000c"  # 12 bytes follow
        "c0000201"  # 192.0.2.1
        "c6336402"  # 198.51.100.2
        "dc04"  # 56324
        "0019"  # 25
    )
    assert got == want


def test_ipv6_vector_byte_exact():
    got = encode_proxy_v2(("2001:db8::1", 1), ("2001:db8:ffff::25", 587))
    want = SIG + bytes.fromhex(
        "21" "21" "0024"  # version 2 PROXY, AF_INET6 STREAM, 36 bytes
        "20010db8000000000000000000000001"
        "20010db8ffff00000000000000000025"
        "0001" "024b"
    )
    assert got == want


def test_ipv4_mapped_addresses_become_ipv4():
    got = encode_proxy_v2(("::ffff:192.0.2.1", 56324), ("::ffff:198.51.100.2", 25))
    assert got == encode_proxy_v2(("192.0.2.1", 56324), ("198.51.100.2", 25))
    assert got[13] == 0x11


def test_mixed_families_use_ipv6_with_mapped_ipv4():
    got = encode_proxy_v2(("2001:db8::1", 1000), ("198.51.100.2", 25))
    assert got[13] == 0x21
    assert got[16 + 16 : 16 + 32] == bytes.fromhex("00000000000000000000ffffc6336402")


def test_local_vector():
    assert encode_local_v2() == SIG + bytes.fromhex("20000000")


def test_tlv_appended_and_counted():
    got = encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=((PP2_TYPE_AUTHORITY, b"mx.example.org"),))
    assert got[14:16] == (12 + 3 + 14).to_bytes(2, "big")
    assert got.endswith(bytes([0x02, 0x00, 14]) + b"mx.example.org")


@pytest.mark.parametrize(
    "src,dst",
    [
        (("203.0.113.9", 40000), ("198.51.100.1", 25)),
        (("2001:db8:1:2::99", 65535), ("2001:db8::25", 465)),
        (("0.0.0.0", 0), ("255.255.255.255", 65535)),
    ],
)
def test_round_trip_through_backend_decoder(src, dst):
    data = encode_proxy_v2(src, dst) + b"EHLO x\r\n"
    header, consumed = parse_proxy_v2(data)
    assert header.command == "PROXY"
    assert header.src == src and header.dst == dst
    assert data[consumed:] == b"EHLO x\r\n"


def test_decoder_needs_every_byte():
    data = encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    for n in range(1, len(data)):
        assert parse_proxy_v2(data[:n]) is None


def test_bad_port_rejected():
    with pytest.raises(ValueError):
        encode_proxy_v2(("192.0.2.1", 70000), ("192.0.2.2", 25))
