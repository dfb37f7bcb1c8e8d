"""STARTTLS (RFC 3207) and implicit TLS behind the gateway (RFC 8314, port 465 after a PROXY header)
for the listeners; mixed into the session class (receive/smtpd.py). asyncio's TLS layer does not
report a connection lost mid-handshake, and aiosmtpd knows only STARTTLS: both are handled here."""

from __future__ import annotations

import asyncio
import logging
import ssl

from asyncio import sslproto

from aiosmtpd.smtp import TLSSetupException

from backend.smtp import replies as R

log = logging.getLogger("homemx.smtp")


class SMTPTLS:
    """TLS for HomeSMTP (a mixin; aiosmtpd's SMTP provides the rest)."""

    async def start_implicit_tls(self) -> bool:
        """Implicit TLS (RFC 8314) on a listener that first reads a PROXY header: the header is
        cleartext, the TLS ClientHello follows it (often in the same segment), so the TLS layer is
        put in place after the header, fed whatever bytes were already read past it, and the
        banner is sent inside TLS."""
        assert self.transport is not None and self.ctx.tls_context is not None
        leftover = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        self._drop_plaintext()
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.ctx.tls_context, waiter, server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        if leftover:
            buf = self._tls_protocol.get_buffer(len(leftover))
            buf[: len(leftover)] = leftover
            self._tls_protocol.buffer_updated(len(leftover))
        try:
            await asyncio.wait_for(waiter, self.ctx.proxy_timeout)
            if self._lost_in_handshake():
                raise ConnectionResetError("connection closed during the TLS handshake")
        except (asyncio.TimeoutError, ssl.SSLError, ConnectionError, OSError) as e:
            log.info("conn=%s client=%s TLS handshake failed: %r", self.conn_id, self.client_host, e)
            if self.outcome == "closed":
                self.outcome = "tls-failed"
            # Nobody else will end this session (see _lost_in_handshake): once aiosmtpd has
            # closed the transport on our False, finish it like any lost connection.
            self.loop.call_soon(self._end_if_open)
            return False
        return True

    def _drop_plaintext(self) -> None:
        """Before TLS starts: forget what the command reader holds (RFC 3207 5: nothing sent in
        clear may count as sent under TLS) and let the socket be read again. The reader pauses
        the socket's transport when it holds more than 128 KiB; the TLS layer then waited for a
        ClientHello, or noticed a reset, only at the idle timeout."""
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        self._reader._maybe_resume_transport()  # type: ignore[attr-defined]

    def _lost_in_handshake(self) -> bool:
        """Whether the connection went while the TLS handshake was in progress. asyncio's
        SSLProtocol then wakes the handshake waiter without an error and never calls our
        connection_lost (it only does so after a completed handshake), so the session would
        wait on its reader for ever: never logged, never counted, held by the drain."""
        return self.transport is None or self.transport.is_closing()

    def _end_if_open(self) -> None:
        if self._registered:
            self.connection_lost(None)

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or self.ctx.listener.kind == "submissions"

    async def smtp_STARTTLS(self, arg: str | None):
        if self.tls_active:
            # A second STARTTLS would stack TLS inside TLS (aiosmtpd does not check); asyncio's
            # SSLProtocol cannot run over its own transport (TypeError on the first error).
            await self.push(R.R503_TLS_ACTIVE)
            return
        if not arg and self.tls_context:
            self._drop_plaintext()
        try:
            await super().smtp_STARTTLS(arg)
            if self._lost_in_handshake():
                # Closed mid-handshake (our idle timeout, a silent client): aiosmtpd saw a
                # success. Raising makes it end the session (it calls connection_lost itself).
                raise TLSSetupException() from ConnectionResetError("connection closed during the TLS handshake")
        except TLSSetupException as e:
            # After "220 Ready to start TLS" the handshake failed (a scanner, no common cipher, a
            # reset): a normal network outcome, one line. aiosmtpd then closes the connection.
            log.info("conn=%s client=%s STARTTLS handshake failed: %r", self.conn_id, self.client_host, e.__cause__)
            if self.outcome == "closed":
                self.outcome = "tls-failed"  # a timeout keeps its own outcome
            raise
