"""Pure rendering of everything provisioning writes that holds no secret: the daemons' TOML files and the hardened systemd units.

Deterministic text (same Site → same bytes) so a second run can compare hashes and change nothing.
"""

from __future__ import annotations

from .site import HostLayout, Site


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ifname(site: Site, layout: HostLayout) -> str:
    return layout.ifname or site.ifname


def wg_conf_path(site: Site, layout: HostLayout) -> str:
    # The file name is the interface name (wg-quick convention, see docs/wireguard.md).
    return f"{layout.etc}/wireguard/{ifname(site, layout)}.conf"


def wg_key_path(site: Site, layout: HostLayout) -> str:
    return f"{layout.etc}/wireguard/{ifname(site, layout)}.key"


def dkim_entries(site: Site, layout: HostLayout) -> list[dict]:
    """The [[dkim]] keys: one RSA and one Ed25519 selector, file names as backend.dkim.generate_key writes them."""
    d = f"{layout.etc}/dkim"
    return [
        {"selector": f"{site.dkim_selector}-rsa", "algorithm": "rsa",
         "private_key": f"{d}/{site.domain}.{site.dkim_selector}-rsa.rsa.pem"},
        {"selector": f"{site.dkim_selector}-ed25519", "algorithm": "ed25519",
         "private_key": f"{d}/{site.domain}.{site.dkim_selector}-ed25519.ed25519"},
    ]


def tls_paths(layout: HostLayout) -> tuple[str, str]:
    return f"{layout.etc}/tls/fullchain.pem", f"{layout.etc}/tls/privkey.pem"


def gateway_toml(site: Site) -> str:
    b = site.backend_tunnel_addr
    lines = [
        "# homemx gateway: written by provisioning (provision/render.py); local edits are overwritten",
        "[server]",
        f"hostname = {_q(site.hostname)}",
        "",
    ]
    for name, kind, port, up, extra in (
        ("mx", "smtp", site.smtp_port, site.backend_mx_port, [f"greet_wait = {_q(site.greet_wait)}"]),
        ("submission", "smtp", site.submission_port, site.backend_submission_port, ["submission = true"]),
        ("submissions", "smtp", site.submissions_port, site.backend_submissions_port,
         ["submission = true", "implicit_tls = true"]),
        ("imaps", "tcp", site.imaps_port, site.backend_imaps_port, []),
    ):
        lines += ["[[listener]]", f"name = {_q(name)}", f"kind = {_q(kind)}",
                  f'listen = ["0.0.0.0:{port}"]', f'upstream = "{b}:{up}"', *extra, ""]
    return "\n".join(lines)


def backend_toml(site: Site, layout: HostLayout) -> str:
    cert, key = tls_paths(layout)
    g = site.gateway_tunnel_addr
    b = site.backend_tunnel_addr
    lines = [
        "# homemx backend: written by provisioning (provision/render.py); local edits are overwritten",
        "[server]",
        f"hostname = {_q(site.hostname)}",
        f"data_dir = {_q(layout.data)}",
        "",
        "[tls]",
        f"cert = {_q(cert)}",
        f"key = {_q(key)}",
        "",
        "[users]",
        f"passwd_file = {_q(layout.etc + '/passwd')}",
        f"maildir_root = {_q(layout.data + '/mail')}",
        "",
        f"[domain.{_q(site.domain)}]",
        f"aliases = {{ postmaster = [{_q(site.first_user)}] }}",
        "",
    ]
    for name, kind, port in (("mx", "mx", site.backend_mx_port),
                             ("submission", "submission", site.backend_submission_port),
                             ("submissions", "submissions", site.backend_submissions_port)):
        lines += ["[[listener]]", f"name = {_q(name)}", f"kind = {_q(kind)}", f'listen = "{b}:{port}"',
                  "proxy_protocol = true", f'trusted_proxies = ["{g}/32"]', ""]
    for e in dkim_entries(site, layout):
        lines += ["[[dkim]]", f"domain = {_q(site.domain)}", f"selector = {_q(e['selector'])}",
                  f"algorithm = {_q(e['algorithm'])}", f"private_key = {_q(e['private_key'])}", ""]
    lines += ["[delivery]", f"source_address = {_q(b)}", "",
              "[gateway]", f"public_ipv4 = [{_q(site.gateway_public_addr)}]", ""]
    if site.dmarc_rua:
        lines += ["[dns]", f"dmarc_rua = {_q(site.dmarc_rua)}", ""]
    return "\n".join(lines)


_HARDENING = """NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
Restart=on-failure
RestartSec=5s
"""


def tunnel_unit(site: Site, layout: HostLayout, role: str) -> str:
    """The tunnel as a oneshot unit around the native bring-up (root: it needs CAP_NET_ADMIN)."""
    conf = wg_conf_path(site, layout)
    cmd = f"{layout.venv}/bin/homemx-{role} tunnel"
    extra = " --userspace" if site.userspace_wireguard else ""
    if role == "gateway":
        extra += f" --public-if {site.gateway_public_if} --public-addr {site.gateway_public_addr}"
    return f"""# written by homemx provisioning
[Unit]
Description=homemx WireGuard tunnel ({role} end, {ifname(site, layout)})
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={cmd} up -c {conf}{extra}
ExecStop={cmd} down -c {conf}

[Install]
WantedBy=multi-user.target
"""


def gateway_unit(site: Site, layout: HostLayout) -> str:
    """Edge proxy: unprivileged user; CAP_NET_BIND_SERVICE is its only capability (ports 25/465/587/993)."""
    return f"""# written by homemx provisioning
[Unit]
Description=homemx edge proxy (gateway)
Wants=homemx-tunnel.service
After=network-online.target homemx-tunnel.service

[Service]
User={layout.user}
Group={layout.user}
ExecStart={layout.venv}/bin/homemx-gateway run -c {layout.etc}/gateway.toml
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
{_HARDENING}
[Install]
WantedBy=multi-user.target
"""


def backend_unit(site: Site, layout: HostLayout) -> str:
    """Home MTA: unprivileged, no capabilities (its ports are > 1023), writes only its data dir."""
    return f"""# written by homemx provisioning
[Unit]
Description=homemx mail server (backend)
Requires=homemx-tunnel.service
After=network-online.target homemx-tunnel.service

[Service]
User={layout.user}
Group={layout.user}
ExecStart={layout.venv}/bin/homemx-backend run -c {layout.etc}/backend.toml
CapabilityBoundingSet=
AmbientCapabilities=
ReadWritePaths={layout.data}
{_HARDENING}
[Install]
WantedBy=multi-user.target
"""
