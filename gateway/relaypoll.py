"""One epoll for every relayed connection of a trio run, and the one task that waits on it.

Theory of operation. A relayed session (gateway.proxy ``_relay``) runs in one task and needs to
wake when either of its two sockets is ready; trio can wait on one descriptor per task. Each
session used to own an epoll descriptor for that: a third descriptor per session, so at a tight
open-files limit the gateway fell back to two pump tasks per session (more memory and CPU). Here
every session registers its two sockets in one shared epoll, ``EPOLLONESHOT``: a socket reports
once and is then disarmed until its session arms it again for the next wait. One system task
waits for the shared epoll to become readable, reads the ready sockets and reschedules the
sessions that wait on them. One-shot arming means a socket nobody waits on (a session busy, a
side it does not read until the other side drains, a HUP on a side it ignores) can never make
the dispatcher spin, and a session is woken at most once per wait.
"""

from __future__ import annotations

import select

import trio

_ONESHOT = select.EPOLLONESHOT
_MAX_EVENTS = 1024


class Waiter:
    """One session's registration: its two descriptors and, while it waits, its task."""

    __slots__ = ("fds", "task")

    def __init__(self, fds: tuple[int, ...]):
        self.fds = fds
        self.task: trio.lowlevel.Task | None = None

    def abort(self, _raise_cancel) -> trio.lowlevel.Abort:
        """A cancelled wait (trio's abort callback): forget the task; the one-shot arming lapses."""
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class SharedPoll:
    """The shared epoll of one trio run. Get it with :func:`shared_poll` (it starts its dispatcher)."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.waiters: dict[int, Waiter] = {}

    def register(self, fds: tuple[int, ...]) -> Waiter:
        """Add a session's descriptors, disarmed (no event is reported until :meth:`wait` arms them)."""
        w = Waiter(fds)
        done = []
        try:
            for fd in fds:
                self.ep.register(fd, _ONESHOT)  # one-shot with no events: registered and disarmed
                self.waiters[fd] = w
                done.append(fd)
        except BaseException:
            self.unregister(Waiter(tuple(done)))
            raise
        return w

    def unregister(self, w: Waiter) -> None:
        """Remove a session's descriptors; call before the sockets are closed."""
        for fd in w.fds:
            if self.waiters.pop(fd, None) is not None:
                try:
                    self.ep.unregister(fd)
                except (OSError, ValueError):  # already closed: the kernel dropped it
                    pass
        w.task = None

    def wait(self, w: Waiter, masks: list[int]):
        """Arm each descriptor with its mask (in the order registered; 0 = not wanted this time) and
        return the awaitable that sleeps until one is ready: ``await poll.wait(w, masks)``.
        Cancellation (the session's idle deadline) works as for any trio checkpoint. A plain
        function, not a coroutine: an idle session's stack holds one frame less."""
        for fd, mask in zip(w.fds, masks):
            if mask:
                self.ep.modify(fd, mask | _ONESHOT)
        w.task = trio.lowlevel.current_task()
        return trio.lowlevel.wait_task_rescheduled(w.abort)

    async def dispatch(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.ep.fileno())
                for fd, _events in self.ep.poll(0, _MAX_EVENTS):
                    w = self.waiters.get(fd)
                    if w is not None and w.task is not None:
                        task, w.task = w.task, None
                        trio.lowlevel.reschedule(task)
        finally:
            self.ep.close()


_POLL: trio.lowlevel.RunVar[SharedPoll] = trio.lowlevel.RunVar("homemx_gateway_shared_poll")


def shared_poll() -> SharedPoll:
    """This trio run's shared epoll, created (and its dispatcher started as a system task) on first use."""
    try:
        return _POLL.get()
    except LookupError:
        poll = SharedPoll()
        _POLL.set(poll)
        trio.lowlevel.spawn_system_task(poll.dispatch, name="homemx-relay-poll")
        return poll
