"""The server TLS context of the SMTP listeners, from the configured certificate and key."""

from __future__ import annotations

import logging
import ssl



from backend.config import BackendConfig


log = logging.getLogger("homemx.smtp")


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message names the files and the reason."""


def make_tls_context(config: BackendConfig) -> ssl.SSLContext | None:
    if config.tls.cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls.cert, config.tls.key)
    except (ssl.SSLError, OSError) as e:
        # The config loader tries this too; the files may have changed since (a renewal).
        raise TLSSetupError(f"certificate {config.tls.cert} and key {config.tls.key}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
