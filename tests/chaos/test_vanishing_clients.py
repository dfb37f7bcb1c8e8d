"""Clients that vanish at every SMTP step (issue 11, item 1): through the real gateway and directly to the real backend, with FIN and with RST; afterwards a normal transaction gets its 250 within a second, the queue holds no half-written message, queued mail is delivered, and neither daemon logged a traceback or ignores SIGTERM.

One storm (module fixture) runs every (path, step, close mode) a few times at once against one
`homemx-backend run` and one `homemx-gateway run` on loopback; each test then checks one outcome.
The critical case is "dot" / "dot_quit" / "pipelined": the client sends the final dot and leaves
without reading the reply, which used to kill the backend's queue writer so that every later
message hung at the dot.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.config import load_config
from backend.queue.model import ACTIVE_STATES
from backend.queue.store import Queue
from tests.backend.helpers import ALICE, BOB, maildir_files, wait_for_sync
from tests.chaos.stack import EXCEPTION_TEXT_RE, Daemon, backend_daemon, gateway_daemon, tracebacks
from tests.chaos.vanish import (
    ACKNOWLEDGED,
    CLOSE_MODES,
    MAYBE_COMMITTED,
    VANISH_STEPS,
    Outcome,
    end_marker,
    normal_transaction,
    session,
)

SENDER = "carol@remote.test"
REPEAT = 3
LARGE = 300 * 1024  # above the queue's spool threshold: the body goes to a spool file
LARGE_STEPS = ("mid_data", "dot", "dot_quit", "pipelined", "after_250")
TAG_RE = re.compile(rb"Message-ID: <([^@>]+)@chaos\.test>")


@dataclass
class Storm:
    work: Path
    backend: Daemon
    gateway: Daemon
    paths: dict[str, tuple[int, bool]]  # name → (port, client sends its own PROXY header)
    outcomes: list[Outcome]

    @property
    def queue_db(self) -> Path:
        return load_config(self.backend.config).queue_db


async def _storm(paths: dict[str, tuple[int, bool]]) -> list[Outcome]:
    jobs = []
    n = itertools.count(1)
    for (name, (port, proxy)), step, mode in itertools.product(paths.items(), VANISH_STEPS, CLOSE_MODES):
        if step == "mid_proxy" and not proxy:
            continue
        sizes = [600] * REPEAT + ([LARGE] if step in LARGE_STEPS else [])
        for size in sizes:
            tag = f"{name}-{step}-{mode}-{size}-{next(n)}"
            jobs.append((port, step, mode, tag, proxy, size))
    limit = asyncio.Semaphore(64)

    async def one(port, step, mode, tag, proxy, size):
        async with limit:
            return await session(port, step, mode, tag, sender=SENDER, rcpts=[BOB], proxy=proxy, size=size,
                                 timeout=5.0)

    return list(await asyncio.gather(*(one(*j) for j in jobs)))


@pytest.fixture(scope="module")
def storm(tmp_path_factory):
    work = tmp_path_factory.mktemp("vanish")
    backend, ports = backend_daemon(work, log_level="debug")
    gateway, gw_ports = gateway_daemon(work, {"mx": ports.mx})
    backend.start()
    try:
        gateway.start()
        paths = {"gateway": (gw_ports["mx"], False), "direct-proxy": (ports.mx, True), "direct": (ports.plain, False)}
        yield Storm(work, backend, gateway, paths, asyncio.run(_storm(paths)))
    finally:
        gateway.kill()
        backend.kill()


def _tag(content: bytes) -> str:
    m = TAG_RE.search(content)
    assert m, f"stored message without its Message-ID: {content[:300]!r}"
    return m.group(1).decode()


def test_clients_that_waited_got_their_replies(storm):
    """Every session read each reply up to its vanishing point (nothing hung or was refused), the
    ones that waited for the dot's reply got 250, and no reply carries Python exception text."""
    failed = [(o.tag, o.error) for o in storm.outcomes if o.error]
    assert not failed, f"{len(failed)} of {len(storm.outcomes)} sessions failed before their step: {failed[:8]}"
    unacked = [o.tag for o in storm.outcomes if o.step in ACKNOWLEDGED and not o.acknowledged]
    assert not unacked, unacked[:8]
    leaked = [r for o in storm.outcomes for r in o.replies if EXCEPTION_TEXT_RE.search(r)]
    assert not leaked, leaked[:5]


@pytest.mark.asyncio
async def test_normal_transaction_gets_250_within_1s(storm):
    for name, (port, proxy) in storm.paths.items():
        try:
            reply, elapsed = await normal_transaction(port, f"after-storm-{name}", sender=SENDER, rcpts=[BOB],
                                                      proxy=proxy, timeout=5.0)
        except asyncio.TimeoutError:
            pytest.fail(f"{name}: no reply within 5 s after the storm (is the queue writer dead?)")
        assert reply.startswith("250 "), (name, reply)
        assert elapsed < 1.0, f"{name}: 250 after {elapsed:.2f}s"


def test_queue_has_no_half_written_message(storm):
    """Every stored message has recipients and its whole content (spool file included); every
    acknowledged message is there; nothing the client abandoned before its final dot is."""
    q = Queue(storm.queue_db, group_commit=False)
    stored = {}
    for entry in q.list(None):
        assert entry.recipients, f"message {entry.id} without recipients"
        content = q.content(entry.id)  # raises when a referenced spool file is missing
        tag = _tag(content)
        assert content.endswith(end_marker(tag)), f"message {entry.id} ({tag}) truncated"
        assert tag not in stored, f"{tag} stored twice ({stored.get(tag)} and {entry.id})"
        stored[tag] = entry.id
    for o in storm.outcomes:
        if o.step in ACKNOWLEDGED:
            assert o.tag in stored, f"acknowledged {o.tag} is not in the queue"
        elif o.step not in MAYBE_COMMITTED:
            assert o.tag not in stored, f"{o.tag} vanished at {o.step} but was queued"


def test_queued_mail_is_still_delivered(storm):
    """A control message reaches bob's Maildir, and so does every message in the queue, whole."""
    port, proxy = storm.paths["gateway"]
    reply, _ = asyncio.run(normal_transaction(port, "control-delivery", sender=SENDER, rcpts=[BOB], proxy=proxy))
    assert reply.startswith("250 "), reply
    q = Queue(storm.queue_db, group_commit=False)

    def settled():
        tags = [_tag(f.read_bytes()) for f in maildir_files(storm.work, BOB)]
        active = q.stats()[0]
        return "control-delivery" in tags and not any(active[s] for s in ACTIVE_STATES) and tags

    tags = wait_for_sync(settled, 15)
    for f in maildir_files(storm.work, BOB):
        data = f.read_bytes().replace(b"\r\n", b"\n")  # Maildir files have LF line ends
        assert data.endswith(end_marker(_tag(data)).replace(b"\r\n", b"\n")), f"{f.name} truncated"
    queued = {_tag(q.content(e.id)) for e in q.list(None)}
    assert sorted(tags) == sorted(queued), "Maildir and queue disagree"
    assert not maildir_files(storm.work, ALICE)


def test_daemons_alive_logs_clean_and_stop_on_sigterm(storm):
    assert storm.backend.alive(), storm.backend.log()[-3000:]
    assert storm.gateway.alive(), storm.gateway.log()[-3000:]
    assert storm.gateway.stop() == 0
    assert storm.backend.stop() == 0, "backend did not exit 0 on SIGTERM:\n" + storm.backend.log()[-3000:]
    for d in (storm.backend, storm.gateway):
        found = tracebacks(d.log())
        assert not found, f"{d.name} log has {len(found)} tracebacks; first:\n{found[0]}"
