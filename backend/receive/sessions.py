"""The registry of open SMTP sessions and message commits: what the draining shutdown waits for."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING



from backend.smtp import replies as R

if TYPE_CHECKING:
    from backend.receive.smtpd import HomeSMTP


log = logging.getLogger("homemx.smtp")


class SessionRegistry:
    """The open SMTP sessions of every listener and the message commits they started: what a
    shutdown drains. One per daemon."""

    def __init__(self) -> None:
        self.sessions: set["HomeSMTP"] = set()
        self.commits: set[asyncio.Task] = set()
        self.closing = False
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, session: "HomeSMTP") -> None:
        self.sessions.add(session)
        self._empty.clear()

    def discard(self, session: "HomeSMTP") -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._empty.set()

    def track_commit(self, task: asyncio.Task) -> None:
        # The registry holds the only strong reference to a commit whose session has gone (the
        # event loop keeps tasks weakly), and shutdown waits for it before closing the queue.
        self.commits.add(task)
        task.add_done_callback(self.commits.discard)

    async def drain(self, grace: float) -> None:
        """RFC 5321 3.8: 421 to every idle session now, to a session in DATA once its message is
        answered (or when ``grace`` runs out), then wait for the commits in flight. Call after
        the listeners are closed, so no session starts meanwhile."""
        self.closing = True
        for s in list(self.sessions):
            if not s.in_data:
                s.hang_up(R.R421_SHUTTING_DOWN, "shutdown")
        if self.sessions:
            busy = sum(1 for s in self.sessions if s.in_data)
            if busy:
                log.info("draining: %d session(s) in DATA, %.1fs grace", busy, grace)
            try:
                await asyncio.wait_for(self._empty.wait(), grace)
            except asyncio.TimeoutError:
                for s in list(self.sessions):
                    s.hang_up(R.R421_SHUTTING_DOWN, "shutdown")  # nothing of theirs was acknowledged
        if self.commits:
            # Committing takes an fsync; a commit that outlives a second grace is reported and the
            # queue closes anyway (its message then has no 250 and no record, or a record).
            done, pending = await asyncio.wait(set(self.commits), timeout=max(grace, 1.0))
            if pending:
                log.error("shutdown: %d message commit(s) still pending", len(pending))
