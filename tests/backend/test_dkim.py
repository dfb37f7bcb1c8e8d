"""DKIM signing: fast RSA path equals dkimpy's own, both algorithms verify, canonical CRLF, key choice, keygen."""

from __future__ import annotations

import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from backend.dkim import keys as dkim_keys
from backend.dkim import sign as dkim
from backend.dns.parse import parse_dkim_txt
from backend.smtp import message as smtp_message
from tests.lab.dkim import run_dkim_cli, sig_tags, verify_all

MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@remote.test>\n"
    b"Cc: carol@remote.test\n"
    b"Subject: quarterly figures\n"
    b"Date: Mon, 03 Jun 2024 10:00:00 +0000\n"
    b"Message-ID: <1@example.org>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"Received: from lan by mail.example.org\n"
    b"Bcc: secret@remote.test\n"
    b"\n"
    b"Hello Bob,\n.leading dot line\n\nregards\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("dkim")
    out = {}
    for alg, sel in (("rsa", "rsa1"), ("ed25519", "ed1")):
        g = dkim_keys.generate_key("example.org", sel, alg, d)
        out[alg] = (SimpleNamespace(domain="example.org", selector=sel, algorithm=alg, private_key=g.path), g.txt_value)
    return out


def test_both_signatures_verify_and_use_the_agreed_parameters(keys):
    signed = dkim.sign_message(MESSAGE, [k for k, _ in keys.values()])
    assert verify_all(signed, keys) == [True, True]
    tags = sig_tags(signed)
    assert sorted(t["a"] for t in tags) == ["ed25519-sha256", "rsa-sha256"]
    for t in tags:
        assert t["c"] == "relaxed/relaxed"
        assert t["d"] == "example.org"
        h = t["h"].split(":")
        assert h.count("from") == 2  # oversigned
        assert {"to", "cc", "subject", "date", "message-id", "mime-version", "content-type"} <= set(h)
        assert "received" not in h and "bcc" not in h
    assert dkim.signature_count_by_algorithm(signed) == {"rsa-sha256": 1, "ed25519-sha256": 1}


def test_fast_rsa_signature_is_bit_identical_to_dkimpys_pure_python(keys):
    rsa_key = [keys["rsa"][0]]
    for _ in range(5):  # both within the same second (t= is part of the signed data)
        fast = dkim.sign_message(MESSAGE, rsa_key)
        pure = dkim.sign_message(MESSAGE, rsa_key, _fast_rsa=False)
        if sig_tags(fast)[0]["t"] == sig_tags(pure)[0]["t"]:
            break
    assert fast == pure
    assert verify_all(fast, keys) == [True]


def test_body_is_crlf_canonical_and_tampering_is_detected(keys):
    signed = dkim.sign_message(MESSAGE, [k for k, _ in keys.values()])
    assert b"\n" not in signed.replace(b"\r\n", b"")
    assert signed.endswith(b"\r\n")
    tampered = signed.replace(b"Hello Bob", b"Hello Eve")
    assert verify_all(tampered, keys) == [False, False]
    # Downstream LF-only storage of the same message still verifies (the body hash is over CRLF lines).
    assert verify_all(signed.replace(b"\r\n", b"\n"), keys) == [True, True]


def test_lone_cr_is_canonicalised_before_signing_so_relay_normalisation_keeps_it_valid(keys):
    # aiosmtplib turns a lone CR into CRLF on the way out; the signature must already cover that form.
    signed = dkim.sign_message(MESSAGE.replace(b"Hello Bob", b"Hello\rBob"), [k for k, _ in keys.values()])
    assert b"\r" not in signed.replace(b"\r\n", b"")
    relayed = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", signed)
    assert relayed == signed and verify_all(relayed, keys) == [True, True]


def test_canonical_input_signed_without_the_check_gives_the_same_bytes(keys):
    # The accept path hands over CRLF-canonical content and skips the line-ending check
    # (canonical=True): the signed message is exactly what the checked path gives.
    allkeys = [k for k, _ in keys.values()]
    canonical = smtp_message.crlf_canonical(MESSAGE + b"tail  \t\r\n" + b"x" * 3000 + b"\r\n")
    for _ in range(5):  # t= is signed: both within one second
        checked = dkim.sign_message(canonical, allkeys)
        trusted = dkim.sign_message(canonical, allkeys, canonical=True)
        if sig_tags(checked)[0]["t"] == sig_tags(trusted)[0]["t"]:
            break
    assert trusted == checked and verify_all(trusted, keys) == [True, True]


def test_keys_are_chosen_by_from_domain(keys):
    allkeys = [k for k, _ in keys.values()]
    other = MESSAGE.replace(b"alice@example.org", b"alice@elsewhere.test")
    assert dkim.signature_count_by_algorithm(dkim.sign_message(other, allkeys)) == {}
    sub = MESSAGE.replace(b"alice@example.org", b"alice@lists.example.org")
    signed = dkim.sign_message(sub, allkeys)
    assert len(sig_tags(signed)) == 2 and verify_all(signed, keys) == [True, True]
    assert dkim.keys_for_domain("example.org.evil.test", allkeys) == []


def test_no_from_header_is_refused(keys):
    with pytest.raises(ValueError, match="From"):
        dkim.sign_message(b"To: x@y.test\n\nbody\n", [keys["rsa"][0]], select_by_from=False)


def test_concurrent_signing_from_threads(keys):
    allkeys = [k for k, _ in keys.values()]
    barrier = threading.Barrier(4)

    def job(i: int) -> bytes:
        if i < 4:
            barrier.wait()
        return dkim.sign_message(MESSAGE.replace(b"quarterly", f"q{i}".encode()), allkeys)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(24)))
    assert all(verify_all(r, keys) == [True, True] for r in results)


def test_ed25519_pem_key_is_accepted(tmp_path, keys):
    k = ed25519.Ed25519PrivateKey.generate()
    p = tmp_path / "ed.pem"
    p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    entry = SimpleNamespace(domain="example.org", selector="edpem", algorithm="ed25519", private_key=p)
    txt = dkim_keys.dkim_txt_record(p, "ed25519")
    signed = dkim.sign_message(MESSAGE, [entry])
    d = dkimpy.DKIM(signed)
    assert d.verify(dnsfunc=lambda name, timeout=5: txt.encode())


def test_wrong_algorithm_key_is_a_clear_error(keys):
    with pytest.raises(dkim_keys.DKIMKeyError, match="not an rsa key|not a readable rsa"):
        dkim_keys.load_private_key(keys["ed25519"][0].private_key, "rsa")


def test_split_txt_keeps_strings_within_255_bytes(keys):
    value = keys["rsa"][1]
    parts = dkim_keys.split_txt(value)
    assert len(value) > 255 and all(len(p) <= 255 for p in parts) and "".join(parts) == value


def test_keygen_writes_0600_keys_and_prints_matching_records(tmp_path, capsys):
    rc = run_dkim_cli(["dkim", "keygen", "--domain", "example.org", "--selector", "s1", "--dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["example.org.s1-ed25519.ed25519", "example.org.s1-rsa.rsa.pem"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    for f, alg, sel in ((files[0], "ed25519", "s1-ed25519"), (files[1], "rsa", "s1-rsa")):
        line = next(l for l in out.splitlines() if l.startswith(f"{sel}._domainkey.example.org."))
        published = "".join(re.findall(r'"([^"]*)"', line))
        rec = parse_dkim_txt(published)
        assert rec.key_type == alg
        assert rec.public_key == dkim_keys.public_key_bytes(dkim_keys.load_private_key(f, alg))
        assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line))
    assert f'private_key = "{files[1]}"' in out


def test_keygen_twice_with_one_selector_makes_the_next_free_selector(tmp_path, capsys):
    """Issue 15 (9): a taken selector is neither overwritten nor an error: the next free one is made
    and named (it was exit 1, "exists: choose another selector")."""
    argv = ["dkim", "keygen", "--domain", "example.org", "--selector", "hmx", "--dir", str(tmp_path)]
    assert run_dkim_cli(argv) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert run_dkim_cli(argv) == 0
    out, err = capsys.readouterr()
    assert 'selector = "hmx-2-rsa"' in out and 'selector = "hmx-2-ed25519"' in out
    assert "hmx-2-rsa._domainkey.example.org." in out and "hmx-2-ed25519._domainkey.example.org." in out
    assert "created selectors hmx-2-rsa, hmx-2-ed25519 for example.org ('hmx' was taken in" in err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(after) == sorted([*first, "example.org.hmx-2-rsa.rsa.pem", "example.org.hmx-2-ed25519.ed25519"])
    assert all(after[name] == data for name, data in first.items())  # the first keys untouched
    # one algorithm: the selector itself, then SELECTOR-2
    one = ["dkim", "keygen", "--domain", "example.net", "--selector", "s1", "--algorithm", "rsa", "--dir", str(tmp_path)]
    assert run_dkim_cli(one) == 0 and run_dkim_cli(one) == 0
    out, err = capsys.readouterr()
    assert 'selector = "s1"' in out and 'selector = "s1-2"' in out
    assert "created selector s1 for example.net\n" in err and "created selector s1-2 for example.net ('s1' was taken" in err


def test_keygen_default_selectors_move_to_the_next_letter_at_each_rotation(tmp_path, capsys):
    import datetime

    year = datetime.date.today().year
    generated = []
    for letter in "abc":  # the first key and two rotations, all in one year
        assert run_dkim_cli(["dkim", "keygen", "--domain", "example.org", "--dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f'selector = "rsa{year}{letter}"' in out and f'selector = "ed{year}{letter}"' in out
        assert f"rsa{year}{letter}._domainkey.example.org." in out and f"ed{year}{letter}._domainkey.example.org." in out
        generated.append({p.name: p.read_bytes() for p in tmp_path.iterdir()})
    assert sorted(generated[-1]) == sorted(
        f"example.org.{alg}{year}{letter}.{ext}" for letter in "abc" for alg, ext in (("rsa", "rsa.pem"), ("ed", "ed25519"))
    )
    # No rotation touched an earlier key (never overwritten, so mail signed with it still verifies).
    assert all(generated[-1][name] == data for g in generated for name, data in g.items())
    # Another domain's keys in the same directory start at "a" (selectors are per domain).
    assert run_dkim_cli(["dkim", "keygen", "--domain", "example.net", "--algorithm", "rsa", "--dir", str(tmp_path)]) == 0
    assert f'selector = "rsa{year}a"' in capsys.readouterr().out


def test_faster_relaxed_body_is_byte_identical_to_dkimpys():
    import hashlib
    import random

    from dkim.canonicalization import Relaxed, Simple

    from backend.dkim.canon import body_digest, canonical_body

    rng = random.Random(7)
    alphabet = [b" ", b"\t", b"a", b"\r\n", b"  ", b"\t "]
    for _ in range(2000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for slice_size in (1, 3, 256 * 1024):
            assert canonical_body(data, True, slice_size) == Relaxed.canonicalize_body(data)
            assert canonical_body(data, False, slice_size) == Simple.canonicalize_body(data)
        assert body_digest(data, True, slice_size=2) == hashlib.sha256(Relaxed.canonicalize_body(data)).digest()


@pytest.mark.parametrize("message", [MESSAGE, b"A: b\r\n\r\n", b"no blank line\r\n", b"", b"A: b\r\n\r\n\r\nbody\r\n"])
def test_header_block_is_split_headers_header_without_copying_the_body(message):
    header = smtp_message.header_block(message)
    assert header == smtp_message.split_header(message)[0]
    assert len(header) <= len(message)
