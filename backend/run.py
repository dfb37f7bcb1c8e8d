"""The backend daemon's run loop: config → queue/users/metrics → listeners → queue runner → signals, and
a watchdog that stops the daemon (exit status 1, so systemd restarts it) when a vital worker died."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import signal
import ssl

from backend.auth import inbound
from backend.deliver import outbound
from backend.http.server import HTTPFace
from backend.http.api import APIServer
from backend.http.apikeys import KeyStore
from backend.accept import Acceptor
from backend.config import BackendConfig
from backend.dns.selfcheck import DNSSelfCheck
from backend.receive.directory import Directory
from backend.metrics import BackendMetrics
from backend.queue.store import Queue
from backend.queue.runner import QueueRunner, wake_path
from backend.http.webhooks import WebhookSender
from backend.reports.tlsrpt import Reporter as TLSReporter
from backend.receive.authlimit import AuthLimiter
from backend.receive.context import PROXY_TIMEOUT, ListenerContext
from backend.receive.sessions import SessionRegistry
from backend.receive.smtpd import protocol_factory
from backend.tls.context import ServerTLS
from backend.receive.users import UserDB
from backend.tls import renew
from backend.tls.challenges import Challenges

log = logging.getLogger("homemx.backend")

SHUTDOWN_GRACE = 10.0
WATCHDOG_INTERVAL = 1.0  # how often the vital workers are checked


class Backend:
    """One running backend. ``start`` binds every listener; ``stop`` closes them and drains."""

    def __init__(self, config: BackendConfig, proxy_timeout: float = PROXY_TIMEOUT):
        self.config = config
        self.proxy_timeout = proxy_timeout
        # One of each for all listeners: a lockout earned on one port holds on the others, and a
        # shutdown drains every session.
        self.auth_limiter = AuthLimiter()
        self.sessions = SessionRegistry()
        self.metrics = BackendMetrics()
        # SQLite commits, bcrypt and signing run here; a few threads are plenty on a home box.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="backend-io")
        self.queue: Queue | None = None
        self.servers: list[asyncio.base_events.Server] = []
        self.runner: QueueRunner | None = None
        self._runner_task: asyncio.Task | None = None
        self.webhooks: WebhookSender | None = None  # delivery events of API keys (backend/http/webhooks.py)
        self._webhooks_task: asyncio.Task | None = None
        self._tlsrpt_task: asyncio.Task | None = None  # daily TLS-RPT reports (backend/reports/tlsrpt.py)
        self.dns_self_check: DNSSelfCheck | None = None  # [dns] self_check_interval (backend/dns/selfcheck.py)
        self._self_check_task: asyncio.Task | None = None
        self.metrics_server = None
        self.signer = None
        self.remote = None
        self.acceptor: Acceptor | None = None  # the one accept pipeline every front end calls
        self.checks: inbound.InboundChecks | None = None  # SPF/DKIM/DMARC/ARC and rspamd on mx (auth/)
        self.http_face: HTTPFace | None = None  # the web face (backend/http/), when [http] enabled
        self.api: APIServer | None = None  # the HTTP send API (backend/http/api.py), when [api] enabled
        # Pending ACME answers: the HTTP face serves http-01 tokens, the TLS holder tls-alpn-01 (443).
        self.challenges = Challenges()
        self.renewer: renew.Renewer | None = None  # ACME issuance and renewal (backend/tls/renew.py)
        self._renew_task: asyncio.Task | None = None
        self.server_tls: ServerTLS | None = None  # the certificate every TLS listener serves; reload() swaps it
        self.users: UserDB | None = None

    async def run_blocking(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    def _outbound(self) -> None:
        """DKIM signing and outbound delivery (backend/deliver/outbound.py); a broken key stops the start."""
        self.signer, self.remote = outbound.build(self)

    def reload(self) -> bool:
        """Re-read what changes without a restart (SIGHUP, and after an ACME renewal): the
        certificate and key (new handshakes get them, sessions open keep theirs), the passwd file,
        and the [[dkim]] tables with their keys. A part that cannot be read keeps what is in
        service. One log line says what changed or why not; returns whether every part loaded.
        Runs on the event loop thread: a few small files, read in milliseconds."""
        outcomes = []
        if self.server_tls is not None:
            outcomes.append(self.server_tls.reload(quiet=True))
        if self.users is not None:
            outcomes.append(self.users.reload())
        outcomes.append(outbound.reload_keys(self))
        ok = all(loaded for loaded, _ in outcomes)
        log.log(logging.INFO if ok else logging.WARNING, "reload%s: %s",
                "" if ok else " (some parts kept)", "; ".join(text for _, text in outcomes))
        return ok

    async def start(self) -> None:
        cfg = self.config
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
        self.queue = await self.run_blocking(
            functools.partial(Queue, cfg.queue_db, max_age=cfg.delivery.max_queue_age)
        )
        orphans = await self.run_blocking(self.queue.remove_orphans)
        if orphans:
            log.info("removed %d spooled bodies without a queue record (interrupted before their 250)", orphans)
        users = self.users = UserDB(cfg.passwd_file)
        directory = Directory(cfg, users)
        self.metrics.watch_queue(self.queue.stats)
        self.metrics.watch_disks({"queue": cfg.server.data_dir, "maildir": cfg.maildir_root})
        loop = asyncio.get_running_loop()
        if cfg.acme.enabled and await self.run_blocking(renew.prepare, cfg):
            # TLS works from the first start; the renewer replaces this at once.
            log.info("ACME: no certificate yet; serving a self-signed placeholder until one is issued")
        try:
            # An unusable certificate or DKIM key stops the start (cmd_run prints one line).
            self.server_tls = ServerTLS.from_config(cfg, getattr(self, "challenges", None))
            # Bound once: each handshake gets the holder's current certificate (SIGHUP, renewals).
            tls = self.server_tls.front_context() if self.server_tls is not None else None
            self._outbound()
            self.checks = inbound.build(cfg, self.metrics, self.run_blocking)
            self.acceptor = Acceptor(cfg, self.queue, directory, self.metrics, self.run_blocking, self.signer,
                                     self.checks)
            for lc in cfg.listeners:
                ctx = ListenerContext(
                    config=cfg,
                    listener=lc,
                    directory=directory,
                    users=users,
                    queue=self.queue,
                    metrics=self.metrics,
                    tls_context=tls,
                    auth_limiter=self.auth_limiter,
                    sessions=self.sessions,
                    acceptor=self.acceptor,
                    run_blocking=self.run_blocking,
                    proxy_timeout=self.proxy_timeout,
                )
                # Implicit TLS: the event loop does the handshake, unless a PROXY header comes
                # first (then the session starts TLS itself after reading it).
                server_ssl: ssl.SSLContext | None = tls if lc.kind == "submissions" and not lc.proxy_protocol else None
                host, port = lc.listen
                server = await loop.create_server(protocol_factory(ctx), host, port, ssl=server_ssl, reuse_address=True)
                self.servers.append(server)
                bound = server.sockets[0].getsockname()
                log.info("listener %s (%s) on %s port %d", lc.name, lc.kind, bound[0], bound[1])
            if cfg.http.enabled:
                # 443 answers TLS-ALPN-01 too (acme=True): a CA validating a name connects there.
                https_tls = self.server_tls.front_context(acme=True) if self.server_tls is not None else None
                self.http_face = HTTPFace(cfg, tls_context=https_tls, challenges=self.challenges,
                                          metrics=self.metrics, proxy_timeout=self.proxy_timeout)
                await self.http_face.start()
            if cfg.api.enabled:
                # On the LAN, clients connect directly: no PROXY; HTTPS with the certificate SMTP serves.
                keys = await self.run_blocking(KeyStore, cfg.server.data_dir / "apikeys.sqlite3")
                self.api = APIServer(cfg, acceptor=self.acceptor, directory=directory, queue=self.queue, keys=keys,
                                     metrics=self.metrics, run_blocking=self.run_blocking,
                                     tls_context=tls if cfg.api.tls else None)
                await self.api.start()
        except Exception:
            await self.stop()
            raise
        if cfg.server.metrics_listen:
            h, p = cfg.server.metrics_listen
            self.metrics_server = self.metrics.serve(h, p)
            log.info("metrics on http://%s:%d/metrics", h, self.metrics_server[0].server_port)
        self.runner = QueueRunner(cfg, self.queue, self.metrics, self.run_blocking, remote=self.remote)
        await self.runner.listen_for_wakeups(wake_path(cfg.queue_db))
        self._runner_task = asyncio.create_task(self.runner.run(), name="queue-runner")
        if cfg.api.enabled:
            # Its own task and client: a slow or dead receiver never holds up a delivery.
            self.webhooks = await self.run_blocking(WebhookSender.from_config, cfg, self.queue, self.metrics,
                                                    self.run_blocking)
            self._webhooks_task = asyncio.create_task(self.webhooks.run(), name="webhooks")
        if getattr(self.remote, "resolver", None) is not None:
            # RFC 8460: each finished day's TLS report, to the domains that publish _smtp._tls.
            reporter = TLSReporter(cfg, self.queue, self.metrics, self.run_blocking, self.remote.resolver, self.signer)
            self._tlsrpt_task = asyncio.create_task(reporter.run(), name="tls-reports")
        if cfg.acme.enabled:
            self.renewer = renew.Renewer(cfg, self.challenges, self.metrics, self.run_blocking,
                                         on_installed=self.reload)  # new handshakes get it
            await self.renewer.listen_for_requests()  # `cert renew --now`
            self._renew_task = asyncio.create_task(self.renewer.run(), name="acme-renewal")
        if cfg.dns.self_check_interval > 0:
            self.dns_self_check = DNSSelfCheck(cfg, self.metrics)
            self._self_check_task = asyncio.create_task(self.dns_self_check.run(), name="dns-self-check")

    def failure(self) -> str | None:
        """What vital worker has died, or None while all live: the queue's writer thread (nothing
        could be stored) and the queue runner task (nothing would be delivered)."""
        if self.queue is not None and not self.queue.healthy():
            return f"queue writer thread died ({self.queue.failure!r})"
        task = self._runner_task
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            return f"queue runner stopped ({exc!r})" if exc else "queue runner stopped"
        return None

    def bound_port(self, name: str) -> int:
        for lc, server in zip(self.config.listeners, self.servers):
            if lc.name == name:
                return server.sockets[0].getsockname()[1]
        raise KeyError(name)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Close the listeners first (new connections are refused), then drain within ``grace``
        seconds: idle sessions get 421 4.3.2, a DATA in progress may finish (its message is
        committed and answered), deliveries in flight may finish (then they are cancelled; their
        next attempt is already recorded); finally close the queue."""
        for s in self.servers:
            s.close()
        if self._renew_task is not None:
            # An order in progress finishes in its worker thread; the live pair changes only whole.
            self._renew_task.cancel()
        if self.renewer is not None:
            self.renewer.close()
        if self._self_check_task is not None:
            self._self_check_task.cancel()  # a run in progress finishes in its thread, unawaited
        if self._tlsrpt_task is not None:
            self._tlsrpt_task.cancel()  # between rounds, or a round that is sent again later
        if self._webhooks_task is not None:
            # POSTs under way are cancelled: their next attempt is planned, the event stays pending.
            self._webhooks_task.cancel()
            try:
                await self._webhooks_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - cancelled, or died (logged by asyncio)
                pass
        if self.webhooks is not None:
            self.webhooks.keys.close()
        if self._runner_task is not None:
            self._runner_task.cancel()
            try:
                await self._runner_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - cancelled, or already dead (the watchdog said why)
                pass
        if self.runner is not None:
            self.runner.close()
        # Sessions and deliveries drain side by side: one grace for both.
        await asyncio.gather(
            self.sessions.drain(grace),
            self.runner.drain(grace) if self.runner is not None else asyncio.sleep(0),
            self.http_face.close(grace) if self.http_face is not None else asyncio.sleep(0),
            self.api.close(grace) if self.api is not None else asyncio.sleep(0),
        )
        if self.api is not None:
            self.api.keys.close()
        if self.remote is not None and hasattr(self.remote, "close"):
            await self.remote.close()  # QUIT idle outbound sessions
        if self.checks is not None:
            await self.checks.close()  # rspamd's HTTP session
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()  # serve_forever returns
            self.metrics_server[0].server_close()  # and the port is released
        if self.queue is not None:
            await self.run_blocking(self.queue.close)
        self.executor.shutdown(wait=False)


async def watchdog(backend: Backend, interval: float) -> str:
    """Check the vital workers every ``interval`` seconds; returns what died. Meanwhile sessions
    already answer 451 (the queue refuses writes at once), so nothing hangs while we look."""
    while True:
        await asyncio.sleep(interval)
        problem = backend.failure()
        if problem is not None:
            return problem


def freeze_startup_heap() -> int:
    """Collect the start's garbage, then move every object alive (modules, schemas, resolvers,
    keys: a few hundred thousand) to the collector's permanent generation; returns how many.

    CPython's full collection walks every tracked object: with the daemon's start-up heap that is
    30-50 ms during which nothing else in the process runs, a few times a minute under load. It
    was the longest pause of the B6 bench's idle phase (docs/benchmarks.md). Objects made later
    (sessions, messages) are collected as before; start-up objects are freed by reference
    counting as always, only a cycle among them would wait for the process's end."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve(config: BackendConfig, ready=None) -> int:
    """Run until SIGTERM/SIGINT or until a vital worker dies; SIGHUP reloads (``Backend.reload``).
    Returns the exit status: 1 when a vital worker died, whichever came first (systemd's
    Restart=on-failure then starts a fresh process), else 0. Sessions in progress get
    SHUTDOWN_GRACE seconds."""
    backend = Backend(config)
    await backend.start()
    frozen = freeze_startup_heap()
    if ready is not None:
        ready(backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, backend.reload)  # SIGHUP's default would end the daemon
    dog = asyncio.create_task(watchdog(backend, WATCHDOG_INTERVAL), name="watchdog")
    stopping = asyncio.ensure_future(stop.wait())
    log.info("homemx-backend %s ready (%d startup objects out of the collector's way)", config.server.hostname, frozen)
    await asyncio.wait([dog, stopping], return_when=asyncio.FIRST_COMPLETED)
    dog.cancel()
    stopping.cancel()
    # Asked again on a signal: a worker may have died since the watchdog last looked.
    problem = backend.failure()
    if problem is not None:
        log.critical("%s; stopping so that the service manager restarts the daemon", problem)
    log.info("shutting down")
    await backend.stop()
    return 1 if problem is not None else 0
