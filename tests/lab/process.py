"""Stopping a test daemon we started in its own session (``start_new_session=True``): SIGTERM to the
process, a grace period, then SIGKILL to whatever of its session is left (workers, children). It
never signals anything outside that session, so a system service of the same name is untouched."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_session(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop ``proc`` and its session; returns once ``proc`` is reaped. Safe on an exited process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of its session left behind
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class LabDaemon:
    """``with`` for a test daemon that has ``start()``, ``close()`` and ``proc`` (None while not
    running): enter starts it unless it runs already, and a failed start is cleaned up before the
    error goes on; exit always closes it."""

    proc: subprocess.Popen | None = None

    def __enter__(self):
        if self.proc is None:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
