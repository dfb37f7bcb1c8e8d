"""backend/tls/challenges.py: HTTP-01 answers by token; a TLS-ALPN-01 handshake over a real socket
negotiates acme-tls/1 and shows the RFC 8737 certificate for the name asked, and only for it."""

from __future__ import annotations

import asyncio
import hashlib
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from backend.tls.challenges import ACME_TLS_ALPN, ID_PE_ACME_IDENTIFIER, Challenges, tls_alpn_certificate
from backend.tls.selfsigned import make_self_signed


def test_http01_answer_is_served_until_removed():
    ch = Challenges()
    assert ch.http01_response("tok") is None
    ch.put_http01("tok", "tok.thumbprint")
    assert ch.http01_response("tok") == "tok.thumbprint"
    ch.remove_http01("tok")
    ch.remove_http01("tok")  # removing twice is harmless (cleanup after a failed order)
    assert ch.http01_response("tok") is None


def test_tls_alpn_certificate_carries_the_key_authorization_digest():
    cert_pem, _ = tls_alpn_certificate("mail.example.test", "tok.thumb")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert ext.critical  # RFC 8737 3: MUST be critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]


async def _handshake(port: int, server_name: str) -> tuple[str | None, x509.Certificate]:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # like the CA: it checks the extension, not a chain
    client.set_alpn_protocols([ACME_TLS_ALPN])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_name)
    obj = writer.get_extra_info("ssl_object")
    alpn, der = obj.selected_alpn_protocol(), obj.getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return alpn, x509.load_der_x509_certificate(der)


@pytest.mark.asyncio
async def test_tls_alpn_handshake_switches_to_the_challenge_context(tmp_path):
    ch = Challenges()
    cert_pem, key_pem = tls_alpn_certificate("Mail.Example.Test", "tok.thumb")
    ch.put_tls_alpn("mail.example.test.", cert_pem, key_pem)  # names compare without case or root dot

    # The server's ordinary context, switched per SNI the way backend/tls/context.py's holder does.
    normal_cert, normal_key = make_self_signed("mail.example.test")
    (tmp_path / "c.pem").write_bytes(normal_cert)
    (tmp_path / "k.pem").write_bytes(normal_key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    def sni(obj, name, _ctx):
        alt = ch.tls_alpn_context(name)
        if alt is not None:
            obj.context = alt

    server.sni_callback = sni

    async def serve(reader, writer):
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        alpn, cert = await _handshake(port, "mail.example.test")
        assert alpn == ACME_TLS_ALPN
        assert cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value.value[2:] == hashlib.sha256(b"tok.thumb").digest()

        alpn, cert = await _handshake(port, "other.example.test")  # no challenge for that name
        assert alpn is None
        assert cert.public_bytes(Encoding.PEM) == normal_cert

        ch.remove_tls_alpn("MAIL.example.test")
        assert ch.tls_alpn_context("mail.example.test") is None
        assert ch.tls_alpn_context(None) is None
        _, cert = await _handshake(port, "mail.example.test")
        assert cert.public_bytes(Encoding.PEM) == normal_cert
    finally:
        srv.close()
        await srv.wait_closed()

