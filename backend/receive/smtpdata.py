"""The DATA command of the listeners: 64 KiB reads fed to the sans-IO reader (smtp/datareader.py);
mixed into the session class (receive/smtpd.py)."""

from __future__ import annotations

import asyncio
import logging


from aiosmtpd.smtp import MISSING

from backend.smtp import replies as R
from backend.accept import JOIN_OFF_LOOP
from backend.smtp.datareader import LINE_TOO_LONG, OK, DataReader


log = logging.getLogger("homemx.smtp")


class SMTPData:
    """DATA; a mixin of HomeSMTP."""

    # -- DATA (RFC 5321 4.1.1.4, 4.5.2) ----------------------------------------------------------
    # aiosmtpd reads DATA one line at a time on the event loop, then post-processes the whole
    # message in one go: a 25 MB message is some 400,000 Python iterations plus several full
    # passes during which no other session runs (docs/benchmarks.md, B6). Here 64 KiB chunks go
    # to the sans-IO reader (smtp/datareader.py: the end, transparency, line endings, line and
    # size limits), yielding to other sessions between megabytes; what follows the terminator
    # (pipelined commands) goes back to the command reader.

    DATA_CHUNK = 65536
    # Bytes read between yields to the loop. read() returns without suspending while the buffer
    # holds data (a fast sender), so without this a 25 MB message would keep every other session
    # waiting. Every chunk: ~20 us per yield, a few ms per 25 MB (B6).
    DATA_YIELD = DATA_CHUNK
    DATA_LINE_MAX = 999  # aiosmtpd's limit (1001 octets with CRLF); RFC 5321 4.5.3.1.6 says 998

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            await self._read_data()
        finally:
            self.in_data = False
        if self.ctx.sessions.closing:
            # Shutting down: the message was answered; nothing more on this session.
            self.hang_up(R.R421_SHUTTING_DOWN, "shutdown")

    async def _read_data(self) -> None:
        assert self.envelope is not None
        data = DataReader(self.data_size_limit, self.DATA_LINE_MAX)
        since_yield = 0
        while not data.done:
            chunk = await self._reader.read(self.DATA_CHUNK)
            if not chunk:
                return  # connection gone: nothing was accepted
            self._reset_timeout()  # RFC 5321 4.5.3.2.5/6: the timeout is per data block
            data.feed(chunk)
            since_yield += len(chunk)
            if since_yield >= self.DATA_YIELD:
                since_yield = 0
                await asyncio.sleep(0)  # let other sessions run during a large message
        if data.leftover:
            # aiosmtpd private: the StreamReader's buffer is where its command loop reads from
            # (docs/development.md, "aiosmtpd internals we touch").
            self._reader._buffer[0:0] = data.leftover  # type: ignore[attr-defined]
        if data.status != OK:
            too_long = data.status == LINE_TOO_LONG
            self._reject("line_too_long" if too_long else "message_too_big")
            self._set_post_data_state()
            await self.push(R.R500_LINE_TOO_LONG if too_long else R.R552_TOO_BIG)
            return
        # A large message's parts are joined off the event loop (backend/accept.py, JOIN_OFF_LOOP).
        run_blocking = self.ctx.run_blocking if data.size >= JOIN_OFF_LOOP else None
        content = data.content() if run_blocking is None else await run_blocking(data.content)
        self.envelope.content = content
        self.envelope.original_content = content
        self.envelope.canonical = True  # type: ignore[attr-defined]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(R.R250_OK if status is MISSING else status)
