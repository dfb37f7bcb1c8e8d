"""TLS contexts: the one server context factory (SMTP listeners and the HTTPS face), the reloadable
holder of the current certificate (``ServerTLS``), and the client contexts of outbound delivery.

Server side. Listeners are bound once, with a fixed "front" context whose SNI callback hands each
new handshake the holder's current context, so ``ServerTLS.reload()`` (SIGHUP, an ACME renewal)
changes the certificate of new STARTTLS/465/HTTPS handshakes while sessions already open keep theirs.
The settings follow Mozilla's "intermediate" server profile (TLS 1.2 and 1.3, AEAD-only suites);
the front context carries them too, because OpenSSL keeps the protocol versions and cipher list of
the context a connection started with when a callback switches it to another one.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Protocol

from cryptography import x509

from backend.config import BackendConfig

log = logging.getLogger("homemx.tls")

# Mozilla "intermediate" (v5.7) TLS 1.2 suites, ECDHE only: forward secrecy and AEAD (AES-GCM,
# ChaCha20-Poly1305). No CBC suite: CBC's MAC-then-encrypt is what LUCKY13 and its successors
# attack (RFC 7457 2.4). Mozilla's DHE suites are left out: they need a DH group loaded, and every
# client that speaks TLS 1.2 also speaks ECDHE. TLS 1.3 suites are all AEAD and not set here.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
))  # fmt: skip


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message names the files and the reason."""


class ALPNChallenges(Protocol):
    """What the holder asks of backend/tls/challenges.py: the acme-tls/1 context for a name, if any."""

    def tls_alpn_context(self, server_name: str | None) -> ssl.SSLContext | None: ...


def _server_settings(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.0/1.1 are deprecated (RFC 8996)
    ctx.set_ciphers(TLS12_CIPHERS)
    # Mozilla intermediate: every suite offered is strong, so the client chooses (a phone without
    # AES hardware prefers ChaCha20).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # No session tickets. A TLS 1.2 ticket is the session's master secret encrypted under a ticket
    # key that OpenSSL makes once per context and Python cannot rotate (no ticket key callback), so
    # whoever reads that key from the process could decrypt every recorded session of the daemon's
    # lifetime: forward secrecy would be gone. Rotating would mean replacing the context on a timer,
    # which ends resumption anyway, and mail clients and MTAs rarely resume. TLS 1.3 tickets are
    # switched off too (num_tickets 0): no resumption state leaves the server at all.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def server_context(cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """A server context with the certificate chain in ``cert`` and its ``key``. Raises TLSSetupError."""
    ctx = _server_settings(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise TLSSetupError(f"certificate {cert} and key {key}: {_reason(Path(cert), Path(key), e)}") from None
    return ctx


def _reason(cert: Path, key: Path, error: Exception) -> str:
    """Why the pair does not load, in words (OpenSSL says only "PEM lib" for either file)."""
    if isinstance(error, OSError) and not isinstance(error, ssl.SSLError):
        return f"cannot read: {error.strerror or error}"
    from backend.config import _tls_pair_problem

    try:
        return _tls_pair_problem(cert, key, error)[1]
    except OSError as e:  # a file vanished between the two reads
        return f"cannot read: {e.strerror or e}"


def _leaf_serial(cert: Path) -> int | None:
    try:
        return x509.load_pem_x509_certificates(cert.read_bytes())[0].serial_number
    except (OSError, ValueError):
        return None


class ServerTLS:
    """The server certificate in use, replaceable while listeners run.

    ``current`` is the context new handshakes get; ``front_context()`` is what a listener binds.
    ``reload()`` re-reads the files and swaps ``current`` only when they load; a broken new
    certificate leaves the old one in service.
    """

    def __init__(self, cert: Path | str, key: Path | str, challenges: ALPNChallenges | None = None):
        self.cert, self.key = Path(cert), Path(key)
        self.challenges = challenges  # answers TLS-ALPN-01 (RFC 8737) on fronts made with acme=True
        self.current = server_context(self.cert, self.key)  # raises TLSSetupError: the start fails
        self.serial = _leaf_serial(self.cert)

    @classmethod
    def from_config(cls, config: BackendConfig, challenges: ALPNChallenges | None = None) -> ServerTLS | None:
        if config.acme.enabled:
            # [tls] cert/key are ignored while ACME is on: the live pair of backend/tls/certfiles.py
            # (a self-signed placeholder until the first issuance, written by renew.prepare).
            from backend.tls.certfiles import live_paths

            return cls(*live_paths(config.acme_dir), challenges)
        if config.tls.cert is None:
            return None
        return cls(config.tls.cert, config.tls.key, challenges)

    def reload(self, cert: Path | str | None = None, key: Path | str | None = None, *, quiet: bool = False) -> tuple[bool, str]:
        """Re-read the certificate and key (or switch to new paths); new handshakes get them.

        Returns (loaded, what happened in words) and logs that as one line unless ``quiet`` (the
        caller logs it with other outcomes). Never raises: on failure the running certificate stays.
        """
        cert, key = Path(cert or self.cert), Path(key or self.key)
        old = self.serial
        try:
            ctx = server_context(cert, key)
        except TLSSetupError as e:
            outcome = f"certificate: kept serial {_hex(old)}: {e}"
            if not quiet:
                log.warning("tls reload failed: %s", outcome)
            return False, outcome
        self.current, self.cert, self.key = ctx, cert, key
        self.serial = _leaf_serial(cert)
        if self.serial == old:
            outcome = f"certificate: serial {_hex(old)} unchanged"
        else:
            outcome = f"certificate: serial {_hex(old)} -> {_hex(self.serial)}"
        if not quiet:
            log.info("tls reload: %s (%s)", outcome, cert)
        return True, outcome

    def front_context(self, acme: bool = False) -> ssl.SSLContext:
        """The context a listener binds once. It holds no certificate of its own: its SNI callback
        (called for every ClientHello, with or without SNI) switches the handshake to ``current``,
        or, with ``acme`` (the HTTPS face on 443, where a CA validates TLS-ALPN-01), to the
        challenge context for that name while one is pending."""
        front = _server_settings(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

        def pick(ssl_obj, server_name: str | None, _front) -> None:
            if acme and self.challenges is not None:
                challenge = self.challenges.tls_alpn_context(server_name)
                if challenge is not None:
                    ssl_obj.context = challenge
                    return None
            ssl_obj.context = self.current
            return None

        front.sni_callback = pick
        return front


def _hex(serial: int | None) -> str:
    return "unknown" if serial is None else format(serial, "x")


# ---------------------------------------------------------------- client side (outbound delivery)


def client_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """A client context for SMTP delivery (and MTA-STS policy fetches). Build it once and reuse it:
    loading the CA bundle costs about 20 ms.

    ``verify``: certificate chain and host name checked (``ca_file`` None: the system trust store),
    TLS 1.2 or later; for TLS required by policy, MTA-STS (RFC 8461 4.2) and the smarthost.
    Otherwise opportunistic (RFC 7435): the certificate is not checked (most MX certificates do not
    match the MX name; encryption still defeats passive eavesdropping) and TLS 1.0/1.1 and the
    weaker suites are accepted, since any encryption beats the cleartext the alternative would be
    (an MX that speaks only TLS 1.0 would otherwise get the message in clear). SECLEVEL 0 is what
    lets OpenSSL 3 negotiate TLS 1.0/1.1 at all (their handshake signatures use SHA-1); a server
    that speaks TLS 1.3 still gets TLS 1.3.
    """
    if verify:
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # TLS 1.0: naming TLSv1 here is deprecated in Python's ssl, the lowest supported version is
    # not, and every Python context carries OP_NO_SSLv3 (SSLv3 is forbidden: RFC 7568).
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx
