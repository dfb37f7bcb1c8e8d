"""Mail users in a Dovecot-compatible passwd-file: lookup, password check, add/passwd/delete.

Format (Dovecot "passwd-file" driver): ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`` with the
full address as the user name and ``{BLF-CRYPT}`` bcrypt hashes, so Dovecot can authenticate IMAP
against the very same file (``passdb { driver = passwd-file args = scheme=BLF-CRYPT /etc/homemx/passwd }``).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from backend.durable import fsync_dir, unlink_quietly

log = logging.getLogger("homemx.users")

SCHEME = "{BLF-CRYPT}"
BCRYPT_ROUNDS = 12  # ~250 ms on a small box: cheap for a login, expensive for a guesser


class UserError(Exception):
    """A user-management problem with a message fit for the CLI."""


@dataclass(frozen=True)
class User:
    address: str  # lower-cased user@domain
    password_hash: str  # with scheme prefix


def hash_password(password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    # Dovecot's BLF-CRYPT accepts $2y$ (and $2b$); bcrypt produces $2b$.
    return SCHEME + bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: bytes, stored: str) -> bool:
    """Constant-time check of a password against a ``{BLF-CRYPT}`` hash. Other schemes never match."""
    if not stored.startswith(SCHEME):
        return False
    h = stored[len(SCHEME) :].encode("ascii")
    if h.startswith(b"$2y$"):
        h = b"$2b$" + h[4:]
    try:
        return bcrypt.checkpw(password, h)
    except ValueError:
        return False


def _stamp_of(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


@functools.cache
def _dummy_hash() -> str:
    # Checked when the user does not exist, so a missing user costs the same time as a wrong
    # password (no user enumeration through timing).
    return hash_password("homemx-dummy-password", rounds=BCRYPT_ROUNDS)


def parse_passwd(text: str, source: str = "passwd-file") -> dict[str, User]:
    users: dict[str, User] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 2 or "@" not in fields[0]:
            raise UserError(f"{source}:{lineno}: expected 'user@domain:{{SCHEME}}hash:...'")
        addr = fields[0].strip().lower()
        users[addr] = User(addr, fields[1])
    return users


class UserDB:
    """The passwd-file, re-read when it changes on disk (the CLI edits it while the daemon runs).

    Lookups keep the users read before when a changed file cannot be read or parsed (a half-edited
    file must not lock everybody out), and say so in one log line per broken version of the file;
    the editing methods and ``all`` raise instead (the CLI must never rewrite a file it misread).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._bad_stamp: tuple[int, int] | None = None  # the broken version already reported
        self._users: dict[str, User] = {}

    def _reload(self, strict: bool = False, force: bool = False) -> dict[str, User]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._users, self._stamp = {}, None
                return self._users
            stamp = (st.st_mtime_ns, st.st_size)
            if force or (stamp != self._stamp and (strict or stamp != self._bad_stamp)):
                try:
                    users = parse_passwd(self.path.read_text(encoding="utf-8"), str(self.path))
                except (UserError, OSError, UnicodeDecodeError) as e:
                    if strict or force:
                        raise UserError(str(e) if isinstance(e, UserError) else f"{self.path}: {e}") from None
                    if stamp != self._bad_stamp:
                        log.warning("users: %s unusable, keeping the %d users read before: %s", self.path, len(self._users), e)
                        self._bad_stamp = stamp
                    return self._users
                self._users, self._stamp = users, stamp
            return self._users

    def reload(self) -> tuple[bool, str]:
        """Re-read the file now, whatever its time stamp says (SIGHUP: an edit that kept the
        mtime and size, e.g. ``rsync -t``). Returns (read, what changed in words); never raises:
        a broken file keeps the users read before."""
        with self._lock:
            before = set(self._users) if self._stamp is not None else None  # None: never read yet
        try:
            after = set(self._reload(force=True))
        except UserError as e:
            with self._lock:
                self._bad_stamp = _stamp_of(self.path)  # reported by the caller: lookups stay quiet
            return False, f"users: kept {len(before or ())}: {e}"
        if before is None:
            return True, f"users: {len(after)}"
        return True, f"users: {len(after)} (+{len(after - before)} -{len(before - after)})"

    def get(self, address: str) -> User | None:
        return self._reload().get(address.lower())

    def exists(self, address: str) -> bool:
        return self.get(address) is not None

    def first_user(self, domain: str) -> str | None:
        """The first user of ``domain`` in the file (the first added: provisioning's first_user),
        else the first user of the file; None when there is no user at all."""
        users = list(self._reload())
        domain = domain.lower()
        return next((a for a in users if a.rpartition("@")[2] == domain), users[0] if users else None)

    def all(self) -> list[User]:
        return sorted(self._reload(strict=True).values(), key=lambda u: u.address)

    def authenticate(self, login: bytes, password: bytes) -> str | None:
        """Blocking (bcrypt): run in a worker thread. Returns the user's address or None."""
        try:
            address = login.decode("utf-8").strip().lower()
        except UnicodeDecodeError:
            address = ""
        user = self.get(address) if address else None
        if user is None:
            verify_password(password, _dummy_hash())
            return None
        return user.address if verify_password(password, user.password_hash) else None

    # -- editing (CLI) ------------------------------------------------------------------------

    def _write(self, users: dict[str, User]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # In the order users were added (a new one goes last): the first line stays the first user,
        # who receives postmaster@ and abuse@ by default (first_user, backend/receive/directory.py).
        lines = [f"{u.address}:{u.password_hash}::::::\n" for u in users.values()]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".passwd.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            # Keep ownership/mode of an existing file (root:dovecot 0640 in a provisioned system).
            try:
                st = self.path.stat()
                os.chmod(tmp, st.st_mode & 0o777)
                os.chown(tmp, st.st_uid, st.st_gid)
            except FileNotFoundError:
                os.chmod(tmp, 0o640)
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            unlink_quietly(Path(tmp))
            raise

    def add(self, address: str, password: str) -> None:
        users = dict(self._reload(strict=True))
        address = address.lower()
        if address in users:
            raise UserError(f"{self.path}: user {address} already exists (use 'users passwd')")
        users[address] = User(address, hash_password(password))
        self._write(users)

    def set_password(self, address: str, password: str) -> None:
        users = dict(self._reload(strict=True))
        address = address.lower()
        if address not in users:
            raise UserError(f"{self.path}: no user {address}")
        users[address] = User(address, hash_password(password))
        self._write(users)

    def delete(self, address: str) -> None:
        users = dict(self._reload(strict=True))
        address = address.lower()
        if address not in users:
            raise UserError(f"{self.path}: no user {address}")
        del users[address]
        self._write(users)
