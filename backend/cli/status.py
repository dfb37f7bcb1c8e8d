"""CLI: ``status``, the backend on one screen: listeners, queue, last deliveries, certificate, DNS
self-check, rspamd, tunnel and metrics, each ok or needing attention.

Everything is read from outside the daemon, the way an operator would look: a TCP connect to
each listen address, the queue database opened read-only, the certificate file the running
config serves, data_dir/dns-check.json (backend/dns/selfcheck.py), rspamd's /ping, the
WireGuard device (wireguard/status.py) and the metrics endpoint. Exit status: 0 all is well,
1 something needs attention (listed last), 2 the config cannot be read.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.config import BackendConfig
from wireguard.cli import DEFAULT_CONFIG as DEFAULT_TUNNEL_CONFIG  # the `tunnel` command's file: interface hmx0

OK, ATTENTION, OFF = "ok", "attention", "off"  # OFF: not configured, or nothing to judge yet
OLDEST_QUEUED_LIMIT = 3600.0  # the alert rule's "oldest queued message older than 1 hour"
CERT_WARN_DAYS = 14  # the alert rule's "certificate expiring within 14 days"
EXIT_OK, EXIT_ATTENTION, EXIT_CONFIG = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the node on one screen; exit 1 when something needs attention",
                       description="Listeners, queue, last deliveries, certificate, DNS self-check, rspamd, "
                       "tunnel and metrics. Exit status 0: all is well; 1: something needs attention; "
                       "2: the config cannot be read.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tunnel-config", default=DEFAULT_TUNNEL_CONFIG,
                   help=f"the wg-quick file of the tunnel (default {DEFAULT_TUNNEL_CONFIG}); its name gives the "
                   "interface. A tunnel that is neither configured there nor up is reported as off")
    p.add_argument("--timeout", type=float, default=3.0, help="per probe, in seconds (default 3)")
    p.set_defaults(func=cmd_status)


# ---------------------------------------------------------------- the report


class Report:
    """Sections in display order, each with a state, a summary line, detail lines and JSON data."""

    def __init__(self) -> None:
        self.sections: dict[str, dict] = {}
        self.problems: list[str] = []

    def add(self, name: str, state: str, summary: str, details: list[str] | None = None,
            problems: list[str] | None = None, **data) -> None:
        self.sections[name] = {"state": state, "summary": summary, "details": details or [], **data}
        self.problems += [f"{name}: {p}" for p in (problems or ([summary] if state == ATTENTION else []))]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self, **head) -> dict:
        return {**head, "ok": self.ok, "attention": self.problems, "sections": self.sections}

    def text(self, title: str) -> str:
        lines = [title]
        for name, s in self.sections.items():
            lines.append(f"{name:<12} {s['state'].upper() if s['state'] == ATTENTION else s['state']:<10} {s['summary']}")
            lines += [f"{'':<23} {d}" for d in s["details"]]
        if self.problems:
            n = len(self.problems)
            lines.append(f"-- {n} {'needs' if n == 1 else 'need'} attention:")
            lines += [f"   {p}" for p in self.problems]
        else:
            lines.append("-- all is well")
        return "\n".join(lines)


def ago(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to (host, port) opens within ``timeout``, else why not. A
    wildcard bind is probed on the loopback address of its family."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)
    return None


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, first 64 KiB of the body). Raises OSError (URLError included) or ValueError.
    Proxies from the environment are not used: the addresses probed are the node's own."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read(65536)
    except urllib.error.HTTPError as e:
        return e.code, b""


def http_problem(url: str, timeout: float, expect: bytes) -> str | None:
    """None when ``url`` answers 200 with ``expect`` in its body, else what went wrong."""
    try:
        status, body = http_get(url, timeout)
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        return f"no answer: {getattr(reason, 'strerror', None) or reason}"
    if status != 200:
        return f"HTTP {status}"
    if expect not in body:
        return f"unexpected answer {body[:40]!r}"
    return None


# ---------------------------------------------------------------- the sections


def listeners(report: Report, cfg: BackendConfig, timeout: float) -> None:
    binds = [(lc.name, lc.kind, lc.listen) for lc in cfg.listeners]
    if cfg.http.enabled:
        binds += [(name, "http", hp) for name, hp in (("http", cfg.http.listen_http), ("https", cfg.http.listen_https))
                  if hp is not None]
    rows, details, problems = [], [], []
    for name, kind, (host, port) in binds:
        error = None if port == 0 else probe(host, port, timeout)
        state = "not probed (port 0)" if port == 0 else "listening" if error is None else f"NOT LISTENING: {error}"
        listening = None if port == 0 else error is None
        rows.append({"name": name, "kind": kind, "address": fmt_hostport(host, port), "listening": listening,
                     "error": error})
        details.append(f"{name:<12} {kind:<11} {fmt_hostport(host, port):<22} {state}")
        if error is not None:
            problems.append(f"{name} ({fmt_hostport(host, port)}) not listening: {error}")
    probed = [r for r in rows if r["listening"] is not None]
    summary = f"{sum(1 for r in probed if r['listening'])} of {len(probed)} listening"
    if len(probed) < len(rows):
        summary += f" ({len(rows) - len(probed)} on port 0, not probed)"
    report.add("listeners", ATTENTION if problems else OK, summary, details, problems, listeners=rows)


def queue(report: Report, cfg: BackendConfig, now: float) -> None:
    """Queue by state and the oldest message; last delivered and last failed recipient."""
    from backend.queue import reads
    from backend.queue.model import BOUNCED, DEFERRED, DELIVERED

    path = cfg.queue_db
    if not path.exists():
        report.add("queue", ATTENTION, f"no queue database at {path} (has the daemon run?)")
        report.add("deliveries", OFF, "no queue database")
        return
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            counts, _ = reads.stats(conn)
            oldest = reads.oldest_unfinished(conn)
            good = reads.last_attempted(conn, [DELIVERED])
            bad = reads.last_attempted(conn, [DEFERRED, BOUNCED])
        finally:
            conn.close()
    except sqlite3.Error as e:
        report.add("queue", ATTENTION, f"cannot read {path}: {e}")
        report.add("deliveries", OFF, "queue unreadable")
        return
    summary = ", ".join(f"{state} {n}" for state, n in counts.items())
    data = {"counts": counts, "oldest": None}
    problems = []
    if oldest is not None:
        qid, created = oldest
        age = now - created
        summary += f"; oldest {qid} waiting {ago(age)}"
        data["oldest"] = {"id": qid, "created": created, "age": round(age, 3)}
        if age > OLDEST_QUEUED_LIMIT:
            problems.append(f"message {qid} has waited {ago(age)} (more than {ago(OLDEST_QUEUED_LIMIT)}): "
                            f"see `homemx-backend queue show {qid}`")
    report.add("queue", ATTENTION if problems else OK, summary, None, problems, **data)

    def one(r) -> dict | None:
        if r is None:
            return None
        return {"queue_id": r.message_id, "recipient": r.address, "state": r.state, "time": r.last_attempt,
                "reply": r.last_reply}

    details = []
    for label, r in (("delivered", good), ("failed", bad)):
        if r is None:
            details.append(f"last {label}: none")
        else:
            details.append(f"last {label}: {utc(r.last_attempt)} ({ago(now - r.last_attempt)} ago) "
                           f"{r.message_id} to <{r.address}> {r.state}: {r.last_reply or '-'}")
    # Information, not a verdict: the queue's age and the alerts judge failures.
    report.add("deliveries", OK if good is not None or bad is not None else OFF, details[0], details[1:],
               last_success=one(good), last_failure=one(bad))


def certificate_path(cfg: BackendConfig) -> Path | None:
    """The certificate file the config serves (as backend/tls/context.py ServerTLS.from_config
    picks it): the ACME live chain while [acme] is on, else [tls] cert."""
    if cfg.acme.enabled:
        from backend.tls.certfiles import live_paths

        return live_paths(cfg.acme_dir)[0]
    return cfg.tls.cert


def certificate(report: Report, cfg: BackendConfig, now: float) -> None:
    """Expiry of the served certificate; with ACME, also a placeholder still in service and the
    last renewal's failure (backend/tls/renew.py state)."""
    from backend.tls.certfiles import cert_info

    path = certificate_path(cfg)
    if path is None:
        report.add("certificate", OFF, "none configured (no TLS)")
        return
    try:
        info = cert_info(path.read_bytes())
    except OSError as e:
        report.add("certificate", ATTENTION, f"cannot read {path}: {e.strerror or e}", path=str(path))
        return
    except ValueError as e:
        report.add("certificate", ATTENTION, f"{path} is not a PEM certificate: {e}", path=str(path))
        return
    days = info.days_left(now)
    data = {"path": str(path), "names": list(info.names), "issuer": info.issuer, "not_after": info.not_after,
            "days_left": round(days, 2), "self_signed": info.placeholder, "acme": None}
    if days < 0:
        summary = f"{path} EXPIRED {utc(info.not_after)} ({ago(-days * 86400)} ago)"
    else:
        summary = f"{path} expires {utc(info.not_after)} (in {days:.0f} days)"
    problems = []
    if 0 <= days < CERT_WARN_DAYS:
        problems.append(f"{path} expires in {days:.1f} days: renew it")
    elif days < 0:
        problems.append(summary)
    details = [f"names: {', '.join(info.names) or '-'}; issuer {info.issuer}"]
    if cfg.acme.enabled:
        from backend.tls.renew import load_state

        state = load_state(cfg.acme_dir)
        data["acme"] = {"last_result": state.last_result, "last_attempt": state.last_attempt,
                        "last_error": state.last_error, "failures": state.failures,
                        "next_attempt": state.next_attempt}
        if info.placeholder:
            problems.append("the self-signed placeholder is served: no certificate has been issued yet")
        if state.last_result == "failure":
            problems.append(f"the last renewal ({utc(state.last_attempt or 0)}) failed: {state.last_error} "
                            f"({state.failures} in a row); `homemx-backend cert renew --now` retries")
        if state.last_attempt is not None:
            details.append(f"ACME: last attempt {utc(state.last_attempt)} {state.last_result or '-'}"
                           + (f", next {utc(state.next_attempt)}" if state.next_attempt else ""))
    report.add("certificate", ATTENTION if problems else OK, summary, details, problems, **data)


def dns_check(report: Report, cfg: BackendConfig, now: float) -> None:
    from backend.dns.selfcheck import read_result, result_path

    interval = cfg.dns.self_check_interval
    if interval == 0:  # a result stored while it was on is no longer kept up to date
        report.add("dns check", OFF, "off ([dns] self_check_interval = 0)")
        return
    last = read_result(cfg)
    if last is None:
        report.add("dns check", OFF, f"no result yet in {result_path(cfg)}")
        return
    checks = last["checks"]
    failed = [c for c in checks if not c["ok"]]
    when = last["timestamp"]
    summary = f"{len(checks) - len(failed)} passed, {len(failed)} failed, at {utc(when)} ({ago(now - when)} ago)"
    problems = [f"{c['name']}: {c.get('detail', '')}" for c in failed]
    if now - when > 2 * interval + 60:
        problems.append(f"the last self-check is {ago(now - when)} old (every {ago(interval)} expected): "
                        "is the daemon running?")
    report.add("dns check", ATTENTION if problems else OK, summary, [f"FAIL {p}" for p in problems[:len(failed)]],
               problems, timestamp=when, checks=checks)


def rspamd(report: Report, cfg: BackendConfig, timeout: float) -> None:
    if cfg.rspamd is None:
        report.add("rspamd", OFF, "not configured")
        return
    url = cfg.rspamd.url + "/ping"
    problem = http_problem(url, timeout, b"pong")
    if problem is None:
        report.add("rspamd", OK, f"{url}: pong", url=url, reachable=True)
    else:
        fail = "mail is answered 451 4.7.1" if cfg.rspamd.fail_closed else "mail is accepted unscanned"
        report.add("rspamd", ATTENTION, f"{url}: {problem} ({fail})", url=url, reachable=False)


def tunnel(report: Report, tunnel_config: str) -> None:
    from wireguard import status as wg_status, wgquick

    try:
        ifname = wgquick.ifname_from_path(tunnel_config)
    except wgquick.WireGuardConfigError as e:
        report.add("tunnel", ATTENTION, str(e))
        return
    st = wg_status.status(ifname)
    data = {"interface": ifname, "present": st["present"], "handshake_age": st.get("handshake_age"),
            "up": st.get("up", False)}
    if not st["present"]:
        if Path(tunnel_config).exists():
            report.add("tunnel", ATTENTION, f"{ifname} is down (configured in {tunnel_config}): "
                       "`homemx-backend tunnel up`", **data)
        else:
            report.add("tunnel", OFF, f"not configured ({tunnel_config} absent, no interface {ifname})", **data)
        return
    age = st.get("handshake_age")
    if age is None:
        report.add("tunnel", ATTENTION, f"{ifname}: no handshake yet with the gateway", **data)
    elif not st.get("up"):
        report.add("tunnel", ATTENTION, f"{ifname}: last handshake {ago(age)} ago (more than "
                   f"{ago(wg_status.STALE_AFTER)}): the gateway is unreachable", **data)
    else:
        report.add("tunnel", OK, f"{ifname}: handshake {ago(age)} ago", **data)


def metrics(report: Report, cfg: BackendConfig, timeout: float) -> None:
    if cfg.server.metrics_listen is None:
        report.add("metrics", OFF, "not configured")
        return
    host, port = cfg.server.metrics_listen
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://{fmt_hostport(host, port)}/metrics"
    problem = None if port == 0 else http_problem(url, timeout, b"homemx_backend_")
    if port == 0:
        report.add("metrics", OFF, "port 0: not probed", url=url)
    elif problem is None:
        report.add("metrics", OK, f"{url} answers", url=url)
    else:
        report.add("metrics", ATTENTION, f"{url}: {problem}", url=url)


def collect(cfg: BackendConfig, tunnel_config: str = DEFAULT_TUNNEL_CONFIG, timeout: float = 3.0,
            now: float | None = None) -> Report:
    """The whole status report of the node ``cfg`` describes."""
    now = time.time() if now is None else now
    report = Report()
    listeners(report, cfg, timeout)
    queue(report, cfg, now)
    certificate(report, cfg, now)
    dns_check(report, cfg, now)
    rspamd(report, cfg, timeout)
    tunnel(report, tunnel_config)
    metrics(report, cfg, timeout)
    return report


def cmd_status(args) -> int:
    cfg = load_or_exit(args.config)  # exit 2 with one line per problem
    report = collect(cfg, args.tunnel_config, args.timeout)
    if args.json:
        json.dump(report.to_json(hostname=cfg.server.hostname, config=str(cfg.path)), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.text(f"homemx-backend {cfg.server.hostname} ({cfg.path})"))
    return EXIT_OK if report.ok else EXIT_ATTENTION
