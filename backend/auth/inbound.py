"""The inbound trust checks of a message arriving on mx, in the order a receiver needs them:

    SPF (MAIL FROM and HELO), DKIM (every signature) and ARC, concurrently, on the real client
    address → DMARC for the From domain (policy, pct, local overrides, own-domain protection)
    → rspamd (with our verdicts already in the message) → one Outcome

The accept pipeline (backend/accept.py) calls ``InboundChecks.check`` for mx messages and turns the
Outcome into a refusal (550 5.7.1 / 451 4.7.1) or into the header fields it prepends and the
folder (Junk) the message is filed into. Submission and lan never come here: they are our own
users, and their mail must never fail our own policy (hairpin), though rspamd may be asked to scan
them too ([rspamd] scan_listeners).

Every verdict is counted in ``homemx_backend_auth_verdicts{method, result}``; a DNS answer that
does not come within ``[auth] timeout`` is a temperror, never a stuck session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from backend.auth import headers as H
from backend.auth.arc import verify_arc
from backend.auth.dkim import verify_dkim
from backend.auth.dmarc import MultipleFrom, evaluate_dmarc, from_domain_of
from backend.auth.results import ARCVerdict, DMARCVerdict, Envelope, SPFVerdict
from backend.auth.rspamd import RspamdClient, is_junk, smtp_reply_for
from backend.auth.spf import verify_spf
from backend.config import BackendConfig
from backend.metrics import BackendMetrics
from backend.smtp import replies as R

log = logging.getLogger("homemx.auth")

JUNK = "Junk"


@dataclass
class Outcome:
    """What the checks decided: ``refuse`` (an SMTP reply and a metric reason) or the fields to
    prepend (Authentication-Results, spam headers) and the folder for local recipients; ``header``
    is the message's header block with forged fields removed (None: unchanged)."""

    refuse: tuple[str, str] | None = None
    prepend: bytes = b""
    header: bytes | None = None
    folder: str | None = None


class InboundChecks:
    def __init__(
        self,
        config: BackendConfig,
        metrics: BackendMetrics,
        lookup,  # backend/dns/lookup.py AsyncDNSLookup
        run_blocking: Callable[..., Awaitable] | None = None,
        rspamd: RspamdClient | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.lookup = lookup
        self.run_blocking = run_blocking
        self.rspamd = rspamd
        self.authserv_id = config.authserv_id
        self.local_domains = frozenset(config.domains)

    def scans(self, listener: str, kind: str) -> bool:
        """Whether a message from this listener goes through rspamd."""
        return self.rspamd is not None and (listener in self.config.rspamd.scan_listeners or kind in self.config.rspamd.scan_listeners)

    async def close(self) -> None:
        if self.rspamd is not None:
            await self.rspamd.close()

    async def check(self, env: Envelope, header: bytes, message: bytes, verify: bool = True,
                    scan: bool = True) -> Outcome:
        """Run the checks on ``message`` (CRLF, as received; ``header`` its header block).
        ``verify``: SPF/DKIM/ARC/DMARC (mx); ``scan``: rspamd, when configured (the caller asks
        ``scans`` once per message: a listener named, or of a kind named, in scan_listeners)."""
        out = Outcome()
        if verify:
            stripped, removed = H.strip_untrusted(header, self.authserv_id)
            if removed:
                out.header = stripped
                self.metrics.auth_forged_fields_removed.inc(removed)
            ar = await self._verify(env, header, message, out)
            if out.refuse:
                return out
            out.prepend += ar
        if scan and self.rspamd is not None:
            # rspamd sees the message as it will be stored: our fields on top, forged ones gone.
            stored = message if out.header is None else out.header + message[len(header):]
            await self._scan(env, out.prepend + stored, out)
        return out

    async def _verify(self, env: Envelope, header: bytes, message: bytes, out: Outcome) -> bytes:
        cfg = self.config.auth
        started = time.monotonic()
        try:
            from_domain = from_domain_of(header)
        except MultipleFrom as e:
            # RFC 7489 6.6.1: a message whose From names several domains cannot be evaluated;
            # treating it as unauthenticated would let a forger pick the domain readers see.
            out.refuse = (R.R550_DMARC_MULTIPLE_FROM, "dmarc_multiple_from")
            self.metrics.auth_verdicts.labels("dmarc", "permerror").inc()
            log.info("queue=%s client=%s refused: %s", env.queue_id, env.client_ip, e)
            return b""

        async def bounded(coro, fallback):
            try:
                return await asyncio.wait_for(coro, cfg.timeout)
            except asyncio.TimeoutError:
                return fallback

        mail_from_domain = env.sender.rpartition("@")[2] if env.sender else env.helo
        spf_timeout = (
            SPFVerdict("mailfrom", mail_from_domain, "temperror", "timed out"),
            SPFVerdict("helo", env.helo, "temperror", "timed out"),
        )
        spf, dkim, arc = await asyncio.gather(
            bounded(verify_spf(self.lookup, env.client_ip, env.helo, env.sender), spf_timeout),
            bounded(verify_dkim(message, self.lookup, self.run_blocking), ()),
            bounded(verify_arc(message, self.lookup, self.run_blocking), ARCVerdict("none", 0, "timed out")),
        )
        mailfrom_spf = spf[0]
        dmarc = None
        if from_domain is not None:
            dmarc = await bounded(
                evaluate_dmarc(
                    self.lookup, from_domain, mailfrom_spf, dkim,
                    overrides=cfg.dmarc_overrides,
                    local_domains=self.local_domains if cfg.own_domain_protection else (),
                ),
                DMARCVerdict("temperror", from_domain, reason="timed out"),
            )
        self._count(spf, dkim, dmarc, arc)
        self.metrics.auth_seconds.observe(time.monotonic() - started)
        if dmarc is not None and dmarc.result != "pass":
            own = dmarc.reason.startswith("own domain")
            if dmarc.disposition == "reject" and (cfg.dmarc_enforce or own):
                out.refuse = (R.R550_DMARC_OWN_DOMAIN if own else R.R550_DMARC_REJECT, "dmarc_reject")
                log.info("queue=%s client=%s from_domain=%s refused by DMARC: %s", env.queue_id, env.client_ip,
                         dmarc.from_domain, dmarc.reason or dmarc.policy)
                return b""
            if dmarc.disposition == "quarantine" and cfg.dmarc_enforce:
                out.folder = JUNK
        return H.authentication_results(self.authserv_id, spf, dkim, dmarc, arc)

    def _count(self, spf, dkim, dmarc, arc) -> None:
        m = self.metrics.auth_verdicts
        for v in spf:
            m.labels(f"spf_{v.identity}", v.result).inc()
        for d in dkim or ():
            m.labels("dkim", d.result).inc()
        if not dkim:
            m.labels("dkim", "none").inc()
        if dmarc is not None:
            m.labels("dmarc", dmarc.result).inc()
        m.labels("arc", arc.result).inc()

    async def _scan(self, env: Envelope, message: bytes, out: Outcome) -> None:
        verdict = await self.rspamd.check(
            message, ip=env.client_ip, helo=env.helo, sender=env.sender, recipients=env.recipients,
            user=env.auth_user, queue_id=env.queue_id, hostname=None,  # rspamd resolves the client's name itself
        )
        reply = smtp_reply_for(verdict)
        if reply is not None:
            out.refuse = (reply, "spam_" + verdict.action.replace(" ", "_"))
            log.info("queue=%s client=%s refused by rspamd: action=%s score=%.2f/%.2f", env.queue_id,
                     env.client_ip, verdict.action, verdict.score, verdict.required_score)
            return
        if is_junk(verdict):
            out.folder = JUNK
            out.prepend += b"X-Spam: Yes\r\n"
        if verdict.available:
            for name, value in verdict.headers:
                out.prepend += f"{name}: {value}\r\n".encode("utf-8", "replace")


def build(config: BackendConfig, metrics: BackendMetrics, run_blocking) -> InboundChecks | None:
    """The checks the config asks for: None when neither [auth] nor [rspamd] has work to do."""
    from backend.dns.lookup import AsyncDNSLookup
    from backend.dns.resolver import make_resolver

    if not config.auth.enabled and config.rspamd is None:
        return None
    d = config.delivery
    lookup = AsyncDNSLookup(make_resolver(d.nameservers, d.dns_port, timeout=min(config.auth.timeout, 10.0)))
    rspamd = None
    if config.rspamd is not None:
        r = config.rspamd
        rspamd = RspamdClient(r.url, r.timeout, fail_closed=r.fail_closed, metrics=metrics)
    return InboundChecks(config, metrics, lookup, run_blocking, rspamd)
