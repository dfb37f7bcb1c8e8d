"""Our DKIM signer is dkimpy's signer, byte for byte, and leaves dkimpy untouched.

backend/dkim/sign.py signs through its own seam (OpenSSL/cryptography for the private-key
operation, a faster relaxed body canonicalisation) instead of dkimpy's sign(). RSASSA-PKCS1-v1_5
and Ed25519 are deterministic, so with t= fixed the header field must equal what an unaided
dkimpy produces for the same key and message.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import dkim as dkimpy
import pytest
from dkim import canonicalization as dkimpy_canon
from dkim import crypto as dkimpy_crypto

from backend.dkim import keys as dkim_keys
from backend.dkim import sign as dkim
from backend.smtp.message import crlf_canonical

FROZEN_T = 1767225600  # t= is signed data: both signers must see the same clock

HEAD = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\nMessage-ID: <1@example.org>\r\n"
CORPUS = {
    "plain": HEAD + b"\r\nHello Bob.\r\n",
    "folded headers": (
        b"From: Alice  <alice@example.org>\r\nTo: bob@example.net,\r\n\tcarol@example.net\r\n"
        b"Subject:   a  subject\r\n \t folded   twice\r\n\t and three times \r\nTo: dave@example.net\r\n"
        b"Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n\r\nbody\r\n"
    ),
    "empty body": HEAD + b"\r\n",
    "no body separator": HEAD,
    "body of blank lines": HEAD + b"\r\n\r\n\r\n\r\n",
    "whitespace runs": HEAD + b"\r\na  b\t\tc \t d \r\n \r\n\t\r\nend \t \r\n\r\n\r\n",
    "lone CR and LF": b"From: alice@example.org\nTo: bob@example.net\rSubject: x\r\n\nline one\nline\rtwo\r\n\n",
    "no final CRLF": HEAD + b"\r\nlast line without CRLF",
    "8bit": HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9t\xc3\xa9  \xe2\x82\xac\r\n",
    "long lines": HEAD + b"\r\n" + (b"word " * 180 + b"\r\n") * 3,
    # Over 1 MB: several canonicalisation slices (backend/dkim/canon.py), cut inside runs of
    # whitespace and of empty lines; ends in empty lines held back across a slice boundary.
    "1 MB mixed": HEAD + b"\r\n" + (
        b"word  \t " * 900 + b" \t \r\n" + b"bare LF line \t\n" + b"\r\n" * 40 + b"x\r\n \t\r\n"
    ) * 140 + b"\r\n" * 70000 + b"\n\n \r\n",
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("dkim-identity")
    out = {}
    for alg, sel in (("rsa", "rsa1"), ("ed25519", "ed1")):
        g = dkim_keys.generate_key("example.org", sel, alg, d)
        out[alg] = SimpleNamespace(domain="example.org", selector=sel, algorithm=alg, private_key=g.path)
    return out


@pytest.fixture
def frozen_clock(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: FROZEN_T)


def dkimpy_signature(message: bytes, entry, canonicalize=(b"relaxed", b"relaxed")) -> bytes:
    """What an unaided dkimpy signs (PEM for RSA, its base64 seed for Ed25519: the files we write)."""
    message = crlf_canonical(message)
    return dkimpy.DKIM(message, linesep=b"\r\n").sign(
        entry.selector.encode(),
        entry.domain.encode(),
        entry.private_key.read_bytes(),
        signature_algorithm=dkim.SIGNATURE_ALGORITHM[entry.algorithm],
        canonicalize=canonicalize,
        include_headers=dkim.headers_to_sign(message),
    )


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_signatures_equal_dkimpys_for_both_algorithms(name, keys, frozen_clock):
    message = CORPUS[name]
    signed_message, signatures = dkim.make_signatures(message, [keys["rsa"], keys["ed25519"]])
    assert signed_message == crlf_canonical(message)
    assert signatures == [dkimpy_signature(message, keys["rsa"]), dkimpy_signature(message, keys["ed25519"])]
    assert dkim.sign_message(message, [keys["ed25519"]]) == signatures[1] + signed_message


@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"simple"), (b"simple", b"simple"), (b"simple", b"relaxed")])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_seam_equals_dkimpy_for_other_canonicalisations(name, canonicalize, keys, frozen_clock):
    message = crlf_canonical(CORPUS[name])
    for entry in keys.values():
        ours = dkim._signature(
            dkimpy.DKIM(message, linesep=b"\r\n"), dkim_keys.load_key(entry), dkim.headers_to_sign(message), canonicalize
        )
        assert ours == dkimpy_signature(message, entry, canonicalize)


def test_dkimpy_module_functions_stay_dkimpys_after_our_signer_ran(keys):
    dkim.sign_message(CORPUS["whitespace runs"], list(keys.values()))
    # The names dkimpy's own sign() looks up at call time are still dkimpy's own functions.
    assert dkimpy.parse_pem_private_key is dkimpy_crypto.parse_pem_private_key
    assert dkimpy.RSASSA_PKCS1_v1_5_sign is dkimpy_crypto.RSASSA_PKCS1_v1_5_sign
    for f in (dkimpy.parse_pem_private_key, dkimpy.RSASSA_PKCS1_v1_5_sign, dkimpy_canon.compress_whitespace):
        assert f.__module__.startswith("dkim"), f
    assert dkimpy_canon.compress_whitespace.__code__.co_filename == dkimpy_canon.__file__
