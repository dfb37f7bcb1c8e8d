"""PROXY protocol version 2 header decoder (pure, no I/O): an independent reader the tests use to check the gateway's encoder and that benchmark sinks use; the backend itself reads the header with aiosmtpd's parser (backend/receive/smtpd.py).

Spec: HAProxy "The PROXY protocol, Versions 1 & 2" (doc/proxy-protocol.txt), section 2.2.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

# 2.2: the 12-byte signature; it cannot appear at the start of any sane protocol (it holds \0 and
# "QUIT\n"), which is why a mismatch on the first bytes is enough to reject.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_LEN = 16  # signature + ver/cmd + family/protocol + 2-byte length
V1_PREFIX = b"PROXY "

CMD_LOCAL = 0x0
CMD_PROXY = 0x1
FAM_TCP4 = 0x11
FAM_TCP6 = 0x21
FAM_UNSPEC = 0x00

# 2.2: "the receiver must not start parsing until it has the whole header"; the length field is 16
# bits, but nothing legitimate sends kilobytes of TLVs to us. Bound it so a peer cannot make us
# buffer 64 KiB before deciding.
MAX_PAYLOAD = 1024


class ProxyProtocolError(ValueError):
    """The bytes are not an acceptable PROXY v2 header; the reason says why."""


@dataclass(frozen=True)
class ProxyHeader:
    command: str  # "PROXY" or "LOCAL"
    src: tuple[str, int] | None
    dst: tuple[str, int] | None
    tlvs: dict[int, bytes] = field(default_factory=dict)


def parse_proxy_v2(buf: bytes) -> tuple[ProxyHeader, int] | None:
    """Decode a PROXY v2 header at the start of ``buf``.

    Returns ``(header, consumed)`` once the whole header is present, ``None`` if more bytes are
    needed, and raises ProxyProtocolError as soon as the bytes cannot be a valid header (a v1 text
    header, a wrong signature, an unknown version or command, a truncated address block).
    Bytes after ``consumed`` belong to the proxied stream and must be kept by the caller.
    """
    probe = buf[: len(SIGNATURE)]
    if probe.startswith(V1_PREFIX[: len(probe)]) and len(probe) >= 1 and buf[:1] == b"P":
        raise ProxyProtocolError("PROXY v1 (text) header is not accepted; send v2")
    if not SIGNATURE.startswith(probe):
        raise ProxyProtocolError("missing PROXY v2 signature")
    if len(buf) < HEADER_LEN:
        return None
    ver_cmd, fam, length = struct.unpack("!BBH", buf[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"unsupported PROXY protocol version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyProtocolError(f"unknown PROXY v2 command {cmd:#x}")
    if length > MAX_PAYLOAD:
        raise ProxyProtocolError(f"PROXY v2 header too long ({length} bytes)")
    if len(buf) < HEADER_LEN + length:
        return None
    payload = buf[HEADER_LEN : HEADER_LEN + length]
    consumed = HEADER_LEN + length
    if cmd == CMD_LOCAL:
        # 2.2: with LOCAL the receiver must ignore the address block.
        return ProxyHeader("LOCAL", None, None, {}), consumed
    if fam == FAM_TCP4:
        if length < 12:
            raise ProxyProtocolError("PROXY v2 IPv4 address block truncated")
        s, d, sp, dp = struct.unpack("!4s4sHH", payload[:12])
        src = (str(ipaddress.IPv4Address(s)), sp)
        dst = (str(ipaddress.IPv4Address(d)), dp)
        rest = payload[12:]
    elif fam == FAM_TCP6:
        if length < 36:
            raise ProxyProtocolError("PROXY v2 IPv6 address block truncated")
        s, d, sp, dp = struct.unpack("!16s16sHH", payload[:36])
        src = (str(ipaddress.IPv6Address(s)), sp)
        dst = (str(ipaddress.IPv6Address(d)), dp)
        rest = payload[36:]
    else:
        raise ProxyProtocolError(f"unsupported PROXY v2 address family/protocol {fam:#04x}")
    return ProxyHeader("PROXY", src, dst, _parse_tlvs(rest)), consumed


def _parse_tlvs(data: bytes) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError("PROXY v2 TLV truncated")
        t, ln = struct.unpack("!BH", data[i : i + 3])
        if i + 3 + ln > len(data):
            raise ProxyProtocolError("PROXY v2 TLV value truncated")
        tlvs[t] = data[i + 3 : i + 3 + ln]
        i += 3 + ln
    return tlvs
