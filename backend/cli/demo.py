"""CLI: ``demo``, a whole local stack on loopback (gateway and backend configs, certificate, DKIM keys, a user) and the backend it runs."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from backend.cli.run import load_or_exit, run_daemon
from backend.dkim.keys import generate_key
from backend.durable import write_secret
from backend.tls.selfsigned import write_self_signed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a local stack on loopback with a generated default config")
    p.add_argument("--dir", default="demo", help="data directory for the demo (default ./demo)")
    p.add_argument("--port-base", type=int, default=2500,  # ports BASE+25 … BASE+192
                   help="gateway on BASE+25/+65/+87, backend on BASE+125/+126/+165/+187, metrics BASE+91/+92")
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

[delivery]
# The demo has no internet: remote recipients stay queued (see `queue list`) instead of being looked up.
nameservers = ["127.0.0.1"]
dns_port = 9
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
    print(f"homemx demo: config {cfg_path} (gateway: {d}/gateway.toml), data in {d}/data")
    print(f"  send a test message:  swaks --server 127.0.0.1:{b + 25} --to demo@example.test --from you@example.net")
    print(f"                        (through the gateway on {b + 25}; it waits 1 s before the banner, like an MX edge)")
    print(f"  then read it:         ls {cfg.maildir_for('demo@example.test')}/new/")
    print(f"  submission (AUTH):    swaks --server 127.0.0.1:{b + 87} --tls --auth-user demo@example.test "
          f"--auth-password \"$(cat {pw_file})\" --from demo@example.test --to demo@example.test")
    print(f"  a homelab app:        swaks --server 127.0.0.1:{b + 126} --from nas@example.test --to demo@example.test")
    print(f"  queue:                .venv/bin/homemx-backend queue list -c {cfg_path}")
    print(f"  metrics:              curl -s 127.0.0.1:{b + 91}/metrics (backend), 127.0.0.1:{b + 92}/metrics (gateway)")
    print("  stop with Ctrl-C")
    sys.stdout.flush()
    return run_daemon(cfg)
