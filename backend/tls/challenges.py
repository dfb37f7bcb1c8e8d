"""Pending ACME challenge answers, in memory: HTTP-01 key authorizations and TLS-ALPN-01 contexts.

One ``Challenges`` per Backend. The ACME client (backend/tls/acme.py) puts an answer here before it
tells the CA to validate and removes it afterwards; the HTTP face (backend/http/) answers
``/.well-known/acme-challenge/TOKEN`` from ``http01_response`` and the server TLS holder
(backend/tls/context.py) switches a handshake to ``tls_alpn_context(server_name)`` when one exists.
Everything runs on the event loop thread or is a single dict operation, so no lock is needed.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# RFC 8737 6.1: the ALPN protocol name a validating CA offers, and nothing else.
ACME_TLS_ALPN = "acme-tls/1"
# RFC 8737 6.1: id-pe-acmeIdentifier, the critical extension carrying SHA-256(key authorization).
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def _normal_name(name: str) -> str:
    # DNS names compare case-insensitively; an SNI never carries the root dot, a config might.
    return name.lower().rstrip(".")


def tls_alpn_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) answering a TLS-ALPN-01 challenge for ``name`` (RFC 8737 3).

    Self-signed, one dNSName SAN = ``name``, and the critical acmeIdentifier extension whose
    value is the DER OCTET STRING of SHA-256 over the key authorization. Built with cryptography
    because certbot's ``acme`` helper for this (TLSALPN01Response.gen_cert) needs pyOpenSSL.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # Authorization ::= OCTET STRING (SIZE (32)): tag 0x04, length 0x20, the digest.
        .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _alpn_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8737 4: TLS 1.2 or later
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    # The ssl module loads keys only from files: a private (0700) temporary directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="homemx-alpn-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Challenges:
    """The answers to the ACME challenges pending right now (nothing is persisted: a challenge
    outlives no process, the client starts a new order after a restart)."""

    def __init__(self) -> None:
        self.http01: dict[str, str] = {}  # token -> key authorization (RFC 8555 8.3)
        self._tls_alpn: dict[str, ssl.SSLContext] = {}  # lower-case name -> acme-tls/1 context

    # --- HTTP-01 (RFC 8555 8.3) ---
    def put_http01(self, token: str, key_authorization: str) -> None:
        self.http01[token] = key_authorization

    def remove_http01(self, token: str) -> None:
        self.http01.pop(token, None)

    def http01_response(self, token: str) -> str | None:
        """The body to serve at /.well-known/acme-challenge/``token``, or None (404)."""
        return self.http01.get(token)

    # --- TLS-ALPN-01 (RFC 8737) ---
    def put_tls_alpn(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        """Answer TLS-ALPN-01 for ``name`` with this certificate (see ``tls_alpn_certificate``)."""
        self._tls_alpn[_normal_name(name)] = _alpn_context(cert_pem, key_pem)

    def remove_tls_alpn(self, name: str) -> None:
        self._tls_alpn.pop(_normal_name(name), None)

    def tls_alpn_context(self, server_name: str | None) -> ssl.SSLContext | None:
        """The acme-tls/1 context to switch a handshake with this SNI to, or None (RFC 8737 3: the
        CA always sends SNI, so a handshake without one is never a challenge)."""
        if not server_name:
            return None
        return self._tls_alpn.get(_normal_name(server_name))
