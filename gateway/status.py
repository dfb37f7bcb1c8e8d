"""``homemx-gateway status``: the gateway on one screen: its listeners, the home's upstreams over
the tunnel, the tunnel's handshake age and the metrics endpoint, each ok or needing attention.

Read from outside the daemon, as an operator would look: a TCP connect to each listen address and
each upstream, the WireGuard device (wireguard/status.py), a GET of /metrics. Plain blocking
sockets: this is a short-lived command, not the trio daemon. The backend's status command
(backend/cli/status.py) has the same shape; the daemons never import each other, so the small
report class lives in both. Exit status: 0 all is well, 1 something needs attention, 2 the config
cannot be read.
"""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request

from .config import GatewayConfig

OK, ATTENTION, OFF = "ok", "attention", "off"
EXIT_OK, EXIT_ATTENTION, EXIT_CONFIG = 0, 1, 2


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
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


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


def listeners(report: Report, config: GatewayConfig, timeout: float) -> None:
    rows, details, problems = [], [], []
    for lc in config.listeners:
        for host, port in lc.listen:
            error = None if port == 0 else probe(host, port, timeout)
            where = fmt_hostport(host, port)
            state = "not probed (port 0)" if port == 0 else "listening" if error is None else f"NOT LISTENING: {error}"
            rows.append({"name": lc.name, "kind": lc.kind, "address": where,
                         "listening": (error is None) if port else None, "error": error})
            details.append(f"{lc.name:<12} {lc.kind:<5} {where:<22} {state}")
            if error is not None:
                problems.append(f"{lc.name} ({where}) not listening: {error}")
    probed = [r for r in rows if r["listening"] is not None]
    summary = f"{sum(1 for r in probed if r['listening'])} of {len(probed)} listening"
    if len(probed) < len(rows):
        summary += f" ({len(rows) - len(probed)} on port 0, not probed)"
    report.add("listeners", ATTENTION if problems else OK, summary, details, problems, listeners=rows)


def upstreams(report: Report, config: GatewayConfig, timeout: float) -> None:
    """Each distinct upstream (the home's listeners, over the tunnel) by a TCP connect. While one is
    unreachable its listener answers 421 (SMTP) or closes (tcp)."""
    by_address: dict[tuple[str, int], list[str]] = {}
    for lc in config.listeners:
        by_address.setdefault(lc.upstream, []).append(lc.name)
    rows, details, problems = [], [], []
    for (host, port), names in by_address.items():
        error = probe(host, port, timeout)
        where = fmt_hostport(host, port)
        rows.append({"address": where, "listeners": names, "reachable": error is None, "error": error})
        details.append(f"{where:<22} for {', '.join(names):<20} {'reachable' if error is None else 'UNREACHABLE: ' + error}")
        if error is not None:
            problems.append(f"{where} unreachable ({error}): {', '.join(names)} cannot reach home")
    up = sum(1 for r in rows if r["reachable"])
    report.add("upstream", ATTENTION if problems else OK, f"{up} of {len(rows)} reachable", details, problems,
               upstreams=rows)


def tunnel(report: Report, config: GatewayConfig) -> None:
    ifname = config.server.tunnel_interface
    if ifname is None:
        report.add("tunnel", OFF, "not configured ([server] tunnel_interface)")
        return
    try:
        from wireguard import status as wg_status  # optional at run time (as for the metrics)
    except ImportError:
        report.add("tunnel", OFF, "the wireguard package is not installed")
        return
    st = wg_status.status(ifname)
    data = {"interface": ifname, "present": st["present"], "handshake_age": st.get("handshake_age"),
            "up": st.get("up", False)}
    age = st.get("handshake_age")
    if not st["present"]:
        report.add("tunnel", ATTENTION, f"{ifname} is down: `homemx-gateway tunnel up`", **data)
    elif age is None:
        report.add("tunnel", ATTENTION, f"{ifname}: no handshake yet with the backend", **data)
    elif not st.get("up"):
        report.add("tunnel", ATTENTION, f"{ifname}: last handshake {ago(age)} ago (more than "
                   f"{ago(wg_status.STALE_AFTER)}): the backend is unreachable", **data)
    else:
        report.add("tunnel", OK, f"{ifname}: handshake {ago(age)} ago", **data)


def metrics(report: Report, config: GatewayConfig, timeout: float) -> None:
    if config.server.metrics_listen is None:
        report.add("metrics", OFF, "not configured")
        return
    host, port = config.server.metrics_listen
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://{fmt_hostport(host, port)}/metrics"
    if port == 0:
        report.add("metrics", OFF, "port 0: not probed", url=url)
        return
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own address: no proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = resp.read(1 << 20)
        problem = None if b"homemx_gateway_" in body else f"unexpected answer {body[:40]!r}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}"
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        problem = f"no answer: {getattr(reason, 'strerror', None) or reason}"
    if problem is None:
        report.add("metrics", OK, f"{url} answers", url=url)
    else:
        report.add("metrics", ATTENTION, f"{url}: {problem}", url=url)


def collect(config: GatewayConfig, timeout: float = 3.0) -> Report:
    """The whole status report of the gateway ``config`` describes."""
    report = Report()
    listeners(report, config, timeout)
    upstreams(report, config, timeout)
    tunnel(report, config)
    metrics(report, config, timeout)
    return report
