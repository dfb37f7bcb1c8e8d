"""Inbound-checks benchmark (B9, issue 13; B7 before issue 17): what SPF, DKIM, ARC, DMARC and Authentication-Results, then
rspamd, add to each message a real `homemx-backend run` accepts on its mx listener, in ms per message
(p50/p99 of the time from the final "." to the 250) and in msgs/s, at 1 and 10 concurrent sessions.

Three backends run one after the other, each with a data directory of its own, against one nsd on
loopback (the sender signed.test: SPF ``ip4:127.0.0.1 -all``, an RSA-2048 DKIM key, DMARC
``p=reject``; and the home domain):

    none    [auth] enabled = false: the message is received and queued as it comes
    auth    [auth] enabled = true: SPF (MAIL FROM and HELO), DKIM, ARC, DMARC, Authentication-Results
    rspamd  auth plus [rspamd] url = a real rspamd (tests/lab/rspamd.py: one normal worker, its own
            Redis, offline modules; its own DNS answers REFUSED, so it waits on nothing)

The load is one pre-signed ~5 KB message (dkimpy, relaxed/relaxed, signed.test) for a local user,
sent by a client in a process of its own (its CPU is not the backend's event loop): one message per
connection (connect, EHLO, MAIL, RCPT, DATA, QUIT), as most mail reaches an MX. Every reply must be
250, and every delivered message must carry the verdicts of its configuration (no
Authentication-Results without checks; spf=pass, dkim=pass and dmarc=pass with them; rspamd's
X-Spamd-Result with rspamd, and every message scanned): a figure over failures is no figure. The
backend delivers each message into the user's Maildir while it accepts the next, in all three, as
on a home.

The backend's resolver caches positive answers for their TTL (backend/dns/resolver.py), so after
the warm-up the checks cost CPU, not DNS round trips; a cold key fetch is in
``python -m tests.bench dkim_verify``. The peer (issue 17; ``--no-peer`` skips it): Postfix in a
namespace of its own receiving the same message for the same user into a Maildir (virtual(8)),
as is and with rspamd's milter (its proxy worker in milter mode on a unix socket, scanning itself, with its SPF,
DKIM, ARC and DMARC modules on and its own nsd with the same zones in that namespace; every
delivered message must carry X-Spamd-Result with R_SPF_ALLOW, R_DKIM_ALLOW and DMARC_POLICY_ALLOW).
Beside the client's figures: the backend's own mean time for
the checks and for the rspamd request (its histograms, scraped before and after each cell), and the
CPU time per message of the backend (/proc, all its threads), of rspamd (every process of its
session) and of the client; CPU moves less than wall time when other work shares the cores.

    python -m tests.bench inbound [--messages N] [--warmup N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.backend.helpers import ALICE, DOMAIN, HOSTNAME, RawSMTP, listener_block, wait_for_sync  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "inbound.json"
SIZE = 5 * 1024
SENDER_DOMAIN = "signed.test"
SENDER = f"news@{SENDER_DOMAIN}"
HELO = f"mail.{SENDER_DOMAIN}"
SELECTOR = "b7"
SESSIONS = (1, 10)
CONFIGS = ("none", "auth", "rspamd")
PEER_CONFIGS = ("postfix", "postfix_rspamd")


# ---------------------------------------------------------------- the client (a process of its own)


async def _one_message(port: int, message: bytes) -> tuple[str, float]:
    """One SMTP session with one message; (the reply to the final ".", seconds from "." to that reply)."""
    c = await RawSMTP.connect(port)
    try:
        for expect, line in (("220", None), ("250", f"EHLO {HELO}"), ("250", f"MAIL FROM:<{SENDER}> SIZE={len(message)}"),
                             ("250", f"RCPT TO:<{ALICE}>"), ("354", "DATA")):
            reply = await c.reply() if line is None else await c.cmd(line)
            if not reply.startswith(expect):
                return f"{line or 'greeting'}: {reply}", 0.0
        await c.send(message)
        started = time.perf_counter()
        c.writer.write(b".\r\n")
        reply = await c.reply(timeout=60)
        took = time.perf_counter() - started
        await c.cmd("QUIT")
        return reply, took
    finally:
        c.close()


async def _client(port: int, sessions: int, count: int, message: bytes) -> dict:
    left = iter(range(count))
    latencies: list[float] = []
    failures: list[str] = []

    async def session_loop() -> None:
        for _ in left:
            reply, took = await _one_message(port, message)
            if reply.startswith("250"):
                latencies.append(took * 1000)
            else:
                failures.append(reply)

    started = time.perf_counter()
    await asyncio.gather(*(session_loop() for _ in range(sessions)))
    return {"elapsed_s": time.perf_counter() - started, "latencies_ms": latencies, "failures": failures}


def client_main(argv: list[str]) -> int:
    """``client PORT SESSIONS COUNT FILE``: send FILE COUNT times over SESSIONS concurrent sessions;
    JSON on stdout."""
    port, sessions, count, path = int(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3])
    # DATA transparency (RFC 5321 4.5.2) once, here: the timed part sends the bytes as they are.
    body = path.read_bytes().replace(b"\r\n.", b"\r\n..")
    cpu = time.process_time()
    out = asyncio.run(_client(port, sessions, count, body))
    out["cpu_s"] = time.process_time() - cpu  # the sending only, not this process's start-up
    print(json.dumps(out))
    return 0


def send(port: int, sessions: int, count: int, message_file: Path, wrap: list[str] | None = None) -> dict:
    """The client's figures for ``count`` messages over ``sessions``; raises unless every one got a 250.
    ``wrap``: a command prefix (``ip netns exec NS``) to run the client in the peer's namespace."""
    r = subprocess.run((wrap or []) + [sys.executable, "-m", "tests.bench.inbound_bench", "client", str(port),
                                       str(sessions), str(count), str(message_file)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"client failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    out = json.loads(r.stdout)
    if out["failures"] or len(out["latencies_ms"]) != count:
        raise RuntimeError(f"{len(out['failures'])} of {count} messages not accepted, e.g. {out['failures'][:3]}")
    return out


# ---------------------------------------------------------------- the sender's DNS and message


def sender_zones(key) -> dict[str, str]:
    from tests.lab.nsd import zone_text

    signed = (f'@\tIN\tTXT\t"v=spf1 ip4:127.0.0.1 -all"\n'
              f'_dmarc\tIN\tTXT\t"v=DMARC1; p=reject"\n'
              f"{key.zone_line()}\n"
              f"mail\tIN\tA\t127.0.0.1\n")
    home = (f"@\tIN\tMX\t10 {HOSTNAME}.\n"
            f"{HOSTNAME}.\tIN\tA\t127.0.0.1\n"
            f'@\tIN\tTXT\t"v=spf1 ip4:127.0.0.1 -all"\n'
            f'_dmarc\tIN\tTXT\t"v=DMARC1; p=reject"\n')
    return {SENDER_DOMAIN: zone_text(SENDER_DOMAIN, signed), DOMAIN: zone_text(DOMAIN, home)}


def signed_message(key) -> bytes:
    """A ~5 KB plain-text newsletter from signed.test to our user, DKIM-signed by signed.test."""
    head = (f"From: Signed News <{SENDER}>\r\nTo: <{ALICE}>\r\nSubject: the weekly numbers\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <b7-bench@{SENDER_DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    line = "The quarterly figures are in; shipping volumes rose in every region but one.\r\n"
    body = line * ((SIZE - len(head)) // len(line))
    return key.sign((head + body).encode(), include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])


def no_rrl_nsd(zones, netns_exec=()):
    """nsd with response rate limiting off (nsd.conf(5) rrl-ratelimit: 0): the warm-up's lookups come
    in bursts from one address, and a dropped answer would time a retry, not a check."""
    from tests.lab.nsd import NSD

    class _NSD(NSD):
        def _write(self) -> None:
            super()._write()
            conf = self.workdir / "nsd.conf"
            conf.write_text(conf.read_text().replace("server:\n", "server:\n  rrl-ratelimit: 0\n", 1))

    return _NSD(zones, netns_exec=netns_exec)


# ---------------------------------------------------------------- what the backend did


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(sid: int) -> float:
    """utime + stime of every live process of session ``sid`` (rspamd's main process and workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == sid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def scrape(port: int) -> dict[str, float]:
    """The backend's metrics of this benchmark, summed per name and label set we look at."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(("homemx_backend_auth_verdicts", "homemx_backend_spam_actions",
                                  "homemx_backend_rspamd_available", "homemx_backend_auth_check_seconds_",
                                  "homemx_backend_rspamd_check_seconds_", "homemx_backend_messages_received")):
                if s.name.endswith("_bucket") or s.name.endswith("_created"):
                    continue
                key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
                out[key] = out.get(key, 0.0) + s.value
    return out


def mean_ms(before: dict[str, float], after: dict[str, float], histogram: str) -> float | None:
    """Mean of what ``histogram`` observed between two scrapes, in ms (None: it observed nothing)."""
    count = after.get(histogram + "_count", 0) - before.get(histogram + "_count", 0)
    total = after.get(histogram + "_sum", 0) - before.get(histogram + "_sum", 0)
    return round(total * 1000 / count, 2) if count else None


def delivered(data_dir: Path, folder: str | None = None) -> list[Path]:
    box = data_dir / "mail" / DOMAIN / ALICE.partition("@")[0] / "Maildir"
    if folder:
        box = box / f".{folder}"
    return [p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir()]


def header_fields(path: Path) -> list[str]:
    head = path.read_bytes().replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return head.replace("\n\t", " ").replace("\n ", " ").split("\n")


def check_delivered(config: str, data_dir: Path, expected: int, metrics: dict[str, float]) -> dict:
    """Every accepted message delivered to the Inbox with its configuration's verdicts; raises otherwise."""
    wait_for_sync(lambda: len(delivered(data_dir)) + len(delivered(data_dir, "Junk")) >= expected, 180)
    inbox, junk = delivered(data_dir), delivered(data_dir, "Junk")
    problems = [f"{len(junk)} in Junk"] if junk else []
    for path in inbox:
        fields = header_fields(path)
        ar = [f for f in fields if f.lower().startswith("authentication-results:")]
        spam = [f for f in fields if f.lower().startswith("x-spamd-result:")]
        if config == "none":
            bad = bool(ar)
        else:
            bad = len(ar) != 1 or not all(v in ar[0] for v in ("spf=pass", "dkim=pass", "dmarc=pass"))
        bad |= (config == "rspamd") != bool(spam)
        if bad:
            problems.append(f"{path.name}: {ar} {spam}")
            break
    n = expected
    if config != "none":
        for method in ("dkim", "dmarc", "spf_mailfrom"):
            got = metrics.get(f"homemx_backend_auth_verdicts_total{{method={method}}}{{result=pass}}", 0)
            if got != n:
                problems.append(f"{method} pass verdicts {got:.0f} of {n}")
    if config == "rspamd":
        scanned = sum(v for k, v in metrics.items() if k.startswith("homemx_backend_spam_actions_total")
                      and "unavailable" not in k)
        if scanned != n or metrics.get("homemx_backend_rspamd_available") != 1:
            problems.append(f"rspamd scanned {scanned:.0f} of {n}")
    if problems:
        raise RuntimeError(f"{config}: delivered messages lack the expected verdicts: {problems[:3]}")
    sample = header_fields(inbox[0])
    return {"delivered": len(inbox),
            "sample_fields": [f for f in sample if f.lower().startswith(("authentication-results:", "x-spam"))]}


# ---------------------------------------------------------------- one configuration


def backend_extra(config: str, ns, rspamd_url: str | None) -> str:
    extra = f'[delivery]\nnameservers = ["{ns.address}"]\ndns_port = {ns.port}\n\n'
    extra += "[auth]\nenabled = false\n" if config == "none" else '[auth]\nenabled = true\ntimeout = "5s"\n'
    if config == "rspamd":
        extra += f'\n[rspamd]\nurl = "{rspamd_url}"\ntimeout = "5s"\nfail_closed = true\n'
    return extra


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run_config(config: str, work: Path, ns, rs, message_file: Path, messages: int, warmup: int) -> dict:
    """One backend with ``config`` (``rs``: the running Rspamd for "rspamd"), warmed up, then timed at each
    session count; its deliveries checked."""
    from tests.bench.accept_bench import Backend

    home = work / config
    home.mkdir()
    metrics_port = free_port()
    be = Backend(home, listeners=listener_block("mx", "mx", "127.0.0.1:{port}"),
                 extra=backend_extra(config, ns, rs and rs.url))
    # fail_closed above: rspamd not answering is a 451, which the client counts, never a silent pass.
    be.cfg.write_text(be.cfg.read_text().replace('log_level = "info"',
                                                  f'log_level = "info"\nmetrics_listen = "127.0.0.1:{metrics_port}"'))
    result: dict = {"loadavg_before": os.getloadavg()}
    with be:
        send(be.port, 1, warmup, message_file)  # DNS answers cached, SQLite pages, rspamd's first scans
        for sessions in SESSIONS:
            m0, cpu0 = scrape(metrics_port), cpu_seconds(be.proc.pid)
            rs_cpu0 = session_cpu_seconds(rs.proc.pid) if rs else 0.0
            out = send(be.port, sessions, messages, message_file)
            cpu = cpu_seconds(be.proc.pid) - cpu0
            rs_cpu = session_cpu_seconds(rs.proc.pid) - rs_cpu0 if rs else 0.0
            m1 = scrape(metrics_port)
            lat = out["latencies_ms"]
            result[f"s{sessions}"] = {
                "messages": messages, "msgs_per_s": round(messages / out["elapsed_s"], 1),
                "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(percentile(lat, 0.99), 2),
                "mean_ms": round(statistics.fmean(lat), 2),
                # Inside the backend, from its own histograms: SPF/DKIM/ARC/DMARC, and the rspamd request.
                "auth_check_mean_ms": mean_ms(m0, m1, "homemx_backend_auth_check_seconds"),
                "rspamd_check_mean_ms": mean_ms(m0, m1, "homemx_backend_rspamd_check_seconds"),
                "backend_cpu_ms_per_msg": round(cpu * 1000 / messages, 2),
                "rspamd_cpu_ms_per_msg": round(rs_cpu * 1000 / messages, 2),
                "client_cpu_ms_per_msg": round(out["cpu_s"] * 1000 / messages, 2),
            }
            print(f"  {config:7} @{sessions:<2} {result[f's{sessions}']}", file=sys.stderr, flush=True)
        metrics = scrape(metrics_port)
        result["checked"] = check_delivered(config, home / "data", warmup + messages * len(SESSIONS), metrics)
        result["metrics"] = metrics
    result["loadavg_after"] = os.getloadavg()
    return result


# ---------------------------------------------------------------- the peer: Postfix with rspamd's milter

PEER_SYMBOLS = ("R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW")


def peer_rspamd_config(milter_socket: Path) -> dict[str, str]:
    """rspamd as Postfix's milter doing the checks itself: its proxy worker in milter mode on the unix
    socket ``milter_socket`` scanning on its own (self_scan), SPF/DKIM/ARC/DMARC back on (homemx's
    config turns them off: it checks them itself), and 127.0.0.1 not treated as a local address (the
    bench's sender connects from there). A unix socket, not TCP on loopback: there Postfix's milter
    exchange waits on delayed ACKs (~45 ms per message, see start_opendkim in e2e_bench.py)."""
    from tests.lab.rspamd import HS_CACHE

    on = "enabled = true;\ncheck_local = true;\ncheck_authed = true;\n"
    return {
        "local.d/worker-proxy.inc": (f'bind_socket = "{milter_socket} mode=0666";\nmilter = yes;\ntimeout = 120s;\n'
                                     "count = 1;\nupstream \"local\" {\n  default = yes;\n  self_scan = yes;\n}\n"),
        # check_local: a loopback client is "local" to these modules whatever local_addrs says.
        "local.d/spf.conf": on, "local.d/dkim.conf": on, "local.d/dmarc.conf": on, "local.d/arc.conf": on,
        "local.d/options.inc": (f'dns {{ nameserver = ["127.0.0.1:53"]; }}\nhs_cache_dir = "{HS_CACHE}";\n'
                                "local_addrs = [];\n"),
    }


def peer_delivered(mail_dir: Path) -> list[Path]:
    box = mail_dir / ALICE.partition("@")[0] / "Maildir"
    return [p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir()]


def run_peer(config: str, lab, zones, message_file: Path, messages: int, warmup: int) -> dict:
    """Postfix in a namespace of its own receiving for the user's domain into a Maildir (virtual(8)),
    as is ("postfix") or with rspamd's milter ("postfix_rspamd"); the client, nsd and rspamd run in the
    same namespace. Every delivered message of the milter run must carry rspamd's X-Spamd-Result with
    SPF, DKIM and DMARC allowed."""
    from tests.lab.postfix import Postfix
    from tests.lab.rspamd import Rspamd

    ns = lab.namespace("p" + ("r" if config == "postfix_rspamd" else "n"))
    ns.etc_file("resolv.conf", "nameserver 127.0.0.1\n")
    wrap = ns.cmd([])
    work = lab.workdir / config
    milter_socket = lab.workdir / "rspamd-peer" / "milter.sock"
    pf = Postfix(ns, work, address="127.0.0.1", domain=DOMAIN, mailboxes=[ALICE.partition("@")[0]],
                 hostname=HOSTNAME)
    pf.write()
    with open(pf.etc / "main.cf", "a") as f:
        f.write("smtpd_peername_lookup = no\nsmtpd_client_connection_count_limit = 0\n"
                "smtpd_client_connection_rate_limit = 0\nsmtpd_client_message_rate_limit = 0\n")
        if config == "postfix_rspamd":
            # tempfail, not accept unscanned, when the milter fails: a figure over unscanned mail is none.
            f.write(f"smtpd_milters = unix:{milter_socket}\nmilter_default_action = tempfail\n"
                    "milter_protocol = 6\nmilter_mail_macros = i {mail_addr} {client_addr} {client_name} "
                    "{auth_authen}\n")
    result: dict = {"loadavg_before": os.getloadavg()}
    with no_rrl_nsd(zones, netns_exec=wrap), contextlib.ExitStack() as stack:
        rs = None
        if config == "postfix_rspamd":
            rs = stack.enter_context(Rspamd(netns_exec=wrap, nameserver="127.0.0.1:53",
                                            workdir=milter_socket.parent,
                                            extra_config=peer_rspamd_config(milter_socket)))
            deadline = time.monotonic() + 30
            while not milter_socket.is_socket():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rspamd's milter did not listen: {rs.log()[-1500:]}")
                time.sleep(0.1)
        pf.start()
        stack.callback(pf.stop)
        send(25, 1, warmup, message_file, wrap)
        for sessions in SESSIONS:
            master = [pid for pid in ns.pids() if _comm(pid) == "master"]
            pf_cpu0 = sum(_tree_cpu(p) for p in master)
            rs_cpu0 = session_cpu_seconds(rs.proc.pid) if rs else 0.0
            out = send(25, sessions, messages, message_file, wrap)
            pf_cpu = sum(_tree_cpu(p) for p in master) - pf_cpu0
            rs_cpu = session_cpu_seconds(rs.proc.pid) - rs_cpu0 if rs else 0.0
            lat = out["latencies_ms"]
            result[f"s{sessions}"] = {
                "messages": messages, "msgs_per_s": round(messages / out["elapsed_s"], 1),
                "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(percentile(lat, 0.99), 2),
                "mean_ms": round(statistics.fmean(lat), 2),
                "postfix_cpu_ms_per_msg": round(pf_cpu * 1000 / messages, 2),
                "rspamd_cpu_ms_per_msg": round(rs_cpu * 1000 / messages, 2),
                "client_cpu_ms_per_msg": round(out["cpu_s"] * 1000 / messages, 2),
            }
            print(f"  {config:14} @{sessions:<2} {result[f's{sessions}']}", file=sys.stderr, flush=True)
        expected = warmup + messages * len(SESSIONS)
        wait_for_sync(lambda: len(peer_delivered(pf.mail_dir)) >= expected, 180)
        got = peer_delivered(pf.mail_dir)
        if config == "postfix_rspamd":
            for path in got:
                spamd = [f for f in header_fields(path) if f.lower().startswith("x-spamd-result:")]
                if not spamd or not all(sym in spamd[0] for sym in PEER_SYMBOLS):
                    raise RuntimeError(f"{config}: {path.name} lacks rspamd's SPF/DKIM/DMARC verdicts: {spamd}")
            result["sample_fields"] = [f[:300] for f in header_fields(got[0]) if f.lower().startswith("x-spam")]
        result["delivered"] = len(got)
    result["loadavg_after"] = os.getloadavg()
    return result


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _tree_cpu(pid: int) -> float:
    """CPU seconds of Postfix's master, the daemons it has reaped (cutime+cstime) and its live children."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid:
            total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
        elif int(f[1]) == pid:
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


# ---------------------------------------------------------------- main


def added(results: dict, config: str, sessions: int, what: str) -> float:
    return round(results[config][f"s{sessions}"][what] - results["none"][f"s{sessions}"][what], 2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tests.bench inbound", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=400, help="messages per session count and configuration (default 400)")
    ap.add_argument("--warmup", type=int, default=20, help="messages sent first at 1 session, not timed (default 20)")
    ap.add_argument("--no-peer", action="store_true", help="skip the Postfix (+ rspamd milter) peer")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)

    import shutil

    from tests.lab.dkim_inbound import rsa_key
    from tests.lab.rspamd import Rspamd

    key = rsa_key(SENDER_DOMAIN, SELECTOR, 2048)
    message = signed_message(key)
    results: dict = {"benchmark": "inbound", "message_bytes": len(message), "cpus": os.cpu_count(),
                     "messages": args.messages, "warmup": args.warmup, "per_connection": 1}
    work = Path(tempfile.mkdtemp(prefix="homemx-bench-inbound-"))
    try:
        message_file = work / "message.eml"
        message_file.write_bytes(message)
        with no_rrl_nsd(sender_zones(key)) as ns:
            for config in CONFIGS:
                if config == "rspamd":
                    with Rspamd() as rs:
                        results[config] = run_config(config, work, ns, rs, message_file, args.messages, args.warmup)
                else:
                    results[config] = run_config(config, work, ns, None, message_file, args.messages, args.warmup)
        if not args.no_peer:
            from tests.lab.netns import Lab

            with Lab("bi") as lab:
                lab.workdir.chmod(0o755)  # Postfix's daemons run as user postfix
                shutil.copy(message_file, lab.workdir / "message.eml")
                for config in PEER_CONFIGS:
                    results[config] = run_peer(config, lab, sender_zones(key), lab.workdir / "message.eml",
                                               args.messages, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_peer:
        for s in SESSIONS:
            r = results["postfix_rspamd"][f"s{s}"]
            for what in ("p50_ms", "p99_ms"):
                r[f"added_{what}"] = round(r[what] - results["postfix"][f"s{s}"][what], 2)

    for config in ("auth", "rspamd"):
        for s in SESSIONS:
            results[config][f"s{s}"]["added_p50_ms"] = added(results, config, s, "p50_ms")
            results[config][f"s{s}"]["added_p99_ms"] = added(results, config, s, "p99_ms")
            results[config][f"s{s}"]["added_cpu_ms_per_msg"] = added(results, config, s, "backend_cpu_ms_per_msg")

    print(f"\nB9 inbound checks on mx ({os.cpu_count()} CPUs, {len(message)} B DKIM-signed message, one per connection, "
          f"{args.messages} per cell; time from '.' to 250)")
    print(f"{'':28} {'sessions':>8} {'msgs/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} {'+p99':>6}"
          f" | in backend ms: {'checks':>6} {'rspamd':>6} | cpu ms/msg: {'backend':>7} {'rspamd':>6} {'client':>6}")
    names = {"none": "no checks", "auth": "SPF+DKIM+ARC+DMARC", "rspamd": "SPF+DKIM+ARC+DMARC+rspamd"}
    for s in SESSIONS:
        for config in CONFIGS:
            r = results[config][f"s{s}"]
            plus = (f"{r['added_p50_ms']:6.2f} {r['added_p99_ms']:6.2f}" if config != "none" else f"{'-':>6} {'-':>6}")
            inside = " ".join(f"{v:6.2f}" if v is not None else f"{'-':>6}"
                              for v in (r["auth_check_mean_ms"], r["rspamd_check_mean_ms"]))
            print(f"{names[config]:28} {s:8d} {r['msgs_per_s']:7.1f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {plus}"
                  f" |                {inside} |             {r['backend_cpu_ms_per_msg']:7.2f} "
                  f"{r['rspamd_cpu_ms_per_msg']:6.2f} {r['client_cpu_ms_per_msg']:6.2f}")
    if not args.no_peer:
        print(f"{'':28} {'sessions':>8} {'msgs/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} {'+p99':>6}"
              f" | cpu ms/msg: {'postfix':>7} {'rspamd':>6} {'client':>6}")
        for s in SESSIONS:
            for config, name in (("postfix", "Postfix"), ("postfix_rspamd", "Postfix + rspamd milter")):
                r = results[config][f"s{s}"]
                plus = (f"{r['added_p50_ms']:6.2f} {r['added_p99_ms']:6.2f}" if "added_p50_ms" in r
                        else f"{'-':>6} {'-':>6}")
                print(f"{name:28} {s:8d} {r['msgs_per_s']:7.1f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {plus}"
                      f" |             {r['postfix_cpu_ms_per_msg']:7.2f} {r['rspamd_cpu_ms_per_msg']:6.2f} "
                      f"{r['client_cpu_ms_per_msg']:6.2f}")
        for f in results["postfix_rspamd"].get("sample_fields", []):
            print(f"  postfix_rspamd: {f[:160]}")
    print("verified: every reply 250; every delivered message in the Inbox with "
          "spf=pass dkim=pass dmarc=pass (checks) and X-Spamd-Result (rspamd)")
    for config in ("auth", "rspamd"):
        for f in results[config]["checked"]["sample_fields"]:
            print(f"  {config}: {f[:160]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
