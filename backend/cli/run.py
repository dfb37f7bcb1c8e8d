"""CLI: ``run``, ``config check`` and ``demo`` (the local stack on loopback with an embedded default)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import secrets
import sys
from pathlib import Path

from backend.config import ConfigError, load_config
from backend.logsetup import setup_logging

DEFAULT_CONFIG = "/etc/homemx/backend.toml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the backend daemon")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("check", help="load and validate the config file, then exit")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("demo", help="run a local stack on loopback with a generated default config")
    p.add_argument("--dir", default="demo", help="data directory for the demo (default ./demo)")
    p.add_argument("--port-base", type=int, default=2500,  # ports BASE+25 … BASE+192
                   help="gateway on BASE+25/+65/+87, backend on BASE+125/+126/+165/+187, metrics BASE+91/+92")
    p.add_argument("--prepare", action="store_true",
                   help="only write the demo configs (backend.toml, gateway.toml), certificate and user, then exit")
    p.set_defaults(func=cmd_demo)


def load_or_exit(path: str):
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.lines:  # every problem of the file, one line each
            print(f"homemx-backend: config error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_config_check(args) -> int:
    cfg = load_or_exit(args.config)
    print(f"{cfg.path}: ok ({len(cfg.listeners)} listeners, {len(cfg.domains)} domains, {len(cfg.dkim)} DKIM keys)")
    return 0


def cmd_run(args) -> int:
    return run_daemon(load_or_exit(args.config))


def run_daemon(cfg) -> int:
    setup_logging(cfg.server.log_level)
    from backend.run import serve

    from backend.dkim.keys import DKIMKeyError
    from backend.receive.smtpd import TLSSetupError

    try:
        status = asyncio.run(serve(cfg))
    except (OSError, DKIMKeyError, TLSSetupError) as e:
        # A port in use, an unusable DKIM key or certificate: one line naming it, no traceback.
        print(f"homemx-backend: cannot start: {e}", file=sys.stderr)
        return 1
    return status  # 1 when a vital worker died (the watchdog logged which): restart me


# ---------------------------------------------------------------- demo


def write_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """A self-signed certificate for ``hostname`` (ECDSA P-256, 1 year), key written 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


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
        from backend.dkim.keys import generate_key

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
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pw + "\n")
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
