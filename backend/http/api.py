"""The HTTP send API for homelab apps: ``POST /v1/messages`` builds a message (JSON, or a raw
RFC 5322 message) and hands it to the accept pipeline every SMTP listener uses; ``GET
/v1/messages/{id}`` tells its sender what became of it; ``GET /v1/openapi.json`` describes both.

Theory of operation. A request is authenticated by its key (``Authorization: Bearer <token>``,
backend/http/apikeys.py), then, for a send: an ``Idempotency-Key`` already answered gets its first
answer again; the key's token bucket must hold a token (429 with Retry-After); the body is read
within ``[api] max_message_size``; the message is built with the standard library's ``email``
package; the sender must be one of the key's (envelope and From); every recipient must parse
under the SMTP path rules (backend/smtp/paths.py) and resolve like a RCPT does (receive/directory.py);
the key's mode rewrites the envelope (redirect, bcc) or keeps the message out of the queue
(sandbox: a Maildir of its own). Then ``Acceptor.accept`` — trace header, Date and Message-ID,
DKIM, the durable queue, exactly as for SMTP — and only after it returned is the answer 202, so a
202 is as durable as an SMTP 250. Every refusal is an RFC 9457 problem document and queues nothing.

The accept pipeline is asked with kind ``lan``: a client trusted to submit without an SMTP login.
That kind's rule for the From header (one of our domains) holds for API messages too, and its
treatment is submission's (Date/Message-ID added, DKIM-signed); which addresses a key may use is
the API's own check, the narrower one.

Delivery is at least once: the queue commit comes first, then the record of which key sent the
message and the idempotent answer (data_dir/apikeys.sqlite3). A crash between the two loses the
answer, not the message; a client retrying with the same Idempotency-Key may then get a second copy.

Connections: plain HTTP/1.1 with keep-alive on aiohttp's low-level server (as the web face,
backend/http/server.py), or HTTPS with the server certificate. No PROXY header: the API listens
on the LAN, clients connect to it directly. Each connection has one deadline, ``[http] timeout``,
renewed when an answer is ready (a slow client is cut off, headers included).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import hashlib
import itertools
import json
import logging
import math
import re
import ssl
import time
from dataclasses import dataclass, field
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from http import HTTPStatus
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from backend.accept import LAN, Acceptor, Incoming, Refused
from backend.config import BackendConfig
from backend.http.apikeys import BCC, REDIRECT, SANDBOX, APIKey, KeyStore
from backend.local import maildir
from backend.metrics import BackendMetrics
from backend.queue.model import NewRecipient, QueueError, new_queue_id
from backend.queue.store import Queue
from backend.receive.clientaddr import canonical_host
from backend.receive.directory import Directory
from backend.smtp.message import crlf_canonical, header_block, split_header
from backend.smtp.paths import PathError, parse_address

log = logging.getLogger("homemx.api")

_conn_ids = itertools.count(1)

LISTENER = "api"  # the accept pipeline's listener name (metrics, queue record)
MAX_RECIPIENTS = 100  # per message, envelope included (the lan listener's default)
MAX_HEADERS = 64
MAX_LINE = 8190
LINGER = 2.0
PROBLEM = "/v1/problems/"  # RFC 9457 3.1.1: the problem type, a URI reference (listed in docs/api.md)
JSON_FIELDS = {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments", "headers", "tags"}
# Fields the API writes itself, or the pipeline does (trace, signature), or that would change the
# MIME structure: never taken from the "headers" object.
OWN_FIELDS = {
    "from", "to", "cc", "bcc", "reply-to", "subject", "sender", "mime-version", "content-type",
    "content-transfer-encoding", "content-disposition", "received", "return-path", "dkim-signature",
    "authentication-results", "arc-seal", "arc-message-signature", "arc-authentication-results",
}
_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 2.2 ftext, kept short enough to fold
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_MESSAGE_ID = re.compile(r"^[0-9A-F]{11}[0-9A-F]{6}$")  # queue.model.new_queue_id
MAX_TAGS = 10


class Problem(Exception):
    """An RFC 9457 answer: ``kind`` names the problem type (PROBLEM + kind)."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"type": PROBLEM + self.kind, "title": TITLES.get(self.kind, HTTPStatus(self.status).phrase),
                "status": self.status, "detail": self.detail}
        return web.Response(status=self.status, body=json.dumps(body).encode(), headers=self.headers,
                            content_type="application/problem+json")


TITLES = {
    "malformed-json": "The body is not a JSON object",
    "missing-field": "A required field is missing",
    "invalid-field": "A field has the wrong type or value",
    "invalid-address": "An address is not valid",
    "unknown-recipient": "Nobody here receives mail for a recipient",
    "too-many-recipients": "Too many recipients",
    "malformed-message": "The message cannot be used",
    "unauthorized": "Missing, unknown or revoked API key",
    "sender-not-allowed": "The key may not send as this address",
    "not-found": "No such resource",
    "gone": "The message is no longer in the queue",
    "method-not-allowed": "Method not allowed",
    "too-large": "The message is too large",
    "unsupported-media-type": "Send application/json or message/rfc822",
    "idempotency-key-reused": "This Idempotency-Key was used for another request",
    "rate-limited": "Over the key's rate limit",
    "rejected": "The message was rejected",
    "unavailable": "The message cannot be queued now; try again later",
}


# -- rate limit -------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """``rate`` messages a minute, bursts up to ``rate``: the key's limit."""

    rate: int
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """0 when a message may go now (a token is taken), else the seconds until one may."""
        if self.tokens < 0:
            self.tokens, self.stamp = float(self.rate), now
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate / 60.0)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) * 60.0 / self.rate


# -- building the message ---------------------------------------------------------------------


@dataclass
class Outgoing:
    """What a send request asks for, once built and checked: the envelope and the bytes."""

    sender: str
    recipients: list[str]  # envelope, as asked (before the key's mode)
    content: bytes  # CRLF, no Bcc field
    tags: list[str] = field(default_factory=list)


def _address(value, where: str) -> tuple[str, str]:
    """(display name, addr-spec) of one mailbox ``"Name <a@b>"`` or ``"a@b"``, checked with the
    SMTP path rules (an address a RCPT TO would refuse is refused here too)."""
    if not isinstance(value, str):
        raise Problem(400, "invalid-field", f"{where}: an address is a string")
    pairs = email.utils.getaddresses([value])
    if len(pairs) != 1 or not pairs[0][1] or "\r" in value or "\n" in value:
        raise Problem(400, "invalid-address", f"{where}: {value!r} is not one address")
    name, addr = pairs[0]
    try:
        parsed = parse_address(addr)
    except PathError as e:
        raise Problem(400, "invalid-address", f"{where}: {addr!r}: {e.reply[10:]}") from None
    return name, str(parsed)


def _addresses(doc: dict, name: str) -> list[tuple[str, str]]:
    value = doc.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise Problem(400, "invalid-field", f"{name}: an address or a list of addresses")
    return [_address(v, name) for v in values]


def _string(doc: dict, name: str) -> str | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, str):
        raise Problem(400, "invalid-field", f"{name}: a string")
    return value


def _header_list(pairs: list[tuple[str, str]]) -> list[HeaderAddress]:
    return [HeaderAddress(display_name=n, addr_spec=a) for n, a in pairs]


def build_from_json(body: bytes) -> Outgoing:
    """The message a JSON request describes (RFC 5322, MIME by the email package, policy SMTP: CRLF)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, "malformed-json", f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise Problem(400, "malformed-json", "the body must be a JSON object")
    unknown = sorted(set(doc) - JSON_FIELDS)
    if unknown:
        raise Problem(400, "invalid-field", f"unknown field(s): {', '.join(unknown)}")
    if "from" not in doc:
        raise Problem(400, "missing-field", "from is required")
    sender = _address(doc["from"], "from")
    to, cc, bcc = _addresses(doc, "to"), _addresses(doc, "cc"), _addresses(doc, "bcc")
    if not (to or cc or bcc):
        raise Problem(400, "missing-field", "at least one recipient (to, cc or bcc) is required")
    reply_to = _addresses(doc, "reply_to")
    subject, text, html = _string(doc, "subject"), _string(doc, "text"), _string(doc, "html")
    if text is None and html is None:
        raise Problem(400, "missing-field", "text or html is required")
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise Problem(400, "invalid-field", "headers: an object of strings")
    tags = doc.get("tags") or []
    if (not isinstance(tags, list) or len(tags) > MAX_TAGS
            or not all(isinstance(t, str) and _TAG.match(t) for t in tags)):
        raise Problem(400, "invalid-field", f"tags: at most {MAX_TAGS} strings of letters, digits and _.:-")
    attachments = doc.get("attachments") or []
    if not isinstance(attachments, list):
        raise Problem(400, "invalid-field", "attachments: a list")

    msg = EmailMessage(policy=SMTP)
    try:
        msg["From"] = _header_list([sender])
        if to:
            msg["To"] = _header_list(to)
        if cc:
            msg["Cc"] = _header_list(cc)  # Bcc: envelope only (RFC 5322 3.6.3)
        if reply_to:
            msg["Reply-To"] = _header_list(reply_to)
        if subject is not None:
            msg["Subject"] = subject
        for name, value in headers.items():
            if not _FIELD_NAME.match(name) or name.lower() in OWN_FIELDS or name.lower().startswith("x-homemx-"):
                raise Problem(400, "invalid-field", f"headers: {name!r} cannot be set here")
            msg[name] = value
    except ValueError as e:  # a CR or LF in a value: header injection
        raise Problem(400, "invalid-field", f"a header value cannot be used: {e}") from None
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    for i, a in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(a, dict) or not isinstance(a.get("filename"), str) or not isinstance(a.get("content"), str):
            raise Problem(400, "invalid-field", f"{where}: an object with filename and content (base64)")
        ctype = a.get("content_type") or "application/octet-stream"
        if not isinstance(ctype, str) or not re.match(r"^[\w.+-]+/[\w.+-]+$", ctype):
            raise Problem(400, "invalid-field", f"{where}: content_type must be type/subtype")
        try:
            data = base64.b64decode(a["content"], validate=True)
        except (binascii.Error, ValueError):
            raise Problem(400, "invalid-field", f"{where}: content is not base64") from None
        maintype, subtype = ctype.lower().split("/", 1)
        try:
            if maintype == "text":
                msg.add_attachment(data.decode("utf-8"), subtype=subtype, filename=a["filename"])
            else:
                msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=a["filename"])
        except (ValueError, UnicodeDecodeError) as e:
            raise Problem(400, "invalid-field", f"{where}: {e}") from None
    try:
        content = msg.as_bytes()
    except (ValueError, UnicodeError) as e:
        raise Problem(400, "malformed-message", f"cannot be encoded: {e}") from None
    rcpts = list(dict.fromkeys(a for _, a in to + cc + bcc))
    return Outgoing(sender[1], rcpts, content, tags)


_FIELD_START = re.compile(rb"(?m)^(?=[^ \t\r\n])")


def _fields(header: bytes) -> list[bytes]:
    """A CRLF header block as its fields, each with its continuation lines."""
    return [f for f in _FIELD_START.split(header) if f]


def build_from_raw(body: bytes) -> Outgoing:
    """A raw RFC 5322 message: the sender is its From, the recipients its To, Cc and Bcc; the
    Bcc field is removed before queuing (RFC 5322 3.6.3), and any X-Homemx- field the API writes."""
    content = crlf_canonical(body)
    header, rest = split_header(content)
    if not header.strip():
        raise Problem(400, "malformed-message", "no header")
    kept, values = [], {"from": [], "to": [], "cc": [], "bcc": []}
    for f in _fields(header):
        name = f.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        if name in values:
            values[name].append(f.split(b":", 1)[1].replace(b"\r\n", b"").decode("utf-8", "surrogateescape"))
        if name == "bcc" or name.startswith("x-homemx-"):
            continue
        kept.append(f)
    senders = _mailboxes(values["from"], "From")
    if len(senders) != 1:
        raise Problem(400, "malformed-message", "the message needs exactly one From address")
    rcpts = [a for name in ("to", "cc", "bcc") for a in _mailboxes(values[name], name.capitalize())]
    if not rcpts:
        raise Problem(400, "missing-field", "the message names no recipient (To, Cc or Bcc)")
    return Outgoing(senders[0], list(dict.fromkeys(rcpts)), b"".join(kept) + content[len(header):])


def _mailboxes(values: list[str], where: str) -> list[str]:
    """The addresses of address fields (groups flattened), each checked with the SMTP path rules."""
    out = []
    for value in values:
        pairs = email.utils.getaddresses([value])
        if value.strip() and not any(a for _, a in pairs):
            raise Problem(400, "invalid-address", f"{where}: {value.strip()!r} names no address")
        for _, addr in pairs:
            if addr:
                try:
                    out.append(str(parse_address(addr)))
                except PathError as e:
                    raise Problem(400, "invalid-address", f"{where}: {addr!r}: {e.reply[10:]}") from None
    return out


def fold(name: str, value: str) -> bytes:
    return SMTP.fold(name, value).encode("utf-8")


# -- the OpenAPI document ---------------------------------------------------------------------


def _problem_ref(description: str) -> dict:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


_ADDRESSES = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
              "description": "\"addr@domain\" or \"Name <addr@domain>\", or a list of them"}

OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "homemx send API", "version": "1",
             "description": "Send mail through homemx from applications; see docs/api.md."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "an API key's token (homemx-backend apikey create)"}},
        "schemas": {
            "Problem": {"type": "object", "description": "RFC 9457 problem details",
                        "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                       "status": {"type": "integer"}, "detail": {"type": "string"}}},
            "Message": {
                "type": "object", "required": ["from"], "additionalProperties": False,
                "properties": {
                    "from": {"type": "string"}, "to": _ADDRESSES, "cc": _ADDRESSES, "bcc": _ADDRESSES,
                    "reply_to": _ADDRESSES, "subject": {"type": "string"}, "text": {"type": "string"},
                    "html": {"type": "string"},
                    "attachments": {"type": "array", "items": {
                        "type": "object", "required": ["filename", "content"],
                        "properties": {"filename": {"type": "string"}, "content_type": {"type": "string"},
                                       "content": {"type": "string", "contentEncoding": "base64"}}}},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "tags": {"type": "array", "maxItems": MAX_TAGS, "items": {"type": "string"}},
                },
            },
            "Accepted": {"type": "object", "properties": {
                "id": {"type": "string"}, "recipients": {"type": "array", "items": {"type": "string"}},
                "mode": {"type": "string"}}},
            "Status": {"type": "object", "properties": {
                "id": {"type": "string"}, "mode": {"type": "string"}, "created": {"type": "number"},
                "sender": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                "recipients": {"type": "array", "items": {"type": "object", "properties": {
                    "address": {"type": "string"}, "original_address": {"type": "string"},
                    "state": {"type": "string",
                              "enum": ["queued", "deferred", "delivered", "bounced", "held", "captured"]},
                    "attempts": {"type": "integer"}, "last_attempt": {"type": ["number", "null"]},
                    "next_attempt": {"type": ["number", "null"]}, "last_reply": {"type": ["string", "null"]}}}},
                "webhooks": {"type": "array", "items": {"type": "object"}}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/messages": {"post": {
            "summary": "Send a message",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "maxLength": 255},
                            "description": "a retry with the same key gets the first answer and queues nothing"}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Message"}},
                "message/rfc822": {"schema": {"type": "string"}}}},
            "responses": {
                "202": {"description": "queued (as durable as after an SMTP 250)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                "400": _problem_ref("malformed JSON, a missing or invalid field, an invalid or unknown address"),
                "401": _problem_ref("missing, unknown or revoked key"),
                "403": _problem_ref("the key may not send as this address"),
                "413": _problem_ref("larger than [api] max_message_size"),
                "415": _problem_ref("neither application/json nor message/rfc822"),
                "422": _problem_ref("the Idempotency-Key was used with another body, or the message was rejected"),
                "429": _problem_ref("over the key's rate limit (see Retry-After)"),
                "503": _problem_ref("cannot be queued now (a local fault); retry later"),
            }}},
        "/v1/messages/{id}": {"get": {
            "summary": "What became of a message sent with this key",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "per-recipient state",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
                "401": _problem_ref("missing, unknown or revoked key"),
                "404": _problem_ref("no message with this id was sent with this key"),
                "410": _problem_ref("the message was removed from the queue"),
            }}},
        "/v1/openapi.json": {"get": {
            "summary": "This document", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
    },
}


# -- the server -------------------------------------------------------------------------------

# (method, path template, handler): what the API serves (the OpenAPI document lists the same).
ROUTES = (
    ("POST", "/v1/messages", "send"),
    ("GET", "/v1/messages/{id}", "status"),
    ("GET", "/v1/openapi.json", "openapi"),
)


class APISetupError(OSError):
    """The API cannot start as configured (cmd_run prints it on one line)."""


class APIServer:
    """The API's listener and what its requests share: keys, buckets, the accept pipeline."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        acceptor: Acceptor,
        directory: Directory,
        queue: Queue,
        keys: KeyStore,
        metrics: BackendMetrics,
        run_blocking: Callable[..., Awaitable],
        tls_context: ssl.SSLContext | None = None,
    ):
        self.config = config
        self.settings = config.api
        self.acceptor = acceptor
        self.directory = directory
        self.queue = queue
        self.keys = keys
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.tls_context = tls_context
        self.timeout = config.http.timeout
        self.sandbox = self.settings.sandbox_maildir or config.server.data_dir / "sandbox" / "Maildir"
        # A base64 JSON body is 4/3 of the message, plus the JSON around it.
        self.body_limit = self.settings.max_message_size * 4 // 3 + 64 * 1024
        self.buckets: dict[str, TokenBucket] = {}
        self.in_flight: dict[tuple[str, str], asyncio.Future] = {}  # Idempotency-Keys being answered
        self.commits: set[asyncio.Task] = set()
        self.server: asyncio.base_events.Server | None = None
        self.web: web.Server | None = None

    async def start(self) -> None:
        if self.settings.listen is None:
            raise APISetupError("[api] enabled needs listen (a LAN address and port)")
        if self.settings.tls and self.tls_context is None:
            raise APISetupError("[api] tls needs a certificate ([tls] cert and key, or [acme])")
        loop = asyncio.get_running_loop()
        self.web = web.Server(self._handle, request_factory=self._make_request, handler_cancellation=True)
        host, port = self.settings.listen
        ctx = self.tls_context if self.settings.tls else None
        self.server = await loop.create_server(
            lambda: _Connection(self.web, api=self, loop=loop, keepalive_timeout=self.timeout, access_log=None,
                                max_line_size=MAX_LINE, max_field_size=MAX_LINE, max_headers=MAX_HEADERS,
                                lingering_time=LINGER),
            host, port, ssl=ctx, ssl_handshake_timeout=self.timeout if ctx else None, reuse_address=True)
        bound = self.server.sockets[0].getsockname()
        log.info("http api on %s://%s:%d", "https" if ctx else "http", bound[0], bound[1])

    def bound_port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def close(self, grace: float) -> None:
        """Stop accepting; answers being committed finish (their messages are queued either way)."""
        if self.server is not None:
            self.server.close()
        if self.commits:
            await asyncio.wait(list(self.commits), timeout=grace)
        if self.web is not None:
            await self.web.shutdown(grace)

    def _make_request(self, message, payload, protocol, writer, task) -> BaseRequest:
        return BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(),
                           client_max_size=self.body_limit)

    # -- requests ------------------------------------------------------------------------------

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        conn: _Connection = request.protocol  # type: ignore[assignment]
        ctx = _RequestContext()
        try:
            response = await self._route(request, ctx)
        except Problem as p:
            response = p.response()
            ctx.problem = p.kind
            if p.kind not in ("not-found", "method-not-allowed"):
                self.metrics.api_rejections.labels(ctx.key_id, p.kind).inc()
        except web.HTTPRequestEntityTooLarge:
            ctx.problem = "too-large"
            response = Problem(413, "too-large", f"the body is larger than {self.body_limit} bytes").response()
            self.metrics.api_rejections.labels(ctx.key_id, "too-large").inc()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:  # noqa: BLE001 - a defect of ours: a 500 and one line, never a dead server
            log.error("conn=%s api request failed: %r", conn.conn_id, e, exc_info=e)
            ctx.problem = "internal"
            response = web.Response(status=500, body=json.dumps({
                "type": "about:blank", "title": "Internal Server Error", "status": 500,
                "detail": "see the backend's log"}).encode(), content_type="application/problem+json")
        if response.status >= 400 and request.method == "POST" and not request.content.is_eof():
            response.force_close()  # an unread body: the connection cannot carry another request
        conn.answered()
        self.metrics.api_requests.labels(ctx.key_id, str(response.status)).inc()
        log.info("conn=%s client=%s %s %s key=%s status=%d%s%s duration=%.3fs", conn.conn_id, request.remote,
                 request.method, request.rel_url.raw_path[:100], ctx.key_id, response.status,
                 f" problem={ctx.problem}" if ctx.problem else "", f" id={ctx.message_id}" if ctx.message_id else "",
                 time.monotonic() - started)
        return response

    async def _route(self, request: BaseRequest, ctx: _RequestContext) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if path == "/v1/messages":
            allowed, call = "POST", lambda: self.send(request, ctx)
        elif path.startswith("/v1/messages/") and "/" not in path[len("/v1/messages/"):]:
            allowed, call = "GET", lambda: self.status(request, ctx, path[len("/v1/messages/"):])
        elif path == "/v1/openapi.json":
            allowed, call = "GET", lambda: self.openapi()
        else:
            raise Problem(404, "not-found", "no such resource; see /v1/openapi.json")
        if request.method != allowed:
            raise Problem(405, "method-not-allowed", f"{path} takes {allowed}", {"Allow": allowed})
        return await call()

    async def openapi(self) -> web.Response:
        return web.json_response(OPENAPI)

    async def authenticate(self, request: BaseRequest, ctx: _RequestContext) -> APIKey:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(401, "unauthorized", "send Authorization: Bearer <token>",
                          {"WWW-Authenticate": 'Bearer realm="homemx"'})
        key = await self.run_blocking(self.keys.verify, token.strip())
        if key is None:
            raise Problem(401, "unauthorized", "unknown or revoked key",
                          {"WWW-Authenticate": 'Bearer realm="homemx", error="invalid_token"'})
        ctx.key_id = key.id
        return key

    async def send(self, request: BaseRequest, ctx: _RequestContext) -> web.Response:
        key = await self.authenticate(request, ctx)
        idem = request.headers.get("Idempotency-Key")
        if idem is not None and not _IDEMPOTENCY_KEY.match(idem):
            raise Problem(400, "invalid-field", "Idempotency-Key: 1 to 255 visible ASCII characters")
        ctype = request.content_type
        if ctype not in ("application/json", "message/rfc822"):
            raise Problem(415, "unsupported-media-type",
                          f"Content-Type {ctype!r}: send application/json or message/rfc822")
        length = request.content_length
        if length is not None and length > self.body_limit:
            raise Problem(413, "too-large", f"the body is larger than {self.body_limit} bytes")
        body = await request.read()  # within the connection's deadline (_Connection)
        # The rest runs as a task of its own: a client that goes away cancels the handler, never
        # a commit half-way (as receive/handler.py shields the SMTP dot). A request with the
        # Idempotency-Key of one being answered waits for that one, then gets its stored answer;
        # the slot is taken with no await after the wait, so two first requests cannot both pass.
        slot = (key.id, idem) if idem is not None else None
        while slot in self.in_flight:
            await asyncio.wait([self.in_flight[slot]])
        task = asyncio.ensure_future(self._send(request, key, ctype, body, idem, ctx))
        self.commits.add(task)
        if slot is not None:
            self.in_flight[slot] = task
        task.add_done_callback(functools.partial(self._sent, slot))
        return await asyncio.shield(task)

    def _sent(self, slot: tuple[str, str] | None, task: asyncio.Task) -> None:
        self.commits.discard(task)
        if slot is not None and self.in_flight.get(slot) is task:
            del self.in_flight[slot]
        if not task.cancelled():
            task.exception()  # answered by the handler, or its client was gone: nothing to log twice

    async def _send(self, request: BaseRequest, key: APIKey, ctype: str, body: bytes, idem: str | None,
                    ctx: _RequestContext) -> web.Response:
        fingerprint = hashlib.sha256(ctype.encode() + b"\0" + body).hexdigest()
        if idem is not None:
            stored = await self.run_blocking(self.keys.idempotent_answer, key.id, idem)
            if stored is not None:
                if stored[0] != fingerprint:
                    raise Problem(422, "idempotency-key-reused", "this Idempotency-Key came with another body")
                ctx.message_id = stored[2].get("id")
                return web.json_response(stored[2], status=stored[1], headers={"Idempotent-Replayed": "true"})
        wait = self.buckets.setdefault(key.id, TokenBucket(key.rate_per_minute)).take(time.monotonic())
        if wait > 0:
            raise Problem(429, "rate-limited", f"{key.rate_per_minute} messages a minute",
                          {"Retry-After": str(math.ceil(wait))})
        out = build_from_raw(body) if ctype == "message/rfc822" else build_from_json(body)
        if len(out.content) > self.settings.max_message_size:
            raise Problem(413, "too-large", f"the message is larger than {self.settings.max_message_size} bytes")
        if not key.allows_sender(out.sender):
            raise Problem(403, "sender-not-allowed", f"this key may not send as {out.sender}")
        return await self._commit(request, key, out, idem, fingerprint, ctx)

    async def _commit(self, request: BaseRequest, key: APIKey, out: Outgoing, idem: str | None,
                      fingerprint: str, ctx: _RequestContext) -> web.Response:
        envelope = list(out.recipients)
        content = out.content
        if key.mode == REDIRECT:
            # Every recipient replaced; the originals kept for whoever reads the redirected copy.
            content = fold("X-Homemx-Original-Recipients", ", ".join(envelope)) + content
            envelope = list(key.redirect_to)
        elif key.mode == BCC:
            envelope += [a for a in key.bcc_to if a not in envelope]
        if len(envelope) > MAX_RECIPIENTS:
            raise Problem(400, "too-many-recipients", f"at most {MAX_RECIPIENTS} recipients")
        recipients: list[NewRecipient] = []
        for address in envelope:
            resolved = self.directory.recipients(address)
            if resolved is None:
                raise Problem(400, "unknown-recipient", f"nobody here receives mail for {address}")
            recipients.extend(resolved)
        incoming = Incoming(
            listener=LISTENER, kind=LAN, sender=out.sender, recipients=tuple(recipients), content=content,
            client_addr=canonical_host(request.remote or "unknown"), helo=key.id,
            protocol="HTTPS" if self.tls_context is not None and self.settings.tls else "HTTP",
            rcpt_to=tuple(envelope), conn_id=request.protocol.conn_id, api_key=key.id,
        )
        if key.mode == SANDBOX:
            qid = await self._capture(incoming)
        else:
            try:
                qid = await self.acceptor.accept(incoming)
            except Refused as e:
                if e.reply.startswith("4"):
                    raise Problem(503, "unavailable", "the message cannot be queued now; retry later",
                                  {"Retry-After": "60"}) from None
                if e.reason == "from_not_allowed":
                    raise Problem(403, "sender-not-allowed", e.reply[10:]) from None
                raise Problem(422, "rejected", e.reply) from None
        ctx.message_id = qid
        answer = {"id": qid, "recipients": envelope, "mode": key.mode}
        # The queue knows which key sent a queued message (message.api_key); the keys file records
        # only what the queue cannot: a sandboxed message, tags, an idempotent answer. A plain send
        # thus costs one commit, not two.
        if key.mode == SANDBOX or out.tags or idem is not None:
            try:
                await self.run_blocking(self.keys.record_sent, qid, key.id, key.mode, envelope, out.tags,
                                        (idem, fingerprint, 202, answer) if idem is not None else None)
            except Exception as e:  # noqa: BLE001 - the message is queued: it is answered as such
                log.error("api key=%s message %s queued, but not recorded in the keys file: %s", key.id, qid, e)
        self.metrics.api_messages.labels(key.id, key.mode).inc()
        return web.json_response(answer, status=202)

    async def _capture(self, m: Incoming) -> str:
        """Sandbox: the message as the queue would have it (From rule, trace header, Date and
        Message-ID), kept in the sandbox Maildir; never queued, never signed."""
        header = header_block(m.content)
        reply = self.acceptor.check_from_header(m, header)
        if reply:
            raise Problem(403, "sender-not-allowed", reply[10:])
        qid = new_queue_id(time.time())
        prefix = self.acceptor.received_header(m, qid) + self.acceptor.submission_fields(header, qid)
        prefix += fold("X-Homemx-Sandbox-Recipients", ", ".join(m.rcpt_to))
        try:
            await self.run_blocking(maildir.deliver, self.sandbox, m.content, qid, prefix)
        except OSError as e:
            log.error("conn=%s sandbox Maildir %s: %s", m.conn_id, self.sandbox, e)
            raise Problem(503, "unavailable", "the sandbox cannot store the message now",
                          {"Retry-After": "60"}) from None
        log.info("conn=%s client=%s captured %s in the sandbox from=<%s> rcpts=%d size=%d", m.conn_id,
                 m.client_addr, qid, m.sender, len(m.recipients), len(m.content))
        return qid

    async def status(self, request: BaseRequest, ctx: _RequestContext, message_id: str) -> web.Response:
        key = await self.authenticate(request, ctx)
        if not _MESSAGE_ID.match(message_id):
            raise Problem(404, "not-found", f"no message {message_id} sent with this key")
        sent = await self.run_blocking(self.keys.sent, message_id)
        if sent is not None and sent[0] != key.id:
            raise Problem(404, "not-found", f"no message {message_id} sent with this key")
        if sent is not None and sent[1] == SANDBOX:
            out = {"id": message_id, "mode": SANDBOX, "created": sent[3], "tags": sent[4]}
            out["recipients"] = [{"address": a, "original_address": a, "state": "captured", "attempts": 0,
                                  "last_attempt": None, "next_attempt": None, "last_reply": None} for a in sent[2]]
        else:
            try:
                entry = await self.run_blocking(self.queue.get, message_id)
            except QueueError:
                if sent is None:
                    raise Problem(404, "not-found", f"no message {message_id} sent with this key") from None
                raise Problem(410, "gone", f"message {message_id} was removed from the queue") from None
            if entry.api_key != key.id:
                raise Problem(404, "not-found", f"no message {message_id} sent with this key")
            # A key's mode never changes: it is the mode the message was sent in.
            out = {"id": message_id, "mode": key.mode, "created": entry.created, "tags": sent[4] if sent else []}
            out["sender"] = entry.sender
            out["recipients"] = [
                {"address": r.address, "original_address": r.orig_address, "state": r.state,
                 "attempts": r.attempts, "last_attempt": r.last_attempt,
                 "next_attempt": r.next_attempt if r.state in ("queued", "deferred") else None,
                 "last_reply": r.last_reply}
                for r in entry.recipients
            ]
        out["webhooks"] = await self._webhook_status(message_id)
        ctx.message_id = message_id
        return web.json_response(out)

    async def _webhook_status(self, message_id: str) -> list[dict]:
        """The webhook deliveries of the message's events (backend/http/webhooks.py), when built."""
        try:
            from backend.http import webhooks
        except ImportError:
            return []
        status = getattr(webhooks, "webhook_status", None)
        if status is None:
            return []
        return await self.run_blocking(status, self.queue, message_id)


@dataclass
class _RequestContext:
    """What a request's log line and metrics say about it."""

    key_id: str = "-"
    problem: str | None = None
    message_id: str | None = None


class _Connection(RequestHandler):
    """aiohttp's HTTP/1.1 protocol for one API connection, with its deadline."""

    def __init__(self, manager: web.Server, *, api: APIServer, **kwargs):
        super().__init__(manager, **kwargs)
        self.api = api
        self.conn_id = f"api-{next(_conn_ids)}"
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.answered()

    def answered(self) -> None:
        """An answer is ready (or the connection is new): the next request gets a fresh deadline."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.api.timeout, self._expire)

    def _expire(self) -> None:
        if self.transport is not None:
            log.info("conn=%s deadline passed: connection cut", self.conn_id)
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def log_exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        log.info("conn=%s %s: %r", self.conn_id, message % args, exc_info)
