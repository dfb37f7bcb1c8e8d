"""Fabric tasks (thin): read site.toml, build the wheelhouse locally, call provision.deploy, print the report.

    fab -r provision both   --site site.toml [--dry-run]
    fab -r provision gateway --site site.toml [--backend-pubkey KEY] [--dry-run]
    fab -r provision backend --site site.toml [--gateway-pubkey KEY] [--dry-run]
    fab -r provision check  --site site.toml

Hosts come from site.toml ([gateway] ssh / [backend] ssh), not from -H, because `both` needs two.
A failure is one line on stderr naming the host, the step and the reason, and exit status 1
(``homemx: gateway (root@vps.example.net): connect: [Errno 111] Connection refused``); both hosts are
reached over SSH before anything is built.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from fabric import task

if __name__ != "provision.fabfile":
    # `fab -r provision` loads this file as a top-level module with only provision/ on sys.path:
    # the checkout goes first, so `import provision` is this checkout's (installed or not)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provision import deploy  # noqa: E402
from provision.site import SiteError, load_site  # noqa: E402
from provision.wheels import WheelError, operator_wheels  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def _load_site(site_file: str):
    """The site file, or every problem in it on stderr (one ``FILE: KEY: REASON`` line each) and exit 1."""
    try:
        return load_site(site_file)
    except SiteError as e:
        sys.exit("\n".join(e.lines))


def _one_line(body):
    """A task whose failures are one ``homemx: HOST: STEP: REASON`` line on stderr and exit 1, not a traceback."""
    @functools.wraps(body)  # invoke reads the task's arguments from the signature __wrapped__ leads to
    def task_body(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except deploy.ProvisionError as e:
            sys.exit(f"homemx: {e}")
        except deploy._transport_errors() as e:  # outside a Remote step (e.g. closing a connection)
            sys.exit(f"homemx: {deploy.transport_reason(e)}")
    return task_body


def _connect(site, *roles: str) -> dict:
    """Fabric connections to the site's hosts, each opened now: an unreachable host fails the run
    in seconds, before any wheel is built."""
    conns = {}
    for role in roles:
        layout = getattr(site, role)
        conns[role] = deploy.connection(layout)
        deploy.reachable(conns[role], layout, role)
    return conns


def _prepare(site_file: str, wheelhouse: str = ""):
    site = _load_site(site_file)
    try:  # homemx's wheel; each host's dependencies are resolved for it when its venv is made
        wheels = operator_wheels(wheelhouse)
    except WheelError as e:
        sys.exit(f"homemx: operator: wheels: {e}")
    tls = (Path(site.tls_cert).read_bytes(), Path(site.tls_key).read_bytes()) if site.tls_cert else (None, None)
    return site, wheels, tls


WHEELHOUSE_HELP = ("deploy the homemx wheel in this directory instead of building it; its other wheels are used "
                   "for the hosts they fit")


@task(help={"site": "site file (default site.toml)", "dry_run": "show what would change, change nothing",
            "wheelhouse": WHEELHOUSE_HELP})
@_one_line
def both(c, site="site.toml", dry_run=False, wheelhouse=""):
    """Gateway then backend, exchanging only public keys; then restarts and the post-deploy check."""
    conns = _connect(_load_site(site), "gateway", "backend")
    s, wheels, (cert, key) = _prepare(site, wheelhouse)
    report, _, _, records = deploy.deploy_both(s, conns["gateway"], conns["backend"], wheels,
                                               dry_run=dry_run, tls_cert=cert, tls_key=key)
    print(report.text())
    if records:
        print("; DKIM records to publish (see `homemx-backend dns records` for all of them):")
        print("\n".join(records))
    if not dry_run and s.gateway.systemctl and s.backend.systemctl:
        _print_check(deploy.check(s, conns["gateway"], conns["backend"]))


@task(help={"site": "site file", "backend_pubkey": "the backend's WireGuard public key", "dry_run": "preview",
            "wheelhouse": WHEELHOUSE_HELP})
@_one_line
def gateway(c, site="site.toml", backend_pubkey="", dry_run=False, wheelhouse=""):
    """Only the VPS end; prints its public key (give it to the `backend` task)."""
    conns = _connect(_load_site(site), "gateway")
    s, wheels, _ = _prepare(site, wheelhouse)
    report = deploy.Report()
    r = deploy.Remote(conns["gateway"], s.gateway, "gateway", report, dry_run)
    deploy.deploy_gateway(r, s, wheels, backend_pubkey or None)
    print(report.text())
    print("gateway public key:", deploy.tunnel_public_key(r, s))


@task(help={"site": "site file", "gateway_pubkey": "the gateway's WireGuard public key", "dry_run": "preview",
            "wheelhouse": WHEELHOUSE_HELP})
@_one_line
def backend(c, site="site.toml", gateway_pubkey="", dry_run=False, wheelhouse=""):
    """Only the home end; prints its public key and the DKIM records."""
    conns = _connect(_load_site(site), "backend")
    s, wheels, (cert, key) = _prepare(site, wheelhouse)
    report = deploy.Report()
    r = deploy.Remote(conns["backend"], s.backend, "backend", report, dry_run)
    records = deploy.deploy_backend(r, s, wheels, gateway_pubkey or None, cert, key)
    print(report.text())
    print("backend public key:", deploy.tunnel_public_key(r, s))
    print("\n".join(records))


@task(help={"site": "site file"})
@_one_line
def check(c, site="site.toml"):
    """Fresh handshake on both ends, a 220 from the backend and an IMAPS login through the gateway; exit 1 otherwise."""
    s = _load_site(site)
    conns = _connect(s, "gateway", "backend")
    _print_check(deploy.check(s, conns["gateway"], conns["backend"]))


def _print_check(res: dict) -> None:
    for host in ("gateway", "backend"):
        age = res[host].get("handshake_age")
        print(f"{host:<8} handshake {'fresh' if res[host].get('handshake_fresh') else 'MISSING'}"
              + (f" ({age:.0f}s ago)" if age is not None else ""))
    print(f"gateway  backend answers through the gateway: {res['gateway'].get('banner') or 'no answer'}")
    print(f"backend  IMAPS login through the gateway: {res['backend'].get('imap') or 'not checked'}")
    if not res["ok"]:
        sys.exit(1)
