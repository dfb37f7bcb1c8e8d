"""Maildir delivery: content, size tag, slicing across line breaks, idempotent re-delivery."""

import os

from backend.durable import WRITEBACK_SLICE
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


def test_a_large_delivery_starts_writeback_a_mebibyte_at_a_time(tmp_path, monkeypatch):
    # Converted in 64 KiB slices (each replace() holds the GIL; B6), but the kernel is asked to
    # start writing back only every WRITEBACK_SLICE (a request per slice cost B6 a quarter of its
    # large messages): ranges in order from the start, none shorter, the rest left to the fsync.
    calls = []
    monkeypatch.setattr(maildir, "start_writeback", lambda fd, offset, count: calls.append((offset, count)))
    msg = b"Subject: big\r\n\r\n" + b"".join(b"y" * (i % 80) + b"\r\n" for i in range(90000))
    path = maildir.deliver(tmp_path / "Maildir", msg, "Q2_1")
    size = path.stat().st_size
    assert path.read_bytes() == msg.replace(b"\r\n", b"\n")
    assert calls and calls[0][0] == 0
    assert all(b[0] == a[0] + a[1] for a, b in zip(calls, calls[1:]))
    assert all(count >= WRITEBACK_SLICE for _, count in calls)
    assert size - (calls[-1][0] + calls[-1][1]) < WRITEBACK_SLICE + maildir._SLICE + 1000
    assert maildir._SLICE <= 1 << 16


def test_redelivery_of_same_pair_is_a_no_op_even_after_imap_moved_it(tmp_path):
    box = tmp_path / "Maildir"
    first = maildir.deliver(box, b"Subject: a\r\n\r\nx\r\n", "Q2_7")
    # An IMAP server marks it seen: moved to cur/ with flags.
    os.rename(first, box / "cur" / (first.name + ":2,S"))
    maildir.deliver(box, b"Subject: a\r\n\r\nx\r\n", "Q2_7")
    assert os.listdir(box / "new") == [] and len(os.listdir(box / "cur")) == 1


def test_junk_folder_is_a_maildirplusplus_folder_created_on_first_use(tmp_path):
    box = tmp_path / "Maildir"
    junk = maildir.folder_path(box, "Junk")
    assert junk == box / ".Junk" and (junk / "maildirfolder").is_file()
    for sub in ("cur", "new", "tmp"):
        assert (box / sub).is_dir() and (junk / sub).is_dir()  # the inbox exists too: Dovecot expects it
    path = maildir.deliver(junk, b"Subject: spam\r\n\r\nx\r\n", "Q3_1")
    assert path.parent == junk / "new" and os.listdir(box / "new") == []
    assert maildir.folder_path(box, "Junk") == junk  # second use: same folder, nothing re-created
    assert maildir.folder_path(box, None) == box


def test_a_folder_name_outside_the_fixed_set_is_never_a_path(tmp_path):
    import pytest

    for bad in ("../../etc", "Junk/..", "INBOX", ".Junk"):
        with pytest.raises(ValueError):
            maildir.folder_path(tmp_path / "Maildir", bad)
    assert not (tmp_path / "Maildir").exists()
