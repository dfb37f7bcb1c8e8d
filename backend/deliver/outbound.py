"""Outbound wiring: the ``build(backend)`` hook that gives the daemon its DKIM signer and its remote delivery.

``backend.run.Backend`` imports this module when it exists and calls ``build``; the signer runs in
a worker thread (smtpd calls it through ``run_blocking``) on mail from the submission,
submissions and lan listeners, before the message is queued, so the signature is made once and
never changes across retries; delivery signs the reports it generates (DSNs) with it too. Keys are loaded here, at start, so a missing or unreadable key
stops the daemon with a clear error instead of failing every submission later.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from backend.dkim import keys as dkim_keys
from backend.dkim import sign as dkim
from backend.config import BackendConfig, ConfigError, DKIMKeyConfig, load_dkim_tables
from backend.deliver.remote import Deliverer
from backend.metrics import BackendMetrics

log = logging.getLogger("homemx.outbound")


def make_signer(keys: tuple[DKIMKeyConfig, ...], metrics: BackendMetrics) -> Callable[..., bytes]:
    """A blocking callable (message, envelope sender[, canonical]) → message with DKIM-Signature headers.

    Keys are chosen by the From header domain (DMARC alignment), not the envelope sender; a
    message from a domain without keys passes through unsigned (CRLF-canonical either way).
    """
    for k in keys:
        # Read from the file itself (load_key would fall back on a key cached before): raises
        # DKIMKeyError naming the file, so a start or a reload never takes a broken key.
        dkim_keys.load_private_key(k.private_key, k.algorithm)
        dkim_keys.load_key(k)

    def sign(message: bytes, envelope_sender: str, canonical: bool = False) -> bytes:
        # canonical: the accept path's content is CRLF-canonical already (see make_signatures)
        message, signatures = dkim.make_signatures(message, keys, canonical=canonical)
        if signatures:
            for alg, n in dkim.signature_count_by_algorithm(b"".join(signatures)).items():
                metrics.dkim_signatures.labels(alg).inc(n)
        return b"".join(signatures) + message

    return sign


def build(backend) -> tuple[Callable[[bytes, str], bytes] | None, Deliverer]:
    """(signer, remote delivery) for a starting ``backend.run.Backend`` (its queue is open)."""
    config: BackendConfig = backend.config
    signer = make_signer(config.dkim, backend.metrics) if config.dkim else None
    # The same signer signs the DSNs and delay notices delivery generates (issue 11 point 9).
    remote = Deliverer(config, backend.queue, backend.metrics, backend.run_blocking, signer=signer)
    d = config.delivery
    log.info(
        "outbound: dkim keys=%d source=%s tls=%s mta-sts=%s smarthost=%s",
        len(config.dkim), d.source_address or "default", d.tls_policy, "on" if d.mta_sts else "off",
        f"{d.smarthost[0]}:{d.smarthost[1]} ({d.smarthost_tls} TLS)" if d.smarthost else "no",
    )
    return signer, remote


def reload_keys(backend) -> tuple[bool, str]:
    """Re-read the [[dkim]] tables of the running ``backend``'s config file and load their keys
    (SIGHUP: rotation to a new selector without a restart, docs/dkim.md). Only when every key
    loads do new messages and DSNs get signed with them; otherwise the keys in service stay.
    Returns (switched, what changed in words)."""
    old = backend.config.dkim
    try:
        keys = load_dkim_tables(backend.config.path)
        signer = make_signer(keys, backend.metrics) if keys else None
    except (ConfigError, dkim_keys.DKIMKeyError) as e:
        return False, f"dkim: kept {len(old)} keys: " + "; ".join(str(e).splitlines())
    backend.config = dataclasses.replace(backend.config, dkim=keys)
    backend.signer = signer
    for user in (backend.acceptor, backend.remote):  # the two that sign: accepted mail, DSNs
        if user is not None:
            user.signer = signer
    name = lambda k: f"{k.domain}/{k.selector}"  # noqa: E731
    added = sorted(name(k) for k in set(keys) - set(old))
    removed = sorted(name(k) for k in set(old) - set(keys))
    if not added and not removed:
        return True, f"dkim: {len(keys)} keys unchanged"
    return True, f"dkim: {len(keys)} keys (" + " ".join([f"+{n}" for n in added] + [f"-{n}" for n in removed]) + ")"
