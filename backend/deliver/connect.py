"""Opening an SMTP session to one target: TCP (bound to the source address), implicit TLS or
STARTTLS as the target's TLS policy requires, EHLO (HELO fallback), and AUTH at the smarthost.
Failures become HostFailure through the table in ``deliver.transaction``."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiosmtplib

from backend.config import BackendConfig
from backend.deliver.pool import Session
from backend.deliver.tlspolicy import REQUIRED, TLS_NONE, TLS_UNVERIFIED, TLS_VERIFIED, ClientTLS, Target
from backend.deliver.transaction import (
    AUTH,
    CONNECT,
    SESSION,
    STARTTLS,
    R_TLS_NOT_OFFERED,
    HostFailure,
    TLSHandshakeFailed,
    failure_reply,
    host_failure,
    reply_text,
)

log = logging.getLogger("homemx.delivery")


class Connector:
    """Opens sessions with the configured source address, timeouts and HELO name."""

    def __init__(self, config: BackendConfig, ca_file: str | None = None):
        self.d = config.delivery
        self.local_hostname = config.server.hostname
        self.tls = ClientTLS(ca_file)  # ca_file None: the system trust store (tests point it at their CA)

    async def open(self, target: Target) -> Session:
        """A ready session (TLS as required, EHLO done, logged in). Raises HostFailure."""
        try:
            return await self._connect(target, tls_allowed=True)
        except TLSHandshakeFailed as e:
            # Opportunistic TLS: a broken TLS stack on the far side must not stop mail
            # (RFC 7435 opportunistic security); reconnect and stay in cleartext. Never for REQUIRED.
            log.info("%s: %s; retrying without TLS (opportunistic)", target.peer, e.reply)
            return await self._connect(target, tls_allowed=False)

    async def _connect(self, target: Target, tls_allowed: bool) -> Session:
        try:
            client = await self._client(target)
            await client.connect(timeout=self.d.connect_timeout)
        except Exception as e:  # noqa: BLE001 - looked up in FAILURES; no row: re-raised
            raise host_failure(CONNECT, e, target.peer) from None
        tls = TLS_VERIFIED if target.implicit_tls else TLS_NONE
        try:
            await self._hello(client, target, starttls_required=target.tls == REQUIRED and not target.implicit_tls)
            if not target.implicit_tls:
                tls = await self._starttls(client, target, tls_allowed)
            if target.auth is not None:
                await self._login(client, target)
        except Exception as e:  # noqa: BLE001 - looked up in FAILURES; no row: re-raised
            client.close()
            if isinstance(e, HostFailure):
                raise
            raise host_failure(SESSION, e, target.peer) from None
        log.debug("connected to %s tls=%s", target.peer, tls)
        return Session(client, target.key, target.peer, target.host_name, tls)

    async def _client(self, target: Target) -> aiosmtplib.SMTP:
        d = self.d
        if target.implicit_tls:
            return aiosmtplib.SMTP(
                hostname=target.host_name,
                sock=await self._bound_socket(target),
                local_hostname=self.local_hostname,
                timeout=d.command_timeout,
                use_tls=True,
                start_tls=False,
                tls_context=self.tls.verified,
            )
        return aiosmtplib.SMTP(
            hostname=target.address,
            port=target.port,
            local_hostname=self.local_hostname,
            source_address=(d.source_address, 0) if d.source_address else None,
            timeout=d.command_timeout,
            start_tls=False,
        )

    async def _starttls(self, client: aiosmtplib.SMTP, target: Target, tls_allowed: bool) -> str:
        """STARTTLS if offered (RFC 3207); the session's TLS status. Refuses cleartext where required."""
        verify = target.tls == REQUIRED
        if not (tls_allowed and client.supports_extension("starttls")):
            if verify:
                # RFC 3207 / RFC 8461 5: with TLS required, never fall back to cleartext.
                raise HostFailure(R_TLS_NOT_OFFERED.format(host=target.peer))
            return TLS_NONE
        try:
            resp = await client.starttls(
                server_hostname=target.host_name,
                tls_context=self.tls.context(verify),
                timeout=self.d.command_timeout,
            )
        except Exception as e:  # noqa: BLE001 - looked up in FAILURES; no row: the session's rows
            reply = failure_reply(STARTTLS, e, target.peer)
            if reply is None:
                raise
            raise (HostFailure if verify else TLSHandshakeFailed)(reply) from None
        if resp.code != 220:
            raise HostFailure(reply_text(resp.code, resp.message))
        await self._hello(client, target, starttls_required=False)  # RFC 3207 4.2: forget and ask again
        return TLS_VERIFIED if verify else TLS_UNVERIFIED

    async def _login(self, client: aiosmtplib.SMTP, target: Target) -> None:
        try:
            await client.login(*target.auth)
        except Exception as e:  # noqa: BLE001 - looked up in FAILURES; no row: the session's rows
            reply = failure_reply(AUTH, e, target.peer)
            if reply is None:
                raise
            raise HostFailure(reply) from None

    async def _bound_socket(self, target: Target) -> socket.socket:
        """A TCP socket bound to the source address and connected (implicit-TLS smarthost path,
        where aiosmtplib needs a ready socket to use the relay's name for the TLS handshake)."""
        fam = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if self.d.source_address:
                sock.bind((self.d.source_address, 0))
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (target.address, target.port)), self.d.connect_timeout
            )
        except BaseException:
            sock.close()
            raise
        return sock

    async def _hello(self, client: aiosmtplib.SMTP, target: Target, starttls_required: bool) -> None:
        """EHLO; HELO to a server that refuses EHLO (RFC 5321 3.2: the client SHOULD fall back).

        A HELO session has no extensions, so no STARTTLS: where TLS is still to be started and is
        required, refusing EHLO ends the attempt as "TLS not offered" (never a cleartext fallback).
        """
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError as e:
            if e.code < 500:
                raise
            if starttls_required:
                raise HostFailure(R_TLS_NOT_OFFERED.format(host=target.peer)) from None
            await client.helo()
