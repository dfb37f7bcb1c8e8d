"""CLI: ``demo``, a whole local stack on loopback (gateway and backend configs, certificate, DKIM keys, a user) and the backend it runs."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from backend.cli.demodns import DemoDNS, DemoZones, demo_zones
from backend.cli.run import load_or_exit, run_daemon
from backend.dkim.keys import generate_key
from backend.durable import write_secret
from backend.tls.selfsigned import write_self_signed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a local stack on loopback with a generated default config")
    p.add_argument("--dir", default="demo", help="data directory for the demo (default ./demo)")
    p.add_argument("--port-base", type=int, default=2500,  # ports BASE+25 … BASE+187
                   help="gateway on BASE+25/+65/+87, backend on BASE+125/+126/+165/+187, metrics BASE+91/+92, "
                        "the demo's DNS on BASE+53 (UDP and TCP)")
    p.add_argument("--prepare", action="store_true",
                   help="only write the demo configs (backend.toml, gateway.toml), certificate and user, then exit")
    p.set_defaults(func=cmd_demo)


def demo_config_text(d: Path, base: int) -> str:
    return f"""# homemx demo: everything on loopback, data under {d}
[server]
hostname = "mail.example.test"
data_dir = "{d}/data"
log_level = "info"
metrics_listen = "127.0.0.1:{base + 91}"

[tls]
cert = "{d}/tls/cert.pem"
key = "{d}/tls/key.pem"

[users]
passwd_file = "{d}/passwd"

[domain."example.test"]
aliases = {{ postmaster = ["demo@example.test"] }}

# Behind the gateway (which listens on {base + 25}, {base + 87}, {base + 65}): PROXY v2 from it only.
[[listener]]
name = "mx"
kind = "mx"
listen = "127.0.0.1:{base + 125}"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

[[listener]]
name = "submission"
kind = "submission"
listen = "127.0.0.1:{base + 187}"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

[[listener]]
name = "submissions"
kind = "submissions"
listen = "127.0.0.1:{base + 165}"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

# Homelab apps submit here directly (no gateway in between).
[[listener]]
name = "lan"
kind = "lan"
listen = "127.0.0.1:{base + 126}"
trusted_networks = ["127.0.0.0/8"]

# What `dns records` prints for this config: the A record and SPF list this (documentation,
# RFC 5737) address, so mail claiming example.test from anywhere else fails SPF.
[gateway]
public_ipv4 = ["192.0.2.25"]

[delivery]
# The demo's own DNS (backend/cli/demodns.py) serves example.test from these records, so the inbound
# SPF, DKIM and DMARC checks see real ones; it refuses every other name at once. The demo has no
# internet: remote recipients stay queued (see `queue list`), their MX lookups refused.
nameservers = ["127.0.0.1"]
dns_port = {base + 53}
"""


def demo_gateway_config_text(base: int) -> str:
    return f"""# homemx demo gateway: the "VPS" on loopback, forwarding to the demo backend with PROXY v2
[server]
hostname = "mail.example.test"
metrics_listen = "127.0.0.1:{base + 92}"

[[listener]]
name = "mx"
kind = "smtp"
listen = ["127.0.0.1:{base + 25}"]
upstream = "127.0.0.1:{base + 125}"
greet_wait = "1s"

[[listener]]
name = "submission"
kind = "smtp"
listen = ["127.0.0.1:{base + 87}"]
upstream = "127.0.0.1:{base + 187}"

[[listener]]
name = "submissions"
kind = "smtp"
listen = ["127.0.0.1:{base + 65}"]
upstream = "127.0.0.1:{base + 165}"
"""


def cmd_demo(args) -> int:
    from backend.receive.users import UserDB

    d = Path(args.dir).resolve()
    (d / "tls").mkdir(parents=True, exist_ok=True)
    cfg_path = d / "backend.toml"
    if not (d / "tls" / "cert.pem").exists():
        write_self_signed(d / "tls" / "cert.pem", d / "tls" / "key.pem", "mail.example.test")
    if not cfg_path.exists():
        text = demo_config_text(d, args.port_base)
        # Demo mail is signed like real mail: one RSA and one Ed25519 key for example.test.
        for algorithm, selector in (("rsa", "demo-rsa"), ("ed25519", "demo-ed")):
            key = d / "dkim" / f"example.test.{selector}.{'rsa.pem' if algorithm == 'rsa' else 'ed25519'}"
            if not key.exists():
                key = generate_key("example.test", selector, algorithm, d / "dkim").path
            text += (f'\n[[dkim]]\ndomain = "example.test"\nselector = "{selector}"\n'
                     f'algorithm = "{algorithm}"\nprivate_key = "{key}"\n')
        cfg_path.write_text(text)
    if not (d / "gateway.toml").exists():
        (d / "gateway.toml").write_text(demo_gateway_config_text(args.port_base))
    pw_file = d / "demo-password"
    users = UserDB(d / "passwd")
    if not users.exists("demo@example.test"):
        pw = secrets.token_urlsafe(12)
        write_secret(pw_file, (pw + "\n").encode(), replace=True)
        users.add("demo@example.test", pw)
    cfg = load_or_exit(str(cfg_path))
    if args.prepare:
        return 0
    b = args.port_base
    if (cfg.delivery.nameservers, cfg.delivery.dns_port) != (("127.0.0.1",), b + 53):
        # A config written by an older demo (or for another port base) asks elsewhere: every inbound
        # check would wait for a DNS timeout.
        print(f"homemx-backend: {cfg_path} does not resolve through the demo's DNS (127.0.0.1:{b + 53}); "
              f"remove it to have it written afresh", file=sys.stderr)
    dns_server = DemoDNS(DemoZones(demo_zones(cfg)), "127.0.0.1", b + 53)
    try:
        dns_server.start()
    except OSError as e:
        print(f"homemx-backend: cannot start: the demo's DNS on 127.0.0.1:{b + 53}: {e}", file=sys.stderr)
        return 1
    print(f"homemx demo: config {cfg_path} (gateway: {d}/gateway.toml), data in {d}/data")
    print(f"  send a test message:  swaks --server 127.0.0.1:{b + 25} --to demo@example.test --from you@example.net")
    print(f"                        (through the gateway on {b + 25}; it waits 1 s before the banner, like an MX edge)")
    print(f"  then read it:         ls {cfg.maildir_for('demo@example.test')}/new/")
    print(f"  a forged From:        swaks --server 127.0.0.1:{b + 25} --from demo@example.test "
          f"--h-From 'Boss <demo@example.test>' --h-Subject 'urgent wire transfer' --to demo@example.test")
    print("                        (refused with 550 5.7.1: example.test's SPF lists only 192.0.2.25, and "
          "mail on mx claiming our own domain must pass DMARC)")
    print(f"  submission (AUTH):    swaks --server 127.0.0.1:{b + 87} --tls --auth-user demo@example.test "
          f"--auth-password \"$(cat {pw_file})\" --from demo@example.test --to demo@example.test")
    print(f"  a homelab app:        swaks --server 127.0.0.1:{b + 126} --from nas@example.test --to demo@example.test")
    print(f"  queue:                .venv/bin/homemx-backend queue list -c {cfg_path}")
    print(f"  metrics:              curl -s 127.0.0.1:{b + 91}/metrics (backend), 127.0.0.1:{b + 92}/metrics (gateway)")
    print(f"  its DNS records:      .venv/bin/homemx-backend dns check --dns-only -c {cfg_path}")
    print(f"                        (served by the demo's DNS on 127.0.0.1:{b + 53}, as `dns records` prints them)")
    print("  stop with Ctrl-C")
    sys.stdout.flush()
    try:
        return run_daemon(cfg)
    finally:
        dns_server.close()
