"""The outbound-delivery lab: a test CA, real aiosmtpd receivers on 127.x addresses, a
loopback HTTPS server for MTA-STS policies, an nsd that can also answer SERVFAIL, and a queue/runner
harness driven by an injected clock."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backend.config import config_from_dict
from backend.deliver.remote import Deliverer
from backend.dns.resolver import make_resolver
from backend.metrics import BackendMetrics
from backend.deliver.mtasts import MTASTS, STORE_FILE, PolicyStore
from backend.queue.model import NewMessage, NewRecipient
from backend.queue.store import Queue
from backend.queue.runner import QueueRunner
from tests.lab.nsd import NSD

T0 = 1_700_000_000.0


# ---------------------------------------------------------------- certificates


class LabCA:
    """A throwaway certificate authority; ``issue`` gives leaf certificates for DNS names."""


    def __init__(self, directory: Path):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "homemx test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *more: str, days: float = 1) -> tuple[Path, Path]:
        """A leaf for ``name`` (and ``more``) valid for ``days`` more days (negative: expired that
        long ago)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        after = now + datetime.timedelta(days=days)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now, after) - datetime.timedelta(hours=1))
            .not_valid_after(after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in (name, *more)]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.dir / f"{name}.crt"
        key_path = self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    def server_context(self, name: str, *more: str, days: float = 1) -> ssl.SSLContext:
        cert, key = self.issue(name, *more, days=days)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        return ctx


def self_signed_context(directory: Path, name: str) -> ssl.SSLContext:
    """A server context with a certificate no client trusts (the "bad certificate" peer)."""
    from backend.tls.selfsigned import write_self_signed

    cert, key = directory / f"selfsigned-{name}.crt", directory / f"selfsigned-{name}.key"
    write_self_signed(cert, key, name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# ---------------------------------------------------------------- SMTP receivers


@dataclass
class Received:
    peer: str  # the address the receiver saw the connection come from
    sender: str
    rcpts: list[str]
    content: bytes
    tls: bool
    connection: int  # identifies the SMTP session (connection reuse)
    auth: str | None = None
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM parameters (SIZE, SMTPUTF8, ...)


@dataclass
class Sink:
    """An aiosmtpd handler that records what arrives and answers as told."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply (e.g. "550 5.1.1 ...")
    data_replies: list[str] = field(default_factory=list)  # consumed one per DATA; empty: 250
    data_delay: float = 0.0
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    mail_commands: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("2"):
                return reply
        login = session.auth_data
        self.messages.append(
            Received(
                peer=session.peer[0],
                sender=envelope.mail_from,
                rcpts=list(envelope.rcpt_tos),
                content=envelope.original_content,
                tls=session.ssl is not None,
                connection=id(server),
                auth=login.decode() if isinstance(login, bytes) else (str(login) if login else None),
                mail_options=list(envelope.mail_options),
            )
        )
        self.arrived.set()
        return "250 2.0.0 OK accepted"


def _authenticator(user: str, password: str):
    def check(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == user.encode() and auth_data.password == password.encode()
        return AuthResult(success=ok, auth_data=user if ok else None)

    return check


class Receivers:
    """Real aiosmtpd servers on several 127.x addresses, all on one port (the delivery.remote_port)."""

    def __init__(self):
        self.port: int | None = None
        self.servers: list[asyncio.base_events.Server] = []

    async def start(
        self,
        address: str,
        sink: Sink,
        *,
        hostname: str = "mx.test",
        tls_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        smtputf8: bool = False,
    ) -> Sink:
        def factory():
            kwargs = {}
            if auth is not None:
                kwargs = dict(auth_required=True, auth_require_tls=True, authenticator=_authenticator(*auth))
            if smtputf8:
                kwargs["enable_SMTPUTF8"] = True  # RFC 6531: offers SMTPUTF8, takes UTF-8 addresses
            proto = SMTP(sink, hostname=hostname, tls_context=tls_context, **kwargs)
            sink.connections += 1
            return proto

        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, address, self.port or 0)
        self.port = server.sockets[0].getsockname()[1]
        self.servers.append(server)
        return sink

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass


# ---------------------------------------------------------------- HTTPS for MTA-STS policies


class PolicyServer:
    """A minimal HTTPS server on loopback answering with the MTA-STS policy of the requested Host."""

    def __init__(self, ctx: ssl.SSLContext, bodies: dict[str, str], content_type: str = "text/plain"):
        self.ctx = ctx
        self.bodies = bodies
        self.content_type = content_type
        self.requests = 0
        self.server = None
        self.port = None

    async def _handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            self.requests += 1
            host = next((l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("host:")), "")
            body = self.bodies.get(host, "").encode()
            writer.write(
                f"HTTP/1.0 200 OK\r\nContent-Type: {self.content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def start(self, address: str = "127.0.0.1") -> "PolicyServer":
        self.server = await asyncio.start_server(self._handle, address, 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()


# ---------------------------------------------------------------- DNS


class ServfailNSD(NSD):
    """nsd with extra zones configured but never loadable: it answers SERVFAIL for them."""

    def __init__(self, zones, servfail_zones=(), **kw):
        super().__init__(zones, **kw)
        self.servfail_zones = tuple(servfail_zones)

    def _write(self) -> None:
        super()._write()
        conf = self.workdir / "nsd.conf"
        extra = "".join(f'zone:\n  name: {z}\n  zonefile: "{self.workdir}/{z}.missing"\n' for z in self.servfail_zones)
        conf.write_text(conf.read_text() + extra)


# ---------------------------------------------------------------- queue + runner harness


def backend_config(tmp: Path, *, delivery: dict, hostname: str = "mail.example.org", extra: dict | None = None):
    """A BackendConfig built through the real loader (unknown keys stay errors)."""
    raw = {
        "server": {"hostname": hostname, "data_dir": str(tmp / "data")},
        "users": {"passwd_file": str(tmp / "passwd")},
        "domain": {"example.org": {}},
        "listener": [{"name": "lan", "kind": "lan", "listen": "127.0.0.1:0", "trusted_networks": ["127.0.0.0/8"]}],
        "delivery": delivery,
    }
    raw.update(extra or {})
    return config_from_dict(raw, tmp / "backend.toml")


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


async def run_blocking(fn, *args):
    return await asyncio.to_thread(fn, *args)


class Harness:
    """Queue + QueueRunner + Deliverer on an injected clock: ``await h.round()`` is one runner pass."""

    def __init__(self, tmp: Path, config, *, ca_file=None, mtasts_port=None, signer=None, deliverer_options=None):
        self.clock = Clock()
        self.config = config
        self.queue = Queue(config.queue_db, now=self.clock)
        self.metrics = BackendMetrics()
        resolver = make_resolver(config.delivery.nameservers, config.delivery.dns_port, timeout=3.0)
        mtasts = None
        if config.delivery.mta_sts:
            # Policies persist in the data directory, as the daemon keeps them (a second harness
            # on the same tmp is a restart).
            mtasts = MTASTS(
                resolver, https_port=mtasts_port or 443, ca_file=str(ca_file) if ca_file else None, now=self.clock,
                store=PolicyStore(config.server.data_dir / STORE_FILE), run_blocking=run_blocking,
            )
        self.deliverer = Deliverer(
            config, self.queue, self.metrics, run_blocking, now=self.clock, resolver=resolver, mtasts=mtasts,
            ca_file=str(ca_file) if ca_file else None, signer=signer, **(deliverer_options or {}),
        )
        self.runner = QueueRunner(config, self.queue, self.metrics, run_blocking, remote=self.deliverer, now=self.clock)

    def submit(self, sender: str, rcpts: list[str], content: bytes | None = None, local: bool = False) -> str:
        content = content or (
            f"From: <{sender or 'mailer-daemon@example.org'}>\r\nTo: {', '.join(rcpts)}\r\n"
            f"Subject: test message\r\nMessage-ID: <t-{len(self.queue.list())}@example.org>\r\n\r\nHello.\r\n"
        ).encode()
        return self.queue.enqueue(
            NewMessage(sender=sender, recipients=tuple(NewRecipient(r, r, local) for r in rcpts), content=content, listener="lan")
        )

    async def round(self) -> None:
        await self.runner.run_once()
        await self.runner.drain(60)

    def states(self, qid: str) -> dict[str, tuple[str, str | None]]:
        return {r.address: (r.state, r.last_reply) for r in self.queue.get(qid).recipients}

    def others(self, qid: str) -> list:
        return [e for e in self.queue.list() if e.id != qid]

    def metric(self, name: str, labels: dict) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        await self.deliverer.close()
        await asyncio.to_thread(self.queue.close)


def addr_ok(a: str) -> bool:
    return ipaddress.ip_address(a).is_loopback
