"""The end-to-end lab fixture (one MailLab per session) and the failure report that prints every daemon's log."""

from __future__ import annotations

import pytest

from tests.conftest import require_root, require_tool


@pytest.fixture(scope="session")
def mail_lab():
    require_root()
    require_tool("ip", "nft", "wireguard-go", "wg", "/usr/sbin/nsd", "dig", "postfix", "dovecot", "swaks", "rspamd", "redis-server",
                 "opendkim-testmsg", "/usr/bin/pebble", "curl", "doveadm")
    from tests.lab.topology import MailLab

    lab = MailLab()
    lab.start()
    try:
        yield lab
    finally:
        lab.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # A red scenario explains itself: daemons' logs, Postfix's log and queue, mail transcripts.
    if report.failed and "mail_lab" in getattr(item, "funcargs", {}):
        lab = item.funcargs["mail_lab"]
        try:
            report.sections.append(("lab daemons' logs", lab.logs()))
        except Exception as e:  # the report must not hide the original failure
            report.sections.append(("lab daemons' logs", f"could not collect: {e!r}"))
