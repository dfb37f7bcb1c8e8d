"""End-to-end benchmark (B5): smtp-source → homemx-gateway → WireGuard tunnel → homemx-backend (PROXY v2, lan listener, fsynced queue, DKIM rsa+ed25519) → MX delivery to Postfix smtp-sink, against HAProxy (send-proxy-v2) → tunnel → Postfix (smtpd_upstream_proxy_protocol = haproxy) relaying to the same smtp-sink, without and with OpenDKIM signing as a milter (RSA-2048 and Ed25519, as homemx signs); messages/s, p50/p99 time to 250 and every process's CPU seconds.

By default on the lab topology (tests/lab/topology.py, ``MailLab(relay_listener=True)``): smtp-source
in "internet", homemx-gateway or HAProxy 2.6 (mode tcp) in "gateway", the tunnel (wireguard-go),
homemx-backend or Postfix in "home" sending from the tunnel address (Postfix: smtp_bind_address), so
both leave through the gateway's egress to the MX of sink.test (lab nsd) — smtp-sink on 198.51.100.60
in "internet". "accepted" is smtp-source's time to get every 250, "delivered" the time until the sink
has them all. The Postfix pair runs twice: as it comes, then with OpenDKIM (Debian's, a milter in
"home"; two instances on unix sockets, since its SignatureAlgorithm is per instance) signing every message with an
RSA-2048 and an Ed25519 key, the work homemx's backend does;
the sink's dump file proves the signatures (counted per algorithm for each pair). During each
20-session load the CPU seconds of every process in the lab's namespaces (edge, tunnel, MTA,
milter, client, sink; /proc/<pid>/stat utime+stime, plus cutime+cstime so a Postfix daemon that
exits counts in its master) are summed per program: on 2 cores the chains compete for the CPU.

``--loopback`` runs the earlier variant without the tunnel: homemx on the host's loopback, the Postfix
pair in a namespace of its own, each relaying to its own smtp-sink on loopback.

    python -m tests.bench e2e [--loopback] [--messages N] [--latency N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.backend.helpers import listener_block  # noqa: E402
from tests.bench.accept_bench import SMTP_SOURCE, Backend  # noqa: E402
from tests.bench.fairness_bench import pct, start_gateway  # noqa: E402
from tests.gateway.peers import HAPROXY_CFG, stop, wait_port  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
DEFAULT_JSON = ROOT / "bench-results" / "e2e.json"
SIZE = 5120
SENDER, RCPT = "alice@example.org", "bob@sink.test"
BODY = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: e2e\r\n\r\n".encode()
        + b"The quick brown fox jumps over the lazy dog.\r\n" * 110)  # ~5 KB like smtp-source -l 5120


def latencies(host: str, port: int, count: int) -> list[float]:
    """Seconds from connect to the 250 after DATA (sequential, one connection per message)."""
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        with smtplib.SMTP(host, port, timeout=60) as s:
            s.ehlo("client.bench.example")
            s.sendmail(SENDER, [RCPT], BODY)
            out.append(time.perf_counter() - t0)
            s.quit()
    return out


def sink_count(path: Path) -> int:
    """Messages smtp-sink -c has counted (its last 'mesg=N' progress line)."""
    found = re.findall(rb"mesg=(\d+)", path.read_bytes()) if path.exists() else []
    return int(found[-1]) if found else 0


TICKS = os.sysconf("SC_CLK_TCK")


def _label(pid: int) -> str:
    """A process's name for the CPU table: the program, or for Python the homemx daemon it runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    name = Path(words[0]).name
    if name.startswith("python") or name.startswith("homemx"):
        text = " ".join(words)
        for hint, label in (("gateway", "homemx-gateway"), ("homemx-backend", "homemx-backend"),
                            ("backend.cli", "homemx-backend"), ("--latency", "latency client")):
            if hint in text:
                return label
        return "python"
    return name


def process_cpu(pids) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds of the process and of its children it has reaped): utime + stime +
    cutime + cstime from /proc/<pid>/stat. A Postfix daemon that exits is counted in its master's."""
    out = {}
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[pid] = (_label(pid), sum(int(x) for x in f[11:15]) / TICKS)
    return out


def cpu_by_process(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed per label (new processes from 0)."""
    spent: dict[str, float] = {}
    for pid, (label, secs) in after.items():
        prev = before.get(pid)
        d = secs - (prev[1] if prev and prev[0] == label else 0.0)
        if d > 0:
            spent[label] = round(spent.get(label, 0.0) + d, 2)
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def signatures(dump_dir: Path | None) -> dict[str, int]:
    """DKIM signatures per algorithm in the sink's dump files so far (smtp-sink -D names its file after
    the template plus a random suffix)."""
    counts = {"rsa-sha256": 0, "ed25519-sha256": 0}
    if dump_dir is None:
        return {}
    for path in dump_dir.iterdir():
        data = path.read_bytes()
        for alg in counts:
            counts[alg] += data.count(f"a={alg};".encode())
    return counts


OPENDKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


def opendkim_milters(work: Path) -> str:
    """Postfix's smtpd_milters for the instances start_opendkim(ns, work) runs."""
    return ", ".join(f"unix:{work / alg / 'opendkim.sock'}" for alg in OPENDKIM_ALGORITHMS)


def start_opendkim(ns, work: Path, domain: str = "example.org") -> list[subprocess.Popen]:
    """OpenDKIM (Debian's 2.11) in ``ns`` as signing milters for ``domain``, relaxed/relaxed: one instance
    with an RSA-2048 key and one with an Ed25519 key — OpenDKIM's SignatureAlgorithm is per instance
    (an Ed25519 key under rsa-sha256 fails: "451 4.7.0 resource unavailable"), so two milters give
    both signatures on every message, as homemx signs. The Ed25519 key is PKCS#8 PEM (OpenDKIM does
    not read the raw base64 seed homemx keeps). Each listens on a unix socket (work/<alg>/opendkim.sock),
    as Debian configures it: over TCP on loopback, Postfix's milter exchange waits on delayed ACKs
    (~45 ms per milter per message; "." to 250 137 ms with both, 6 ms with the namespace's loopback
    routes set to quickack), a cost of the transport, not of signing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    procs: list[subprocess.Popen] = []
    keys = {  # algorithm: (selector, private key)
        "rsa-sha256": ("rsa1", rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())),
        "ed25519-sha256": ("ed1", ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }
    try:
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o755)  # Postfix's smtpd (user postfix) reaches the sockets below
        for alg, (selector, pem) in keys.items():
            d = work / alg
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
            (d / "key.pem").write_bytes(pem)
            (d / "KeyTable").write_text(f"{selector}._domainkey.{domain} {domain}:{selector}:{d / 'key.pem'}\n")
            (d / "SigningTable").write_text(f"*@{domain} {selector}._domainkey.{domain}\n")
            sock = d / "opendkim.sock"
            (d / "opendkim.conf").write_text(f"""Syslog no
Background no
Mode s
Socket local:{sock}
UMask 0000
PidFile {d}/opendkim.pid
UserID root
RequireSafeKeys no
Canonicalization relaxed/relaxed
SignatureAlgorithm {alg}
KeyTable file:{d}/KeyTable
SigningTable refile:{d}/SigningTable
InternalHosts 0.0.0.0/0
On-Default tempfail
""")
            for f in d.iterdir():
                f.chmod(0o600)
            procs.append(ns.popen(["/usr/sbin/opendkim", "-f", "-x", str(d / "opendkim.conf")],
                                  stdout=open(d / "opendkim.log", "ab"), stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 15
            while not sock.is_socket():
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"opendkim ({alg}) did not start: {(d / 'opendkim.log').read_text()[-1000:]}")
                time.sleep(0.05)
    except BaseException:
        for p in procs:
            stop(p)
        raise
    return procs


def run_pair(wrap: list[str], port: int, sink_log: Path, messages: int, lat_n: int, host: str = "127.0.0.1",
             cpu_pids=None, dump: Path | None = None) -> dict:
    """Latency series, then the 20-session load until the sink holds every message. ``cpu_pids()``: the
    processes of both chains, whose CPU seconds during the load are reported per program; ``dump``: the
    sink's dump directory, whose DKIM signatures of this pair's load are counted."""
    before = sink_count(sink_log)
    r = subprocess.run(wrap + [sys.executable, __file__, "--latency", host, str(port), str(lat_n)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"latency client failed: {r.stderr.strip()[-600:]}")
    lat = json.loads(r.stdout)
    base = before + lat_n + 10  # warm-up + latency messages already sent (a shared sink counted `before`)
    deadline = time.monotonic() + 120
    while sink_count(sink_log) < base and time.monotonic() < deadline:
        time.sleep(0.1)
    start_count = sink_count(sink_log)
    sigs0 = signatures(dump)
    cpu0 = process_cpu(cpu_pids()) if cpu_pids else {}
    t0 = time.perf_counter()
    r = subprocess.run(wrap + [SMTP_SOURCE, "-s", "20", "-m", str(messages), "-l", str(SIZE), "-f", SENDER, "-t",
                               RCPT, f"{host}:{port}"], capture_output=True, text=True, timeout=900)
    accepted = time.perf_counter() - t0
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError(f"smtp-source: {r.stderr.strip()[-500:]}")
    deadline = time.monotonic() + 300
    while sink_count(sink_log) < start_count + messages and time.monotonic() < deadline:
        time.sleep(0.05)
    delivered = time.perf_counter() - t0
    got = min(sink_count(sink_log) - start_count, messages)
    cpu = cpu_by_process(cpu0, process_cpu(cpu_pids())) if cpu_pids else {}
    # Let late deliveries land (bounded) so the next pair's count starts clean, and report what the sink
    # received beyond what this pair was sent (a duplicate delivery shows up here, not in the rates).
    settle = time.monotonic() + 60
    last, quiet_since = sink_count(sink_log), time.monotonic()
    while time.monotonic() < settle and time.monotonic() - quiet_since < 3:
        time.sleep(0.2)
        now = sink_count(sink_log)
        if now != last:
            last, quiet_since = now, time.monotonic()
    surplus = sink_count(sink_log) - before - (lat_n + 10 + messages)
    return {"accepted_per_s": round(messages / accepted, 1), "delivered_per_s": round(got / delivered, 1),
            "delivered": got, "sink_surplus": surplus, "p50_ms": round(pct(lat, 50) * 1000, 2),
            "p99_ms": round(pct(lat, 99) * 1000, 2), "cpu_s": cpu, "cpu_total_s": round(sum(cpu.values()), 2),
            "signatures": {k: v - sigs0.get(k, 0) for k, v in signatures(dump).items()}}


def homemx_pair(lab, messages: int, lat_n: int) -> dict:
    from tests.lab.nsd import NSD, zone_text

    work = lab.workdir / "homemx"
    work.mkdir()
    sink_port = free_port()
    # MX delivery, as for any remote domain: nsd on loopback says sink.test's MX is 127.0.0.1 (a smarthost
    # would demand STARTTLS, which smtp-sink does not offer).
    zone = zone_text("sink.test", "@ IN MX 10 mx\nmx IN A 127.0.0.1\n")
    sink_log = work / "sink.out"
    with NSD({"sink.test": zone}) as nsd:
        sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "256"],
                                stdout=open(sink_log, "wb"), stderr=subprocess.DEVNULL)
        try:
            return _homemx_run(work, nsd, sink, sink_port, sink_log, messages, lat_n)
        finally:
            stop(sink)


def _homemx_run(work: Path, nsd, sink, sink_port: int, sink_log: Path, messages: int, lat_n: int) -> dict:
    from backend.dkim import keys as dkim_keys

    wait_port("127.0.0.1", sink_port, proc=sink)
    keys = work / "dkim"
    rsa = dkim_keys.generate_key("example.org", "rsa1", "rsa", keys)
    ed = dkim_keys.generate_key("example.org", "ed1", "ed25519", keys)
    extra = (f'[[dkim]]\ndomain = "example.org"\nselector = "rsa1"\nalgorithm = "rsa"\nprivate_key = "{rsa.path}"\n'
             f'[[dkim]]\ndomain = "example.org"\nselector = "ed1"\nalgorithm = "ed25519"\nprivate_key = "{ed.path}"\n'
             f'[delivery]\nnameservers = ["{nsd.address}"]\ndns_port = {nsd.port}\nremote_port = {sink_port}\n'
             f'mta_sts = false\n')
    lan = listener_block("lan", "lan", "127.0.0.1:{port}", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"],
                         trusted_networks=["127.0.0.0/8"], max_message_size="50MB")
    gw = None
    with Backend(work, lan, extra) as be:
        try:
            gw, port = start_gateway(work, be.port)
            r = run_pair([], port, sink_log, messages, lat_n)
            if r["delivered"] < messages:
                print((work / "backend.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            return r
        finally:
            if gw is not None:
                stop(gw)


def postfix_pair(lab, messages: int, lat_n: int) -> dict:
    from tests.lab.postfix import Postfix

    ns = lab.namespace("pp")  # a fresh namespace: its loopback ports are ours alone
    ns.etc_file("resolv.conf", "nameserver 127.0.0.1\n")
    work = lab.workdir / "postfix"
    sink_log = lab.workdir / "pf-sink.out"
    ns.popen([SMTP_SINK, "-u", "nobody", "-c", "127.0.0.1:2600", "256"], stdout=open(sink_log, "wb"),
             stderr=subprocess.DEVNULL)
    pf = Postfix(ns, work, address="127.0.0.1", domain="pair.test", mailboxes=[])
    pf.write()
    with open(pf.etc / "main.cf", "a") as f:
        f.write("relayhost = [127.0.0.1]:2600\nsmtpd_upstream_proxy_protocol = haproxy\nsmtpd_peername_lookup = no\n"
                "smtpd_client_connection_count_limit = 0\nsmtpd_client_connection_rate_limit = 0\n"
                "smtp_tls_security_level = none\nqueue_run_delay = 300s\n")
    pf.start()
    try:
        cfg = lab.workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(maxconn=2000, binds="    bind 127.0.0.1:2525", upstream="127.0.0.1:25",
                                          server_opts=" send-proxy-v2").replace("    option logasap\n", ""))
        hap = ns.popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while ns.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 2525), 1)"],
                         check=False).returncode != 0:
                if hap.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("haproxy did not start")
                time.sleep(0.05)
            return run_pair(ns.cmd([]), 2525, sink_log, messages, lat_n)
        finally:
            stop(hap)
    finally:
        pf.stop()


HAPROXY_PORT = 2527  # the Postfix pair's edge on the gateway address, beside homemx-gateway's relay port


def lab_pairs(messages: int, lat_n: int, sign_peer: bool = True) -> dict:
    """Both pairs on one MailLab (tunnel and all), relaying to one smtp-sink at sink.test's MX; with
    ``sign_peer`` the Postfix pair runs a second time with OpenDKIM signing as a milter."""
    from tests.lab.topology import MailLab

    results: dict = {}
    # The lab's 2 s retry schedule (for the scenarios) is also the claim lease of a delivery attempt: under
    # this load attempts wait longer than that and the backend delivers them twice. Minutes, as deployed.
    with MailLab(relay_listener=True, log_level="info", retry_schedule=("5m",)) as lab:
        sink_log = lab.work / "sink.out"
        # Every message as received (its DKIM signatures are counted), in a directory of its own: smtp-sink
        # writes it as nobody, who cannot traverse the lab's 0700 work directory.
        dump_dir = Path(tempfile.mkdtemp(prefix="hmx-e2e-dump-"))
        dump_dir.chmod(0o755)
        shutil.chown(dump_dir, "nobody")  # it creates sink.dump<random hex> there
        dump = dump_dir
        sink = lab.internet.popen([SMTP_SINK, "-u", "nobody", "-c", "-D", str(dump_dir / "sink.dump"),
                                   f"{lab.sink_addr}:25", "256"],
                                  stdout=open(sink_log, "wb"), stderr=subprocess.DEVNULL)

        def chains() -> list[int]:  # every process of both chains: edge, tunnel, MTA, milter, client, sink
            return lab.gateway.pids() + lab.home.pids() + lab.internet.pids()

        try:
            lab._wait_port(lab.internet, lab.sink_addr, 25, sink, "smtp-sink")
            r = run_pair(lab.internet.cmd([]), lab.relay_port, sink_log, messages, lat_n, host=lab.gateway_addr,
                         cpu_pids=chains, dump=dump)
            if r["delivered"] < messages:
                print(lab.logs()[-3000:], file=sys.stderr)
            results["homemx"] = r
            print(f"  homemx: {r}", file=sys.stderr, flush=True)
            results["postfix"] = _lab_postfix_pair(lab, sink_log, messages, lat_n, chains, dump)
            print(f"  postfix: {results['postfix']}", file=sys.stderr, flush=True)
            if sign_peer:
                results["postfix_dkim"] = _lab_postfix_pair(lab, sink_log, messages, lat_n, chains, dump, sign=True)
                print(f"  postfix + opendkim: {results['postfix_dkim']}", file=sys.stderr, flush=True)
        finally:
            stop(sink)
            shutil.rmtree(dump_dir, ignore_errors=True)
    return results


def _lab_postfix_pair(lab, sink_log: Path, messages: int, lat_n: int, cpu_pids=None, dump: Path | None = None,
                      sign: bool = False) -> dict:
    """HAProxy (gateway) → tunnel → Postfix (home, sending from the tunnel address) → sink.test's MX;
    ``sign``: Postfix hands every message to OpenDKIM (milter) for an RSA and an Ed25519 signature."""
    from tests.lab.postfix import Postfix

    # Postfix's own config dir is /etc/netns/<home>/postfix: the lab's backend keeps running beside it.
    pf = Postfix(lab.home, lab.work / "pf-home", address=lab.home_tunnel_addr, domain="pair.test", mailboxes=[],
                 mynetworks=("127.0.0.0/8", f"{lab.internet_addr}/32", f"{lab.sender_addr}/32"))
    pf.write()
    with open(pf.etc / "main.cf", "a") as f:
        # MX delivery through the lab's nsd like the backend's (smtp_bind_address is the tunnel address).
        f.write("smtpd_upstream_proxy_protocol = haproxy\nsmtpd_peername_lookup = no\n"
                "smtpd_client_connection_count_limit = 0\nsmtpd_client_connection_rate_limit = 0\n"
                "queue_run_delay = 300s\n")
        if sign:  # tempfail, not accept unsigned, when the milter fails: a figure over unsigned mail is none
            f.write(f"smtpd_milters = {opendkim_milters(lab.work / 'opendkim')}\nmilter_default_action = tempfail\n")
    dkim = start_opendkim(lab.home, lab.work / "opendkim") if sign else []
    try:
        pf.start()
    except BaseException:
        for p in dkim:
            stop(p)
        raise
    try:
        cfg = lab.work / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(maxconn=2000, binds=f"    bind {lab.gateway_addr}:{HAPROXY_PORT}",
                                          upstream=f"{lab.home_tunnel_addr}:25", server_opts=" send-proxy-v2")
                       .replace("    option logasap\n", ""))
        hap = lab.gateway.popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        try:
            lab._wait_port(lab.internet, lab.gateway_addr, HAPROXY_PORT, hap, "haproxy")
            return run_pair(lab.internet.cmd([]), HAPROXY_PORT, sink_log, messages, lat_n, host=lab.gateway_addr,
                            cpu_pids=cpu_pids, dump=dump)
        finally:
            stop(hap)
    finally:
        pf.stop()
        for p in dkim:
            stop(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages at 20 sessions (default 2000)")
    ap.add_argument("--latency", type=int, default=300, help="sequential messages for p50/p99 (default 300)")
    ap.add_argument("--loopback", action="store_true",
                    help="the earlier variant: both pairs on loopback, no tunnel (default: the lab topology)")
    ap.add_argument("--no-opendkim", action="store_true", help="skip the Postfix pair that signs with OpenDKIM")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not Path(tool).exists():
            print(f"e2e_bench: {tool} missing (./dev setup installs postfix)", file=sys.stderr)
            return 1
    from tests.lab.netns import Lab

    variant = "loopback, no tunnel" if args.loopback else "lab topology, WireGuard tunnel (wireguard-go)"
    results: dict = {"benchmark": "e2e", "variant": variant, "message_bytes": SIZE, "cpus": os.cpu_count()}
    if args.loopback:
        with Lab("be") as lab:
            lab.workdir.chmod(0o755)  # Postfix's daemons run as user postfix
            results["homemx"] = homemx_pair(lab, args.messages, args.latency)
            print(f"  homemx: {results['homemx']}", file=sys.stderr, flush=True)
            results["postfix"] = postfix_pair(lab, args.messages, args.latency)
            print(f"  postfix: {results['postfix']}", file=sys.stderr, flush=True)
    else:
        results.update(lab_pairs(args.messages, args.latency, sign_peer=not args.no_opendkim))
    h, p = results["homemx"], results["postfix"]
    results["ratio_accepted"] = round(h["accepted_per_s"] / p["accepted_per_s"], 3)
    results["ratio_delivered"] = round(h["delivered_per_s"] / p["delivered_per_s"], 3)
    results["ratio_p99"] = round(h["p99_ms"] / p["p99_ms"], 3)
    pairs = [("gateway → backend (DKIM) → sink", h), ("haproxy → postfix → sink", p)]
    if "postfix_dkim" in results:
        d = results["postfix_dkim"]
        pairs.append(("haproxy → postfix+opendkim → sink", d))
        results["ratio_accepted_signing"] = round(h["accepted_per_s"] / d["accepted_per_s"], 3)
        results["ratio_delivered_signing"] = round(h["delivered_per_s"] / d["delivered_per_s"], 3)
        results["ratio_p99_signing"] = round(h["p99_ms"] / d["p99_ms"], 3)
    print(f"\nB5 end to end ({variant}): 5 KB messages, 20 sessions, new connection each")
    print(f"{'':36} {'accepted/s':>10} {'delivered/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'CPU s':>6}  signatures")
    for name, r in pairs:
        print(f"{name:36} {r['accepted_per_s']:10.1f} {r['delivered_per_s']:11.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r.get('cpu_total_s', 0):6.1f}  {r.get('signatures', {})}")
    print(f"homemx / postfix: accepted {results['ratio_accepted']:.2f}, delivered {results['ratio_delivered']:.2f} "
          f"(target >= 0.65), p99 {results['ratio_p99']:.2f} (target <= 1.0)")
    if "postfix_dkim" in results:
        print(f"homemx / postfix+opendkim: accepted {results['ratio_accepted_signing']:.2f}, delivered "
              f"{results['ratio_delivered_signing']:.2f}, p99 {results['ratio_p99_signing']:.2f}")
    for name, r in pairs:
        if r.get("cpu_s"):
            print(f"CPU s during the load, {name}: " + ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--latency":
        host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        latencies(host, port, 10)  # warm-up
        print(json.dumps(latencies(host, port, n)))
    else:
        sys.exit(main(sys.argv[1:]))
