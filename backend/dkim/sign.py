"""DKIM signing of outbound mail (RFC 6376): which keys sign, which headers, and the DKIM-Signature fields.

dkimpy parses the message and provides the tag list folding and the header hashing (RFC 6376
3.7); the body canonicalisation and the private-key operation are ours (see "Theory of
operation" below), so no dkimpy function is ever replaced: other users of dkimpy in the process
see dkimpy as installed. Every function here is thread-safe: the caller runs ``sign_message`` in
a worker thread so that the CPU work never blocks the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

import dkim as _dkimpy
from dkim.canonicalization import CanonicalizationPolicy, Relaxed
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from backend.dkim.canon import body_digest
from backend.dkim.keys import DKIMKeyLike, LoadedKey, load_key
from backend.smtp.message import crlf_canonical, from_addresses, header_block, split_header

SIGNATURE_ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}  # RFC 8301, RFC 8463

# Header fields signed when present (RFC 6376 5.4.1 recommendations, the ones that carry meaning
# for a reader or a MUA). Each occurrence present is signed; From is signed once more than it
# occurs ("oversigned", RFC 6376 8.15) so nobody can add a second From after us.
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-id", "content-description", "list-id", "list-help", "list-unsubscribe",
    "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner", "list-archive",
)  # fmt: skip
OVERSIGNED_HEADERS = ("from",)


# ---------------------------------------------------------------- our seam into dkimpy
#
# Theory of operation. dkimpy's DKIM.sign() canonicalises the body, builds the tag list, folds
# it, hashes the canonical headers (hash_headers) and signs the digest. Two of those steps are
# slow in pure Python: the RSA private-key operation (dkimpy's own bignum arithmetic, ~9 ms) and
# body canonicalisation (dkimpy splits the whole message into lines, and its relaxed
# re.sub(b"[\t ]+", b" ") stops at every single space of a text body). ``_signature`` below is
# DKIM.sign() for our fixed parameters (no l=, i=@d), written against dkimpy's lower-level pieces (the
# parsed ``headers``/``body``, ``fold``, ``RE_BTAG``, ``hash_headers``), with
#   - the body canonicalised and hashed slice by slice by backend/dkim/canon.py (bytes-level
#     operations; only WSP runs that are not already one space are rewritten), and
#   - the digest signed by ``cryptography``: RSASSA-PKCS1-v1_5 (RFC 8017 8.2.1) through OpenSSL,
#     Ed25519 (RFC 8032, what PyNaCl does for dkimpy).
# Both signature schemes are deterministic, so the output is byte for byte what dkimpy's sign()
# gives for the same key, message and t= (tests/backend/test_dkim_identity.py checks a corpus).
# These names are dkimpy internals: pyproject.toml pins dkimpy to the minor version tested.

_HEADER_NAME = b"DKIM-Signature"


def _raw_signature(key: LoadedKey, digest: bytes) -> bytes:
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        # Prehashed: the header block is already hashed; OpenSSL adds the DigestInfo (EMSA-PKCS1-v1_5).
        return key.private_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return key.private_key.sign(digest)  # RFC 8463 3: Ed25519 over the SHA-256 of the headers


def _signature(
    parsed: _dkimpy.DKIM,
    key: LoadedKey,
    include: Sequence[bytes],
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    body_hash: bytes | None = None,
) -> bytes:
    """One DKIM-Signature header field (with CRLF) for a message dkimpy has parsed.

    ``body_hash``: the base64 bh= when the caller already has it (same body, same c=).
    """
    policy = CanonicalizationPolicy.from_c_value(b"/".join(canonicalize))
    if body_hash is None:
        body_hash = base64.b64encode(body_digest(parsed.body, policy.body_algorithm is Relaxed))
    domain = key.domain.encode("ascii")
    fields = [
        (b"v", b"1"),
        (b"a", SIGNATURE_ALGORITHM[key.algorithm]),
        (b"c", policy.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(int(time.time())).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),  # dkimpy's placeholder: folds b= onto its own line (RFC 6376 3.5 allows FWS)
    ]
    value = _dkimpy.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_HEADER_NAME), linesep=b"\r\n")
    value = _dkimpy.RE_BTAG.sub(b"\\1", value)
    digest = hashlib.sha256()
    # RFC 6376 3.7: the signed header fields, then this header with an empty b=, no trailing CRLF.
    _dkimpy.hash_headers(digest, policy, policy.canonicalize_headers(parsed.headers), include, (_HEADER_NAME, b" " + value), dict(fields))
    fields[-1] = (b"b", base64.b64encode(_raw_signature(key, digest.digest())))
    value = _dkimpy.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(_HEADER_NAME), linesep=b"\r\n")
    return _HEADER_NAME + b": " + value


# ---------------------------------------------------------------- signing

def _header_names(message: bytes) -> list[bytes]:
    names = []
    for line in header_block(message).split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if colon:
            names.append(name.strip().lower())
    return names


def headers_to_sign(message: bytes) -> list[bytes]:
    """The h= list for a message: signed headers present (each occurrence), plus From once more."""
    wanted = {h.encode() for h in SIGNED_HEADERS}
    present = [n for n in _header_names(message) if n in wanted]
    return present + [h.encode() for h in OVERSIGNED_HEADERS]


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From address, lower-case; None when there is none."""
    for addr in from_addresses(header_block(message)) or ():
        if "@" in addr:
            return addr.rpartition("@")[2].strip().rstrip(">").lower()
    return None


def _unfolded_headers(message: bytes) -> Iterable[str]:
    text = header_block(message).decode("utf-8", "replace")
    return re.sub(r"\r\n[ \t]", " ", text).split("\r\n")


def keys_for_domain(domain: str | None, keys: Sequence[DKIMKeyLike]) -> list[DKIMKeyLike]:
    """The keys that sign mail whose From domain is ``domain``.

    Keys are chosen by the From (RFC 5322) domain, not the envelope sender: DMARC (RFC 7489 3.1.1)
    aligns d= with the From domain, so that is the signature receivers judge. A key of a parent
    domain also signs for a subdomain (relaxed alignment). The most specific domain wins.
    """
    if not domain:
        return []
    domain = domain.lower().rstrip(".")
    best: list[DKIMKeyLike] = []
    best_len = -1
    for k in keys:
        kd = k.domain.lower()
        if domain == kd or domain.endswith("." + kd):
            if len(kd) > best_len:
                best, best_len = [k], len(kd)
            elif len(kd) == best_len:
                best.append(k)
    return best


def sign_message(
    message: bytes,
    keys: Sequence[DKIMKeyLike],
    *,
    select_by_from: bool = True,
    canonical: bool = False,
    _fast_rsa: bool = True,
) -> bytes:
    """Return ``message`` (made CRLF-canonical) with one DKIM-Signature header prepended per key.

    With ``select_by_from`` (the default) only the keys for the From domain sign (see
    ``keys_for_domain``); otherwise every key given signs. A message with no matching key comes
    back canonicalised but unsigned. relaxed/relaxed canonicalisation, From oversigned.
    ``canonical``: the caller guarantees the CRLF-canonical form already (see ``make_signatures``).
    Thread-safe: a fresh dkimpy parse per call, keys shared read-only.
    """
    message, signatures = make_signatures(message, keys, select_by_from=select_by_from, canonical=canonical,
                                          _fast_rsa=_fast_rsa)
    return b"".join(signatures) + message


def make_signatures(
    message: bytes,
    keys: Sequence[DKIMKeyLike],
    *,
    select_by_from: bool = True,
    canonical: bool = False,
    _fast_rsa: bool = True,
) -> tuple[bytes, list[bytes]]:
    """(the CRLF-canonical message, its DKIM-Signature header fields): what ``sign_message``
    joins, for callers that want the signatures themselves (metrics count them).

    ``canonical``: the caller guarantees the message is CRLF-canonical already (the accept path:
    the DATA reader made it so), so the check is skipped: three counts over the whole message,
    ~1.8 ms of a 1 MB message's ~7 ms signature. Signing a message that is not canonical this way
    would sign bytes other than those stored; the receive path never hands one over."""
    if not canonical:
        message = crlf_canonical(message)
    chosen = keys_for_domain(from_domain(message), keys) if select_by_from else list(keys)
    if not chosen:
        return message, []
    include = headers_to_sign(message)
    if b"from" not in include[:-1]:
        raise ValueError("message has no From header: RFC 6376 5.4 requires From to be signed")
    # One dkimpy object per call (never shared between threads); the body is canonicalised and
    # hashed once, every key signs that same bh=. dkimpy parses only the header block: its
    # rfc822_parse splits the whole message into lines (a regex pass and a list of lines for a
    # 1 MB body). The body of a CRLF-canonical message is exactly the bytes after the blank line,
    # what rfc822_parse would rejoin, and has CRLF line ends only.
    header, body = split_header(message)
    parsed = _dkimpy.DKIM(header, linesep=b"\r\n")
    body_hash = base64.b64encode(body_digest(body, relaxed=True, crlf=True))
    signatures = []
    for entry in chosen:
        loaded = load_key(entry)
        if not _fast_rsa and loaded.algorithm == "rsa":
            # Benchmark hook: dkimpy's own sign() on its own parse, pure-Python RSA from the PEM bytes.
            signatures.append(_dkimpy.DKIM(message, linesep=b"\r\n").sign(
                loaded.selector.encode("ascii"), loaded.domain.encode("ascii"), Path(entry.private_key).read_bytes(),
                signature_algorithm=b"rsa-sha256", canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
            ))  # fmt: skip
            continue
        signatures.append(_signature(parsed, loaded, include, body_hash=body_hash))
    return message, signatures


def signature_count_by_algorithm(signed: bytes) -> dict[str, int]:
    """How many DKIM-Signature headers of each a= a message carries (for metrics and tests)."""
    counts: dict[str, int] = {}
    for line in _unfolded_headers(signed):
        name, _, value = line.partition(":")
        if name.strip().lower() == "dkim-signature":
            m = re.search(r"(?:^|;)\s*a\s*=\s*([\w-]+)", value)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts
