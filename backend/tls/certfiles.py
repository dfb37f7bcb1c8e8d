"""Where the ACME certificate lives on disk: the live/ files every TLS user loads, installing a new
certificate and key as one step, the self-signed placeholder, and reading a certificate's facts.

Layout of config.acme_dir (0700): ``account.key`` (0600), ``account.json`` (the account URL),
``state.json`` (renewal state, backend/tls/renew.py), ``archive/<stamp>/{fullchain,privkey}.pem``
and ``live`` -> ``archive/<stamp>``, a symlink replaced atomically. The certificate and its key
are two files; swapping the directory they are read through means a reader (our TLS holder,
Dovecot) sees the old pair or the new pair, never a new key beside an old certificate.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from backend.durable import fsync_dir, write_atomic, write_secret
from backend.tls.selfsigned import make_self_signed

LIVE = "live"
ARCHIVE = "archive"
FULLCHAIN = "fullchain.pem"
PRIVKEY = "privkey.pem"
KEEP_ARCHIVES = 2  # the live pair and the one before it (an operator can go back by hand)


def live_paths(acme_dir: Path) -> tuple[Path, Path]:
    """(fullchain, private key) as TLS users should load them: through the live/ symlink."""
    live = Path(acme_dir) / LIVE
    return live / FULLCHAIN, live / PRIVKEY


@dataclass(frozen=True)
class CertInfo:
    """What the status command, the metrics and the renewal schedule need of a certificate."""

    names: tuple[str, ...]  # dNSName SANs, as issued
    issuer: str
    serial: int
    not_before: float  # Unix time
    not_after: float
    placeholder: bool  # self-signed (our stand-in until the first issuance)

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def days_left(self, now: float | None = None) -> float:
        return (self.not_after - (time.time() if now is None else now)) / 86400


def cert_info(pem: bytes) -> CertInfo:
    """The facts of the first (leaf) certificate in ``pem``."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(
        names=names,
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        placeholder=cert.issuer == cert.subject,
    )


def read_live(acme_dir: Path) -> CertInfo | None:
    """The live certificate's facts, or None when there is none (or it cannot be parsed)."""
    try:
        return cert_info(live_paths(acme_dir)[0].read_bytes())
    except (OSError, ValueError):
        return None


def install(acme_dir: Path, fullchain_pem: bytes, key_pem: bytes) -> Path:
    """Make this pair the live one: both files written (key 0600) into a new archive directory,
    then the live symlink swapped in one rename(2). Returns the new archive directory."""
    acme_dir = Path(acme_dir)
    ensure_dir(acme_dir)
    archive = acme_dir / ARCHIVE
    archive.mkdir(mode=0o700, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = archive / stamp
    target.mkdir(mode=0o700)
    write_secret(target / PRIVKEY, key_pem)
    write_atomic(target / FULLCHAIN, fullchain_pem, 0o644)
    tmp = acme_dir / f".{LIVE}.{os.getpid()}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(Path(ARCHIVE) / stamp, tmp)  # relative: the directory can be moved or mounted elsewhere
    os.replace(tmp, acme_dir / LIVE)
    fsync_dir(acme_dir)
    _prune(archive, keep=stamp)
    return target


def _prune(archive: Path, keep: str) -> None:
    old = sorted(p.name for p in archive.iterdir() if p.is_dir() and p.name != keep)
    for name in old[: max(0, len(old) - (KEEP_ARCHIVES - 1))]:
        shutil.rmtree(archive / name, ignore_errors=True)


def ensure_dir(acme_dir: Path) -> None:
    """Create acme_dir 0700 (it holds the account key); tighten it when it exists looser."""
    acme_dir = Path(acme_dir)
    acme_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(acme_dir, 0o700)


def ensure_placeholder(acme_dir: Path, hostname: str) -> bool:
    """Install a self-signed certificate for ``hostname`` when nothing is live yet, so TLS works
    from the first start; the renewer replaces it at once. True when one was written."""
    if live_paths(acme_dir)[0].exists():
        return False
    cert_pem, key_pem = make_self_signed(hostname, days=30)
    install(acme_dir, cert_pem, key_pem)
    return True


def private_key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
