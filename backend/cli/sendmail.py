"""``homemx-sendmail``: a sendmail-compatible command for homelab tools (cron, smartd, mdadm, backup
scripts, NAS tools) that submits a message read on stdin to the backend's lan listener.

A short-lived blocking client (smtplib), not part of the asyncio daemon. It reads the backend's
config only for the lan listener's address and the server's host name (the raw TOML: the rest of
the file, with its key and certificate paths, is the daemon's business), talks plain SMTP to that
listener from this host, and exits with a sysexits(3) code and one line on stderr when the message
was not accepted. Unqualified addresses (``root``, ``root@nas``) are sent as they are: the lan
listener masquerades them to our domain (backend/smtp/masquerade.py), one place for that policy.

Sendmail semantics kept (sendmail(8), Postfix's sendmail(1)):
- recipients are the arguments; with ``-t`` also the To, Cc and Bcc fields (Postfix adds the
  arguments to them; Sendmail 8 would drop the argument addresses), and Bcc fields are removed;
- ``-f`` sets the envelope sender (default: the login name), ``-F`` the full name of a From field
  added when the message has none (default: the GECOS name); Date and Message-ID are added when
  missing; a leading mbox ``From `` line is dropped;
- without ``-i``/``-oi`` a line of a single ``.`` ends the message; with it, the end of input does;
- the options tools pass and that mean nothing here (``-oem``, ``-odi``, ``-bm``, ``-B8BITMIME``,
  ``-v``, ``-N``, ``-R``, ``-V``, ``-U``, ...) are accepted; the modes that are not message
  submission (``-bs``, ``-bp``, ``-bd``, ``-bi``, ``-q``) are refused with EX_USAGE.
"""

from __future__ import annotations

import email.utils
import os
import re
import smtplib
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

DEFAULT_CONFIG = "/etc/homemx/backend.toml"
TIMEOUT = 60.0  # per SMTP command; a lan listener answers in milliseconds

# sysexits(3)
EX_OK = 0
EX_USAGE = 64  # bad command line, no recipients
EX_NOUSER = 67  # a recipient refused as unknown (5.1.1)
EX_UNAVAILABLE = 69  # any other permanent refusal (5xx)
EX_SOFTWARE = 70
EX_IOERR = 74  # stdin could not be read
EX_TEMPFAIL = 75  # server unreachable, 4xx, connection lost: try again later
EX_CONFIG = 78  # no readable config, no lan listener

# Options that take a value (attached, ``-fX``, or the next argument, ``-f X``); the ones not used are ignored.
_WITH_VALUE = set("fFrCBNRVXLhApOd")
_IGNORED_FLAGS = set("vUnmGeax")  # verbose (handled), initial submission, no aliasing, me too, ...
_UNSUPPORTED_MODES = {
    "s": "SMTP on stdin (-bs)",
    "p": "listing the queue (-bp): use `homemx-backend queue list`",
    "d": "running a daemon (-bd): the daemon is homemx-backend.service",
    "D": "running a daemon (-bD): the daemon is homemx-backend.service",
    "i": "rebuilding aliases (-bi): aliases live in backend.toml",
    "v": "verifying addresses (-bv)",
    "t": "address test mode (-bt)",
    "h": "the host status (-bh)",
    "H": "the host status (-bH)",
    "P": "queue statistics (-bP)",
}


class UsageError(Exception):
    pass


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False  # -t
    dot_ends: bool = True  # cleared by -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    config: str | None = None  # -C / --config
    verbose: bool = False  # -v: the SMTP dialogue on stderr
    help: bool = False


def parse_args(argv: list[str]) -> Options:
    """Sendmail's command line (getopt-style clusters, options anywhere before ``--``)."""
    o = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            o.recipients.extend(args[i:])
            break
        if a in ("--help", "-?"):
            o.help = True
            continue
        if a.startswith("--config"):
            if a.startswith("--config="):
                o.config = a.split("=", 1)[1]
            elif a == "--config" and i < len(args):
                o.config, i = args[i], i + 1
            else:
                raise UsageError(f"{a}: expected --config PATH")
            continue
        if a.startswith("--"):
            raise UsageError(f"unknown option {a}")
        if not a.startswith("-") or a == "-":
            o.recipients.append(a)
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            if c == "t":
                o.from_headers = True
            elif c == "i":
                o.dot_ends = False
            elif c == "v":
                o.verbose = True
            elif c in _IGNORED_FLAGS:
                pass
            elif c == "o":
                opt = a[j:]
                if not opt:
                    if i >= len(args):
                        raise UsageError("-o: expected an option letter (for example -oi)")
                    opt, i = args[i], i + 1
                if opt == "i":
                    o.dot_ends = False
                break  # -oem, -oep, -odi, -odb, -oQ..., -oX...: delivery and error modes of no meaning here
            elif c == "b":
                mode = a[j:j + 1]
                if mode in ("m", ""):
                    break  # -bm: deliver mail, the one mode
                what = _UNSUPPORTED_MODES.get(mode, f"-b{mode}")
                raise UsageError(f"-b{mode} is not supported: this sendmail only submits messages ({what})")
            elif c == "q":
                raise UsageError("-q is not supported: the homemx backend runs its queue itself")
            elif c == "I":
                raise UsageError("-I (newaliases) is not supported: aliases live in backend.toml")
            elif c in _WITH_VALUE:
                value = a[j:]
                if not value:
                    if i >= len(args):
                        raise UsageError(f"-{c}: expected a value")
                    value, i = args[i], i + 1
                if c in "fr":
                    o.sender = value
                elif c == "F":
                    o.full_name = value
                elif c == "C":
                    o.config = value
                break
            else:
                raise UsageError(f"unknown option -{c}")
    return o


def read_message(stream: BinaryIO, dot_ends: bool) -> list[bytes]:
    """The message's lines (without line ends). Without -i a line of a single "." ends it."""
    lines = []
    for raw in stream:
        line = raw.rstrip(b"\n").removesuffix(b"\r")
        if dot_ends and line == b".":
            break
        lines.append(line)
    return lines


_FIELD_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


@dataclass
class Message:
    fields: list[tuple[bytes, list[bytes]]]  # (lower-cased name, the field's lines)
    body: list[bytes]

    def values(self, name: bytes) -> list[str]:
        return [b" ".join(ln.strip() for ln in lines).split(b":", 1)[1].decode("utf-8", "surrogateescape")
                for n, lines in self.fields if n == name]

    def has(self, name: bytes) -> bool:
        return any(n == name for n, _ in self.fields)

    def to_bytes(self) -> bytes:
        header = [ln for _, lines in self.fields for ln in lines]
        return b"".join(ln + b"\r\n" for ln in header + [b""] + self.body)


def parse_message(lines: list[bytes]) -> Message:
    """Header fields up to the first empty line (or the first line that is not a field, which then
    starts the body, as sendmail does); a leading mbox ``From `` line is dropped."""
    i = 1 if lines and lines[0].startswith(b"From ") else 0
    fields: list[tuple[bytes, list[bytes]]] = []
    while i < len(lines):
        line = lines[i]
        m = _FIELD_RE.match(line)
        if m:
            fields.append((m.group(1).lower(), [line]))
        elif line[:1] in (b" ", b"\t") and fields and line.strip():
            fields[-1][1].append(line)
        else:
            if line == b"":
                i += 1
            break
        i += 1
    return Message(fields, lines[i:])


def addresses(values: list[str]) -> list[str]:
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


@dataclass(frozen=True)
class Submission:
    sender: str
    recipients: list[str]
    content: bytes


def prepare(o: Options, lines: list[bytes], login: str, gecos: str, msgid_domain: str) -> Submission:
    """Envelope and final bytes of the message (pure)."""
    msg = parse_message(lines)
    recipients = addresses(o.recipients)
    if o.from_headers:
        recipients += addresses([v for name in (b"to", b"cc", b"bcc") for v in msg.values(name)])
        msg.fields = [(n, ls) for n, ls in msg.fields if n != b"bcc"]
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise UsageError("no recipients: name them as arguments, or use -t with To/Cc/Bcc fields"
                         if not o.from_headers else "no recipient addresses found in the To, Cc and Bcc fields")
    sender = login if o.sender is None else o.sender.strip()
    if sender == "<>":
        sender = ""
    added: list[tuple[bytes, list[bytes]]] = []
    if not msg.has(b"from"):
        name = o.full_name if o.full_name is not None else gecos
        value = email.utils.formataddr((name, sender or login), charset="utf-8")
        added.append((b"from", [b"From: " + value.encode()]))
    if not msg.has(b"date"):
        added.append((b"date", [b"Date: " + email.utils.formatdate(localtime=True).encode()]))
    if not msg.has(b"message-id"):
        added.append((b"message-id", [b"Message-ID: " + email.utils.make_msgid(domain=msgid_domain).encode()]))
    msg.fields = msg.fields + added
    return Submission(sender, recipients, msg.to_bytes())


# ---------------------------------------------------------------- where to submit


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    hostname: str  # server.hostname: the Message-ID domain
    where: str  # for messages: the listener and the config file

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ConfigProblem(Exception):
    pass


def lan_server(path: str) -> Server:
    """The first lan listener of the backend config at ``path`` (a wildcard address means this host)."""
    from backend.config.values import parse_hostport

    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigProblem(f"{path}: cannot read: {e.strerror} (use --config PATH or HOMEMX_CONFIG)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigProblem(f"{path}: invalid TOML: {e}") from None
    listeners = raw.get("listener") if isinstance(raw.get("listener"), list) else []
    lan = [lc for lc in listeners if isinstance(lc, dict) and lc.get("kind") == "lan"]
    if not lan:
        raise ConfigProblem(f"{path}: no [[listener]] with kind = \"lan\" to submit to")
    try:
        host, port = parse_hostport(lan[0].get("listen"))
    except ValueError as e:
        raise ConfigProblem(f"{path}: listener {lan[0].get('name')!r}: listen: {e}") from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    server = raw.get("server") if isinstance(raw.get("server"), dict) else {}
    hostname = server.get("hostname") if isinstance(server.get("hostname"), str) else socket.getfqdn()
    return Server(host, port, hostname, f"lan listener {lan[0].get('name')!r} of {path}")


# ---------------------------------------------------------------- submitting


class Failed(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code, self.text = code, text


def _reply(code: int, msg: bytes) -> str:
    return f"{code} {msg.decode('utf-8', 'replace')}".replace("\n", " ")


def _exit_for(code: int, msg: bytes = b"") -> int:
    if 400 <= code < 500 or code < 0:
        return EX_TEMPFAIL
    if code in (550, 553) and msg.startswith(b"5.1.1"):
        return EX_NOUSER
    return EX_UNAVAILABLE


def submit(server: Server, s: Submission, verbose: bool = False) -> str:
    """One SMTP transaction; returns the server's reply to the message. Raises Failed. Nothing is sent
    unless every recipient is accepted (a tool's exit code then means all or nothing)."""
    try:
        smtp = smtplib.SMTP(server.host, server.port, local_hostname=socket.gethostname() or "localhost",
                            timeout=TIMEOUT)
    except smtplib.SMTPConnectError as e:
        reply = _reply(e.smtp_code, e.smtp_error)
        raise Failed(_exit_for(e.smtp_code), f"{server} refused the connection: {reply}") from None
    except OSError as e:
        raise Failed(EX_TEMPFAIL, f"cannot connect to {server} ({server.where}): {e.strerror or e}") from None
    try:
        if verbose:
            smtp.set_debuglevel(1)
        smtp.ehlo_or_helo_if_needed()
        options = []
        if smtp.has_extn("8bitmime") and any(b > 127 for b in s.content):
            options.append("BODY=8BITMIME")
        if smtp.has_extn("smtputf8") and not all(a.isascii() for a in [s.sender, *s.recipients]):
            options.append("SMTPUTF8")
        code, msg = smtp.mail(s.sender, options)
        if code != 250:
            hint = " (is this host in the lan listener's trusted_networks?)" if code == 530 else ""
            raise Failed(_exit_for(code, msg), f"{server} refused MAIL FROM:<{s.sender}>: {_reply(code, msg)}{hint}")
        refused, exits = [], set()
        for r in s.recipients:
            code, msg = smtp.rcpt(r)
            if code not in (250, 251):
                refused.append(f"<{r}>: {_reply(code, msg)}")
                exits.add(_exit_for(code, msg))
        if refused:
            smtp.rset()
            # a permanent refusal wins over a temporary one: retrying would not deliver the message
            code = next(c for c in (EX_UNAVAILABLE, EX_NOUSER, EX_TEMPFAIL) if c in exits)
            raise Failed(code, f"{server} refused RCPT TO {'; '.join(refused)} (message not sent)")
        code, msg = smtp.data(s.content)
        if code != 250:
            raise Failed(_exit_for(code, msg), f"{server} refused the message: {_reply(code, msg)}")
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass  # the message is accepted; a lost QUIT changes nothing
        return _reply(code, msg)
    except smtplib.SMTPDataError as e:
        reply = _reply(e.smtp_code, e.smtp_error)
        raise Failed(_exit_for(e.smtp_code, e.smtp_error), f"{server} refused DATA: {reply}") from None
    except smtplib.SMTPResponseException as e:
        raise Failed(_exit_for(e.smtp_code, e.smtp_error), f"{server}: {_reply(e.smtp_code, e.smtp_error)}") from None
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        raise Failed(EX_TEMPFAIL, f"{server} ({server.where}): connection lost: {e}") from None
    finally:
        smtp.close()


USAGE = """usage: sendmail [-t] [-i|-oi] [-f SENDER] [-F FULLNAME] [--config PATH] [--] [RECIPIENT ...]
Reads a message on stdin and submits it to the homemx lan listener named in the backend config
(default /etc/homemx/backend.toml, or HOMEMX_CONFIG). -t: recipients also from To/Cc/Bcc (Bcc removed).
Exit codes (sysexits): 0 accepted, 64 usage, 67 unknown recipient, 69 refused, 75 try again later, 78 config."""


def main(argv: list[str] | None = None) -> int:
    prog = os.path.basename(sys.argv[0]) or "sendmail"

    def fail(code: int, text: str) -> int:
        print(f"{prog}: {text}", file=sys.stderr)
        return code

    try:
        o = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        return fail(EX_USAGE, str(e))
    if o.help:
        print(USAGE)
        return EX_OK
    config = o.config or os.environ.get("HOMEMX_CONFIG") or DEFAULT_CONFIG
    try:
        server = lan_server(config)
    except ConfigProblem as e:
        return fail(EX_CONFIG, str(e))
    login, gecos = _login()
    try:
        lines = read_message(sys.stdin.buffer, o.dot_ends)
    except OSError as e:
        return fail(EX_IOERR, f"cannot read the message on stdin: {e.strerror or e}")
    try:
        submission = prepare(o, lines, login, gecos, server.hostname)
    except UsageError as e:
        return fail(EX_USAGE, str(e))
    try:
        submit(server, submission, o.verbose)
    except Failed as e:
        return fail(e.code, e.text)
    return EX_OK


def _login() -> tuple[str, str]:
    """The login name (the default envelope sender) and the full name from the password file."""
    try:
        import pwd

        pw = pwd.getpwuid(os.getuid())
        return pw.pw_name, pw.pw_gecos.split(",")[0]
    except (KeyError, ImportError):
        return os.environ.get("LOGNAME") or os.environ.get("USER") or "root", ""


if __name__ == "__main__":
    sys.exit(main())
