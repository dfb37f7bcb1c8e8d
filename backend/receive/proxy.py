"""PROXY protocol v2 header checks the backend adds to aiosmtpd's parser: which headers are accepted
(``proxy_refusal``, for every listener behind the gateway: SMTP and the HTTP face) and the CRC32C TLV."""

from __future__ import annotations

import logging


import google_crc32c



log = logging.getLogger("homemx.smtp")


PP2_TYPE_CRC32C = 0x03  # PROXY protocol spec 2.2.5


def proxy_refusal(proxy_data) -> str | None:
    """Why a parsed PROXY header (aiosmtpd's ``ProxyData``) is refused, as a metrics reason
    (``bad_proxy_header``, ``bad_proxy_checksum``), or None when it is accepted. HAProxy spec 2.2:
    only v2, only the PROXY command (not LOCAL), only TCP over IPv4/IPv6; then the CRC32C TLV,
    when present, must match (``proxy_checksum_ok``)."""
    ok = (
        proxy_data.version == 2
        and proxy_data.command == 1
        and proxy_data.family in (1, 2)
        and proxy_data.protocol == 1
        and proxy_data.src_addr is not None
    )
    if not ok:
        return "bad_proxy_header"
    if not proxy_checksum_ok(proxy_data):
        return "bad_proxy_checksum"
    return None


def proxy_checksum_ok(proxy_data) -> bool:
    """PROXY protocol 2.2.5: a header that carries a PP2_TYPE_CRC32C TLV is valid only if the
    CRC32c (RFC 4960 appendix B, network byte order) of the whole header, with the checksum field
    set to zero, equals it. A header without one passes; a malformed TLV block or a second or
    wrongly sized checksum fails.

    The TLVs are walked here rather than with aiosmtpd's ProxyTLV, whose offsets are wrong for
    TLVs nested in PP2_TYPE_SSL and which keeps only the last of two TLVs of one type."""
    tlvs = bytes(proxy_data.rest)
    if not tlvs:
        return True
    i, crc_at = 0, None
    while i < len(tlvs):
        if i + 3 > len(tlvs):
            return False
        kind, length = tlvs[i], int.from_bytes(tlvs[i + 1 : i + 3], "big")
        if i + 3 + length > len(tlvs):
            return False
        if kind == PP2_TYPE_CRC32C:
            if length != 4 or crc_at is not None:
                return False
            crc_at = i + 3
        i += 3 + length
    if crc_at is None:
        return True
    header = bytearray(proxy_data.whole_raw)
    at = proxy_data.tlv_start + crc_at
    expected = int.from_bytes(header[at : at + 4], "big")
    header[at : at + 4] = bytes(4)
    return google_crc32c.value(bytes(header)) == expected
