"""Fabric tasks (thin): read site.toml, build the wheelhouse locally, call provision.deploy, print the report.

    fab -r provision both   --site site.toml [--dry-run]
    fab -r provision gateway --site site.toml [--backend-pubkey KEY] [--dry-run]
    fab -r provision backend --site site.toml [--gateway-pubkey KEY] [--dry-run]
    fab -r provision check  --site site.toml

Hosts come from site.toml ([gateway] ssh / [backend] ssh), not from -H, because `both` needs two.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fabric import task

from provision import deploy
from provision.site import SiteError, load_site

PROJECT = Path(__file__).resolve().parent.parent


def _load_site(site_file: str):
    """The site file, or every problem in it on stderr (one ``FILE: KEY: REASON`` line each) and exit 1."""
    try:
        return load_site(site_file)
    except SiteError as e:
        sys.exit("\n".join(e.lines))


def _prepare(site_file: str, wheelhouse: str = ""):
    site = _load_site(site_file)
    if wheelhouse:  # wheels built before (`pip wheel -w DIR .`): deploy exactly those
        wheels = sorted(Path(wheelhouse).glob("*.whl"))
        if not any(w.name.startswith("homemx-") for w in wheels):
            sys.exit(f"no homemx wheel in {wheelhouse}")
    else:
        wheels = deploy.build_wheelhouse(PROJECT, Path(tempfile.mkdtemp(prefix="homemx-wheels-")))
    tls = (Path(site.tls_cert).read_bytes(), Path(site.tls_key).read_bytes()) if site.tls_cert else (None, None)
    return site, wheels, tls


WHEELHOUSE_HELP = "deploy the wheels in this directory instead of building them"


@task(help={"site": "site file (default site.toml)", "dry_run": "show what would change, change nothing",
            "wheelhouse": WHEELHOUSE_HELP})
def both(c, site="site.toml", dry_run=False, wheelhouse=""):
    """Gateway then backend, exchanging only public keys; then restarts and the post-deploy check."""
    s, wheels, (cert, key) = _prepare(site, wheelhouse)
    report, _, _, records = deploy.deploy_both(s, deploy.connection(s.gateway), deploy.connection(s.backend), wheels,
                                               dry_run=dry_run, tls_cert=cert, tls_key=key)
    print(report.text())
    if records:
        print("; DKIM records to publish (see `homemx-backend dns records` for all of them):")
        print("\n".join(records))
    if not dry_run and s.gateway.systemctl and s.backend.systemctl:
        _print_check(deploy.check(s, deploy.connection(s.gateway), deploy.connection(s.backend)))


@task(help={"site": "site file", "backend_pubkey": "the backend's WireGuard public key", "dry_run": "preview",
            "wheelhouse": WHEELHOUSE_HELP})
def gateway(c, site="site.toml", backend_pubkey="", dry_run=False, wheelhouse=""):
    """Only the VPS end; prints its public key (give it to the `backend` task)."""
    s, wheels, _ = _prepare(site, wheelhouse)
    report = deploy.Report()
    r = deploy.Remote(deploy.connection(s.gateway), s.gateway, "gateway", report, dry_run)
    deploy.deploy_gateway(r, s, wheels, backend_pubkey or None)
    print(report.text())
    print("gateway public key:", deploy.tunnel_public_key(r, s))


@task(help={"site": "site file", "gateway_pubkey": "the gateway's WireGuard public key", "dry_run": "preview",
            "wheelhouse": WHEELHOUSE_HELP})
def backend(c, site="site.toml", gateway_pubkey="", dry_run=False, wheelhouse=""):
    """Only the home end; prints its public key and the DKIM records."""
    s, wheels, (cert, key) = _prepare(site, wheelhouse)
    report = deploy.Report()
    r = deploy.Remote(deploy.connection(s.backend), s.backend, "backend", report, dry_run)
    records = deploy.deploy_backend(r, s, wheels, gateway_pubkey or None, cert, key)
    print(report.text())
    print("backend public key:", deploy.tunnel_public_key(r, s))
    print("\n".join(records))


@task(help={"site": "site file"})
def check(c, site="site.toml"):
    """Fresh handshake on both ends and a 220 from the backend through the gateway; exit 1 otherwise."""
    s = _load_site(site)
    _print_check(deploy.check(s, deploy.connection(s.gateway), deploy.connection(s.backend)))


def _print_check(res: dict) -> None:
    for host in ("gateway", "backend"):
        age = res[host].get("handshake_age")
        print(f"{host:<8} handshake {'fresh' if res[host].get('handshake_fresh') else 'MISSING'}"
              + (f" ({age:.0f}s ago)" if age is not None else ""))
    print(f"gateway  backend answers through the gateway: {res['gateway'].get('banner') or 'no answer'}")
    if not res["ok"]:
        sys.exit(1)
