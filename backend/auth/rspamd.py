"""The spam filter: rspamd asked over its HTTP protocol (``POST /checkv2``), its answer turned into a
SpamVerdict and the verdict into SMTP (a refusal, or Junk); and the ``local.d`` files homemx gives
rspamd, the same on a provisioned home and in the lab.

rspamd protocol: https://rspamd.com/doc/developers/protocol.html (request headers IP, Helo, From,
Rcpt, User, Queue-Id, Hostname; the JSON reply with action, score, required_score, symbols and the
``milter`` block of header changes).

rspamd down, slow or answering nonsense is not the sender's fault: by default the message goes on
unscanned (fail-open, counted, logged once per change of state); ``fail_closed`` answers 451 4.7.1
instead, so the sender retries later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Sequence

import aiohttp

from backend.auth.results import SpamVerdict
from backend.smtp import replies as R

log = logging.getLogger("homemx.auth.rspamd")

# rspamd's actions (rspamd 3.x, src/libserver/cfg_file.h "rspamd_action_type"); anything else is a
# reply we do not understand.
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")
# A reply larger than this is not rspamd's JSON (a check of a message with many symbols is a few KiB).
MAX_REPLY = 1 << 20

# rspamd modules homemx does itself: SPF, DKIM, DMARC and ARC are verified in backend/auth/ (their
# result goes into Authentication-Results and into rspamd's view of the message), and outbound
# mail is signed by backend/dkim/. rspamd checking again could give a second, different answer
# (its own DNS, its own limits) that scores the message; arc also covers ARC sealing.
OWN_CHECKS = ("spf", "dkim", "dmarc", "arc", "dkim_signing")
# Modules that ask hosts on the internet about every message: DNS block lists (rbl also runs the
# surbl and email lists since rspamd 2.x), rspamd.com's fuzzy hash servers, the ASN lookups, the
# URL redirector (it follows the links in a message), and rspamd_update's rule downloads. Off where
# mail must not leave the machine (the lab and tests: ``offline``); a real home keeps them, they
# are much of rspamd's value.
NETWORK_MODULES = ("rbl", "fuzzy_check", "asn", "url_redirector", "rspamd_update")
# The verdict fields rspamd's milter_headers module writes into the reply (we add them to the
# message). X-Spam: Yes is written by homemx itself for Junk (backend/auth/inbound.py).
HEADER_ROUTINES = ("x-spamd-result", "x-spam-status", "x-spam-level")
# Debian's redis-server package: loopback, the standard port.
DEBIAN_REDIS = "127.0.0.1:6379"


def rspamd_local_config(
    *, redis: str | None = DEBIAN_REDIS, nameservers: Sequence[str] = (), offline: bool = False
) -> dict[str, str]:
    """rspamd's ``local.d`` files for homemx, as {path relative to LOCAL_CONFDIR: text}.

    ``redis`` ("host:port"; default: where Debian's redis-server package listens) is where rspamd
    keeps its Bayes statistics, learned from the user's moves to and out of Junk (Dovecot
    IMAPSieve → rspamc learn_spam/learn_ham); None: no Redis, and rspamd does not learn. ``nameservers`` ("host:port") replaces the system resolver for rspamd's own
    lookups; ``offline`` also turns off every module that asks the internet (NETWORK_MODULES).
    Provisioning writes these files under /etc/rspamd; tests/lab/rspamd.py writes them for its own
    instance."""
    files: dict[str, str] = {}
    for module in OWN_CHECKS + (NETWORK_MODULES if offline else ()):
        files[f"local.d/{module}.conf"] = "enabled = false;\n"
    # No greylisting. With Redis, rspamd's greylist module answers "soft reject" the first time it
    # sees any message it would not pass untouched, "add header" included: mail for Junk would be
    # delayed by minutes, and the mapping (add header → Junk, now) would not hold. Without
    # it, the stock "greylist" action (a score in [4, 6)) would be a 451 on every retry, forever,
    # since nothing remembers the retry. The gateway's greet wait already stops the senders
    # greylisting is for.
    files["local.d/greylist.conf"] = "enabled = false;\n"
    files["local.d/actions.conf"] = "greylist = null;\n"
    files["local.d/milter_headers.conf"] = (
        f"use = [{', '.join(json.dumps(r) for r in HEADER_ROUTINES)}];\n"
        # Every scanned message gets the fields, whoever sent it: homemx decides what is scanned.
        "skip_local = false;\n"
        "skip_authenticated = false;\n"
    )
    if redis:
        # rspamd 3.4's Bayes backend is Redis (stock statistic.conf), and so is its cache of
        # learned messages. Its SQLite backend is no alternative: the controller and the normal
        # worker both create the databases at start and the loser's statfile stays broken
        # ("cannot find statfile backend to learn"), and a learn concurrent with a scan fails
        # with "database is locked" (both seen with 3.4 in our lab).
        files["local.d/redis.conf"] = f"servers = {json.dumps(redis)};\n"
    if nameservers:
        names = ", ".join(json.dumps(n) for n in nameservers)
        files["local.d/options.inc"] = f"dns {{ nameserver = [{names}]; }}\n"
    return files


class RspamdUnavailable(Exception):
    """rspamd gave no usable answer: unreachable, too slow, an HTTP error, or a reply we cannot read."""


# RFC 5322 2.2: a field name is printable ASCII without ":"; a value may be folded (CRLF + WSP) but
# carries no other line break, so a header rspamd asks for cannot add fields of its own.
_FIELD_NAME_RE = re.compile(r"^[!-9;-~]+$")
_FOLD_RE = re.compile(r"\r\n(?=[ \t])")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def parse_reply(body: bytes) -> SpamVerdict:
    """The verdict in rspamd's /checkv2 JSON reply; RspamdUnavailable when it is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise RspamdUnavailable("reply is not JSON") from None
    if not isinstance(doc, dict):
        raise RspamdUnavailable("reply is not a JSON object")
    action = doc.get("action")
    if action not in ACTIONS:
        raise RspamdUnavailable(f"reply has no known action ({str(action)[:40]!r})")
    try:
        score = float(doc.get("score", 0.0))
        required = float(doc.get("required_score", 0.0))
    except (TypeError, ValueError):
        raise RspamdUnavailable("reply has a score that is not a number") from None
    symbols = doc.get("symbols") or {}
    if not isinstance(symbols, dict):
        raise RspamdUnavailable("reply has symbols that are not an object")
    return SpamVerdict(
        action=action, score=score, required_score=required,
        symbols=tuple(sorted(str(s) for s in symbols)), headers=_added_headers(doc.get("milter")),
    )


def _added_headers(milter: Any) -> tuple[tuple[str, str], ...]:
    """The fields of the reply's ``milter.add_headers`` ({name: value}, {name: {"value", "order"}} or a
    list of those per name), in rspamd's order; a field that is not a well-formed header is left out."""
    if not isinstance(milter, dict) or not isinstance(milter.get("add_headers"), dict):
        return ()
    fields = []
    for name, spec in milter["add_headers"].items():
        for item in spec if isinstance(spec, list) else [spec]:
            value, order = (item.get("value"), item.get("order", 0)) if isinstance(item, dict) else (item, 0)
            if not isinstance(value, str) or not _FIELD_NAME_RE.match(str(name)) or not _folded_ok(value):
                continue
            fields.append((order if isinstance(order, int) else 0, len(fields), str(name), value))
    return tuple((name, value) for _, _, name, value in sorted(fields))


def _folded_ok(value: str) -> bool:
    """Whether ``value`` has no line break but folding (CRLF followed by a space or tab) and no NUL."""
    return not any(c in _FOLD_RE.sub("", value) for c in "\r\n\x00")


def _header_value(text: str) -> str:
    """A request header value without control characters: the HELO name is the client's own words,
    and a line break in a value is a ValueError in aiohttp (not a fault of rspamd's)."""
    return _CONTROL_RE.sub("?", text)


def smtp_reply_for(verdict: SpamVerdict) -> str | None:
    """The SMTP refusal for a verdict, or None when the message is taken (Inbox or Junk)."""
    if verdict.action == "reject":
        return R.R550_SPAM
    if verdict.action in ("soft reject", "greylist"):
        return R.R451_SPAM_TEMP
    return None


def is_junk(verdict: SpamVerdict) -> bool:
    """Whether the message is taken but filed as spam (the recipient's Junk folder)."""
    return verdict.action in ("add header", "rewrite subject")


class RspamdClient:
    """One rspamd normal worker (``url``: its base URL, e.g. http://127.0.0.1:11333), asked once per
    message with a bound of ``timeout`` seconds for the whole exchange.

    Availability is a state: the first check rspamd does not answer logs one line (and sets the
    gauge to 0), the first answer after that logs one line (and sets it back to 1); nothing is
    logged per message."""

    def __init__(self, url: str, timeout: float, fail_closed: bool = False, metrics=None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.fail_closed = fail_closed
        self.metrics = metrics  # backend.metrics.BackendMetrics or None
        self.available = True  # assumed until a check says otherwise
        self._http: aiohttp.ClientSession | None = None
        if metrics is not None:
            metrics.rspamd_available.set(1)

    def _client(self) -> aiohttp.ClientSession:
        """The one HTTP client of this RspamdClient (created on first use, inside the running loop)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                # rspamd answers with Connection: close; never offer it a pooled connection it has shut.
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": "homemx"},
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def check(
        self,
        message: bytes,
        *,
        ip: str,
        helo: str,
        sender: str,
        recipients: Sequence[str],
        user: str | None,
        queue_id: str,
        hostname: str | None,
    ) -> SpamVerdict:
        """rspamd's verdict on ``message`` (as it will be stored: CRLF, our own fields prepended).

        ``ip`` the real client address, ``helo`` its EHLO/HELO name, ``sender`` the MAIL FROM
        address ("" for the null sender), ``recipients`` the RCPT TO addresses, ``user`` the
        authenticated user (None: none), ``queue_id`` for rspamd's log, ``hostname`` the client's
        host name from a verified reverse lookup (rspamd's Hostname; None: rspamd looks it up
        itself). When rspamd gives no answer: "no action" (fail-open) or "soft reject"
        (fail-closed), with ``available`` False and the reason."""
        headers: list[tuple[str, str]] = [("IP", ip), ("Helo", helo), ("From", sender or "<>")]
        headers += [("Rcpt", r) for r in recipients]
        if user:
            headers.append(("User", user))
        if queue_id:
            headers.append(("Queue-Id", queue_id))
        if hostname:
            headers.append(("Hostname", hostname))
        headers = [(name, _header_value(value)) for name, value in headers]
        started = time.monotonic()
        try:
            verdict = parse_reply(await self._post(message, headers))
        except RspamdUnavailable as e:
            verdict = self._unavailable(str(e))
        else:
            self._set_available(True, "")
        if self.metrics is not None:
            self.metrics.rspamd_seconds.observe(time.monotonic() - started)
            self.metrics.spam_actions.labels(verdict.action if verdict.available else "unavailable").inc()
        return verdict

    async def _post(self, message: bytes, headers: list[tuple[str, str]]) -> bytes:
        try:
            async with self._client().post(f"{self.url}/checkv2", data=message, headers=headers) as resp:
                if resp.status != 200:
                    raise RspamdUnavailable(f"HTTP {resp.status}")
                body = b""
                while chunk := await resp.content.read(65536):
                    body += chunk
                    if len(body) > MAX_REPLY:
                        raise RspamdUnavailable("reply too large")
                return body
        except asyncio.TimeoutError:
            raise RspamdUnavailable(f"no answer within {self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise RspamdUnavailable(f"{type(e).__name__}: {e}") from None

    def _unavailable(self, reason: str) -> SpamVerdict:
        self._set_available(False, reason)
        return SpamVerdict(action="soft reject" if self.fail_closed else "no action", available=False, reason=reason)

    def _set_available(self, available: bool, reason: str) -> None:
        if available == self.available:
            return
        self.available = available
        if self.metrics is not None:
            self.metrics.rspamd_available.set(1 if available else 0)
        if available:
            log.info("rspamd %s answers again", self.url)
        else:
            then = "refused with 451 4.7.1" if self.fail_closed else "accepted unscanned"
            log.warning("rspamd %s unavailable (%s): messages are %s until it answers", self.url, reason, then)
