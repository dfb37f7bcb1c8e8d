"""Open SMTP sessions kept for reuse: after a transaction a session idles here (RSET done) so the
next message to the same host skips connect, TLS and EHLO; one idle for ``idle_timeout`` gets its
QUIT from a timer (also when no mail follows) and is never reused."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiosmtplib

from backend.deliver.tlspolicy import Target

POOL_IDLE_TIMEOUT = 30.0  # close an idle session after this (Postfix smtp_connection_cache_time_limit is 2 s;
#                           a home server sends little, so a longer reuse window pays off)
POOL_MAX_USES = 100  # Postfix smtp_connection_reuse_count_limit is 100 too


@dataclass
class Session:
    """One open SMTP session to a host, reusable for several transactions."""

    client: aiosmtplib.SMTP
    key: tuple
    peer: str  # "mx.example.net[192.0.2.1]:25" for logs and DSN Remote-MTA
    host_name: str
    tls: str
    uses: int = 0
    idle_since: float = 0.0


class Pool:
    """Idle sessions by target key; ``session`` hands out one that still answers, or a new one."""

    def __init__(
        self,
        connect: Callable[[Target], Awaitable[Session]],
        command_timeout: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        idle_timeout: float = POOL_IDLE_TIMEOUT,
    ):
        self.connect = connect
        self.command_timeout = command_timeout
        # The pool's own clock (idle times), apart from the queue's ``now``: tests inject both.
        self.monotonic = monotonic
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple, list[Session]] = defaultdict(list)
        self._closing: set[asyncio.Task] = set()  # QUITs of expired idle sessions (kept referenced)
        self._sweep_timer: asyncio.TimerHandle | None = None

    async def session(self, target: Target) -> Session:
        """An idle session to ``target`` that still answers NOOP, or a new one (``connect``'s errors)."""
        while True:
            s = self._take_idle(target.key)
            if s is None:
                return await self.connect(target)
            try:
                resp = await s.client.noop(timeout=self.command_timeout)
                if resp.code == 250:
                    return s
            except aiosmtplib.SMTPException:
                pass
            self.discard(s)

    def _take_idle(self, key: tuple) -> Session | None:
        self.sweep()  # an expired session is never reused: it gets its QUIT instead
        idle = self._idle.get(key)
        while idle:
            s = idle.pop()
            if s.client.is_connected:
                return s
            self.discard(s)
        return None

    def release(self, session: Session) -> None:
        """Keep ``session`` for reuse, unless it has carried enough or the remote closed it."""
        if session.uses >= POOL_MAX_USES or not session.client.is_connected:
            self.discard(session)
            return
        session.idle_since = self.monotonic()
        self._idle[session.key].append(session)
        self._arm_sweep()

    @staticmethod
    def discard(session: Session) -> None:
        """Close ``session`` without QUIT (its state is unknown or it is already gone)."""
        try:
            session.client.close()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def sweep(self) -> None:
        """QUIT the idle sessions that have waited ``idle_timeout``; drop those the remote closed."""
        now = self.monotonic()
        for key, sessions in list(self._idle.items()):
            keep = []
            for s in sessions:
                if not s.client.is_connected:
                    self.discard(s)
                elif now - s.idle_since >= self.idle_timeout:
                    task = asyncio.ensure_future(self._quit(s))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
                else:
                    keep.append(s)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def _arm_sweep(self) -> None:
        # A timer, so an idle session is closed when it expires even if no other mail follows:
        # holding a slot at the remote (RFC 5321 4.5.3.2.7: servers wait 5 min) helps nobody.
        if self._sweep_timer is not None or not self._idle:
            return
        oldest = min(s.idle_since for ss in self._idle.values() for s in ss)
        delay = max(0.0, oldest + self.idle_timeout - self.monotonic())
        self._sweep_timer = asyncio.get_running_loop().call_later(delay, self._on_sweep_timer)

    def _on_sweep_timer(self) -> None:
        self._sweep_timer = None
        self.sweep()
        self._arm_sweep()

    async def _quit(self, s: Session) -> None:
        try:
            await asyncio.wait_for(s.client.quit(), 5)
        except Exception:  # noqa: BLE001 - a polite QUIT that fails changes nothing
            self.discard(s)

    async def close(self) -> None:
        """QUIT every idle session (daemon shutdown)."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        sessions = [s for ss in self._idle.values() for s in ss]
        self._idle.clear()
        await asyncio.gather(*(self._quit(s) for s in sessions), *self._closing, return_exceptions=True)
