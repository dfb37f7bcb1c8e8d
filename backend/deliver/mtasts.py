"""MTA-STS (RFC 8461): discover a destination's policy (TXT + HTTPS), cache it durably, and say which MX hosts it allows.

Pure parsing (``parse_txt``, ``parse_policy``, ``mx_matches``) sits apart from the lookups
(``MTASTS.policy``). The policy is fetched with aiohttp (one ClientSession per MTASTS, closed with
it), the host resolved through our own resolver. The fetcher is injectable, and the default one
takes the HTTPS port and CA file as parameters, so tests can serve a policy from a loopback HTTPS
server with their own CA.

The cache outlives the process (``PolicyStore``, a small SQLite file in the data directory): RFC
8461 5.1 keeps a cached policy in force until its max_age even when a refresh fails, and an
attacker who blocks the policy host must not win by waiting for a restart (issue 11 point 4).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from backend.dns.resolver import ASYNCIO
from backend.tls.context import client_context

log = logging.getLogger("homemx.mtasts")

MODES = ("enforce", "testing", "none")
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: senders may limit the policy size; 64 KiB as in mox
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: max_age is at most one year
FETCH_TIMEOUT = 60.0  # RFC 8461 3.3 suggests a timeout of one minute or more
POLICY_PATH = "/.well-known/mta-sts.txt"

_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")


class MTASTSError(Exception):
    """A policy that could not be fetched or parsed; the message says why."""


@dataclass(frozen=True)
class Policy:
    """One domain's MTA-STS policy as fetched (RFC 8461 3.2)."""

    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # patterns: "mx.example.net" or "*.example.net"
    max_age: int
    id: str | None = None  # the TXT id it was fetched under
    fetched: float = 0.0

    def expires(self) -> float:
        return self.fetched + self.max_age

    def allows(self, mx_host: str) -> bool:
        return any(mx_matches(p, mx_host) for p in self.mx)


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the ``_mta-sts`` TXT records, or None when there is no valid one.

    RFC 8461 3.1: records not starting with ``v=STSv1`` are ignored; more than one STS record
    means no policy; the id is 1-32 alphanumerics.
    """
    sts = [r for r in records if re.match(r"^v=STSv1\s*(;|$)", r)]
    if len(sts) != 1:
        return None
    fields = {}
    for part in sts[0].split(";"):
        k, eq, v = part.strip().partition("=")
        if eq:
            fields.setdefault(k.strip(), v.strip())
    pid = fields.get("id")
    return pid if pid and _ID_RE.match(pid) else None


def parse_policy(text: str, policy_id: str | None = None, fetched: float = 0.0) -> Policy:
    """Parse a policy body (RFC 8461 3.2). Raises MTASTSError naming the problem."""
    fields: dict[str, list[str]] = {}
    for line in re.split(r"\r?\n", text):
        if not line.strip():
            continue
        k, colon, v = line.partition(":")
        if not colon:
            raise MTASTSError(f"policy line without ':': {line[:80]!r}")
        fields.setdefault(k.strip(), []).append(v.strip())
    if fields.get("version") != ["STSv1"]:
        raise MTASTSError(f"policy version is {fields.get('version')!r}, not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in MODES:
        raise MTASTSError(f"policy mode {mode!r} is not one of {', '.join(MODES)}")
    raw_age = (fields.get("max_age") or [""])[0]
    if not raw_age.isdigit() or len(raw_age) > 10:
        raise MTASTSError(f"policy max_age {raw_age!r} is not a number of seconds")
    max_age = min(int(raw_age), MAX_AGE_LIMIT)
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if mode != "none" and not mx:
        raise MTASTSError("policy names no mx")
    return Policy(mode=mode, mx=mx, max_age=max_age, id=policy_id, fetched=fetched)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact match, or ``*.`` matching exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(dot and label) and rest == pattern[2:]
    return host == pattern


Fetcher = Callable[[str], Awaitable[str]]

STORE_FILE = "mta-sts.sqlite3"  # in the data directory, beside the queue

_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    domain    TEXT PRIMARY KEY,
    policy_id TEXT,                 -- the TXT id it was fetched under (RFC 8461 3.1)
    mode      TEXT NOT NULL,
    mx        TEXT NOT NULL,        -- the mx patterns, one per line
    max_age   INTEGER NOT NULL,
    fetched   REAL NOT NULL,
    expires   REAL NOT NULL         -- fetched + max_age: never applied after this
);
"""


class PolicyStore:
    """Durable MTA-STS policy cache in its own SQLite file. Blocking: call from a worker thread.

    A separate file rather than a table in the queue database: it is written rarely (once per
    fetched policy), never in a transaction with queue state, and losing it costs only refetches.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")  # a policy we act on survives power loss
            db.executescript(_STORE_SCHEMA)
            self._db = db
        return self._db

    def load(self, now: float) -> dict[str, Policy]:
        """Every policy still within its max_age (expired rows are removed)."""
        with self._lock:
            db = self._conn()
            db.execute("DELETE FROM policy WHERE expires <= ?", (now,))
            rows = db.execute("SELECT domain, policy_id, mode, mx, max_age, fetched FROM policy").fetchall()
        return {
            domain: Policy(mode=mode, mx=tuple(m for m in mx.split("\n") if m), max_age=max_age, id=pid, fetched=fetched)
            for domain, pid, mode, mx, max_age, fetched in rows
        }

    def save(self, domain: str, policy: Policy) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO policy (domain, policy_id, mode, mx, max_age, fetched, expires)"
                " VALUES (?,?,?,?,?,?,?)",
                (domain, policy.id, policy.mode, "\n".join(policy.mx), policy.max_age, policy.fetched, policy.expires()),
            )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


async def _to_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


class MTASTS:
    """Policy lookups with a cache (RFC 8461 5.1: a cached policy stays in force until it expires
    even if the TXT record disappears or the refresh fails, which is what defeats an attacker
    stripping DNS or blocking the policy host). With a ``store`` the cache survives restarts."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        fetcher: Fetcher | None = None,
        https_port: int = 443,
        ca_file: str | None = None,
        now: Callable[[], float] = time.time,
        timeout: float = FETCH_TIMEOUT,
        store: PolicyStore | None = None,
        run_blocking: Callable[..., Awaitable] = _to_thread,
    ):
        self.resolver = resolver
        self.fetcher = fetcher or self.fetch_https
        self.https_port = https_port
        self.ca_file = ca_file
        self.now = now
        self.timeout = timeout
        self._cache: dict[str, Policy] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.store = store
        self.run_blocking = run_blocking
        self._loaded: asyncio.Future | None = None  # the one load of the store, shared by all callers
        self._http: aiohttp.ClientSession | None = None  # one HTTP client (and connection pool) per MTASTS
        # The last policy fetch that failed, per domain, until TLS-RPT takes it (reports/tlsrpt.py):
        # ("fetch" | "invalid", the error). "invalid": the body came but is no policy.
        self.failures: dict[str, tuple[str, Exception]] = {}

    async def _load_store(self) -> None:
        """Fill the cache from the store once (the first lookup after start waits for it)."""
        if self.store is None:
            return
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(self._read_store())
        await asyncio.shield(self._loaded)

    async def _read_store(self) -> None:
        try:
            stored = await self.run_blocking(self.store.load, self.now())
        except Exception as e:  # noqa: BLE001 - an unreadable store costs refetches, not delivery
            log.error("mta-sts: cannot read the policy store %s: %s", self.store.path, e)
            return
        for domain, pol in stored.items():
            self._cache.setdefault(domain, pol)
        if stored:
            log.info("mta-sts: %d cached policies loaded from %s", len(stored), self.store.path)

    async def _txt_id(self, domain: str) -> tuple[str | None, bool]:
        """(policy id, whether the answer is authoritative). A DNS failure is not "no policy"."""
        try:
            ans = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", backend=ASYNCIO)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None, True
        except dns.exception.DNSException as e:
            log.info("mta-sts: TXT lookup for %s failed: %s", domain, e)
            return None, False
        records = [b"".join(r.strings).decode("ascii", "replace") for r in ans]
        return parse_txt(records), True

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for ``domain`` (None: the domain publishes none we can use)."""
        domain = domain.lower().rstrip(".")
        # Several messages to one domain at once share one lookup and fetch.
        fut = self._inflight.get(domain)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.ensure_future(self._policy(domain))
        self._inflight[domain] = fut
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._inflight.pop(domain, None)
            else:
                fut.add_done_callback(lambda _f: self._inflight.pop(domain, None))

    async def _policy(self, domain: str) -> Policy | None:
        await self._load_store()
        now = self.now()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires() <= now:
            del self._cache[domain]
            cached = None
        pid, _ = await self._txt_id(domain)
        if pid is None:
            return cached
        if cached is not None and cached.id == pid:
            return cached
        text = None
        try:
            text = await asyncio.wait_for(self.fetcher(domain), self.timeout)
            pol = parse_policy(text, pid, now)
        except (MTASTSError, aiohttp.ClientError, OSError, asyncio.TimeoutError, dns.exception.DNSException) as e:
            # RFC 8461 5.1: on a failed refresh keep using a still-valid cached policy; with none,
            # deliver as if the domain had no policy (it is not an error to skip MTA-STS then).
            log.warning("mta-sts: policy fetch for %s failed: %s", domain, e)
            self.failures[domain] = ("invalid" if text is not None else "fetch", e)
            return cached
        self._cache[domain] = pol
        if self.store is not None:
            try:
                await self.run_blocking(self.store.save, domain, pol)
            except Exception as e:  # noqa: BLE001 - still applied now; only a restart would forget it
                log.error("mta-sts: cannot store the policy of %s in %s: %s", domain, self.store.path, e)
        log.info("mta-sts: %s policy mode=%s mx=%s max_age=%d", domain, pol.mode, ",".join(pol.mx), pol.max_age)
        return pol

    def _client(self) -> aiohttp.ClientSession:
        """The one HTTP client of this MTASTS (created on first use, inside the running loop)."""
        if self._http is None:
            ctx = client_context(True, self.ca_file)  # verified, TLS 1.2+: RFC 8461 3.3
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=ctx, resolver=_PolicyHostResolver(self.resolver, self.https_port), use_dns_cache=False
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                # The body is read as sent and capped as sent: no decompression that could turn
                # 64 KiB on the wire into much more in memory.
                auto_decompress=False,
                headers={"User-Agent": "homemx", "Accept-Encoding": "identity"},
            )
        return self._http

    async def fetch_https(self, domain: str) -> str:
        """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt with a verified certificate (RFC 8461 3.3)."""
        host = f"mta-sts.{domain}"
        # RFC 8461 3.3: redirects are not followed; only a 200 answer is a policy.
        async with self._client().get(f"https://{host}{POLICY_PATH}", allow_redirects=False) as resp:
            if resp.status != 200:
                raise MTASTSError(f"{host} answered HTTP {resp.status}")
            if resp.content_type != "text/plain":
                raise MTASTSError(f"{host} served the policy as {resp.content_type!r}, not text/plain")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(8192):
                body += chunk
                if len(body) > MAX_POLICY_BYTES:
                    raise MTASTSError(f"policy at {host} exceeds {MAX_POLICY_BYTES} bytes")
        return body.decode("utf-8", "replace")

    async def close(self) -> None:
        """Close the HTTP client and the policy store (daemon shutdown)."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
        if self.store is not None:
            await self.run_blocking(self.store.close)


class _PolicyHostResolver(AbstractResolver):
    """aiohttp's name-resolution seam: the policy host is resolved through our dnspython resolver
    (the configured nameservers, not the system's). The connection goes to ``port``, so tests can
    point it at a loopback HTTPS server while the URL and Host header keep RFC 8461's form."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, port: int):
        self.resolver = resolver
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for rtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                ans = await self.resolver.resolve(host, rtype, backend=ASYNCIO)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            results += [
                ResolveResult(hostname=host, host=r.address, port=self.port, family=fam, proto=0, flags=0) for r in ans
            ]
        if not results:
            # As the system resolver would: aiohttp reports it as a ClientConnectorDNSError.
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        return results

    async def close(self) -> None:
        pass
