"""SMTP reply strings of the backend, each with its RFC 3463 enhanced status code."""

# Greeting / session
R421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
R421_AUTH_LOCKOUT = "421 4.7.0 Too many authentication failures, try again later"
R421_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"

# Generic
R250_OK = "250 2.0.0 OK"
R451_LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"
R500_SYNTAX = "500 5.5.2 Syntax error"
R500_LINE_TOO_LONG = "500 5.5.2 Line too long"
R501_BARE_CR = "501 5.5.2 Bare CR in command line not allowed"

# Paths (RFC 5321 4.1.2)
R501_PATH_SYNTAX = "501 5.1.3 Bad address syntax"
R501_PATH_UNCLOSED = "501 5.1.3 Address must be enclosed in <>"
R501_PATH_CONTROL = "501 5.1.3 Control characters in address"
R501_PATH_TOO_LONG = "501 5.1.3 Address too long"
R501_TRAILING_DOT = "501 5.1.3 Trailing dot in domain not allowed"
R501_BAD_DOMAIN = "501 5.1.3 Bad domain syntax"
R501_PATH_NOT_UTF8 = "501 5.1.3 Address is not UTF-8"  # RFC 6531 3.3
R550_SOURCE_ROUTE = "550 5.7.1 Source routes are not accepted"
R550_PERCENT_HACK = "550 5.7.1 Relaying with % in the local part is not allowed"
R550_BANG_PATH = "550 5.7.1 UUCP bang paths are not allowed"
R550_QUOTED_ROUTE = "550 5.7.1 Routing characters in quoted local part are not allowed"
R550_MULTIPLE_AT = "550 5.7.1 More than one @ in address"
R550_ADDRESS_LITERAL = "550 5.7.1 Address literals are not accepted"

# Policy
R554_RELAY_DENIED = "554 5.7.1 Relay access denied"
R550_NO_SUCH_USER = "550 5.1.1 No such user here"
R553_NOT_OWNER = "553 5.7.1 Sender address not owned by authenticated user"
R553_FROM_NOT_OWNER = "553 5.7.1 From header address not owned by authenticated user"
R553_NULL_SENDER = "553 5.7.1 Null sender not allowed on submission"
R553_SENDER_DOMAIN = "553 5.7.1 Sender must be in one of our domains"
R452_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R552_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
R554_LOOP = "554 5.4.6 Too many Received headers: mail loop detected"
R530_AUTH_REQUIRED = "530 5.7.0 Authentication required"
R550_NO_FROM = "550 5.6.0 Message has no From header"

# Inbound trust (backend/auth/; RFC 7372 2.1 for the DMARC code 5.7.1 + text, RFC 7489 6.6.1)
R550_DMARC_REJECT = "550 5.7.1 Rejected by the DMARC policy of the From domain"
R550_DMARC_OWN_DOMAIN = "550 5.7.1 From is a domain of this server, and the message is not authenticated as its mail"
R550_DMARC_MULTIPLE_FROM = "550 5.7.1 From names more than one domain: DMARC cannot be evaluated"
# The spam filter (backend/auth/rspamd.py): its reject, and its soft reject/greylist or no verdict
# at all when configured fail-closed (RFC 3463 4.7.1/5.7.1: delivery not authorized, message refused).
R550_SPAM = "550 5.7.1 Message refused as spam"
R451_SPAM_TEMP = "451 4.7.1 Message deferred by the spam filter, try again later"

# AUTH (RFC 4954)
R235_AUTH_OK = "235 2.7.0 Authentication successful"
R535_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
R454_AUTH_TEMP = "454 4.7.0 Temporary authentication failure"
R503_ALREADY_AUTH = "503 5.5.1 Already authenticated"
R500_AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"  # RFC 4954 4
# Like Postfix on a port without SASL: the mx listener never takes AUTH (RFC 4954 is for submission).
R503_AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"

# STARTTLS (RFC 3207)
R503_TLS_ACTIVE = "503 5.5.1 TLS already active"

# aiosmtpd's reply before it closes a session that sent too many unknown commands.
R502_TOO_MANY_BAD_PREFIX = "502 5.5.1 Too many unrecognized commands"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 OK: queued as {queue_id}"


# aiosmtpd answers some errors itself with plain text. These map its exact strings (or prefixes)
# to the same reply with an enhanced status code, so every reply a client sees carries one.
AIOSMTPD_REWRITES_EXACT = {
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "500 Error: bad syntax": R500_SYNTAX,
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)",
    "552 Error: Too much mail data": R552_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": R552_TOO_BIG,
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "503 Already authenticated": R503_ALREADY_AUTH,
    "354 End data with <CR><LF>.<CR><LF>": "354 End data with <CR><LF>.<CR><LF>",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused due to lack of security",
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send EHLO first",
    "501 Too many values": "501 5.5.4 Too many values",
    "501 Not enough value": "501 5.5.4 Not enough value",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "553 5.1.3 Error: malformed address": R501_PATH_SYNTAX,
}
AIOSMTPD_REWRITES_PREFIX = (
    ("500 Error: command ", "500 5.5.1 Error: command "),
    ("501 Syntax: ", "501 5.5.4 Syntax: "),
    ("555 ", "555 5.5.4 "),
    ("252 Cannot VRFY", "252 2.5.0 Cannot VRFY"),
    ("500 Error: strict ASCII", "500 5.6.7 Error: strict ASCII"),
    ("501 Error: ", "501 5.5.4 Error: "),
    ("502 ", "502 5.5.1 "),
    ("250 Syntax: ", "250 2.0.0 Syntax: "),  # HELP <command>
    ("250 Supported commands: ", "250 2.0.0 Supported commands: "),  # HELP
    ("501 Supported commands: ", "501 5.5.4 Supported commands: "),  # HELP <unknown>
)


def enhance(reply: str) -> str:
    """Give an aiosmtpd-generated reply an enhanced status code (RFC 2034) if it lacks one."""
    exact = AIOSMTPD_REWRITES_EXACT.get(reply)
    if exact is not None:
        return exact
    for old, new in AIOSMTPD_REWRITES_PREFIX:
        if reply.startswith(old) and not reply[4:5].isdigit():
            return new + reply[len(old) :]
    return reply
