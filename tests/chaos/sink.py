"""The chaos run's remote MX: an aiosmtpd sink that records each delivered (Message-ID, recipient), refuses ``reject*`` recipients with 550, defers ``flaky*`` ones at random with 451, and on request SIGKILLs a process right after one of its refusals (a crash during bounce recording).

    python -m tests.chaos.sink --port P --control-port C --record FILE [--flaky-rate 0.5] [--seed N]

Control protocol (one TCP connection on the control port, lines): ``ARM PGID`` arms the trigger; the
next 550 refusal (or end of DATA of a transaction that had refusals) schedules SIGKILL of process
group PGID 0–150 ms later, and the sink answers ``FIRED <event>``. ``DISARM`` answers ``DISARMED``
if it had not fired yet. The record file gets one ``<message-id>\\t<recipient>`` line per accepted
recipient, flushed before the 250 is sent: what the sink acknowledged, it has recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import signal

from aiosmtpd.smtp import SMTP

MSGID_RE = re.compile(rb"^Message-ID:\s*<([^>]*)>", re.IGNORECASE | re.MULTILINE)


class Trigger:
    """The armed kill: at most one per ARM."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pgid: int | None = None
        self.writer: asyncio.StreamWriter | None = None

    def fire(self, event: str) -> None:
        if self.pgid is None:
            return
        pgid, writer = self.pgid, self.writer
        self.pgid = None

        def kill() -> None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if writer is not None and not writer.is_closing():
                writer.write(f"FIRED {event}\n".encode())

        # 0-150 ms: the remote's reply is out; the backend is somewhere in recording it.
        asyncio.get_running_loop().call_later(self.rng.uniform(0, 0.15), kill)


class SinkHandler:
    def __init__(self, record, rng: random.Random, flaky_rate: float, trigger: Trigger):
        self.record, self.rng, self.flaky_rate, self.trigger = record, rng, flaky_rate, trigger

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.partition("@")[0].lower()
        if local.startswith("reject"):
            envelope.refused = True
            self.trigger.fire("550")
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user (chaos sink)"
        if local.startswith("flaky") and self.rng.random() < self.flaky_rate:
            return "451 4.3.0 Try again later (chaos sink)"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        m = MSGID_RE.search(envelope.original_content or b"")
        mid = m.group(1).decode("ascii", "replace") if m else "-"
        self.record.write("".join(f"{mid}\t{r.lower()}\n" for r in envelope.rcpt_tos))
        self.record.flush()
        if getattr(envelope, "refused", False):
            self.trigger.fire("data-after-550")
        return "250 2.0.0 OK recorded"


async def serve(args) -> None:
    rng = random.Random(args.seed)
    trigger = Trigger(rng)
    record = open(args.record, "a", buffering=1024 * 1024)
    handler = SinkHandler(record, rng, args.flaky_rate, trigger)
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test", data_size_limit=0, enable_SMTPUTF8=True, ident="chaos sink"),
        "127.0.0.1", args.port, reuse_address=True, backlog=1024,
    )

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            cmd = line.decode().split()
            if cmd and cmd[0] == "ARM":
                trigger.pgid, trigger.writer = int(cmd[1]), writer
            elif cmd and cmd[0] == "DISARM":
                if trigger.pgid is not None:
                    trigger.pgid = None
                    writer.write(b"DISARMED\n")

    ctl = await asyncio.start_server(control, "127.0.0.1", args.control_port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with smtp, ctl:
        await stop.wait()
    record.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--control-port", type=int, required=True)
    ap.add_argument("--record", required=True)
    ap.add_argument("--flaky-rate", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
