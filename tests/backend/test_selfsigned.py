"""backend/tls/selfsigned.py: a certificate for the name asked, whose key is 0600 and loads into a TLS context."""

from __future__ import annotations

import ssl
import stat

from cryptography import x509

from backend.tls.selfsigned import write_self_signed


def test_self_signed_certificate_names_the_host_and_its_key_is_private(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    key.write_bytes(b"an old key")
    key.chmod(0o644)
    write_self_signed(cert, key, "mail.example.test", days=10)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # replaced, not rewritten in place with the old mode
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    assert (c.not_valid_after_utc - c.not_valid_before_utc).days == 10
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # key matches the certificate
