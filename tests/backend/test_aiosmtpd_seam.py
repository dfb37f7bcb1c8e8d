"""The one seam into aiosmtpd's constructor (receive/smtpd.py, _AiosmtpdInspect): it is in place
only while a HomeSMTP is built, and gives aiosmtpd the same answers as the real ``inspect`` and
``dir``."""

from __future__ import annotations

import asyncio
import inspect

import aiosmtpd
import aiosmtpd.smtp as aiosmtpd_smtp
import pytest

from backend.receive import smtpd
from tests.backend.helpers import listener_block, running_backend, write_config


def test_aiosmtpd_is_the_version_the_seam_was_tested_with():
    # The stand-in answers getmembers()/signature() for what SMTP.__init__ asks in 1.4.x; a new
    # aiosmtpd must be checked by this file before the pin moves (pyproject.toml).
    assert aiosmtpd.__version__.startswith("1.4.")


@pytest.mark.asyncio
async def test_the_stand_in_is_only_there_during_construction_and_answers_like_inspect(tmp_path):
    cfg = write_config(tmp_path, listener_block("sub", "submission") + listener_block("mx", "mx"))
    async with running_backend(cfg) as b:
        assert aiosmtpd_smtp.inspect is inspect  # nothing patched for the process
        for lc, server in zip(b.config.listeners, b.servers):
            factory = server._protocol_factory  # asyncio's; the listener's aiosmtpd factory
            fast = factory()
            assert aiosmtpd_smtp.inspect is inspect
            assert "dir" not in vars(aiosmtpd_smtp)  # the builtin again once the protocol is built
            # The same protocol built with the real module (the slow path aiosmtpd takes alone).
            real = smtpd._AiosmtpdInspect(inspect, ())  # matches no class: delegates every call
            smtpd._INSPECT, saved = real, smtpd._INSPECT
            try:
                slow = factory()
            finally:
                smtpd._INSPECT = saved
            assert {k: (v.is_builtin, getattr(v.method, "__name__", v.method)) for k, v in fast._auth_methods.items()} == {
                k: (v.is_builtin, getattr(v.method, "__name__", v.method)) for k, v in slow._auth_methods.items()}
            assert fast._ehlo_hook_ver == slow._ehlo_hook_ver == "new"
            assert fast._handle_hooks == slow._handle_hooks  # the same bound methods
            assert {k: v.__func__ for k, v in fast._smtp_methods.items()} == {
                k: v.__func__ for k, v in slow._smtp_methods.items()}
            assert fast._smtp_methods["DATA"].__self__ is fast
            assert fast.loop is asyncio.get_running_loop()
            assert "PLAIN" in fast._auth_methods and "LOGIN" in fast._auth_methods
