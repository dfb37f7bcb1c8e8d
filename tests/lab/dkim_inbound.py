"""Senders' side for the inbound DKIM and ARC tests: signing keys made when the tests run (no
private key is ever committed), their key records as zone lines for a real nsd, dkimpy as the
sending domain's signer and as the forwarders' ARC sealer, and the backend's AsyncDNSLookup
pointed at that nsd."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from backend.dkim.keys import public_key_bytes, txt_record_value, zone_txt_rdata
from backend.dns.lookup import AsyncDNSLookup
from backend.dns.resolver import make_resolver
from tests.lab.nsd import NSD

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@home.test>\r\n"
    b"Subject: inbound verification\r\n"
    b"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
    b"Message-ID: <inbound-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\nthe quarterly numbers are attached.\r\n"
)


@dataclass(frozen=True)
class SigningKey:
    """A sender's DKIM key: ``private`` in the form dkimpy's signer takes (PKCS#1 PEM for RSA,
    the base64 seed for Ed25519), ``txt`` the key record published at ``record_name``."""

    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256 | rsa-sha1
    private: bytes
    txt: str
    bits: int

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."

    def zone_line(self) -> str:
        return f"{self.record_name}\tIN\tTXT\t{zone_txt_rdata(self.txt)}"

    def sign(self, message: bytes, **kw) -> bytes:
        """``message`` with this key's DKIM-Signature prepended (dkimpy's signer, relaxed/relaxed)."""
        kw.setdefault("canonicalize", (b"relaxed", b"relaxed"))
        header = dkimpy.sign(
            message, self.selector.encode(), self.domain.encode(), self.private,
            signature_algorithm=self.algorithm.encode(), **kw,
        )  # fmt: skip
        return header + message

    def seal(self, message: bytes, authserv_id: str) -> bytes:
        """``message`` with the next ARC set prepended, sealed as the forwarder ``authserv_id`` whose
        Authentication-Results the message must carry (dkimpy's arc_sign, RSA only)."""
        headers = dkimpy.arc_sign(message, self.selector.encode(), self.domain.encode(), self.private, authserv_id.encode())
        assert headers, "arc_sign found no Authentication-Results of " + authserv_id
        return b"".join(headers) + message


def rsa_key(domain: str, selector: str, bits: int = 2048, algorithm: str = "rsa-sha256") -> SigningKey:
    if bits >= 1024:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        # cryptography refuses to make keys under 1024 bits (RFC 8301 says why); the 512-bit
        # fixture comes from openssl, which still does.
        pem = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], capture_output=True, check=True).stdout
        key = serialization.load_pem_private_key(pem, password=None)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return SigningKey(domain, selector, algorithm, private, txt_record_value("rsa", public_key_bytes(key)), key.key_size)


def ed25519_key(domain: str, selector: str) -> SigningKey:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    txt = txt_record_value("ed25519", public_key_bytes(key))
    return SigningKey(domain, selector, "ed25519-sha256", base64.b64encode(seed), txt, 256)


def nsd_lookup(ns: NSD, timeout: float = 3.0) -> AsyncDNSLookup:
    """The backend's async lookup, over the backend's resolver builder, asking only ``ns``."""
    return AsyncDNSLookup(make_resolver((ns.address,), ns.port, timeout))


class CountingLookup:
    """An AsyncDNSLookup that counts the TXT names it was asked (a real lookup underneath)."""

    def __init__(self, inner):
        self.inner = inner
        self.asked: list[str] = []

    async def txt(self, name: str) -> list[str]:
        self.asked.append(name)
        return await self.inner.txt(name)
