"""The spam filter: rspamd asked over its HTTP protocol (``POST /checkv2``), its answer turned into a
SpamVerdict and the verdict into SMTP (a refusal, or Junk); and the ``local.d`` files homemx gives
rspamd, the same on a provisioned home and in the lab.

rspamd protocol: https://rspamd.com/doc/developers/protocol.html (request headers IP, Helo, From,
Rcpt, User, Queue-Id, Hostname; the JSON reply with action, score, required_score, symbols and the
``milter`` block of header changes).

rspamd down, slow or answering nonsense is not the sender's fault: by default the message goes on
unscanned (fail-open, counted, logged once per change of state); ``fail_closed`` answers 451 4.7.1
instead, so the sender retries later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Sequence

import aiohttp

from backend.auth.results import SpamVerdict
from backend.smtp import replies as R

log = logging.getLogger("homemx.auth.rspamd")

# rspamd's actions (rspamd 3.x, src/libserver/cfg_file.h "rspamd_action_type"); anything else is a
# reply we do not understand.
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")
# A reply larger than this is not rspamd's JSON (a check of a message with many symbols is a few KiB).
MAX_REPLY = 1 << 20

# rspamd modules homemx does itself: SPF, DKIM, DMARC and ARC are verified in backend/auth/ (their
# result goes into Authentication-Results and into rspamd's view of the message), and outbound
# mail is signed by backend/dkim/. rspamd checking again could give a second, different answer
# (its own DNS, its own limits) that scores the message; arc also covers ARC sealing.
OWN_CHECKS = ("spf", "dkim", "dmarc", "arc", "dkim_signing")
# Modules that ask hosts on the internet about every message: DNS block lists (rbl also runs the
# surbl and email lists since rspamd 2.x), rspamd.com's fuzzy hash servers, the ASN lookups, the
# URL redirector, and rspamd_update's rule downloads. Off where mail must not leave the machine
# (the lab and tests: ``offline``); a real home keeps them, they are much of rspamd's value.
NETWORK_MODULES = ("rbl", "fuzzy_check", "asn", "url_redirector", "rspamd_update", "neural")
# The verdict fields rspamd's milter_headers module writes into the reply (we add them to the
# message). X-Spam: Yes is written by homemx itself for Junk (backend/auth/inbound.py).
HEADER_ROUTINES = ("x-spamd-result", "x-spam-status", "x-spam-level")


def rspamd_local_config(*, nameservers: Sequence[str] = (), offline: bool = False) -> dict[str, str]:
    """rspamd's ``local.d`` files for homemx, as {path relative to LOCAL_CONFDIR: text}.

    ``nameservers`` ("host:port") replaces the system resolver for rspamd's own lookups;
    ``offline`` also turns off every module that asks the internet (NETWORK_MODULES). Provisioning
    writes these files under /etc/rspamd; tests/lab/rspamd.py writes them for its own instance."""
    files: dict[str, str] = {}
    for module in OWN_CHECKS + (NETWORK_MODULES if offline else ()):
        files[f"local.d/{module}.conf"] = "enabled = false;\n"
    # Greylisting needs the greylist module, which needs Redis; without it rspamd still answers
    # "greylist" for a score in [4, 6), and a 451 for that would refuse the same message on every
    # retry, forever. No Redis here, so no greylist action: such a score is "no action".
    files["local.d/actions.conf"] = "greylist = null;\n"
    files["local.d/milter_headers.conf"] = (
        f"use = [{', '.join(json.dumps(r) for r in HEADER_ROUTINES)}];\n"
        # Every scanned message gets the fields, whoever sent it: homemx decides what is scanned.
        "skip_local = false;\n"
        "skip_authenticated = false;\n"
    )
    # Bayes learns from the user's moves to and out of Junk (Dovecot IMAPSieve → rspamc
    # learn_spam/learn_ham). SQLite keeps the statistics in rspamd's own directory, so a home needs
    # no Redis for it (rspamd 3.4's default backend is Redis).
    files["local.d/classifier-bayes.conf"] = (
        'backend = "sqlite3";\n'
        'statfile { symbol = "BAYES_HAM"; spam = false; path = "${DBDIR}/bayes.ham.sqlite"; }\n'
        'statfile { symbol = "BAYES_SPAM"; spam = true; path = "${DBDIR}/bayes.spam.sqlite"; }\n'
    )
    if nameservers:
        names = ", ".join(json.dumps(n) for n in nameservers)
        files["local.d/options.inc"] = f"dns {{ nameserver = [{names}]; }}\n"
    return files
