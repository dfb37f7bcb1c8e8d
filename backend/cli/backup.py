"""CLI: ``backup DIR`` (a consistent snapshot while the daemon runs) and ``restore DIR`` (onto a fresh box).

The work is in backend/backup.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.backup import BackupError, make_backup, restore
from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.config import ConfigError, load_config


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("backup", help="back up queue, mail, keys, users, config and ACME state into DIR "
                       "(the daemon may run)",
                       description="Write a consistent backup into DIR (new or empty; made 0700) while the daemon "
                       "runs: the queue and every SQLite store by SQLite's online backup, the spool files the "
                       "queue snapshot names, Maildirs (not tmp/), DKIM keys, the users file, the config, ACME "
                       "state, and a manifest of every file with its SHA-256.")
    b.add_argument("dir", metavar="DIR")
    b.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="restore a backup made by `backup` (stop the daemon first)",
                       description="Check every file of the backup against its manifest, then put the config at "
                       "--config and everything else where that config names it, with modes and owners. "
                       "Refuses a data directory that already holds files unless --force.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("-c", "--config", default=None,
                   help="where the restored config goes (default: where it was on the backed-up box); "
                   "relative paths in it are then relative to this file's folder")
    r.add_argument("--force", action="store_true", help="write over a data directory or Maildir root that holds files")
    r.set_defaults(func=cmd_restore)


def cmd_backup(args) -> int:
    cfg = load_or_exit(args.config)
    try:
        s = make_backup(cfg, Path(args.dir))
    except (BackupError, OSError) as e:
        print(f"homemx-backend backup: {_line(e)}", file=sys.stderr)
        return 1
    dropped = f", {len(s.dropped)} deleted while it ran left out" if s.dropped else ""
    print(f"backup: {args.dir}: {s.files} files, {s.bytes / 1e6:.1f} MB; queue: {s.messages} messages "
          f"({s.spooled} spooled){dropped}")
    return 0


def cmd_restore(args) -> int:
    try:
        s = restore(Path(args.dir), Path(args.config) if args.config else None, force=args.force)
    except (BackupError, OSError) as e:
        print(f"homemx-backend restore: {_line(e)}", file=sys.stderr)
        return 1
    target = args.config or "its original place"
    print(f"restored: {s.files} files, {s.bytes / 1e6:.1f} MB, queue: {s.messages} messages; config at {target}")
    try:
        load_config(args.config or _original_config(Path(args.dir)))
    except ConfigError as e:
        for line in e.lines:
            print(f"homemx-backend restore: warning: restored config: {line}", file=sys.stderr)
        return 1
    return 0


def _original_config(backup: Path) -> str:
    from backend.backup import read_manifest

    return next(r["original"] for r in read_manifest(backup)["roles"] if r["name"] == "config")


def _line(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)
