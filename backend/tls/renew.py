"""Certificate renewal in the running backend: when to ask the CA (about two thirds into the
certificate's lifetime, with jitter; at once when there is none, only a placeholder, or a name is
missing), exponential backoff after failures, the state kept in acme_dir/state.json across
restarts, and what follows an issuance (install, TLS reload, the operator's reload hook).

The old certificate stays live until the new pair is complete on disk (certfiles.install swaps
both at once). ``homemx-backend cert renew --now`` asks the running daemon through a datagram
socket (acme_dir/renew.wake, 0600), the way ``queue retry`` wakes the queue runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Awaitable, Callable

from backend.config import BackendConfig
from backend.durable import write_atomic
from backend.tls import acme, certfiles

log = logging.getLogger("homemx.acme")

STATE_FILE = "state.json"
WAKE_SOCKET = "renew.wake"
RENEW_AT = 2 / 3  # of the lifetime (Let's Encrypt's advice for 90-day certificates: renew at 60 days)
JITTER = 0.03  # ± this share of the lifetime (about ±3 days of 90), so many homes do not ask at once
BACKOFF_MIN = 60.0  # first retry after a failure
BACKOFF_MAX = 86400.0  # then doubling up to a day
MAX_SLEEP = 3600.0  # look again at least hourly (a suspended machine, a changed clock)
HOOK_TIMEOUT = 60.0


@dataclass
class RenewalState:
    next_attempt: float | None = None  # Unix time of the next issuance attempt
    serial: int | None = None  # the live certificate next_attempt was planned for
    last_attempt: float | None = None
    last_attempt_end: float | None = None
    last_result: str | None = None  # "success" | "failure"
    last_error: str | None = None
    last_success: float | None = None
    failures: int = 0  # consecutive


def load_state(acme_dir: Path) -> RenewalState:
    try:
        raw = json.loads((Path(acme_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return RenewalState()
    known = {f.name for f in fields(RenewalState)}
    return RenewalState(**{k: v for k, v in raw.items() if k in known})


def save_state(acme_dir: Path, state: RenewalState) -> None:
    write_atomic(Path(acme_dir) / STATE_FILE, json.dumps(asdict(state), indent=2).encode() + b"\n", 0o600)


def renewal_time(info: certfiles.CertInfo, rng: Callable[[], float] = random.random) -> float:
    """When to renew ``info``: two thirds into its lifetime ± JITTER of it."""
    return info.not_before + info.lifetime * (RENEW_AT + JITTER * (2 * rng() - 1))


def backoff(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after ``failures`` consecutive failures: 1 min doubling to
    1 day, ±10 % jitter."""
    base = min(BACKOFF_MIN * 2 ** max(failures - 1, 0), BACKOFF_MAX)
    return base * (0.9 + 0.2 * rng())


def next_due(state: RenewalState, info: certfiles.CertInfo | None, wanted: list[str], now: float) -> float:
    """When the next attempt is due (may be in the past: at once)."""
    if state.failures and state.next_attempt is not None:
        return state.next_attempt  # backing off, whatever the reason for trying
    if info is None or info.placeholder or not set(wanted) <= set(info.names):
        return now
    if state.next_attempt is not None and state.serial == info.serial:
        return state.next_attempt
    return renewal_time(info)  # a certificate we did not plan for (first start, restored by hand)


def prepare(config: BackendConfig) -> bool:
    """Before any TLS context is made: acme_dir exists (0700) and something is live (a self-signed
    placeholder on the very first start). True when the placeholder was written."""
    certfiles.ensure_dir(config.acme_dir)
    return certfiles.ensure_placeholder(config.acme_dir, config.server.hostname)


def wake_path(config: BackendConfig) -> Path:
    return config.acme_dir / WAKE_SOCKET


def request_renewal(config: BackendConfig) -> bool:
    """Ask the running daemon to renew now. False when no daemon listens."""
    from backend.queue.runner import _unix_address

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, _unix_address(wake_path(config)) as addr:
            s.setblocking(False)
            s.sendto(b"renew", addr)
        return True
    except OSError:
        return False


class _WakeProtocol(asyncio.DatagramProtocol):
    def __init__(self, wake: Callable[[], None]):
        self.wake = wake

    def datagram_received(self, data: bytes, addr) -> None:
        self.wake()


class Renewer:
    """The renewal task of one backend (``run`` forever; ``request_now`` forces an attempt)."""

    def __init__(
        self,
        config: BackendConfig,
        challenges,
        metrics,
        run_blocking: Callable[..., Awaitable],
        on_installed: Callable[[], object] | None = None,
        *,
        now: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        issue: Callable = acme.issue,
    ):
        self.config = config
        self.acme_dir = config.acme_dir
        self.challenges = challenges
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.on_installed = on_installed  # the TLS holder's reload
        self.now, self.rng, self.issue = now, rng, issue
        self.wakeup = asyncio.Event()
        self._forced = False
        self.attempts = 0  # finished attempts of this process (tests wait on it)
        self._transport: asyncio.DatagramTransport | None = None

    def request_now(self) -> None:
        self._forced = True
        self.wakeup.set()

    async def listen_for_requests(self) -> None:
        """Bind acme_dir/renew.wake (0600) for ``cert renew --now``. Best effort."""
        from backend.queue.runner import _unix_address

        path = wake_path(self.config)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with _unix_address(path) as addr:
                sock.bind(addr)
                os.chmod(addr, 0o600)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(lambda: _WakeProtocol(self.request_now), sock=sock)
        except OSError as e:
            sock.close()
            log.warning("no renewal request socket at %s (%s): 'cert renew --now' cannot reach this daemon", path, e)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            with contextlib.suppress(OSError):
                os.unlink(wake_path(self.config))

    def _export(self, info: certfiles.CertInfo | None, state: RenewalState, due: float | None) -> None:
        m = self.metrics
        if m is None:
            return
        if info is not None:
            m.cert_expiry.set(info.not_after)
        if due is not None:
            m.cert_next_renewal.set(due)
        m.cert_renewal_failures.set(state.failures)
        if state.last_success is not None:
            m.cert_renewal_last_success.set(state.last_success)

    async def run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the state or certificate files cannot be read or written
                log.exception("certificate renewal round failed; trying again in %.0f s", BACKOFF_MIN)
                await asyncio.sleep(BACKOFF_MIN)

    async def _round(self) -> None:
        """Wait until the next attempt is due (or forced), then make it."""
        state = await self.run_blocking(load_state, self.acme_dir)
        info = await self.run_blocking(certfiles.read_live, self.acme_dir)
        now = self.now()
        due = next_due(state, info, acme.wanted_names(self.config), now)
        self._export(info, state, due)
        if due > now and not self._forced:
            self.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=min(due - now, MAX_SLEEP))
            if not self._forced:
                return  # the hour is up, or woken for nothing: plan again from the files
        self._forced = False
        await self.attempt()

    async def attempt(self) -> bool:
        """One issuance attempt; True when a new certificate is live."""
        state = await self.run_blocking(load_state, self.acme_dir)
        names = acme.wanted_names(self.config)
        started = self.now()
        # Recorded before trying (like the queue's next_attempt): a crash mid-attempt never
        # makes the next start ask the CA again at once.
        await self.run_blocking(certfiles.ensure_dir, self.acme_dir)
        state.last_attempt = started
        state.next_attempt = started + backoff(state.failures + 1, self.rng)
        await self.run_blocking(save_state, self.acme_dir, state)
        t0 = time.monotonic()
        try:
            issued = await self.run_blocking(self.issue, self.config, self.challenges, names)
            await self.run_blocking(certfiles.install, self.acme_dir, issued.fullchain_pem, issued.key_pem)
        except Exception as e:  # noqa: BLE001 - every failure is backed off and recorded
            state.failures += 1
            state.next_attempt = self.now() + backoff(state.failures, self.rng)
            state.last_result, state.last_error = "failure", str(e)[:500]
            state.last_attempt_end = self.now()
            await self.run_blocking(save_state, self.acme_dir, state)
            self._count("failure")
            info = await self.run_blocking(certfiles.read_live, self.acme_dir)
            self._export(info, state, state.next_attempt)
            self.attempts += 1
            wait = state.next_attempt - self.now()
            if isinstance(e, acme.ACMEError):
                log.warning("certificate for %s not issued (%d in a row): %s; next attempt in %.0f s",
                            ", ".join(names), state.failures, e, wait)
            else:
                log.exception("certificate for %s not issued (%d in a row); next attempt in %.0f s",
                              ", ".join(names), state.failures, wait)
            return False
        info = certfiles.cert_info(issued.fullchain_pem)
        state.failures = 0
        state.last_result, state.last_error = "success", None
        state.last_success = state.last_attempt_end = self.now()
        state.serial = info.serial
        state.next_attempt = renewal_time(info, self.rng)
        await self.run_blocking(save_state, self.acme_dir, state)
        self._count("success")
        self._export(info, state, state.next_attempt)
        log.info("certificate issued for %s by %s: serial %x, not after %s, in %.1f s; next renewal %s",
                 ", ".join(info.names), info.issuer, info.serial, _iso(info.not_after), time.monotonic() - t0,
                 _iso(state.next_attempt))
        if self.on_installed is not None:
            result = self.on_installed()
            if asyncio.iscoroutine(result):
                await result
        await self._run_reload_hook()
        self.attempts += 1
        return True

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.cert_renewals.labels(result).inc()

    async def _run_reload_hook(self) -> None:
        hook = self.config.acme.reload_hook
        if not hook:
            return
        try:
            proc = await asyncio.create_subprocess_shell(
                hook, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await asyncio.wait_for(proc.communicate(), HOOK_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("reload_hook %r did not finish within %.0f s (killed)", hook, HOOK_TIMEOUT)
            return
        except OSError as e:
            log.warning("reload_hook %r cannot run: %s", hook, e)
            return
        if proc.returncode != 0:
            log.warning("reload_hook %r exited %d: %s", hook, proc.returncode, out.decode(errors="replace").strip()[:300])
        else:
            log.info("reload_hook %r done", hook)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
