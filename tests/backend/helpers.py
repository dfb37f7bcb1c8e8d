"""Test helpers for the backend: config files like a user's, users, certificates, raw SMTP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

from backend.tls.selfsigned import write_self_signed
from backend.receive.users import UserDB

DOMAIN = "example.org"
ALICE = "alice@example.org"
ALICE_PW = "alice-secret-pw"
BOB = "bob@example.org"
BOB_PW = "bob-secret-pw"
HOSTNAME = "mail.example.org"
VENV_BIN = Path(sys.executable).parent
BACKEND_CLI = str(VENV_BIN / "homemx-backend")

_CERT_CACHE: dict[str, tuple[bytes, bytes]] = {}


def write_cert(directory: Path, hostname: str = HOSTNAME) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    if hostname not in _CERT_CACHE:
        write_self_signed(cert, key, hostname)
        _CERT_CACHE[hostname] = (cert.read_bytes(), key.read_bytes())
    else:
        cert.write_bytes(_CERT_CACHE[hostname][0])
        key.write_bytes(_CERT_CACHE[hostname][1])
        os.chmod(key, 0o600)
    return cert, key


_PASSWD_CACHE: dict[tuple, str] = {}


def write_users(path: Path, users: dict[str, str]) -> None:
    """Passwd-file with bcrypt hashes (cached per run: bcrypt is deliberately slow)."""
    key = tuple(sorted(users.items()))
    if key not in _PASSWD_CACHE:
        db = UserDB(path)
        for addr, pw in users.items():
            db.add(addr, pw)
        _PASSWD_CACHE[key] = path.read_text()
    else:
        path.write_text(_PASSWD_CACHE[key])


def listener_block(name: str, kind: str, listen: str = "127.0.0.1:0", **extra) -> str:
    lines = ["[[listener]]", f'name = "{name}"', f'kind = "{kind}"', f'listen = "{listen}"']
    for k, v in extra.items():
        lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(
    tmp: Path,
    listeners: str,
    *,
    extra: str = "",
    users: dict[str, str] | None = None,
    aliases: dict | None = None,
    catch_all: str | None = None,
    server_extra: str = "",
) -> Path:
    cert, key = write_cert(tmp / "tls")
    write_users(tmp / "passwd", users if users is not None else {ALICE: ALICE_PW, BOB: BOB_PW})
    dom = f'[domain."{DOMAIN}"]\n'
    if aliases:
        dom += f"aliases = {toml_value(aliases)}\n"
    if catch_all:
        dom += f"catch_all = {toml_value(catch_all)}\n"
    # With no DNS to ask, every inbound check would wait for its timeout: tests of other things run
    # without them; tests of the checks (test_inbound_checks.py) configure [auth] and a real nsd.
    auth = "" if "[auth]" in extra else "[auth]\nenabled = false\n"
    # No DNS here either: the daemon's periodic DNS self-check would only time out and log
    # failures. Its own tests (test_dns_selfcheck.py) turn it on against a real nsd.
    dns = "" if "[dns]" in extra else "[dns]\nself_check_interval = 0\n"
    text = f"""[server]
hostname = "{HOSTNAME}"
data_dir = "{tmp}/data"
log_level = "debug"
{server_extra}

[tls]
cert = "{cert}"
key = "{key}"

[users]
passwd_file = "{tmp}/passwd"

{dom}
{listeners}
{auth}
{dns}
{extra}
"""
    if "[delivery]" not in extra:
        # Keep every DNS lookup of a test on loopback: a closed port answers "refused" at once,
        # so remote recipients are deferred instead of querying the machine's resolver.
        text += '\n[delivery]\nnameservers = ["127.0.0.1"]\ndns_port = 9\n'
    path = tmp / "backend.toml"
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def running_backend(cfg_path: Path):
    """A backend (every listener of ``cfg_path``) running in this event loop for the block."""
    from backend.config import load_config
    from backend.run import Backend

    b = Backend(load_config(cfg_path))
    await b.start()
    try:
        yield b
    finally:
        await b.stop(grace=0.5)


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def maildir_files(tmp: Path, address: str) -> list[Path]:
    local, _, domain = address.partition("@")
    new = tmp / "data" / "mail" / domain / local / "Maildir" / "new"
    return sorted(new.iterdir()) if new.exists() else []


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Wait on a condition (never a fixed sleep alone); returns its last truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def wait_for_sync(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class RawSMTP:
    """A byte-level SMTP client for protocol edge cases (smuggling, PROXY headers, pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", prefix: bytes = b"", local_addr=None) -> "RawSMTP":
        reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
        if prefix:
            writer.write(prefix)
            await writer.drain()
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("closed: " + "".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text + "\n")
            if len(text) < 4 or text[3] != "-":
                return "".join(lines).rstrip("\n")

    async def cmd(self, line: bytes | str) -> str:
        if isinstance(line, str):
            line = line.encode() + b"\r\n"
        self.writer.write(line)
        await self.writer.drain()
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_without_banner(self, timeout: float = 5.0) -> bool:
        data = await asyncio.wait_for(self.reader.read(1024), timeout)
        return data == b""

    async def starttls(self) -> None:
        await self.writer.start_tls(client_tls())

    def close(self) -> None:
        self.writer.close()


def run_cli(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([BACKEND_CLI, *args], capture_output=True, text=True, input=input, timeout=timeout)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


async def open_tls(port: int, ctx: ssl.SSLContext, *, starttls: bool, proxy_header: bytes = b"") -> RawSMTP:
    """A TLS session to a listener on loopback: STARTTLS after EHLO (submission, mx), or implicit TLS
    (submissions; after ``proxy_header`` when the listener reads one). The banner (and the EHLO
    before STARTTLS) are read; raises ssl.SSLError when the handshake fails."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    smtp = RawSMTP(reader, writer)
    if proxy_header:
        writer.write(proxy_header)
    if starttls:
        assert (await smtp.reply()).startswith("220")
        for line in (b"EHLO client.example\r\n", b"STARTTLS\r\n"):
            writer.write(line)
            await smtp.reply()
    try:
        await writer.start_tls(ctx)
    except BaseException:
        writer.close()
        raise
    if not starttls:
        assert (await smtp.reply()).startswith("220")
    return smtp


def peer_serial(smtp: RawSMTP) -> int:
    """The serial number of the certificate the server presented to this TLS session."""
    from cryptography import x509

    der = smtp.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number
