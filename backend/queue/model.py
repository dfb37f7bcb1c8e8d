"""The queue's records and errors, whatever stores them: recipient states, a new message as it is
handed in, a queued message and its recipients as they are read back, and the queue id."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

QUEUED, DEFERRED, DELIVERED, BOUNCED, HELD = "queued", "deferred", "delivered", "bounced", "held"
ACTIVE_STATES = (QUEUED, DEFERRED)
FINAL_STATES = (DELIVERED, BOUNCED)
STATES = (QUEUED, DEFERRED, DELIVERED, BOUNCED, HELD)


class QueueError(Exception):
    """A queue operation that cannot be done (unknown id, wrong state); the message says why."""


@dataclass(frozen=True)
class NewRecipient:
    address: str
    orig_address: str
    local: bool


@dataclass(frozen=True)
class NewMessage:
    sender: str  # '' for <>
    recipients: tuple[NewRecipient, ...]
    content: bytes
    listener: str
    client_addr: str | None = None
    auth_user: str | None = None
    id: str | None = None  # pre-assigned queue id (the Received header names it); None: assign one
    spool: str | None = None  # body already durable in spool/<spool> (see Queue.spool_large)
    folder: str | None = None  # local recipients get it in this Maildir++ folder ("Junk"); None: the inbox
    api_key: str | None = None  # id of the HTTP API key that sent it (its webhook gets the outcomes); None: not the API


@dataclass(frozen=True)
class Recipient:
    id: int
    message_id: str
    address: str
    orig_address: str
    domain: str
    local: bool
    state: str
    attempts: int
    next_attempt: float
    last_attempt: float | None
    last_reply: str | None


@dataclass(frozen=True)
class QueueEntry:
    id: str
    created: float
    sender: str
    listener: str
    client_addr: str | None
    auth_user: str | None
    size: int
    recipients: tuple[Recipient, ...] = field(default=())
    delay_dsn_sent: bool = False
    folder: str | None = None
    api_key: str | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "created": self.created,
            "sender": self.sender,
            "listener": self.listener,
            "client_addr": self.client_addr,
            "auth_user": self.auth_user,
            "size": self.size,
            "folder": self.folder,
            "api_key": self.api_key,
            "recipients": [
                {
                    "id": r.id,
                    "address": r.address,
                    "orig_address": r.orig_address,
                    "state": r.state,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt,
                    "last_attempt": r.last_attempt,
                    "last_reply": r.last_reply,
                }
                for r in self.recipients
            ],
        }


def new_queue_id(now: float) -> str:
    """Sortable by arrival (millisecond hex time) and unique (random suffix)."""
    return f"{int(now * 1000):011X}{secrets.token_hex(3).upper()}"
