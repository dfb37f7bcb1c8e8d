"""PROXY protocol v2 header checks the backend adds to aiosmtpd's parser (the CRC32C TLV)."""

from __future__ import annotations

import logging


import google_crc32c



log = logging.getLogger("homemx.smtp")


PP2_TYPE_CRC32C = 0x03  # PROXY protocol spec 2.2.5


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
