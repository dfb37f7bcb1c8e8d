"""Backup and restore of a home box: a consistent snapshot taken while the daemon runs, and its return onto a fresh box.

What a backup holds is found from the config, by role: the config file itself, the whole data
directory (queue, spool, ACME state, API keys and webhooks, reports, MTA-STS cache, Maildirs when
they live under it), the Maildir root and the API sandbox when they live elsewhere, and every file
the config names (users file, DKIM keys, TLS certificate and key, smarthost password, TSIG key, CA
bundle). Each role is a folder of the backup, and ``manifest.json`` lists every file with its size,
SHA-256, mode, owner and mtime. The manifest is written last: a backup without one is unfinished.

Consistency while the daemon writes (docs/operator-guide.md, "Backups"):

- Every SQLite database is copied with SQLite's online backup (one step, under a read
  transaction: a committed state, never a torn file; WAL mode lets the daemon keep writing).
- The queue database is copied first. A large body lives in spool/<name> and is written and
  fsynced *before* its record commits, and removed only *after* its record is deleted
  (backend/queue/spool.py), so every record in the snapshot has its file on disk unless the
  message was deleted since; such records are dropped from the snapshot (the box deleted them
  anyway). Spool files without a record in the snapshot (accepted after it) are not copied.
- Maildirs are walked after the queue snapshot, so a message the snapshot records as delivered
  locally is in the copy; one delivered after it is delivered again after a restore, which the
  Maildir code recognises (``already_delivered``) and does not duplicate. ``tmp/`` is never
  copied (files being written); a message that moves from new/ to cur/ or changes flags while the
  walk runs is found under its new name, once.
- Temporary files of atomic writes (``.NAME….tmp``) and SQLite's -wal/-shm/-journal are skipped.

Restore verifies every checksum before it writes anything, refuses a data directory that already
holds files (unless forced), then puts each role where the *restored* config says (relative
paths in it are relative to where the config is restored, so a home can also move), with modes,
owners (by name, as root) and mtimes. Blocking functions; the CLI is backend/cli/backup.py.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import hashlib
import json
import os
import pwd
import shutil
import sqlite3
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from backend.config import BackendConfig
from backend.durable import write_atomic

MANIFEST = "manifest.json"
FORMAT = "homemx-backup"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
QUEUE_DB = "queue.sqlite3"
SPOOL = "spool"
CHUNK = 1 << 20

# Files the config names, outside the trees: (role, how to read it from the loaded config).
# The role is also the dotted key in backend.toml, which restore reads from the restored config.
_CONFIG_FILES = (
    ("users.passwd_file", lambda c: c.passwd_file),
    ("tls.cert", lambda c: c.tls.cert),
    ("tls.key", lambda c: c.tls.key),
    ("delivery.smarthost_password_file", lambda c: c.delivery.smarthost_password_file),
    ("acme.dns01_tsig_key_file", lambda c: c.acme.dns01_tsig_key_file),
    ("acme.ca_bundle", lambda c: c.acme.ca_bundle),
)


class BackupError(Exception):
    """A backup or restore that cannot go on; the message is the one line the operator reads."""


@dataclass
class Role:
    name: str  # folder in the backup; for all but "config", the dotted key of backend.toml
    kind: str  # "tree" or "file"
    original: Path  # absolute path on the box backed up

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "original": str(self.original)}


@dataclass
class Summary:
    files: int = 0
    bytes: int = 0
    messages: int = 0  # in the queue snapshot
    spooled: int = 0
    dropped: list[str] = field(default_factory=list)  # queue ids deleted while the backup ran


# ---------------------------------------------------------------- what is backed up


def roles_of(cfg: BackendConfig) -> list[Role]:
    """The config, the trees and the named files of this config; a path inside a tree is not a role of its own."""
    data = cfg.server.data_dir.resolve()
    roles = [Role("config", "file", cfg.path.resolve()), Role("server.data_dir", "tree", data)]
    trees = [data]

    def outside(p: Path) -> bool:
        return not any(p == t or p.is_relative_to(t) for t in trees)

    for name, path in (("users.maildir_root", cfg.maildir_root), ("api.sandbox_maildir", cfg.api.sandbox_maildir)):
        if path is not None and outside(path.resolve()):
            roles.append(Role(name, "tree", path.resolve()))
            trees.append(path.resolve())
    named = [(n, get(cfg)) for n, get in _CONFIG_FILES]
    named += [(f"dkim.{i}.private_key", k.private_key) for i, k in enumerate(cfg.dkim)]
    for name, path in named:
        if path is not None and outside(path.resolve()):
            roles.append(Role(name, "file", path.resolve()))
    return roles


def _owner(st: os.stat_result) -> dict:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = None
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = None
    return {"owner": user, "group": group, "uid": st.st_uid, "gid": st.st_gid}


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def _is_maildir(d: Path) -> bool:
    return (d / "cur").is_dir() and (d / "new").is_dir()


def _skipped_name(name: str) -> bool:
    """Half-written files: write_atomic's ``.NAME.PID.RAND.tmp``, the users file's ``.passwd.XXXX``,
    spool's ``NAME.tmp``."""
    return name.endswith(".tmp") or name.startswith(".passwd.")


# ---------------------------------------------------------------- backup


class _Writer:
    """Puts files into the backup folder and remembers their manifest entries."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[str, dict] = {}
        self.summary = Summary()

    def _dest(self, rel: str) -> Path:
        dest = self.root / rel
        if not dest.parent.exists():
            dest.parent.mkdir(mode=0o700, parents=True)
        return dest

    def directory(self, rel: str, st: os.stat_result) -> None:
        (self.root / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.entries[rel] = {"path": rel, "type": "dir", "mode": f"{stat.S_IMODE(st.st_mode):04o}", **_owner(st)}

    def symlink(self, rel: str, source: Path, st: os.stat_result) -> None:
        target = os.readlink(source)
        os.symlink(target, self._dest(rel))
        self.entries[rel] = {"path": rel, "type": "symlink", "target": target, **_owner(st)}

    def copy(self, rel: str, source: Path) -> None:
        """Copy one file as it is now (raises FileNotFoundError when it is gone)."""
        with open(source, "rb") as src:
            st = os.fstat(src.fileno())
            dest = self._dest(rel)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
        self._file_entry(rel, st, size, digest.hexdigest())

    def sqlite(self, rel: str, source: Path) -> sqlite3.Connection:
        """Online backup of a SQLite database; returns an open connection to the copy (the caller closes it)."""
        st = os.stat(source)
        dest = self._dest(rel)
        # mode=ro: the backup never writes the live database (SQLite itself gives a -shm it has
        # to create, as root, to the database's owner).
        try:
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                src.execute("PRAGMA busy_timeout=30000")
                copy = sqlite3.connect(dest, isolation_level=None)
                os.chmod(dest, 0o600)
                src.backup(copy)  # pages=-1: one step under one read transaction, a committed state
            finally:
                src.close()
            # The copy must stand alone: no -wal beside it in the backup.
            copy.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.Error as e:
            raise BackupError(f"{source}: SQLite online backup failed: {e}") from None
        self._pending_sqlite = (rel, st)
        return copy

    def finish_sqlite(self, copy: sqlite3.Connection) -> None:
        copy.close()
        rel, st = self._pending_sqlite
        dest = self.root / rel
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        self._file_entry(rel, st, dest.stat().st_size, _sha256(dest))

    def _file_entry(self, rel: str, st: os.stat_result, size: int, digest: str) -> None:
        self.entries[rel] = {"path": rel, "type": "file", "size": size, "sha256": digest,
                             "mode": f"{stat.S_IMODE(st.st_mode):04o}", "mtime": st.st_mtime, **_owner(st)}
        self.summary.files += 1
        self.summary.bytes += size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def make_backup(cfg: BackendConfig, target: Path, now: datetime.datetime | None = None) -> Summary:
    """Write a backup of the box ``cfg`` describes into ``target`` (absent or an empty directory; made 0700)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target}: exists and is not an empty directory (a backup goes into a new one)")
    roles = roles_of(cfg)
    inside = next((r for r in roles if r.kind == "tree" and target.resolve().is_relative_to(r.original)), None)
    if inside is not None:
        raise BackupError(f"{target}: inside {inside.original}, which the backup copies (choose a folder outside it)")
    existed = target.exists()
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    try:
        return _write_backup(cfg, target, roles, now)
    except BaseException:
        # No half backup left behind (it would hold some of the secrets); a folder we were given stays, empty.
        for child in target.iterdir() if existed else ():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if not existed:
            shutil.rmtree(target, ignore_errors=True)
        raise


def _write_backup(cfg: BackendConfig, target: Path, roles: list[Role], now: datetime.datetime | None) -> Summary:
    w = _Writer(target)
    data = cfg.server.data_dir.resolve()
    try:
        # 1. The queue first: the point in time the rest agrees with.
        queue_db = data / QUEUE_DB
        if queue_db.exists():
            _backup_queue(w, queue_db, f"server.data_dir/{QUEUE_DB}")
        # 2. The trees (other SQLite stores, ACME, Maildirs, ...), then the named files.
        for role in roles:
            if role.kind == "tree":
                _walk(w, role.name, role.original, skip={queue_db, data / SPOOL})
            else:
                # Its folder's mode and owner too, for a restore that has to create it (a 0700 dkim/ of the mail user).
                w.directory(role.name, os.stat(role.original.parent))
                w.copy(f"{role.name}/{role.original.name}", role.original)
    except PermissionError as e:
        raise BackupError(f"cannot read {e.filename}: permission denied "
                          "(run as root or as the backend's user)") from None
    except FileNotFoundError as e:
        raise BackupError(f"{e.filename}: missing (named in {cfg.path})") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "homemx_version": _version(),
        "created": now.isoformat(timespec="seconds"),
        "hostname": cfg.server.hostname,
        "roles": [r.as_json() for r in roles],
        "queue": {"messages": w.summary.messages, "spooled": w.summary.spooled, "dropped": w.summary.dropped},
        "files": [w.entries[k] for k in sorted(w.entries)],
    }
    write_atomic(target / MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n", 0o600)
    os.sync()  # the whole backup on disk before we say it is done
    return w.summary


def _backup_queue(w: _Writer, queue_db: Path, rel: str) -> None:
    """The queue snapshot and exactly the spool files its records name (module docstring)."""
    spool_dir = queue_db.parent / SPOOL
    spool_rel = rel.rsplit("/", 1)[0] + "/" + SPOOL
    copy = w.sqlite(rel, queue_db)
    try:
        copy.execute("PRAGMA foreign_keys=ON")
        if spool_dir.is_dir():
            w.directory(spool_rel, os.stat(spool_dir))
        has_spool = "spool" in {row[1] for row in copy.execute("PRAGMA table_info(message)")}
        rows = copy.execute("SELECT id, spool FROM message" if has_spool else "SELECT id, NULL FROM message").fetchall()
        w.summary.messages = len(rows)
        for qid, name in rows:
            if not name:
                continue
            try:
                w.copy(f"{spool_rel}/{name}", spool_dir / name)
                w.summary.spooled += 1
            except FileNotFoundError:
                w.summary.dropped.append(qid)  # deleted (and its file removed) after the snapshot
        if w.summary.dropped:
            marks = ",".join("?" * len(w.summary.dropped))
            copy.execute(f"DELETE FROM message WHERE id IN ({marks})", w.summary.dropped)  # recipients cascade
            w.summary.messages -= len(w.summary.dropped)
    finally:
        w.finish_sqlite(copy)


def _walk(w: _Writer, role: str, top: Path, skip: set[Path]) -> None:
    seen: set[tuple[Path, str]] = set()  # (maildir, unique part of a message file name) already copied
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        rel_dir = role if here == top else f"{role}/{here.relative_to(top)}"
        try:
            w.directory(rel_dir, os.stat(here))
        except FileNotFoundError:
            dirnames[:] = []  # removed while we walked (a Maildir++ folder deleted over IMAP)
            continue
        in_maildir = here.name in ("new", "cur") and _is_maildir(here.parent)
        keep = []
        for d in dirnames:
            sub = here / d
            if sub.is_symlink():
                w.symlink(f"{rel_dir}/{d}", sub, os.lstat(sub))
            elif sub in skip or (d == "tmp" and _is_maildir(here)):
                with contextlib.suppress(FileNotFoundError):  # the folder itself, empty: its mode and owner
                    w.directory(f"{rel_dir}/{d}", os.stat(sub))
            else:
                keep.append(d)
        dirnames[:] = sorted(keep, key=lambda d: (d != "new", d))  # new/ before cur/: moves go that way
        for name in sorted(filenames):
            path = here / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                w.symlink(f"{rel_dir}/{name}", path, st)
                continue
            if path in skip or _skipped_name(name) or (st is not None and not stat.S_ISREG(st.st_mode)):
                continue  # the live queue (copied first), sockets, half-written files
            if name.endswith(SQLITE_SIDECARS) and _is_sqlite(here / name.rsplit("-", 1)[0]):
                continue
            if in_maildir:
                _copy_message(w, rel_dir, here, name, seen)
            elif _is_sqlite(path):
                w.finish_sqlite(w.sqlite(f"{rel_dir}/{name}", path))
            else:
                try:
                    w.copy(f"{rel_dir}/{name}", path)
                except FileNotFoundError:
                    pass  # removed while we walked (an old ACME archive, a replaced state file)


def _copy_message(w: _Writer, rel_dir: str, here: Path, name: str, seen: set) -> None:
    """One Maildir message, once, under whatever name it has now (new/ → cur/, flag changes)."""
    maildir = here.parent
    unique = name.split(":", 1)[0]
    if (maildir, unique) in seen:
        return
    rel_maildir = rel_dir.rsplit("/", 1)[0]

    def candidates() -> Iterator[tuple[str, str]]:
        yield here.name, name
        # Only when it is gone: look for its new name (listing the folder for every message would be quadratic).
        for sub in ("new", "cur"):
            yield from ((sub, n) for n in _listdir(maildir / sub) if n.split(":", 1)[0] == unique)

    for sub, n in candidates():
        try:
            w.copy(f"{rel_maildir}/{sub}/{n}", maildir / sub / n)
        except FileNotFoundError:
            continue
        seen.add((maildir, unique))
        return
    # Gone from both: the user expunged it while the walk ran.


def _listdir(d: Path) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("homemx")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- restore


def read_manifest(backup: Path) -> dict:
    path = Path(backup) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{path}: missing: not a homemx backup, or one that did not finish") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"{path}: unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: not a homemx backup manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise BackupError(f"{path}: backup format version {manifest.get('version')} is not supported "
                          f"(this homemx reads version {FORMAT_VERSION})")
    try:
        names = {r["name"] for r in manifest["roles"]}
        ok = {"config", "server.data_dir"} <= names and all(
            isinstance(e["path"], str) and e["type"] in ("file", "dir", "symlink") for e in manifest["files"])
        ok = ok and any(e["path"].startswith("config/") and e["type"] == "file" for e in manifest["files"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise BackupError(f"{path}: incomplete manifest (roles, files or the config entry missing)")
    return manifest


def verify(backup: Path, manifest: dict) -> None:
    """Every file of the manifest is there with its size and SHA-256; the first that is not is named."""
    backup = Path(backup)
    for entry in manifest["files"]:
        if ".." in Path(entry["path"]).parts or Path(entry["path"]).is_absolute():
            raise BackupError(f"{backup / MANIFEST}: bad path {entry['path']!r}")
        if entry["type"] != "file":
            continue
        path = backup / entry["path"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BackupError(f"{path}: missing from the backup (listed in its manifest)") from None
        if size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise BackupError(f"{path}: checksum mismatch: the backup is damaged or was altered (nothing restored)")


def _config_value(doc: dict, dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def restore_targets(backup: Path, manifest: dict, config_target: Path | None) -> dict[str, Path]:
    """Where each role goes: the config to ``config_target`` (default: where it was), everything else
    where the restored config names it (relative paths: relative to the restored config's folder)."""
    roles = {r["name"]: r for r in manifest["roles"]}
    config_entry = next(e for e in manifest["files"] if e["path"].startswith("config/") and e["type"] == "file")
    config_target = Path(config_target or roles["config"]["original"]).absolute()
    try:
        doc = tomllib.loads((Path(backup) / config_entry["path"]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BackupError(f"{Path(backup) / config_entry['path']}: cannot read the backed-up config: {e}") from None
    targets = {"config": config_target}
    for name in roles:
        if name == "config":
            continue
        value = _config_value(doc, name)
        if not isinstance(value, str):
            raise BackupError(f"{Path(backup) / config_entry['path']}: {name} is not set (the backup has it)")
        p = Path(value)
        targets[name] = p if p.is_absolute() else config_target.parent / p
    return targets


def _files_in(d: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(d):
        for n in filenames:
            yield Path(dirpath) / n


def restore(backup: Path, config_target: Path | None = None, force: bool = False) -> Summary:
    """Put a backup back: verify it, check the target, write every file with its mode and owner."""
    from backend.queue.runner import poke_daemon

    backup = Path(backup)
    manifest = read_manifest(backup)
    verify(backup, manifest)
    targets = restore_targets(backup, manifest, config_target)
    roles = {r["name"]: r for r in manifest["roles"]}
    data = targets["server.data_dir"]
    if poke_daemon(data / QUEUE_DB):
        raise BackupError(f"{data}: a homemx-backend daemon is running on it; stop it first")
    if not force:
        for name, role in roles.items():
            if role["kind"] == "tree" and targets[name].exists():
                found = next(_files_in(targets[name]), None)
                if found is not None:
                    raise BackupError(f"{targets[name]}: not empty (holds {found}); restore writes into an empty "
                                      "data directory only (--force writes over it)")
    root = os.geteuid() == 0
    summary = Summary()
    entries = manifest["files"]
    placed: list[tuple[Path, dict]] = []
    for entry in entries:  # sorted: a folder comes before what is in it
        role, _, rest = entry["path"].partition("/")
        if role not in targets:
            raise BackupError(f"{backup / MANIFEST}: {entry['path']} belongs to no role of the backup")
        dest = targets[role] if roles[role]["kind"] == "file" or not rest else targets[role] / rest
        if entry["type"] == "dir" and roles[role]["kind"] == "file":
            dest = dest.parent  # the folder of a named file: its mode and owner only when restore makes it
            if dest.exists():
                continue
            dest.mkdir(mode=0o700, parents=True)
        elif entry["type"] == "dir":
            dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif entry["type"] == "symlink":
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.restore.tmp")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(entry["target"], tmp)
            os.replace(tmp, dest)
        else:
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _place(backup / entry["path"], dest, entry)
            summary.files += 1
            summary.bytes += entry["size"]
        placed.append((dest, entry))
    # Owners and modes last, innermost first: a restrictive folder never blocks what goes into it.
    for dest, entry in reversed(placed):
        if root:
            uid, gid = _ids(entry)
            os.lchown(dest, uid, gid)
        if entry["type"] != "symlink":
            os.chmod(dest, int(entry["mode"], 8))
        if entry["type"] == "file":
            os.utime(dest, (entry["mtime"], entry["mtime"]))
    os.sync()
    summary.messages = manifest.get("queue", {}).get("messages", 0)
    return summary


def _place(source: Path, dest: Path, entry: dict) -> None:
    """Write one file next to its destination and rename it in; a restored database loses the stale
    -wal/-shm of whatever was there before (they would be replayed onto it)."""
    tmp = dest.with_name(f".{dest.name}.restore.tmp")
    with open(source, "rb") as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    if dest.name.endswith(".sqlite3") or _is_sqlite(tmp):
        for suffix in SQLITE_SIDECARS:
            try:
                os.unlink(f"{dest}{suffix}")
            except FileNotFoundError:
                pass
    os.replace(tmp, dest)  # made durable by the os.sync() at the end of restore()


def _ids(entry: dict) -> tuple[int, int]:
    """The owner by name on this box (uids differ between boxes), else the number recorded."""
    try:
        uid = pwd.getpwnam(entry["owner"]).pw_uid if entry.get("owner") else entry["uid"]
    except KeyError:
        uid = entry["uid"]
    try:
        gid = grp.getgrnam(entry["group"]).gr_gid if entry.get("group") else entry["gid"]
    except KeyError:
        gid = entry["gid"]
    return uid, gid
