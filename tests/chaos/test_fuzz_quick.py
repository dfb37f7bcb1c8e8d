"""Quick fuzz (issue 11, acceptance, CI size): the fuzzer of `./dev bench fuzz` (tests/bench/fuzz.py) for 20 s with a fixed seed against a real homemx-gateway and homemx-backend on loopback: random and mutated SMTP commands through the gateway and directly to every backend listener kind, and random and mutated PROXY v2 headers to the proxied listeners. Afterwards a normal transaction gets 250 within 1 s, no reply carried Python exception text, the PROXY verdicts held, no thread died, and no log holds a traceback, an ERROR line, an asyncio warning flood or a raw control byte.

One run (module fixture); each test checks one outcome. A failure names the session that found it
(``--replay TARGET:KIND:SEED`` of ``python -m tests.bench fuzz`` runs it again on a fresh stack).
"""

from __future__ import annotations

import pytest

from tests.bench.fuzz import FINAL_PROBE_LIMIT, run

SECONDS = 20
SEED = 11


@pytest.fixture(scope="module")
def fuzzed() -> dict:
    return run(SECONDS, seed=SEED, workers=12, probe_every=4.0)


def test_the_fuzzer_reached_the_whole_surface(fuzzed):
    """The run did what it claims (a fuzzer that stalls early would pass every other test):
    sessions on every target, logins, messages accepted, refusals, TLS, PROXY headers accepted
    and refused."""
    targets = {k.split()[0] for k in fuzzed["sessions_by_target"]}
    assert targets == {"gw-mx", "gw-relay", "gw-submission", "gw-submissions", "mx", "lan", "submission",
                       "submissions", "plain"}, targets
    assert fuzzed["sessions"] >= 300 and fuzzed["commands_sent"] >= 2000, (fuzzed["sessions"], fuzzed["commands_sent"])
    codes = fuzzed["reply_codes"]
    for code in ("220", "235", "250", "354", "500", "501", "503", "530"):
        assert codes.get(code), f"no {code} reply in {codes}"
    assert fuzzed["tls_handshakes"].get("ok"), fuzzed["tls_handshakes"]
    outcomes = " ".join(fuzzed["proxy_outcomes"])
    assert ": banner" in outcomes and ": closed" in outcomes, fuzzed["proxy_outcomes"]


def test_no_reply_leaked_exception_text_and_proxy_verdicts_held(fuzzed):
    """No reply holds a traceback or an exception name; every valid PROXY header got the banner,
    no invalid one did, and an incomplete one was closed at the PROXY timeout."""
    assert not fuzzed["findings"], fuzzed["findings"][:5]


def test_the_server_kept_answering(fuzzed):
    """A normal transaction got 250 at every probe during the fuzzing, and within 1 s afterwards
    through the gateway, to the plain mx listener and to the mx listener with a PROXY header."""
    assert fuzzed["probes"] >= 9 and not fuzzed["failed_probes"], fuzzed["failed_probes"]
    for p in fuzzed["final_probes"]:
        assert p["ok"] and p["seconds"] < FINAL_PROBE_LIMIT, p


def test_daemons_alive_with_sane_threads_and_exit_0(fuzzed):
    assert not fuzzed["health"], fuzzed["health"]
    assert fuzzed["threads_end"]["backend"] and fuzzed["threads_end"]["gateway"], fuzzed["threads_end"]
    # The backend exits 1 when its watchdog saw a vital worker (the queue writer) die.
    assert fuzzed["backend_exit"] == 0 and fuzzed["gateway_exit"] == 0, (fuzzed["backend_exit"], fuzzed["gateway_exit"])


@pytest.mark.parametrize("daemon", ["backend", "gateway"])
def test_log_has_no_traceback_error_or_raw_control_byte(fuzzed, daemon):
    lp = fuzzed["logs"][daemon]
    assert lp["tracebacks"] == 0, lp.get("first_traceback")
    assert lp["error_lines"] == 0, lp.get("error_examples")
    assert lp["raw_control_bytes"] == 0, lp.get("raw_control_example")


@pytest.mark.parametrize("daemon", ["backend", "gateway"])
def test_log_is_not_flooded_with_asyncio_warnings(fuzzed, daemon):
    """A client must not be able to write many log lines: asyncio warns once per write to a
    transport whose connection is gone ("socket.send() raised exception.")."""
    lp = fuzzed["logs"][daemon]
    assert lp["asyncio_warnings"] == 0, lp.get("asyncio_warning_examples")


def test_backend_noticed_every_session_end(fuzzed):
    """After every client left (and the longest pre-banner timeout passed), the backend holds no
    session: one it still holds at SIGTERM is one whose end it never noticed, kept for ever."""
    assert fuzzed["sessions_left_open"] == 0, fuzzed["sessions_left_open_examples"]
