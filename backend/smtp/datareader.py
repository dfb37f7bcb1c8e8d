"""The DATA reader: the message body of an SMTP transaction, read from bytes, with no I/O.

Feed it what the socket gives (any split, one byte or megabytes at a time); it answers when the
terminator arrived, with the message or the reason it is refused. The rules (RFC 5321):
- only ``CRLF.CRLF`` ends the data (4.1.1.4): a bare ``LF.LF``, ``CR.CR`` or any mix is content,
  never an end, so no message can be smuggled past a peer that reads it differently;
- a dot that starts a line is removed (transparency, 4.5.2);
- lone CR and lone LF become CRLF (the stored message is CRLF-canonical, what DKIM signs);
- a line longer than ``line_max`` octets (without CRLF) refuses the message (4.5.3.1.6), as does
  more than ``size_limit`` octets (the SIZE limit, RFC 1870); the data is still read to its end,
  so the session stays in step with the client;
- bytes after the terminator (pipelined commands) are handed back as ``leftover``.

The protocol glue (receive/smtpd.py) loops ``feed(await read())`` until ``done``; tests feed
messages split at every byte boundary (h11 style).
"""

from __future__ import annotations

from backend.smtp.message import crlf_canonical

OK, LINE_TOO_LONG, TOO_BIG = "ok", "line_too_long", "too_big"


def _unstuff(run: bytes, canonical: bool, dots: bool = True) -> bytes:
    """Transparency and line endings for a run of whole lines (each ends in CRLF, the run starts
    at a line start): a leading dot of a line is removed (the others looked for only if ``dots``:
    a later line may start with one), then lone CR/LF become CRLF (only looked for when the run
    is not ``canonical``)."""
    if run.startswith(b"."):
        run = run[1:]
    if dots:
        run = run.replace(b"\r\n.", b"\r\n")
    return run if canonical else crlf_canonical(run)


def _is_canonical(run: bytes) -> bool:
    """Whether every CR and every LF of ``run`` belongs to a CRLF (three C-level counts)."""
    crlf = run.count(b"\r\n")
    return run.count(b"\r") == crlf and run.count(b"\n") == crlf


def _longest_line_over(run: bytes, line_max: int) -> bool:
    """Whether a line of a CRLF-canonical run of whole lines is longer than ``line_max``.

    Without splitting the run into ~800 line objects per 64 KiB (the DATA reader's largest cost,
    docs/benchmarks.md B6): a line of more than ``line_max`` octets holds no LF and covers at
    least one whole block of ``(line_max + 2) // 2`` octets at a multiple of that size (an
    interval of 2B-1 octets always covers an aligned block of B), so a block without an LF is
    the only place one can be; only then are the lines measured."""
    block = (line_max + 2) // 2
    find = run.find
    for start in range(0, len(run), block):
        if find(b"\n", start, start + block) < 0:
            return max(map(len, run.split(b"\r\n"))) > line_max
    return False


class DataReader:
    """One message's DATA. ``feed`` until ``done``; then ``status`` (OK, LINE_TOO_LONG or
    TOO_BIG), ``content()`` (when OK) and ``leftover``. The status does not depend on how the
    stream was split: a too-long line anywhere wins over the size (both are read to the end)."""

    def __init__(self, size_limit: int | None, line_max: int = 999):
        self.size_limit = size_limit or None
        self.line_max = line_max
        self.done = False
        self.leftover = b""
        self.size = 0  # octets of complete lines seen so far, as the client sent them
        self._too_long = self._too_big = False
        self._pending = bytearray(b"\r\n")  # unprocessed; starts with the CRLF that ended DATA
        self._dropped = 0  # octets of the unfinished line dropped from _pending (refused message)
        self._parts: list[bytes] = []  # finished runs of complete lines

    @property
    def status(self) -> str:
        return LINE_TOO_LONG if self._too_long else TOO_BIG if self._too_big else OK

    def feed(self, chunk: bytes) -> None:
        if self.done:
            raise RuntimeError("DataReader.feed after the end of data")
        pending = self._pending
        search_from = max(0, len(pending) - 4)
        pending += chunk
        # pending holds no CRLF before search_from but its first: every line start that has a
        # dot (a stuffed one, or the terminator's) is found by one search, and most runs have none.
        dot = pending.find(b"\r\n.", search_from)
        end = -1 if dot < 0 else pending.find(b"\r\n.\r\n", dot)
        # Finish everything up to the last complete line (up to the terminator's first CRLF).
        cut = end + 2 if end >= 0 else pending.rfind(b"\r\n") + 2
        if cut > 2:
            with memoryview(pending) as view:  # one copy (a bytearray slice would be a second)
                run = bytes(view[2:cut])  # lines, each ending in CRLF
            del pending[: cut - 2]  # keep the CRLF that ended the run (for the searches)
            self.size += len(run) + self._dropped
            canonical = _is_canonical(run)
            if canonical and not self._dropped:
                too_long = _longest_line_over(run, self.line_max)
            else:  # lone CR/LF count as octets of their line; dropped octets began the first one
                lines = run.split(b"\r\n")
                too_long = len(lines[0]) + self._dropped > self.line_max or max(map(len, lines)) > self.line_max
            self._dropped = 0
            if too_long:
                self._too_long = True
            if self.size_limit and self.size > self.size_limit:
                self._too_big = True
            if self.status == OK:
                self._parts.append(_unstuff(run, canonical, dot >= 0))
            else:
                self._parts.clear()
        if end >= 0:
            self.leftover = bytes(pending[5:])
            pending.clear()
            self.done = True
            return
        # An unfinished line already too long (a final CR may be the first half of its CRLF).
        if len(pending) - 2 - pending.endswith(b"\r") + self._dropped > self.line_max:
            self._too_long = True
        if self.status != OK and len(pending) > 8:
            # A refused message keeps only what the terminator search needs (and counts the rest).
            self._dropped += len(pending) - 6
            del pending[2:-4]

    def content(self) -> bytes:
        """The message (CRLF-canonical, unstuffed); only once ``done`` with status OK."""
        if not self.done or self.status != OK:
            raise RuntimeError(f"no message: done={self.done} status={self.status}")
        out = b"".join(self._parts)
        self._parts.clear()
        return out
