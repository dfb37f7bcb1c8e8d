"""Outbound wiring: the ``build(backend)`` hook that gives the daemon its DKIM signer and its remote delivery.

``backend.run.Backend`` imports this module when it exists and calls ``build``; the signer runs in
a worker thread (smtpd calls it through ``run_blocking``) on mail from the submission,
submissions and lan listeners, before the message is queued, so the signature is made once and
never changes across retries; delivery signs the reports it generates (DSNs) with it too. Keys are loaded here, at start, so a missing or unreadable key
stops the daemon with a clear error instead of failing every submission later.
"""

from __future__ import annotations

import logging
from typing import Callable

from backend.dkim import keys as dkim_keys
from backend.dkim import sign as dkim
from backend.config import BackendConfig, DKIMKeyConfig
from backend.deliver.remote import Deliverer
from backend.metrics import BackendMetrics

log = logging.getLogger("homemx.outbound")


def make_signer(keys: tuple[DKIMKeyConfig, ...], metrics: BackendMetrics) -> Callable[[bytes, str], bytes]:
    """A blocking callable (message, envelope sender) → message with DKIM-Signature headers.

    Keys are chosen by the From header domain (DMARC alignment), not the envelope sender; a
    message from a domain without keys passes through unsigned (CRLF-canonical either way).
    """
    for k in keys:
        dkim_keys.load_key(k)  # raises DKIMKeyError naming the file

    def sign(message: bytes, envelope_sender: str) -> bytes:
        message, signatures = dkim.make_signatures(message, keys)
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
