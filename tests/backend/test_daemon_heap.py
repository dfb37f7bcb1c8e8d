"""The daemon's start-up heap is out of the cyclic collector's way (docs/benchmarks.md, B6): a
full collection walked every object of the start (30-50 ms with nothing else running in the
process, a few times a minute under load). Garbage of the start is collected first, not kept."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from tests.backend.helpers import BACKEND_CLI, listener_block, wait_for_sync, write_config

_SEMANTICS = """
import gc, weakref
from backend.run import freeze_startup_heap

class Node:
    pass

garbage = Node(); garbage.me = garbage; dead = weakref.ref(garbage); del garbage
alive = Node(); alive.me = alive
frozen = freeze_startup_heap()
assert dead() is None, "the start's garbage was frozen, not collected"
assert frozen == gc.get_freeze_count() > 1000, frozen
assert not any(o is alive for o in gc.get_objects()), "a live start-up object is still walked"
print(frozen)
"""


def test_freezing_collects_the_start_garbage_and_keeps_live_objects_out_of_collections():
    r = subprocess.run([sys.executable, "-c", _SEMANTICS], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_running_daemon_has_frozen_its_start_up_heap(tmp_path):
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([BACKEND_CLI, "run", "-c", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_sync(lambda: proc.poll() is not None or " ready (" in log.read_text(), 30)
        text = log.read_text()
        found = re.search(r"ready \((\d+) startup objects out of the collector's way\)", text)
        assert found, text[-2000:]
        # Modules, schemas, resolvers, TLS and DKIM state: far more than a handful.
        assert int(found.group(1)) > 50_000, found.group(0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
