"""PROXY protocol version 2 header encoder (pure, no I/O): what the gateway writes upstream before any byte of the client.

Spec: HAProxy "The PROXY protocol, Versions 1 & 2" (doc/proxy-protocol.txt), section 2.2. The
gateway only ever sends the PROXY command with a TCP over IPv4 or IPv6 address block (and LOCAL for
its own health probes). The backend reads the header with aiosmtpd; an independent decoder for tests lives in tests/lab/proxyv2_decoder.py; the gateway
never needs one, and the two daemons do not import each other.
"""

from __future__ import annotations

import ipaddress
import struct

# 2.2: the 12-byte signature, chosen so that it cannot start any sane protocol.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# 2.2: the 13th byte is version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY).
VER_CMD_LOCAL = 0x20
VER_CMD_PROXY = 0x21
# 2.2: the 14th byte is address family (high nibble: 1 AF_INET, 2 AF_INET6) | transport (1 STREAM).
FAM_UNSPEC = 0x00
FAM_TCP4 = 0x11
FAM_TCP6 = 0x21
# 2.2: fixed address block lengths for TCP over IPv4 (2 x 4 + 2 x 2) and IPv6 (2 x 16 + 2 x 2).
ADDR_LEN_TCP4 = 12
ADDR_LEN_TCP6 = 36

# 2.2.x TLV types the gateway may add (optional; none by default).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05


def _as_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id: it has no wire form
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the receiver must see the IPv4
    # address (its limits, Received header and logs speak IPv4), so unmap before choosing a family.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _tlv_bytes(tlvs: tuple[tuple[int, bytes], ...]) -> bytes:
    out = bytearray()
    for t, value in tlvs:
        if not 0 <= t <= 0xFF:
            raise ValueError(f"TLV type {t} out of range")
        if len(value) > 0xFFFF:
            raise ValueError("TLV value longer than 65535 bytes")
        out += struct.pack("!BH", t, len(value)) + value
    return bytes(out)


def encode_proxy_v2(
    src: tuple[str, int], dst: tuple[str, int], tlvs: tuple[tuple[int, bytes], ...] = ()
) -> bytes:
    """The PROXY v2 header announcing a TCP connection from ``src`` (the client) to ``dst`` (the
    address the client connected to), optionally followed by TLVs.

    Both ends are encoded in one family: IPv4 when both are IPv4 (or IPv4-mapped IPv6), IPv6
    otherwise, an IPv4 end then written as its IPv4-mapped IPv6 form (2.2 needs one family for both).
    """
    s_ip, d_ip = _as_ip(src[0]), _as_ip(dst[0])
    for port in (src[1], dst[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
    extra = _tlv_bytes(tlvs)
    if s_ip.version == 4 and d_ip.version == 4:
        fam, block = FAM_TCP4, s_ip.packed + d_ip.packed
    else:
        s6 = s_ip if s_ip.version == 6 else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + s_ip.packed)
        d6 = d_ip if d_ip.version == 6 else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + d_ip.packed)
        fam, block = FAM_TCP6, s6.packed + d6.packed
    block += struct.pack("!HH", src[1], dst[1])
    length = len(block) + len(extra)
    if length > 0xFFFF:
        raise ValueError("PROXY v2 header longer than 65535 bytes")
    # 2.2: the length field counts the bytes after the 16-byte fixed part, in network order.
    return SIGNATURE + struct.pack("!BBH", VER_CMD_PROXY, fam, length) + block + extra


def encode_local_v2() -> bytes:
    """The LOCAL header (2.2: a connection the proxy made on its own, e.g. a health check): the
    receiver must use the real connection's addresses and ignore any address block."""
    return SIGNATURE + struct.pack("!BBH", VER_CMD_LOCAL, FAM_UNSPEC, 0)
