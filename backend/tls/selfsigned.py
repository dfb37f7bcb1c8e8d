"""Self-signed certificates: the one way homemx makes a certificate for a host name that has none yet
(the demo, a first provisioning before the user brings a real one, tests)."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backend.durable import write_atomic, write_secret


def make_self_signed(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 private key PEM) for ``hostname``: ECDSA P-256, SAN = the name."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a peer's clock a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)  # RFC 6125: SAN, not CN
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_self_signed(cert_path: Path, key_path: Path, hostname: str, days: int = 365) -> None:
    """Write a new self-signed certificate (0644) and its key (0600 from creation), replacing any there.

    The key is written first: a crash in between leaves a new key beside an old certificate, which
    TLS setup refuses loudly, never a certificate whose key is lost.
    """
    cert_pem, key_pem = make_self_signed(hostname, days)
    write_secret(Path(key_path), key_pem, replace=True)
    write_atomic(Path(cert_path), cert_pem, 0o644)
