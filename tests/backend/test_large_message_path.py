"""A large message is put together off the event loop (docs/benchmarks.md, B6): the DATA reader's
parts, the lan masquerade's new header and the trace fields are joined on a worker thread (bytes.join
releases the GIL there, ``a + b`` on the loop held every other session for 15-20 ms per 25 MB),
and what reaches the Maildir is still exactly the message: transparency undone, header rewritten,
line endings converted, ``S=`` the size on disk. A small message does none of this."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from backend.accept import JOIN_OFF_LOOP
from backend.config import load_config
from backend.run import Backend
from tests.backend.helpers import ALICE, listener_block, maildir_files, wait_for, write_config


def _body(lines: int) -> bytes:
    # Lines that start with a dot at many offsets of the 64 KiB reads (smtplib stuffs them), one
    # line of exactly 998 octets, text otherwise.
    out = []
    for i in range(lines):
        if i % 97 == 0:
            out.append(b".dot line %d" % i)
        elif i == lines // 2:
            out.append(b"w" * 998)
        else:
            out.append(b"line %06d of a large message, with some text to fill it up to seventy-odd" % i)
    return b"\r\n".join(out) + b"\r\n"


@pytest.mark.asyncio
async def test_a_large_message_is_joined_off_the_loop_and_stored_exactly(tmp_path):
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"],
                                                max_message_size="20MB"))
    b = Backend(load_config(cfg))
    calls: list[tuple[str, int]] = []
    plain = b.run_blocking

    async def recording(fn, *args):
        size = sum(len(a) for a in args[0]) if args and isinstance(args[0], tuple) else 0
        calls.append((getattr(fn, "__qualname__", repr(fn)), size))
        return await plain(fn, *args)

    b.run_blocking = recording  # before start: every listener's context takes it from here
    await b.start()
    try:
        port = b.bound_port("lan")
        body = _body(40_000)  # ~3 MiB
        assert len(body) > 2 * JOIN_OFF_LOOP
        header = b"From: root\r\nTo: alice@example.org\r\nSubject: big\r\n\r\n"
        small = b"From: root\r\nTo: alice@example.org\r\nSubject: small\r\n\r\nhi\r\n"

        def send(message: bytes) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.ehlo("nas.lan")
                assert s.sendmail("root", [ALICE], message) == {}

        await asyncio.to_thread(send, small)
        small_calls = list(calls)
        await asyncio.to_thread(send, header + body)
        files = await wait_for(lambda: [p for p in maildir_files(tmp_path, ALICE) if "big" in p.read_text()[:4000]])
    finally:
        await b.stop(grace=0.5)

    # The small message: no join off the loop.
    assert not [c for c in small_calls if c[0] in ("DataReader.content", "bytes.join")]
    large = [c for c in calls[len(small_calls):] if c[0] in ("DataReader.content", "bytes.join")]
    names = [name for name, _ in large]
    # The DATA reader's parts, the masqueraded header + body, the trace fields + content.
    assert names.count("DataReader.content") == 1 and names.count("bytes.join") == 2, large
    assert all(size >= len(body) for name, size in large if name == "bytes.join"), large

    [stored] = files
    data = stored.read_bytes()
    assert stored.name.endswith(f",S={len(data)}")
    head, _, rest = data.partition(b"\n\n")
    assert b"\nFrom: root@example.org\n" in b"\n" + head + b"\n"  # masqueraded (lan)
    assert rest == body.replace(b"\r\n", b"\n")  # unstuffed, every line, LF on disk
