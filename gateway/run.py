"""The gateway's run loop: config → listeners → nursery → SIGTERM/SIGINT graceful drain, and nothing else."""

from __future__ import annotations

import functools
import gc
import logging
import resource
import signal

import trio

from .config import GatewayConfig
from .logsetup import setup_logging
from .proxy import Gateway

log = logging.getLogger("homemx.gateway")


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard limit: every relayed session holds two
    descriptors, and the default soft limit (1024) would cap the gateway near 500 sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# With CPython's default (700, 10, 10) the gateway of B8 (a burst of 9,750 silent connections;
# 4.4-5.1 s of CPU in the flood phase) spent 4.1-5.6 s of its whole run in the cyclic GC, 2.7-3.7 s
# of it in 11 full collections (each walks every session's ~57 tracked objects: a pause of a
# quarter of a second for every session) that found 327 objects in all: a session's objects die
# by reference counting. A young generation of 50,000 allocations makes every collection about
# 70 times rarer (none of them full during the burst) and holds at most that much garbage.
GC_THRESHOLDS = (50_000, 10, 10)


def tune_gc() -> None:
    """Set the gateway's GC thresholds (GC_THRESHOLDS): see the note above."""
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_heap() -> int:
    """Collect the start's garbage, then move every object alive (modules, config, listeners) to
    the collector's permanent generation; returns how many. A full collection walks every tracked
    object: with the start-up heap in it, 25-52 ms with nothing relayed meanwhile, seen during B6's
    loaded phase (docs/benchmarks.md). Sessions' objects are collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def run_gateway(config: GatewayConfig, *, freeze: bool = False,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM or SIGINT, then drain within server.shutdown_grace. A listener that
    cannot be bound raises BindError before any nursery opens (the caller prints one line).
    ``freeze``: the daemon's own process (``run``) freezes its start-up heap once serving."""
    gateway = Gateway(config)
    await gateway.bind()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            if freeze:
                log.info("serving (%d startup objects out of the collector's way)", freeze_startup_heap())
            task_status.started(gateway)
            async for signum in signals:
                log.info("%s: stopping new connections", signal.Signals(signum).name)
                gateway.request_drain()
                break


def run(config: GatewayConfig) -> int:
    setup_logging(config.server.log_level, config.server.log_format)
    raise_nofile_limit()
    tune_gc()
    trio.run(functools.partial(run_gateway, config, freeze=True))
    return 0
