"""DKIM body canonicalisation (RFC 6376 3.4.3 simple, 3.4.4 relaxed) and body hash, in slices.

Shared by the signer (backend/dkim/sign.py) and the inbound verifier (backend/auth/dkim.py).
Byte for byte what dkimpy's ``rfc822_parse`` and Simple/Relaxed give (tests/backend/
test_auth_dkim.py checks every slice size, tests/backend/test_dkim_identity.py the signatures),
but done with C-level bytes operations on slices cut after a LF: every step is line-local except
dropping the trailing empty lines, which holds back only the CRLFs at the end of a slice. Between
slices another thread (the event loop) gets the GIL back, and the body hash is fed slice by slice,
so no whole canonical copy of a 25 MB body is built.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterator

_LINE_END_RE = re.compile(rb"\r?\n")
# Each slice holds the GIL for a fraction of a millisecond.
BODY_SLICE = 256 * 1024


def _relaxed(part: bytes) -> bytes:
    """RFC 6376 3.4.4 on a slice of CRLF lines: WSP at the end of a line goes, then WSP runs
    become one space (dkimpy's order). Bytes operations, a Python step per line only when some
    line has trailing WSP: a regex stops at every space of a text body and takes several times
    as long.
    """
    if b" \r\n" in part or b"\t\r\n" in part:
        lines = part.split(b"\r\n")
        last = lines.pop()  # after the last CRLF: b"", or a last line without CRLF, kept as is (as dkimpy)
        part = b"\r\n".join([line.rstrip(b" \t") for line in lines] + [last])
    if b"\t" in part:
        part = part.replace(b"\t", b" ")
    while b"  " in part:  # each pass halves every run: a few passes over the slice at most
        part = part.replace(b"  ", b" ")
    return part


def canonical_body_slices(
    body: bytes, relaxed: bool, slice_size: int = BODY_SLICE, *, crlf: bool | None = None
) -> Iterator[bytes]:
    """The canonical form of a body as received (CRLF or bare LF line ends), in pieces whose
    concatenation is the canonical body.

    RFC 6376 3.4.3/3.4.4 drop the empty lines at the end and end the body with one CRLF: the body
    without its trailing CRLF pairs, then CRLF (dkimpy's ``strip_trailing_lines``); relaxed makes
    an empty body empty. The trailing CRLF pairs of a slice are held back until a later slice
    shows they were not the end. ``crlf``: the caller knows every LF is in a CRLF (None: look).
    """
    if crlf is None:
        crlf = body.count(b"\n") == body.count(b"\r\n")
    held = b""  # CRLF pairs that may be the trailing empty lines
    content = False  # anything but CRLF pairs seen
    start = 0
    while start < len(body):
        end = body.find(b"\n", start + slice_size)
        end = len(body) if end < 0 else end + 1
        part = body[start:end]
        start = end
        if not crlf:
            part = _LINE_END_RE.sub(b"\r\n", part)  # as dkimpy: lines split on CR? LF, joined with CRLF
        if relaxed:
            part = _relaxed(part)
        cut = len(part.rstrip(b"\r\n"))  # the CRLF pairs at the end lie in this run of CR and LF
        if (len(part) - cut) % 2 or part[cut:] != b"\r\n" * ((len(part) - cut) // 2):
            cut = len(part)  # a bare CR or LF in the run (CRLF input keeps bare CRs): pair by pair
            while part.endswith(b"\r\n", 0, cut):
                cut -= 2
        if cut == 0:
            held += part
            continue
        content = True
        yield held + part[:cut] if held else part[:cut]
        held = part[cut:]
    if content or not relaxed:
        yield b"\r\n"


def canonical_body(body: bytes, relaxed: bool, slice_size: int = BODY_SLICE) -> bytes:
    """The whole canonical body (see ``canonical_body_slices``)."""
    return b"".join(canonical_body_slices(body, relaxed, slice_size))


def body_digest(
    body: bytes,
    relaxed: bool,
    hash_factory: Callable = hashlib.sha256,
    slice_size: int = BODY_SLICE,
    *,
    crlf: bool | None = None,
) -> bytes:
    """The hash (RFC 6376 3.7 bh=, before base64) of the canonical body, fed slice by slice."""
    h = hash_factory()
    for piece in canonical_body_slices(body, relaxed, slice_size, crlf=crlf):
        h.update(piece)
    return h.digest()
