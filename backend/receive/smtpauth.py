"""SMTP AUTH (RFC 4954) for the listeners: PLAIN and LOGIN checked off the event loop, with the
shared failure limiter; mixed into the session class (receive/smtpd.py)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging


from aiosmtpd.smtp import MISSING, AuthResult

from backend.smtp import replies as R
from backend.receive.authlimit import auth_delay


log = logging.getLogger("homemx.smtp")


class SMTPAuth:
    """AUTH mechanisms and their failure handling; a mixin of HomeSMTP (aiosmtpd finds auth_* methods)."""

    # -- AUTH (RFC 4954) -----------------------------------------------------------------------
    # aiosmtpd's built-in mechanisms call a synchronous authenticator; bcrypt must not run on the
    # event loop, so PLAIN and LOGIN are re-implemented here with an awaited check.

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        if await self._auth_blocked():
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = self._b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # RFC 4616: acting as another identity is not supported.
            return await self._auth_failed()
        return await self._auth_check(login, password)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        if await self._auth_blocked():
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = self._b64(args[1])
            if login is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._auth_check(login, password)

    async def challenge_auth(self, challenge, encode_to_b64: bool = True, log_client_response: bool = False):
        """aiosmtpd's challenge (334) and the client's answer, with a bounded answer line: its
        readline() raised ValueError past the reader's limit (64 KiB) and left the rest of the
        line to be read as commands. RFC 4954 4: a longer answer is refused with 500 5.5.6 and
        counts as a failed AUTH; the whole line is read and dropped."""
        if isinstance(challenge, str):
            challenge = challenge.encode()
        await self.push(b"334 " + (base64.b64encode(challenge) if encode_to_b64 else challenge))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            line = e.partial  # the connection is going; aiosmtpd's readline() answered the same
        except asyncio.LimitOverrunError as e:
            await self._skip_line(e.consumed)
            self._count_auth_failure()
            await self.push(R.R500_AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 4: the client cancels
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        decoded = self._b64(blob)
        if decoded is None:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING
        return decoded

    async def _skip_line(self, consumed: int) -> None:
        """Drop an overlong line: what the reader holds of it, and the rest up to its LF."""
        while True:
            await self._reader.readexactly(consumed)
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.IncompleteReadError:
                return  # the connection ended inside the line
            except asyncio.LimitOverrunError as e:
                consumed = e.consumed

    @staticmethod
    def _b64(text: str | bytes) -> bytes | None:
        try:
            return base64.b64decode(text.encode() if isinstance(text, str) else text, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _auth_blocked(self) -> bool:
        lc = self.ctx.listener
        if self.ctx.auth_limiter.blocked(self.client_host, lc.auth_max_failures, lc.auth_failure_window):
            self._reject("auth_lockout")
            await self.push(R.R421_AUTH_LOCKOUT)
            if self.transport is not None:
                self.transport.close()
            return True
        return False

    async def _auth_check(self, login: bytes, password: bytes) -> AuthResult:
        try:
            user = await self.ctx.run_blocking(self.ctx.users.authenticate, login, password)
        except Exception:  # noqa: BLE001 - unreadable passwd-file and the like: temporary
            log.exception("conn=%s AUTH check failed", self.conn_id)
            await self.push(R.R454_AUTH_TEMP)
            return AuthResult(success=False, handled=True)
        if user is None:
            return await self._auth_failed()
        self.login_user = user
        log.info("conn=%s client=%s authenticated as %s", self.conn_id, self.client_host, user)
        return AuthResult(success=True, auth_data=user, message=R.R235_AUTH_OK)

    def _count_auth_failure(self) -> int:
        """Record a failed AUTH for this client (the shared limiter, the metric, one log line);
        returns the client's failures in the window."""
        lc = self.ctx.listener
        n = self.ctx.auth_limiter.failed(self.client_host, lc.auth_failure_window)
        self.ctx.metrics.auth_failures.labels(lc.name).inc()
        log.info("conn=%s client=%s AUTH failed (%d in window)", self.conn_id, self.client_host, n)
        return n

    async def _auth_failed(self) -> AuthResult:
        n = self._count_auth_failure()
        delay = auth_delay(n, self.ctx.listener.auth_failure_delay)
        if delay:
            await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False, message=R.R535_AUTH_FAILED)
