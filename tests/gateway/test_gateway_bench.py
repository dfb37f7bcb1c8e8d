"""The gateway benchmark's client loops stay bounded (issue 17): a relayed connection that closes
before its banner ends the wait with an error instead of spinning on ``recv() == b""`` forever."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.bench.gateway_bench import read_banner


def test_banner_read_ends_when_the_connection_closes_first():
    ours, theirs = socket.socketpair()
    theirs.sendall(b"220 half a ban")
    theirs.close()
    outcome: list[BaseException | bytes] = []

    def reader() -> None:
        try:
            outcome.append(read_banner(ours))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    t = threading.Thread(target=reader, daemon=True)  # daemon: a spinning loop cannot hang pytest
    t.start()
    t.join(10)
    ours.close()
    assert not t.is_alive(), "read_banner kept looping after EOF"
    assert isinstance(outcome[0], ConnectionError)


def test_banner_read_returns_the_first_line():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"220 sink ESMTP\r\n")
        assert read_banner(ours) == b"220 sink ESMTP\r\n"
