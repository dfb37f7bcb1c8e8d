"""DKIM signing of outbound mail: key loading and caching, key generation, TXT records, and signing.

dkimpy builds and canonicalises the DKIM-Signature header (RFC 6376, relaxed/relaxed); the RSA
private-key operation goes through ``cryptography`` (OpenSSL) instead of dkimpy's pure-Python
arithmetic, and Ed25519 (RFC 8463) goes through PyNaCl/libsodium as dkimpy already does.

Every function here is thread-safe: the caller runs ``sign_message`` in a worker thread so that
the CPU work never blocks the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import dkim as _dkimpy
import dkim.canonicalization as _dkimpy_canon
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from backend.smtp.message import crlf_canonical, from_addresses, split_header

RSA_BITS = 2048  # RFC 8301 3.2: signers MUST use at least 1024 bits, SHOULD use 2048
ALGORITHMS = ("rsa", "ed25519")
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


class DKIMKeyLike(Protocol):
    """What signing needs from a key entry (config.DKIMKeyConfig fits)."""

    domain: str
    selector: str
    algorithm: str
    private_key: Path


class DKIMKeyError(Exception):
    """A DKIM private key file cannot be read or is not a key of the expected algorithm."""


# ---------------------------------------------------------------- fast RSA seam
#
# Theory of operation. dkimpy's DKIM.sign() does, in order:
#   pk = parse_pem_private_key(privkey)           # module global of the ``dkim`` package
#   ... canonicalise body, build the tag list ...
#   gen_header(...) → h = hash of canonical headers; sig = RSASSA_PKCS1_v1_5_sign(h, pk)
# Both names are looked up as globals of the ``dkim`` module at call time, and nothing else
# touches ``pk`` on the RSA path. That is the seam: we replace both globals with type
# dispatchers. When dkimpy is handed an ``_OpenSSLRSAKey`` (instead of PEM bytes) the parser
# returns it unchanged and the signer performs RSASSA-PKCS1-v1_5 (RFC 8017 8.2.1) over the very
# digest dkimpy computed, through OpenSSL. Any other argument goes to dkimpy's own functions, so
# other users of dkimpy (and the benchmark's pure path) are unaffected. The result is bit-for-bit
# what dkimpy's own code produces (PKCS#1 v1.5 signatures are deterministic), which the tests
# check, besides checking that independent verifiers accept it.


class _OpenSSLRSAKey:
    """An RSA private key held by cryptography/OpenSSL, recognised by the dkimpy seam below."""

    __slots__ = ("key",)

    def __init__(self, key: rsa.RSAPrivateKey):
        self.key = key


_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}
_dkimpy_parse_pem_private_key = _dkimpy.parse_pem_private_key
_dkimpy_rsa_sign = _dkimpy.RSASSA_PKCS1_v1_5_sign


def _parse_pem_private_key(data):
    if isinstance(data, _OpenSSLRSAKey):
        return data
    return _dkimpy_parse_pem_private_key(data)


def _rsassa_pkcs1_v1_5_sign(hash_obj, private_key):
    if isinstance(private_key, _OpenSSLRSAKey):
        # Prehashed: dkimpy already hashed the canonical header block; OpenSSL adds the
        # DigestInfo (EMSA-PKCS1-v1_5) and does the private-key operation.
        return private_key.key.sign(hash_obj.digest(), padding.PKCS1v15(), Prehashed(_HASHES[hash_obj.name.lower()]))
    return _dkimpy_rsa_sign(hash_obj, private_key)


# Relaxed canonicalisation (RFC 6376 3.4.4) replaces every run of WSP with one space. dkimpy does
# it with re.sub(b"[\t ]+", b" "), which rewrites every single space of a text body as well: about
# half of the cost of signing a 1 MB message. Only runs that are not already one space need
# replacing; the output is byte-identical (tests compare both on random input).
_dkimpy_compress_whitespace = _dkimpy_canon.compress_whitespace
_WSP_RUN_NOT_SINGLE_SPACE = re.compile(rb"\t[\t ]*| [\t ]+")


def _compress_whitespace(content: bytes) -> bytes:
    return _WSP_RUN_NOT_SINGLE_SPACE.sub(b" ", content)


_install_lock = threading.Lock()


def _install_fast_rsa() -> None:
    # Installed once, at import; idempotent and guarded, so concurrent importers cannot race.
    with _install_lock:
        if _dkimpy.RSASSA_PKCS1_v1_5_sign is not _rsassa_pkcs1_v1_5_sign:
            _dkimpy.parse_pem_private_key = _parse_pem_private_key
            _dkimpy.RSASSA_PKCS1_v1_5_sign = _rsassa_pkcs1_v1_5_sign
            _dkimpy_canon.compress_whitespace = _compress_whitespace


_install_fast_rsa()


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class LoadedKey:
    """A private key loaded once and kept: what dkimpy's signer receives, plus the public half."""

    domain: str
    selector: str
    algorithm: str  # rsa | ed25519
    signer_key: object  # _OpenSSLRSAKey for rsa; base64 seed bytes (dkimpy's format) for ed25519
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


def load_key(entry: DKIMKeyLike) -> LoadedKey:
    """Load (once) the key an entry names. Reloaded when the file changes (key rotation)."""
    path = Path(entry.private_key)
    try:
        st = path.stat()
    except OSError as e:
        raise DKIMKeyError(f"{path}: cannot read: {e.strerror}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    ident = (str(path), entry.algorithm, entry.domain.lower(), entry.selector)
    with _cache_lock:
        hit = _key_cache.get(ident)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    key = load_private_key(path, entry.algorithm)
    if entry.algorithm == "rsa":
        signer_key: object = _OpenSSLRSAKey(key)
    else:
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        signer_key = base64.b64encode(seed)
    loaded = LoadedKey(entry.domain.lower(), entry.selector, entry.algorithm, signer_key, public_key_bytes(key))
    with _cache_lock:
        _key_cache[ident] = (stamp, loaded)
    return loaded


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


def _write_secret(path: Path, data: bytes) -> None:
    # Created 0600 from the start (O_EXCL: never overwrite an existing key by accident); the
    # umask cannot widen it and there is no window where the key is world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _write_secret(path, data)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: choose another selector (never reuse one for a new key)") from None
    return GeneratedKey(domain, selector, algorithm, path, txt_record_value(algorithm, public_key_bytes(key)))


# ---------------------------------------------------------------- signing


def _header_block(message: bytes) -> bytes:
    return split_header(message)[0]


def _header_names(message: bytes) -> list[bytes]:
    names = []
    for line in _header_block(message).split(b"\r\n"):
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
    for addr in from_addresses(_header_block(message)) or ():
        if "@" in addr:
            return addr.rpartition("@")[2].strip().rstrip(">").lower()
    return None


def _unfolded_headers(message: bytes) -> Iterable[str]:
    text = _header_block(message).decode("utf-8", "replace")
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
    _fast_rsa: bool = True,
) -> bytes:
    """Return ``message`` (made CRLF-canonical) with one DKIM-Signature header prepended per key.

    With ``select_by_from`` (the default) only the keys for the From domain sign (see
    ``keys_for_domain``); otherwise every key given signs. A message with no matching key comes
    back canonicalised but unsigned. relaxed/relaxed canonicalisation, From oversigned.
    Thread-safe: a fresh dkimpy signer per signature, keys shared read-only.
    """
    message, signatures = make_signatures(message, keys, select_by_from=select_by_from, _fast_rsa=_fast_rsa)
    return b"".join(signatures) + message


def make_signatures(
    message: bytes,
    keys: Sequence[DKIMKeyLike],
    *,
    select_by_from: bool = True,
    _fast_rsa: bool = True,
) -> tuple[bytes, list[bytes]]:
    """(the CRLF-canonical message, its DKIM-Signature header fields): what ``sign_message``
    joins, for callers that want the signatures themselves (metrics count them)."""
    message = crlf_canonical(message)
    chosen = keys_for_domain(from_domain(message), keys) if select_by_from else list(keys)
    if not chosen:
        return message, []
    include = headers_to_sign(message)
    if b"from" not in include[:-1]:
        raise ValueError("message has no From header: RFC 6376 5.4 requires From to be signed")
    signatures = []
    # One dkimpy object per call (never shared between threads); it parses the message once and
    # signs once per key (sign() recomputes every per-signature field).
    d = _dkimpy.DKIM(message, linesep=b"\r\n")
    for entry in chosen:
        loaded = load_key(entry)
        signer_key = loaded.signer_key
        if not _fast_rsa and loaded.algorithm == "rsa":
            # Benchmark/test hook: dkimpy's own pure-Python RSA from the PEM bytes.
            signer_key = Path(entry.private_key).read_bytes()
        sig = d.sign(
            loaded.selector.encode("ascii"),
            loaded.domain.encode("ascii"),
            signer_key,
            signature_algorithm=SIGNATURE_ALGORITHM[loaded.algorithm],
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        signatures.append(sig)
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


def body_hash_sha256(message: bytes) -> str:
    """Base64 SHA-256 of a relaxed-canonical body (diagnostics: compare with a signature's bh=)."""
    from dkim.canonicalization import Relaxed

    body = crlf_canonical(message).partition(b"\r\n\r\n")[2]
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(body)).digest()).decode()
