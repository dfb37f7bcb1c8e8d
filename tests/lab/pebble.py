"""A real ACME server for tests: Let's Encrypt's Pebble (Debian's ``pebble``) as our own process.

Pebble validates challenges for real: it resolves the names through the DNS server we give it
(``-dnsserver``, e.g. a tests/lab/nsd.py instance answering 127.0.0.1) and connects to
``http_port`` (HTTP-01) and ``tls_port`` (TLS-ALPN-01) on the address it found. Its own HTTPS
certificate comes from a small CA made here (``ca_file`` is what an ACME client must trust: the
backend's [acme] ca_bundle); the root that signs the certificates it issues is ``issuer_root()``.

    with NSD(zones) as ns, Pebble(dns=f"127.0.0.1:{ns.port}", http_port=8080) as pebble:
        directory = pebble.directory        # https://127.0.0.1:PORT/dir
        pebble.ca_file                      # trust this for the ACME API
        pebble.issuer_root()                # PEM of the root its certificates chain to

Environment (Pebble's README): PEBBLE_VA_NOSLEEP=1 (no random validation delay),
PEBBLE_VA_ALWAYS_VALID=0 (really validate), PEBBLE_AUTHZREUSE=0 (every order validates again),
PEBBLE_WFE_NONCEREJECT=``nonce_reject`` percent (0 unless a test asks for badNonce errors).
With ``netns_exec`` (e.g. ``["ip", "netns", "exec", "lab-internet"]``) it runs inside that network
namespace on its usual ports 14000 (ACME) and 15000 (management), and is asked from there too.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.lab.ports import free_port
from tests.lab.process import LabDaemon, stop_session

PEBBLE_BIN = "/usr/bin/pebble"
READY_TIMEOUT = 20.0


class PebbleError(Exception):
    """Pebble did not start; the message carries its output."""


def pebble_version() -> str:
    """The installed package's version (Pebble 2.4 prints none of its own)."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "pebble"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _tls_pair(address: str) -> tuple[bytes, bytes, bytes]:
    """(CA PEM, server certificate PEM, server key PEM) for Pebble's own HTTPS on ``address``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "homemx test Pebble API CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), leaf.public_bytes(pem), key_pem


class Pebble(LabDaemon):
    """One Pebble with its own working directory; a context manager that always stops it."""

    def __init__(
        self,
        *,
        dns: str,
        http_port: int = 5002,
        tls_port: int = 5001,
        address: str = "127.0.0.1",
        nonce_reject: int = 0,
        validity: int | None = None,
        netns_exec: Sequence[str] = (),
    ):
        self.dns = dns
        self.http_port, self.tls_port = http_port, tls_port
        self.address = address
        self.nonce_reject = nonce_reject
        self.validity = validity  # certificate lifetime in seconds (Pebble's default: 5 years)
        self.netns_exec = list(netns_exec)
        if self.netns_exec:
            # Inside a namespace the test owns the port space: Pebble's usual ports.
            self.port, self.management_port = 14000, 15000
        else:
            self.port, self.management_port = free_port(address), free_port(address)
        self.workdir = Path(tempfile.mkdtemp(prefix="homemx-pebble-"))
        self.ca_file = self.workdir / "api-ca.pem"
        self.proc: subprocess.Popen | None = None
        self._ca_pem, self._cert_pem, self._key_pem = _tls_pair(address)

    @property
    def directory(self) -> str:
        return f"https://{self.address}:{self.port}/dir"

    @property
    def api_ca_pem(self) -> bytes:
        """The CA of Pebble's own HTTPS (what ``ca_file`` holds once started), known before ``start()``:
        a lab can give the ACME client a copy it may read."""
        return self._ca_pem

    def _get(self, url: str, timeout: float) -> bytes:
        """GET over HTTPS trusting ``ca_file``, from where Pebble listens (its namespace, if any)."""
        if not self.netns_exec:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
                return r.read()
        cmd = [*self.netns_exec, "curl", "-sSf", "--max-time", str(timeout), "--cacert", str(self.ca_file), url]
        r = subprocess.run(cmd, capture_output=True)
        if r.returncode != 0:
            raise OSError(r.stderr.decode(errors="replace").strip())
        return r.stdout

    def _write(self) -> None:
        self.ca_file.write_bytes(self._ca_pem)
        (self.workdir / "cert.pem").write_bytes(self._cert_pem)
        (self.workdir / "key.pem").write_bytes(self._key_pem)
        conf = {
            "listenAddress": f"{self.address}:{self.port}",
            "managementListenAddress": f"{self.address}:{self.management_port}",
            "certificate": str(self.workdir / "cert.pem"),
            "privateKey": str(self.workdir / "key.pem"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            conf["certificateValidityPeriod"] = self.validity
        (self.workdir / "pebble.json").write_text(json.dumps({"pebble": conf}, indent=2))

    def start(self) -> "Pebble":
        if self.proc is not None:
            raise PebbleError("already started")
        self._write()
        env = dict(
            os.environ,
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_VA_ALWAYS_VALID="0",
            PEBBLE_AUTHZREUSE="0",
            PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject),
        )
        cmd = [*self.netns_exec, PEBBLE_BIN, "-config", str(self.workdir / "pebble.json"), "-dnsserver", self.dns]
        self.log_file = open(self.workdir / "pebble.log", "ab")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise PebbleError(f"pebble did not start on {self.directory}: {self.log().strip()}")
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PebbleError("pebble exited")
            try:
                self._get(self.directory, timeout=2)
                return
            except OSError:
                pass
            time.sleep(0.05)
        raise PebbleError("no answer within timeout")

    def log(self) -> str:
        try:
            return (self.workdir / "pebble.log").read_text(errors="replace")
        except OSError:
            return ""

    def issuer_root(self) -> bytes:
        """The PEM root Pebble's issued certificates chain to (its management interface; a new
        one every start)."""
        return self._get(f"https://{self.address}:{self.management_port}/roots/0", timeout=5)

    def intermediate(self) -> bytes:
        """The PEM intermediate that signs the certificates it issues (also new every start)."""
        return self._get(f"https://{self.address}:{self.management_port}/intermediates/0", timeout=5)

    def stop(self) -> None:
        """Stop Pebble (its whole session). Safe to call twice; the address and ports stay this
        object's, so ``start()`` again brings up a Pebble at the same directory URL (with a new
        root and no accounts: Pebble keeps everything in memory)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_session(proc)
        self.log_file.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

