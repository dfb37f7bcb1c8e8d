"""DKIM keys: loading and caching private keys, generating new ones, and the TXT records that publish them.

RSA keys (RFC 8301) and Ed25519 keys (RFC 8463) are read and made with ``cryptography``. Every
function here is thread-safe: signing runs in worker threads and loads keys through ``load_key``.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from backend.durable import write_secret

log = logging.getLogger("homemx.dkim")

RSA_BITS = 2048  # RFC 8301 3.2: signers MUST use at least 1024 bits, SHOULD use 2048
ALGORITHMS = ("rsa", "ed25519")


class DKIMKeyLike(Protocol):
    """What signing needs from a key entry (config.DKIMKeyConfig fits)."""

    domain: str
    selector: str
    algorithm: str
    private_key: Path


class DKIMKeyError(Exception):
    """A DKIM private key file cannot be read or is not a key of the expected algorithm."""


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class LoadedKey:
    """A private key loaded once and kept, with the public half."""

    domain: str
    selector: str
    algorithm: str  # rsa | ed25519
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    public_key: bytes  # the p= value (RFC 6376 3.6.1): SubjectPublicKeyInfo DER, or raw 32 bytes (RFC 8463)


def load_private_key(path: str | os.PathLike[str], algorithm: str):
    """Read a private key file: a cryptography key object (RSAPrivateKey or Ed25519PrivateKey).

    RSA: PEM (PKCS#1 or PKCS#8). Ed25519: the base64 32-byte seed dkimpy and ``dknewkey`` use, or
    PEM PKCS#8 as written by ``openssl genpkey -algorithm ed25519``.
    """
    if algorithm not in ALGORITHMS:
        raise DKIMKeyError(f"{path}: unknown DKIM algorithm {algorithm!r}")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DKIMKeyError(f"{path}: cannot read: {e.strerror}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        elif algorithm == "ed25519":
            seed = base64.b64decode(data.strip(), validate=True)
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        else:
            raise ValueError("expected a PEM private key")
    except (ValueError, TypeError) as e:
        raise DKIMKeyError(f"{path}: not a readable {algorithm} private key: {e}") from None
    expected = rsa.RSAPrivateKey if algorithm == "rsa" else ed25519.Ed25519PrivateKey
    if not isinstance(key, expected):
        raise DKIMKeyError(f"{path}: holds a {type(key).__name__}, not an {algorithm} key")
    if algorithm == "rsa" and key.key_size < 1024:
        # RFC 8301 3.2: verifiers MUST NOT consider keys under 1024 bits valid.
        raise DKIMKeyError(f"{path}: RSA key of {key.key_size} bits is too short (at least 1024, 2048 advised)")
    return key


def public_key_bytes(key) -> bytes:
    """The DKIM p= bytes of a private key (before base64)."""
    pub = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


_cache_lock = threading.Lock()
_key_cache: dict[tuple[str, str, str, str], tuple[tuple[int, int], LoadedKey]] = {}
_broken_stamp: dict[tuple[str, str, str, str], tuple[int, int] | None] = {}  # broken versions already reported


def load_key(entry: DKIMKeyLike) -> LoadedKey:
    """Load (once) the key an entry names. Reloaded when the file changes (key rotation); when the
    changed file does not load (a copy half done), the key loaded before keeps signing and one
    warning per broken version says why: every submission would get 451 otherwise."""
    path = Path(entry.private_key)
    ident = (str(path), entry.algorithm, entry.domain.lower(), entry.selector)
    stamp = _stamp(path)
    with _cache_lock:
        hit = _key_cache.get(ident)
    if hit is not None and stamp is not None and hit[0] == stamp:
        return hit[1]
    try:
        key = load_private_key(path, entry.algorithm)  # a missing file: DKIMKeyError "cannot read"
    except DKIMKeyError as e:
        if hit is None:
            raise
        with _cache_lock:
            first = _broken_stamp.get(ident) != stamp
            _broken_stamp[ident] = stamp
        if first:
            log.warning("dkim: %s; signing with the key loaded before", e)
        return hit[1]
    loaded = LoadedKey(entry.domain.lower(), entry.selector, entry.algorithm, key, public_key_bytes(key))
    with _cache_lock:
        _key_cache[ident] = (stamp, loaded)
    return loaded


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------- TXT records


def txt_record_value(algorithm: str, public_key: bytes) -> str:
    """The DKIM key record text (RFC 6376 3.6.1; k=ed25519 per RFC 8463 4.2)."""
    k = "rsa" if algorithm == "rsa" else "ed25519"
    return f"v=DKIM1; k={k}; p={base64.b64encode(public_key).decode('ascii')}"


def dkim_txt_record(private_key_path: str | os.PathLike[str], algorithm: str) -> str:
    """The TXT record value to publish at SELECTOR._domainkey.DOMAIN for this private key."""
    return txt_record_value(algorithm, public_key_bytes(load_private_key(private_key_path, algorithm)))


def split_txt(value: str, limit: int = 255) -> list[str]:
    """Split a TXT value into character-strings of at most ``limit`` bytes (RFC 1035 3.3.14).

    DKIM verifiers concatenate the strings without separators (RFC 6376 3.6.2.2).
    """
    raw = value.encode("ascii")
    return [raw[i : i + limit].decode("ascii") for i in range(0, len(raw), limit)] or [""]


def zone_txt_rdata(value: str) -> str:
    """A TXT value as zone-file rdata: quoted strings of at most 255 bytes in parentheses."""
    parts = split_txt(value)
    quoted = ['"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts]
    if len(quoted) == 1:
        return quoted[0]
    return "( " + " ".join(quoted) + " )"


# ---------------------------------------------------------------- key generation


@dataclass(frozen=True)
class GeneratedKey:
    domain: str
    selector: str
    algorithm: str
    path: Path
    txt_value: str

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."

    def zone_line(self) -> str:
        return f"{self.record_name}\tIN\tTXT\t{zone_txt_rdata(self.txt_value)}"


def default_selector(algorithm: str, today: str | None = None, letter: str = "a") -> str:
    """A dated selector such as ``rsa2025a``/``ed2025a``: rotation gets a new selector, never reuses one."""
    import datetime

    year = today or str(datetime.date.today().year)
    return f"{'rsa' if algorithm == 'rsa' else 'ed'}{year}{letter}"


def key_file(directory: str | os.PathLike[str], domain: str, selector: str, algorithm: str) -> Path:
    """Where ``generate_key`` writes a key: DIRECTORY/DOMAIN.SELECTOR.{rsa.pem,ed25519}."""
    return Path(directory) / (f"{domain}.{selector}.rsa.pem" if algorithm == "rsa" else f"{domain}.{selector}.ed25519")


def free_default_selectors(
    domain: str, algorithms: Sequence[str], directory: str | os.PathLike[str], today: str | None = None
) -> dict[str, str]:
    """{algorithm: dated selector} for new keys: the first letter whose key files are not in
    ``directory`` yet (``rsa2025a``, then ``rsa2025b`` at the next rotation of that year), the same
    letter for every algorithm so that one rotation's selectors read as a pair."""
    for letter in "abcdefghijklmnopqrstuvwxyz":
        chosen = {alg: default_selector(alg, today, letter) for alg in algorithms}
        if not any(key_file(directory, domain, sel, alg).exists() for alg, sel in chosen.items()):
            return chosen
    raise FileExistsError(f"{directory}: every dated selector of the year is taken for {domain}: choose one with --selector")


def free_named_selectors(
    domain: str, base: str, algorithms: Sequence[str], directory: str | os.PathLike[str]
) -> dict[str, str]:
    """{algorithm: selector} for new keys under an operator-chosen selector ``base``: ``base`` itself
    (``base-rsa``/``base-ed25519`` for several algorithms), else the first of ``base-2``, ``base-3``, ...
    whose key files are not in ``directory`` yet. A selector is never reused for a new key (a
    receiver may have cached the old record), so a second keygen moves on instead of failing."""

    def named(stem: str) -> dict[str, str]:
        return {alg: f"{stem}-{alg}" if len(algorithms) > 1 else stem for alg in algorithms}

    for n in range(1, 1000):
        chosen = named(base if n == 1 else f"{base}-{n}")
        if any(len(sel) > 63 for sel in chosen.values()):
            break  # RFC 1035 2.3.4: a label of at most 63 octets
        if not any(key_file(directory, domain, sel, alg).exists() for alg, sel in chosen.items()):
            return chosen
    raise FileExistsError(f"{directory}: no free selector left after {base!r} for {domain}: choose another --selector")


def generate_key(domain: str, selector: str, algorithm: str, directory: str | os.PathLike[str]) -> GeneratedKey:
    """Generate a private key into DIRECTORY/DOMAIN.SELECTOR.{rsa.pem,ed25519} (0600) and return its TXT record.

    RSA keys are PEM PKCS#1 (what dkimpy, OpenDKIM and Mail::DKIM all read); Ed25519 keys are the
    base64 32-byte seed that dkimpy's signer takes.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        data = base64.b64encode(seed) + b"\n"
    path = key_file(directory, domain, selector, algorithm)
    try:
        write_secret(path, data)  # never replaces an existing key file
    except FileExistsError:
        raise FileExistsError(f"{path} exists: choose another selector (never reuse one for a new key)") from None
    return GeneratedKey(domain, selector, algorithm, path, txt_record_value(algorithm, public_key_bytes(key)))
