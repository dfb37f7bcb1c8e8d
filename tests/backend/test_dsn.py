"""RFC 3464 report builder (pure): structure, fields, status codes, never to <>."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re

import pytest

from backend.deliver import dsn

ORIGINAL = (
    b"Received: from lan by mail.example.org\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: figures\r\n"
    b"\r\n"
    b"secret body text\r\n"
)


def report(action=dsn.FAILED, **kw):
    rcpt = dict(
        final_recipient="bob@remote.test",
        original_recipient="team@example.org",
        action=action,
        status="5.1.1" if action == dsn.FAILED else "4.2.2",
        diagnostic="550 5.1.1 No such user" if action == dsn.FAILED else "452 4.2.2 Mailbox full",
        remote_mta="dns; mx.remote.test",
        last_attempt=1_700_000_100.0,
        will_retry_until=1_700_400_000.0 if action == dsn.DELAYED else None,
    )
    rcpt.update(kw)
    return dsn.build_dsn(
        reporting_mta="mail.example.org",
        sender="alice@example.org",
        queue_id="18C0ABCDEF0123456",
        arrival=1_700_000_000.0,
        recipients=[dsn.DSNRecipient(**rcpt)],
        headers=dsn.original_headers(ORIGINAL),
        now=1_700_000_200.0,
    )


def parts(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return msg, msg.get_payload()


def test_failed_report_structure_and_fields():
    raw = report()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    msg, (human, status, headers) = parts(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<alice@example.org>"
    assert msg["From"].endswith("<MAILER-DAEMON@mail.example.org>")
    assert msg["Auto-Submitted"] == "auto-replied"
    assert human.get_content_type() == "text/plain" and "bob@remote.test" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; mail.example.org"
    assert per_msg["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_rcpt["Original-Recipient"] == "rfc822;team@example.org"
    assert per_rcpt["Final-Recipient"] == "rfc822;bob@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Will-Retry-Until"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload()
    assert "Subject: figures" in returned and "secret body text" not in returned


def test_delay_report_says_delayed_and_until_when():
    msg, (_, status, _) = parts(report(dsn.DELAYED))
    _, per_rcpt = status.get_payload()
    assert per_rcpt["Action"] == "delayed" and per_rcpt["Status"] == "4.2.2"
    assert per_rcpt["Will-Retry-Until"]
    assert msg["Subject"].startswith("Delayed")


@pytest.mark.parametrize("action", [dsn.FAILED, dsn.DELAYED])
def test_every_date_is_rfc5322_with_a_numeric_zone(action):
    # RFC 5322 3.3: zone is +0000; "GMT" is obsolete syntax (4.3) and "-0000" means "zone unknown".
    raw = report(action).decode()
    dated = re.findall(r"^(Date|Arrival-Date|Last-Attempt-Date|Will-Retry-Until): (.*)$", raw, re.M)
    names = {n for n, _ in dated}
    assert names == {"Date", "Arrival-Date", "Last-Attempt-Date"} | ({"Will-Retry-Until"} if action == dsn.DELAYED else set())
    for name, value in dated:
        assert value.rstrip("\r").endswith(" +0000"), (name, value)
        assert email.utils.parsedate_to_datetime(value).timestamp() in (1_700_000_000.0, 1_700_000_100.0, 1_700_000_200.0, 1_700_400_000.0)
    assert "GMT" not in raw and "-0000" not in raw


def test_utf8_recipient_is_written_as_rfc6533_xtext_in_the_7bit_report():
    raw = report(final_recipient="jösé+x@bücher.test", original_recipient=None)
    _, (human, status, _) = parts(raw)
    per_rcpt = status.get_payload()[1]
    # RFC 6533 3: utf-8-addr-xtext in message/delivery-status; "+" is not a QCHAR either.
    assert per_rcpt["Final-Recipient"] == "utf-8;j\\x{F6}s\\x{E9}\\x{2B}x@b\\x{FC}cher.test"
    assert raw.split(b"\r\n\r\n", 1)[1].isascii()
    assert "j\\x{F6}s\\x{E9}" in human.get_payload()


def test_original_recipient_omitted_when_same_as_final():
    _, (_, status, _) = parts(report(original_recipient="BOB@remote.test"))
    assert status.get_payload()[1]["Original-Recipient"] is None


def test_reply_text_cannot_break_the_report():
    _, (_, status, _) = parts(report(diagnostic="550 5.1.1 evil\r\nAction: delivered"))
    per_rcpt = status.get_payload()[1]
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt.get_all("Action") == ["failed"]


def test_never_to_the_null_sender():
    assert not dsn.should_send("") and not dsn.should_send("<>") and dsn.should_send("a@b.test")
    with pytest.raises(ValueError):
        dsn.build_dsn(
            reporting_mta="m.test", sender="", queue_id="X", arrival=0, headers=b"", now=0,
            recipients=[dsn.DSNRecipient("b@r.test", None, dsn.FAILED, "5.0.0", None)],
        )


@pytest.mark.parametrize(
    "reply, permanent, status",
    [
        ("550 5.1.1 No such user", True, "5.1.1"),
        ("550 No such user", True, "5.0.0"),
        ("451 4.7.1 Greylisted", False, "4.7.1"),
        ("421 Service not available", False, "4.0.0"),
        ("554 5.4.7 Delivery time expired; last error: 451 4.7.1 x", True, "5.4.7"),
        ("451 4.4.2 timeout", True, "5.0.0"),  # gave up after a transient error: class follows the outcome
        (None, True, "5.0.0"),
    ],
)
def test_status_from_reply(reply, permanent, status):
    assert dsn.status_from_reply(reply, permanent) == status


def test_original_headers_of_lf_message():
    assert dsn.original_headers(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\r\nB: 2"
