"""API keys of the HTTP send API: who may send, as whom, how fast and in which mode, stored in
data_dir/apikeys.sqlite3 (0600) with what the API remembers per key (idempotent answers, which
key sent which message).

A key's token is shown once, at creation, and only its SHA-256 is stored: the token is 256 random
bits, so a plain hash is as strong as a slow one would be (a slow hash protects low-entropy
passwords), and a request costs one hash. The webhook secret is stored as it is, since signing
needs it (backend/http/webhooks.py); that is why the file is 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from backend.smtp.paths import PathError, parse_address

PRODUCTION, SANDBOX, REDIRECT, BCC = "production", "sandbox", "redirect", "bcc"
MODES = (PRODUCTION, SANDBOX, REDIRECT, BCC)
TOKEN_PREFIX = "hmx_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS apikey (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    token_sha256    TEXT NOT NULL UNIQUE,  -- hex; the token itself is never stored
    senders         TEXT NOT NULL,         -- JSON list: addresses and "@domain" patterns
    rate_per_minute INTEGER NOT NULL,
    mode            TEXT NOT NULL,
    redirect_to     TEXT NOT NULL,         -- JSON list
    bcc_to          TEXT NOT NULL,         -- JSON list
    webhook_url     TEXT,
    webhook_secret  TEXT,
    revoked         REAL,                  -- when; NULL: in service
    created         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotent (
    key_id      TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,             -- SHA-256 of the request body: a reused key with another body is refused
    status      INTEGER NOT NULL,
    body        TEXT NOT NULL,             -- the JSON answered the first time
    created     REAL NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE TABLE IF NOT EXISTS sent (
    id      TEXT PRIMARY KEY,              -- the queue id (sandbox: the id answered, never queued)
    key_id  TEXT NOT NULL,
    mode    TEXT NOT NULL,
    recipients TEXT NOT NULL,              -- JSON list of the envelope recipients
    tags    TEXT NOT NULL,                 -- JSON list, as the request gave them
    created REAL NOT NULL
);
"""


class APIKeyError(ValueError):
    """A key cannot be created or changed as asked; the message says why."""


@dataclass(frozen=True)
class APIKey:
    id: str
    name: str
    senders: tuple[str, ...]  # "user@domain" or "@domain"
    rate_per_minute: int
    mode: str
    redirect_to: tuple[str, ...] = ()
    bcc_to: tuple[str, ...] = ()
    webhook_url: str | None = None
    revoked: float | None = None
    created: float = 0.0

    def allows_sender(self, address: str) -> bool:
        """Whether ``address`` may be the sender (envelope and From): an exact address or any
        address of an "@domain" pattern, compared without case."""
        address = address.lower()
        domain = "@" + address.rpartition("@")[2]
        return any(s == address or s == domain for s in self.senders)

    def to_json(self) -> dict:
        return {
            "id": self.id, "name": self.name, "senders": list(self.senders), "rate_per_minute": self.rate_per_minute,
            "mode": self.mode, "redirect_to": list(self.redirect_to), "bcc_to": list(self.bcc_to),
            "webhook_url": self.webhook_url, "revoked": self.revoked, "created": self.created,
        }


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def normalize_sender(pattern: str) -> str:
    """An address or "@domain", checked with the SMTP path rules and lower-cased."""
    pattern = pattern.strip()
    try:
        if pattern.startswith("@"):
            return "@" + parse_address("x" + pattern).domain
        return parse_address(pattern).key
    except PathError as e:
        raise APIKeyError(f"{pattern!r} is not an address or @domain ({e.reply[10:]})") from None


def normalize_address(address: str) -> str:
    try:
        return str(parse_address(address))
    except PathError as e:
        raise APIKeyError(f"{address!r} is not an address ({e.reply[10:]})") from None


class KeyStore:
    """The keys file. Thread-safe (one connection behind a lock); the daemon calls it from its
    worker threads, the CLI from its own process (SQLite's WAL lets both at once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: the webhook secrets are in it.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an idempotent answer stored before the 202 survives a power loss with the message.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- keys ----------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        senders: list[str] | tuple[str, ...],
        *,
        rate_per_minute: int = 60,
        mode: str = PRODUCTION,
        redirect_to: list[str] | tuple[str, ...] = (),
        bcc_to: list[str] | tuple[str, ...] = (),
        webhook_url: str | None = None,
        now: float | None = None,
    ) -> tuple[APIKey, str, str | None]:
        """A new key; returns it with its token and webhook secret (None without a webhook URL),
        which are never shown again."""
        if not name.strip():
            raise APIKeyError("a key needs a name")
        if not senders:
            raise APIKeyError("a key needs at least one sender (an address or @domain)")
        if mode not in MODES:
            raise APIKeyError(f"mode must be one of {', '.join(MODES)}")
        if rate_per_minute < 1:
            raise APIKeyError("the rate must be at least 1 message a minute")
        if mode == REDIRECT and not redirect_to:
            raise APIKeyError("mode redirect needs --redirect-to")
        if mode == BCC and not bcc_to:
            raise APIKeyError("mode bcc needs --bcc-to")
        if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
            raise APIKeyError("the webhook URL must be http:// or https://")
        key = APIKey(
            id="key_" + secrets.token_hex(6),
            name=name.strip(),
            senders=tuple(dict.fromkeys(normalize_sender(s) for s in senders)),
            rate_per_minute=rate_per_minute,
            mode=mode,
            redirect_to=tuple(normalize_address(a) for a in redirect_to),
            bcc_to=tuple(normalize_address(a) for a in bcc_to),
            webhook_url=webhook_url,
            created=time.time() if now is None else now,
        )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        secret = ("whsec_" + secrets.token_urlsafe(32)) if webhook_url else None
        with self._lock:
            self._db.execute(
                "INSERT INTO apikey (id, name, token_sha256, senders, rate_per_minute, mode, redirect_to, bcc_to,"
                " webhook_url, webhook_secret, revoked, created) VALUES (?,?,?,?,?,?,?,?,?,?,NULL,?)",
                (key.id, key.name, token_hash(token), json.dumps(key.senders), key.rate_per_minute, key.mode,
                 json.dumps(key.redirect_to), json.dumps(key.bcc_to), key.webhook_url, secret, key.created),
            )
        return key, token, secret

    _COLUMNS = "id, name, senders, rate_per_minute, mode, redirect_to, bcc_to, webhook_url, revoked, created"

    @staticmethod
    def _key(row) -> APIKey:
        return APIKey(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], tuple(json.loads(row[5])),
                      tuple(json.loads(row[6])), row[7], row[8], row[9])

    def list(self) -> list[APIKey]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM apikey ORDER BY created, id").fetchall()
        return [self._key(r) for r in rows]

    def get(self, key_id: str) -> APIKey | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM apikey WHERE id = ?", (key_id,)).fetchone()
        return self._key(row) if row else None

    def revoke(self, key_id: str, now: float | None = None) -> bool:
        """Revoke a key (at once: every request reads the file). False: no such key in service."""
        with self._lock:
            cur = self._db.execute("UPDATE apikey SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                   (time.time() if now is None else now, key_id))
        return cur.rowcount == 1

    def verify(self, token: str) -> APIKey | None:
        """The key in service that ``token`` belongs to; None for an unknown or revoked token."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = token_hash(token)
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS}, token_sha256 FROM apikey WHERE token_sha256 = ?",
                                   (digest,)).fetchone()
        # The lookup is by hash (nothing about the token leaks from its timing); compare anyway.
        if row is None or not hmac.compare_digest(row[10], digest) or row[8] is not None:
            return None
        return self._key(row[:10])

    def webhook_secret(self, key_id: str) -> str | None:
        """The secret that signs the key's webhook events (backend/http/webhooks.py)."""
        with self._lock:
            row = self._db.execute("SELECT webhook_secret FROM apikey WHERE id = ?", (key_id,)).fetchone()
        return row[0] if row else None

    # -- what the API remembers ------------------------------------------------------------------

    def idempotent_answer(self, key_id: str, idem_key: str) -> tuple[str, int, dict] | None:
        """(body fingerprint, status, JSON body) answered the first time, or None."""
        with self._lock:
            row = self._db.execute("SELECT fingerprint, status, body FROM idempotent WHERE key_id = ? AND idem_key = ?",
                                   (key_id, idem_key)).fetchone()
        return (row[0], row[1], json.loads(row[2])) if row else None

    def record_sent(self, message_id: str, key_id: str, mode: str, recipients: list[str], tags: list[str],
                    idem: tuple[str, str, int, dict] | None = None) -> None:
        """Remember that ``key_id`` sent ``message_id`` (GET /v1/messages/{id} answers only its
        sender) and, with an Idempotency-Key (idem_key, fingerprint, status, body), the answer;
        one commit, made before the 202 goes out."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO sent (id, key_id, mode, recipients, tags, created) VALUES (?,?,?,?,?,?)",
                                 (message_id, key_id, mode, json.dumps(recipients), json.dumps(tags), now))
                if idem is not None:
                    idem_key, fingerprint, status, body = idem
                    self._db.execute(
                        "INSERT INTO idempotent (key_id, idem_key, fingerprint, status, body, created)"
                        " VALUES (?,?,?,?,?,?)", (key_id, idem_key, fingerprint, status, json.dumps(body), now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def sent(self, message_id: str) -> tuple[str, str, list[str], float, list[str]] | None:
        """(key id, mode, recipients, created, tags) of a message sent through the API, or None."""
        with self._lock:
            row = self._db.execute("SELECT key_id, mode, recipients, created, tags FROM sent WHERE id = ?",
                                   (message_id,)).fetchone()
        return (row[0], row[1], json.loads(row[2]), row[3], json.loads(row[4])) if row else None
