"""Local delivery into Maildir: write to tmp/, fsync, rename into new/, fsync the directory.

The layout is the one Dovecot reads as-is (``mail_location = maildir:<maildir_root>/%d/%n/Maildir``).
Files use LF line endings like every Unix MDA; Dovecot handles them (and adds CR when serving IMAP).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from backend.durable import WRITEBACK_SLICE, fsync_dir, start_writeback, unlink_quietly, write_all

_SLICE = 1 << 16
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def ensure_maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


# Folder names a message may be filed into: a fixed set, so nothing a sender controls ever becomes
# a path. Dovecot presents ".Junk" as the special-use \Junk mailbox (docs/inbound-trust.md).
FOLDERS = ("Junk",)


def folder_path(maildir: Path, folder: str | None) -> Path:
    """The Maildir of ``folder`` inside ``maildir`` (Maildir++: a ".Name" sub-directory holding a
    ``maildirfolder`` marker); None is the inbox itself. Created on first use."""
    if folder is None:
        return maildir
    if folder not in FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")
    path = maildir / f".{folder}"
    if not (path / "maildirfolder").exists():
        ensure_maildir(maildir)  # the inbox first: Dovecot expects the parent Maildir to exist
        ensure_maildir(path)
        (path / "maildirfolder").touch(mode=0o600)
        fsync_dir(maildir)
    return path


def already_delivered(maildir: Path, unique: str) -> bool:
    """True if a file for this (message, recipient) exists in new/ or cur/ (an IMAP server may have
    moved it to cur/ and appended flags). Makes re-delivery after a crash between the rename and
    the queue update idempotent."""
    for sub in ("new", "cur"):
        d = maildir / sub
        try:
            for name in os.listdir(d):
                if name.startswith(unique):
                    return True
        except FileNotFoundError:
            pass
    return False


def deliver(maildir: Path, message: bytes, unique: str, header_prefix: bytes = b"") -> Path:
    """Deliver ``header_prefix + message`` (CRLF or LF) into ``maildir``; returns the file in new/.

    ``unique`` must be unique per (message, recipient); it starts the file name, which makes a
    repeated delivery of the same pair a no-op. Blocking: call from a worker thread.
    """
    ensure_maildir(maildir)
    if already_delivered(maildir, unique):
        return maildir / "new" / unique
    # Maildir file name: time.unique.host (cr.yp.to/proto/maildir.html); ,S= (the size on disk)
    # lets Dovecot skip a stat. Every CRLF becomes LF; the size is what was written, known when
    # the file moves from tmp/ to new/ (counting the CRLFs first held the GIL ~20 ms per 25 MB,
    # every other thread and the event loop waiting: docs/benchmarks.md, B6).
    base = f"{unique}.{int(time.time())}.{_HOST}"
    tmp = maildir / "tmp" / base
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            size = write_all(fd, header_prefix.replace(b"\r\n", b"\n"))
            # Convert and write in slices that end on a line break: each replace() holds the GIL,
            # the write releases it, so the event loop and the sessions never wait long for it
            # (64 KiB: 1 MiB slices held it ~1.5 ms at a time and B6's loaded p99 was 50 ms, not
            # 31); writeback is started every WRITEBACK_SLICE written (backend/durable.py).
            pos = started = 0
            while pos < len(message):
                cut = message.find(b"\n", pos + _SLICE)
                cut = len(message) if cut < 0 else cut + 1
                size += write_all(fd, message[pos:cut].replace(b"\r\n", b"\n"))
                pos = cut
                if size - started >= WRITEBACK_SLICE:
                    start_writeback(fd, started, size - started)
                    started = size
            os.fsync(fd)
        finally:
            os.close(fd)
        final = maildir / "new" / f"{base},S={size}"
        os.rename(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(maildir / "new")
    return final
