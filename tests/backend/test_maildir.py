"""Maildir delivery: content, size tag, slicing across line breaks, idempotent re-delivery."""

import os

from backend.local import maildir


def test_large_message_converted_in_slices_exactly(tmp_path):
    # Lines of varied length so slice cuts land everywhere relative to CRLF pairs.
    body = b"".join(b"x" * (i % 97) + b"\r\n" for i in range(60000)) + b"no final newline"
    msg = b"Subject: big\r\n\r\n" + body
    path = maildir.deliver(tmp_path / "Maildir", msg, "Q1_1", b"Return-Path: <a@example.org>\r\n")
    expected = (b"Return-Path: <a@example.org>\r\n" + msg).replace(b"\r\n", b"\n")
    assert path.read_bytes() == expected
    assert path.name.endswith(f",S={len(expected)}") and path.parent.name == "new"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []


def test_redelivery_of_same_pair_is_a_no_op_even_after_imap_moved_it(tmp_path):
    box = tmp_path / "Maildir"
    first = maildir.deliver(box, b"Subject: a\r\n\r\nx\r\n", "Q2_7")
    # An IMAP server marks it seen: moved to cur/ with flags.
    os.rename(first, box / "cur" / (first.name + ":2,S"))
    maildir.deliver(box, b"Subject: a\r\n\r\nx\r\n", "Q2_7")
    assert os.listdir(box / "new") == [] and len(os.listdir(box / "cur")) == 1
