"""Pure rendering of everything provisioning writes that holds no secret: the daemons' TOML files and the hardened systemd units.

Deterministic text (same Site → same bytes) so a second run can compare hashes and change nothing.
"""

from __future__ import annotations

from pathlib import Path

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
        # Metrics on the tunnel address only: a Prometheus at home reaches them, the internet does not.
        *([f'metrics_listen = "{site.gateway_tunnel_addr}:{site.gateway_metrics_port}"',
           f"tunnel_interface = {_q(ifname(site, site.gateway))}"] if site.gateway_metrics_port else []),
        "",
    ]
    for name, kind, port, up, extra in (
        ("mx", "smtp", site.smtp_port, site.backend_mx_port, [f"greet_wait = {_q(site.greet_wait)}"]),
        ("submission", "smtp", site.submission_port, site.backend_submission_port, ["submission = true"]),
        ("submissions", "smtp", site.submissions_port, site.backend_submissions_port,
         ["submission = true", "implicit_tls = true"]),
        ("imaps", "tcp", site.imaps_port, site.backend_imaps_port, []),
        # The home's web face (PROXY v2 like the rest): ACME http-01 and tls-alpn-01 reach home
        # here, and the MTA-STS policy and autoconfig are served; the gateway holds no key for it.
        ("http", "tcp", site.http_port, site.backend_http_port, []),
        ("https", "tcp", site.https_port, site.backend_https_port, []),
    ):
        lines += ["[[listener]]", f"name = {_q(name)}", f"kind = {_q(kind)}",
                  f'listen = ["0.0.0.0:{port}"]', f'upstream = "{b}:{up}"', *extra, ""]
    return "\n".join(lines)


def acme_live_paths(layout: HostLayout) -> tuple[str, str]:
    """The certificate and key the backend's ACME client keeps live (backend/tls/certfiles.py)."""
    return f"{layout.data}/acme/live/fullchain.pem", f"{layout.data}/acme/live/privkey.pem"


def dovecot_reload_trigger(layout: HostLayout) -> str:
    """The file the backend's reload_hook touches after each new certificate; a root path unit
    watching it reloads Dovecot (the backend, unprivileged and NoNewPrivileges, cannot signal it)."""
    return f"{layout.data}/acme/dovecot.reload"


def backend_tls_tables(site: Site, layout: HostLayout) -> list[str]:
    """[acme] (or [tls] with ACME off) and the web face's [http], on the tunnel address behind the
    gateway's PROXY v2 (keys as in backend/config)."""
    if site.acme:
        lines = ["[acme]", "enabled = true", f"contact = {_q(site.contact)}",
                 *([f"directory = {_q(site.acme_directory)}"] if site.acme_directory else []),
                 'challenge = "http-01"',
                 f"reload_hook = {_q('touch ' + dovecot_reload_trigger(layout))}", ""]
    else:
        cert, key = tls_paths(layout)
        lines = ["[tls]", f"cert = {_q(cert)}", f"key = {_q(key)}", ""]
    b = site.backend_tunnel_addr
    return lines + ["[http]", "enabled = true", f'listen_http = "{b}:{site.backend_http_port}"',
                    f'listen_https = "{b}:{site.backend_https_port}"', "proxy_protocol = true",
                    f'trusted_proxies = ["{site.gateway_tunnel_addr}/32"]', ""]


DOVECOT_TLS_CONF = "homemx-tls.conf"


def dovecot_tls_conf(site: Site, layout: HostLayout) -> str:
    """Dovecot's certificate (``!include`` it): the backend's own files, so IMAPS shows what SMTP shows."""
    cert, key = acme_live_paths(layout) if site.acme else tls_paths(layout)
    how = ("the backend's ACME certificate; homemx-dovecot-reload.path reloads Dovecot after each renewal"
           if site.acme else "the backend's certificate")
    return f"# homemx: written by provisioning (provision/render.py): {how}\nssl_cert = <{cert}\nssl_key = <{key}\n"


def dovecot_reload_units(layout: HostLayout) -> dict[str, str]:
    """A path unit watching the reload trigger and the oneshot service it starts (``doveadm reload``:
    Dovecot reads its config, and so the new certificate, again; open sessions keep theirs)."""
    trigger = dovecot_reload_trigger(layout)
    return {
        "homemx-dovecot-reload.path": f"""# written by homemx provisioning
[Unit]
Description=homemx: reload Dovecot when the backend installed a new certificate

[Path]
PathChanged={trigger}

[Install]
WantedBy=paths.target
""",
        "homemx-dovecot-reload.service": """# written by homemx provisioning
[Unit]
Description=homemx: reload Dovecot for the backend's new certificate
ConditionPathExists=/usr/bin/doveadm

[Service]
Type=oneshot
ExecStart=/usr/bin/doveadm reload
""",
    }


def backend_toml(site: Site, layout: HostLayout) -> str:
    g = site.gateway_tunnel_addr
    b = site.backend_tunnel_addr
    lines = [
        "# homemx backend: written by provisioning (provision/render.py); local edits are overwritten",
        "[server]",
        f"hostname = {_q(site.hostname)}",
        f"data_dir = {_q(layout.data)}",
        *([f"metrics_listen = {_q(site.backend_metrics_listen)}"] if site.backend_metrics_listen else []),
        "",
        *backend_tls_tables(site, layout),
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
    if site.rspamd:
        lines += backend_rspamd_table()
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
# `systemctl reload homemx-backend`: the certificate, users and DKIM keys without a restart (docs/tls.md).
ExecReload=/bin/kill -HUP $MAINPID
CapabilityBoundingSet=
AmbientCapabilities=
ReadWritePaths={layout.data}
{_HARDENING}
[Install]
WantedBy=multi-user.target
"""


# ---------------------------------------------------------------- spam filtering (docs/inbound-trust.md)
# rspamd runs on the home host, bound to loopback only: the backend scans each mx message through
# the normal worker (/checkv2), and Dovecot's learning scripts train it through the controller.

RSPAMD_WORKER = "127.0.0.1:11333"      # rspamd's normal worker: the backend's scanner
RSPAMD_CONTROLLER = "127.0.0.1:11334"  # rspamd's controller: learn_spam/learn_ham, stat
RSPAMC = "/usr/bin/rspamc"             # Debian's rspamd package
RSPAMD_CONF = "/etc/rspamd/rspamd.conf"  # the package's own (never written; it includes local.d)
RSPAMD_CONFDIR = "/etc/rspamd"         # the package's LOCAL_CONFDIR: a site's changes go to its local.d


ALERT_RULES = Path(__file__).with_name("monitoring") / "homemx-alerts.yml"


def alert_rules_path(site: Site, layout: HostLayout) -> str:
    """Where the Prometheus alert rules go on the home host (site.prometheus_rules_dir under the layout's root)."""
    return layout.path(f"{site.prometheus_rules_dir.rstrip('/')}/{ALERT_RULES.name}")


def rspamd_local_files() -> dict[str, str]:
    """rspamd's files by path relative to RSPAMD_CONFDIR: homemx's settings
    (backend.auth.rspamd.rspamd_local_config, as on a real home: the system resolver, the network
    modules on, Bayes in Debian's redis-server) and the workers on loopback only (the package binds
    "localhost", which is also ::1)."""
    from backend.auth.rspamd import rspamd_local_config

    files = dict(rspamd_local_config())
    files.update({
        "local.d/worker-normal.inc": f'# homemx: written by provisioning\nbind_socket = "{RSPAMD_WORKER}";\n',
        # Learning needs no password: the controller answers write commands from secure_ip without
        # one, and it listens on loopback only, so every client it can have is on this host.
        "local.d/worker-controller.inc": (f'# homemx: written by provisioning\nbind_socket = "{RSPAMD_CONTROLLER}";\n'
                                          'secure_ip = "127.0.0.1";\n'),
        # The milter proxy is for MTAs that speak milter; the backend asks the normal worker itself.
        "local.d/worker-proxy.inc": "# homemx: written by provisioning\nenabled = false;\n",
    })
    return dict(sorted(files.items()))


def backend_rspamd_table() -> list[str]:
    """The backend's ``[rspamd]`` table (keys as in backend/config: the one place provisioning names them)."""
    return ["[rspamd]", f"url = {_q('http://' + RSPAMD_WORKER)}", 'timeout = "5s"', "fail_closed = false", ""]


# Dovecot presents the backend's Maildir++ folder ".Junk" as the special-use Junk mailbox (RFC 6154),
# and IMAPSieve (RFC 6785, Pigeonhole's imap_sieve plugin; Debian package dovecot-sieve) runs a
# script when a user moves a message into Junk (learn spam) or out of it (learn ham). The recipe is
# Dovecot's own ("Antispam with IMAPSieve"); MOVE is a COPY cause to IMAPSieve. A message deleted
# from Junk (moved to Trash) teaches nothing.
DOVECOT_JUNK_CONF = "homemx-junk.conf"
DOVECOT_LEARN_SPAM = "learn-spam.sieve"
DOVECOT_LEARN_HAM = "learn-ham.sieve"

_SIEVE_SPAM = """# homemx: a message the user moved into Junk teaches rspamd spam (docs/inbound-trust.md)
require ["vnd.dovecot.pipe", "copy", "imapsieve"];
pipe :copy "rspamd-learn-spam";
"""

_SIEVE_HAM = """# homemx: a message the user moved out of Junk teaches rspamd ham, unless it went to the Trash
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];
if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string "${mailbox}" "Trash" {
  stop;
}
pipe :copy "rspamd-learn-ham";
"""


def _learn_program(command: str, controller: str) -> str:
    # Pigeonhole pipes the message on stdin; rspamc reads it from there and asks the controller.
    return (f"#!/bin/sh\n# homemx: called by Dovecot IMAPSieve (docs/inbound-trust.md)\n"
            f"exec {RSPAMC} --connect {controller} {command}\n")


def dovecot_junk_conf(script_dir: str) -> str:
    """Dovecot config (``!include`` it, or drop it in conf.d): the Junk mailbox and learning from moves.

    ``script_dir`` holds the files of ``dovecot_junk_files`` (the Sieve scripts and the programs
    they pipe to)."""
    return f"""# homemx: written by provisioning (provision/render.py); see docs/inbound-trust.md
# The backend files spam into the Maildir++ folder .Junk; Dovecot shows it as the \\Junk mailbox.
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
}}

protocol imap {{
  mail_plugins = $mail_plugins imap_sieve
}}

plugin {{
  sieve_plugins = sieve_imapsieve sieve_extprograms
  sieve_global_extensions = +vnd.dovecot.pipe +vnd.dovecot.environment
  sieve_pipe_bin_dir = {script_dir}

  # into Junk (from anywhere): spam
  imapsieve_mailbox1_name = Junk
  imapsieve_mailbox1_causes = COPY
  imapsieve_mailbox1_before = file:{script_dir}/{DOVECOT_LEARN_SPAM}

  # out of Junk (to anywhere but the Trash): ham
  imapsieve_mailbox2_name = *
  imapsieve_mailbox2_from = Junk
  imapsieve_mailbox2_causes = COPY
  imapsieve_mailbox2_before = file:{script_dir}/{DOVECOT_LEARN_HAM}
}}
"""


def dovecot_sievec(script_dir: str) -> list[list[str]]:
    """The commands that compile the Sieve scripts ahead (argv lists). Dovecot compiles a script it
    finds uncompiled on every run, and logs an error each time it cannot save the result (the mail
    user may not write in ``script_dir``). The Junk config alone is a config sievec can load."""
    conf = f"{script_dir}/{DOVECOT_JUNK_CONF}"
    return [["sievec", "-c", conf, f"{script_dir}/{name}"] for name in (DOVECOT_LEARN_SPAM, DOVECOT_LEARN_HAM)]


def dovecot_junk_files(controller: str = RSPAMD_CONTROLLER) -> dict[str, tuple[str, int]]:
    """The files ``dovecot_junk_conf`` names, by file name: (text, mode)."""
    return {DOVECOT_LEARN_SPAM: (_SIEVE_SPAM, 0o644), DOVECOT_LEARN_HAM: (_SIEVE_HAM, 0o644),
            "rspamd-learn-spam": (_learn_program("learn_spam", controller), 0o755),
            "rspamd-learn-ham": (_learn_program("learn_ham", controller), 0o755)}
