"""Pure rendering of everything provisioning writes that holds no secret: the daemons' TOML files and the hardened systemd units.

Deterministic text (same Site → same bytes) so a second run can compare hashes and change nothing.
The daemons' files are built as dicts (the [site] keys), merged with the site's ``[gateway.extra]`` /
``[backend.extra]`` tables, checked with the daemons' own schemas (``rendered_problems``) and written
as TOML by ``toml_text``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .site import HostLayout, Site


def ifname(site: Site, layout: HostLayout) -> str:
    return layout.ifname or site.ifname


def wg_conf_path(site: Site, layout: HostLayout) -> str:
    # The file name is the interface name (wg-quick convention, see docs/wireguard.md).
    return f"{layout.etc}/wireguard/{ifname(site, layout)}.conf"


def wg_key_path(site: Site, layout: HostLayout) -> str:
    return f"{layout.etc}/wireguard/{ifname(site, layout)}.key"


def dkim_entries(site: Site, layout: HostLayout, domain: str = "") -> list[dict]:
    """The [[dkim]] keys of one domain (default: site.domain): one RSA and one Ed25519 selector, file
    names as backend.dkim.generate_key writes them."""
    d, domain = f"{layout.etc}/dkim", domain or site.domain
    return [
        {"selector": f"{site.dkim_selector}-rsa", "algorithm": "rsa",
         "private_key": f"{d}/{domain}.{site.dkim_selector}-rsa.rsa.pem"},
        {"selector": f"{site.dkim_selector}-ed25519", "algorithm": "ed25519",
         "private_key": f"{d}/{domain}.{site.dkim_selector}-ed25519.ed25519"},
    ]


def tls_paths(layout: HostLayout) -> tuple[str, str]:
    return f"{layout.etc}/tls/fullchain.pem", f"{layout.etc}/tls/privkey.pem"


# ---------------------------------------------------------------- TOML out
# No TOML writer is among homemx's dependencies (tomllib only reads); the daemons' files hold strings,
# numbers, booleans, lists and tables only, which this writes in a fixed order: a table's own keys,
# then its sub-tables and arrays of tables, in insertion order.

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_tables(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def _table_lines(path: list[str], table: dict, out: list[str], array: bool = False) -> None:
    own = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not _is_tables(v)]
    subs = [(k, v) for k, v in table.items() if isinstance(v, dict) or _is_tables(v)]
    name = ".".join(_key(k) for k in path)
    if array:
        out.append(f"[[{name}]]")
    elif path and (own or not subs):  # a table with only sub-tables needs no header of its own
        out.append(f"[{name}]")
    out += [f"{_key(k)} = {_value(v)}" for k, v in own]
    if own or array or (path and not subs):
        out.append("")
    for k, v in subs:
        if isinstance(v, dict):
            _table_lines([*path, k], v, out)
        else:
            for item in v:
                _table_lines([*path, k], item, out, array=True)


def toml_text(doc: dict, header: str = "") -> str:
    """``doc`` as TOML text (deterministic: same dict, same bytes), after ``header`` comment lines."""
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    _table_lines([], doc, out)
    return "\n".join(out)


def merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base`` (neither changed): tables key by key, arrays of tables extended,
    except that an entry whose ``name`` is already there (a [[listener]]) is merged into that one;
    any other value of ``extra`` replaces the rendered one."""
    out = dict(base)
    for k, v in extra.items():
        have = out.get(k)
        if isinstance(have, dict) and isinstance(v, dict):
            out[k] = merge(have, v)
        elif _is_tables(have) and _is_tables(v):
            items = list(have)
            for entry in v:
                at = next((i for i, e in enumerate(items) if "name" in entry and e.get("name") == entry["name"]), None)
                if at is None:
                    items.append(dict(entry))
                else:
                    items[at] = merge(items[at], entry)
            out[k] = items
        else:
            out[k] = v
    return out


_OVERWRITTEN = ("written by provisioning (provision/render.py) from site.toml on every run: edits here are "
                "overwritten.\nSet what you need in site.toml ([site] keys, or [{role}.extra]; docs/operator-guide.md).")


def _listens(site: Site, port: int) -> list[str]:
    """The gateway's public binds for a port: IPv4, and IPv6 where the VPS has a public IPv6 address."""
    return [f"0.0.0.0:{port}", *([f"[::]:{port}"] if site.gateway_public_addr6 else [])]


def gateway_config(site: Site) -> dict:
    """gateway.toml as a dict: the [site] keys, then [gateway.extra] merged in."""
    b = site.backend_tunnel_addr
    server: dict[str, Any] = {"hostname": site.hostname}
    if site.gateway_metrics_port:
        # Metrics on the tunnel address only: a Prometheus at home reaches them, the internet does not.
        server |= {"metrics_listen": f"{site.gateway_tunnel_addr}:{site.gateway_metrics_port}",
                   "tunnel_interface": ifname(site, site.gateway)}
    doc: dict[str, Any] = {"server": server}
    if site.dnsbl_zones:
        doc["dnsbl"] = {"zones": list(site.dnsbl_zones)}
    mx_extra: dict[str, Any] = {"greet_wait": site.greet_wait}
    if site.dnsbl_zones:
        mx_extra["dnsbl"] = True
    listeners = []
    for name, kind, port, up, extra in (
        ("mx", "smtp", site.smtp_port, site.backend_mx_port, mx_extra),
        ("submission", "smtp", site.submission_port, site.backend_submission_port, {"submission": True}),
        ("submissions", "smtp", site.submissions_port, site.backend_submissions_port,
         {"submission": True, "implicit_tls": True}),
        ("imaps", "tcp", site.imaps_port, site.backend_imaps_port, {}),
        # The home's web face (PROXY v2 like the rest): ACME http-01 and tls-alpn-01 reach home
        # here, and the MTA-STS policy and autoconfig are served; the gateway holds no key for it.
        ("http", "tcp", site.http_port, site.backend_http_port, {}),
        ("https", "tcp", site.https_port, site.backend_https_port, {}),
    ):
        listeners.append({"name": name, "kind": kind, "listen": _listens(site, port), "upstream": f"{b}:{up}",
                          **extra})
    doc["listener"] = listeners
    return merge(doc, site.gateway.extra)


def gateway_toml(site: Site) -> str:
    return toml_text(gateway_config(site), "homemx gateway: " + _OVERWRITTEN.format(role="gateway"))


def acme_live_paths(layout: HostLayout) -> tuple[str, str]:
    """The certificate and key the backend's ACME client keeps live (backend/tls/certfiles.py)."""
    return f"{layout.data}/acme/live/fullchain.pem", f"{layout.data}/acme/live/privkey.pem"


def dovecot_reload_trigger(layout: HostLayout) -> str:
    """The file the backend's reload_hook touches after each new certificate; a root path unit
    watching it reloads Dovecot (the backend, unprivileged and NoNewPrivileges, cannot signal it)."""
    return f"{layout.data}/acme/dovecot.reload"


DOVECOT_TLS_CONF = "homemx-tls.conf"


def dovecot_tls_conf(site: Site, layout: HostLayout) -> str:
    """Dovecot's certificate (``!include`` it): the backend's own files, so IMAPS shows what SMTP shows."""
    cert, key = acme_live_paths(layout) if site.acme else tls_paths(layout)
    how = ("the backend's ACME certificate; homemx-dovecot-reload.path reloads Dovecot after each renewal"
           if site.acme else "the backend's certificate")
    return f"# homemx: written by provisioning (provision/render.py): {how}\nssl_cert = <{cert}\nssl_key = <{key}\n"


# ---------------------------------------------------------------- Dovecot (IMAPS at home, docs/operator-guide.md)
# Provisioning owns Dovecot's whole configuration: Debian's /etc/dovecot/dovecot.conf is replaced by
# one that includes only homemx's files, so Debian's conf.d (the PAM passdb of auth-system.conf.ext,
# the imap/imaps listeners on every address) is never read. homemx keeps writing the Maildirs itself
# (backend/local/): Dovecot only serves them, and runs Sieve where it acts on mail (IMAPSieve, moves).

DOVECOT_CONF = "/etc/dovecot/dovecot.conf"  # Debian's main file (ucf-managed): the one Dovecot and doveadm read
DOVECOT_DIR = "dovecot"                     # under the layout's etc: homemx's includes and check account
DOVECOT_CHECK_USER = "check@homemx.invalid"  # IMAP-only: in Dovecot's check-passwd, not in the backend's users
DOVECOT_CHECK_PASSWD = "check-passwd"        # {BLF-CRYPT} hash of its password (root:<user> 0640)
DOVECOT_CHECK_PASSWORD = "check.password"    # the password itself (root 0600, read by `fab check` at home)
DOVECOT_PACKAGES = ("dovecot-imapd",)        # dovecot-core comes with it
DOVECOT_SIEVE_PACKAGE = "dovecot-sieve"      # Pigeonhole: IMAPSieve for the Junk learning (with rspamd)
DOVECOT_SPECIAL_USE = (("Drafts", "\\Drafts"), ("Junk", "\\Junk"), ("Sent", "\\Sent"), ("Trash", "\\Trash"))


def dovecot_conf_text(*, address: str, port: int, trusted: str, passwd: str, check_passwd: str,
                      maildir_root: str, mail_user: str, mail_group: str, includes: list[str]) -> str:
    """Dovecot's complete configuration: IMAPS only on ``address`` behind the gateway's PROXY header
    (``trusted``: the gateway's tunnel address, the only peer allowed to send one), the backend's
    passwd-file and the check account's, no system (PAM) passdb, the backend's Maildirs as
    ``mail_user``/``mail_group``, special-use folders created on first login. ``includes``: the certificate file
    (homemx-tls.conf) and, with the spam filter, the Junk/IMAPSieve file."""
    mailboxes = "".join(f"  mailbox {name} {{\n    special_use = {flag}\n    auto = subscribe\n  }}\n"
                        for name, flag in DOVECOT_SPECIAL_USE)
    passdbs = "".join(f"passdb {{\n  driver = passwd-file\n  args = scheme=BLF-CRYPT username_format=%u {path}\n}}\n"
                      for path in (passwd, check_passwd))
    return f"""# homemx: written by provisioning (provision/render.py); local edits are overwritten.
# The whole Dovecot configuration: Debian's conf.d is not included (no PAM passdb, no listener on
# every address). Mail clients reach it through the gateway's port 993 (docs/operator-guide.md).
protocols = imap
listen = {address}
# Only the gateway may send a PROXY header, and the imaps listener requires one: a connection from
# anywhere else, or without the header, is closed before TLS.
haproxy_trusted_networks = {trusted}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = {address}
    port = {port}
    ssl = yes
    haproxy = yes
  }}
}}
ssl = required
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
# The backend's users (one password for SMTP and IMAP), then the IMAP-only check account of
# `fab check`; nothing else: a system account cannot log in.
{passdbs}# The auth process (user dovecot) reads those files by the backend's group, as the backend does.
service auth {{
  extra_groups = {mail_group}
}}
# Every user's mail belongs to the backend's user, in the Maildirs it delivers to (backend/local/).
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={maildir_root}/%d/%n
}}
# The backend's user is a system user (uid under 1000); root (uid 0) is refused whatever this says.
first_valid_uid = 1
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
{mailboxes}}}
""" + "".join(f"!include {path}\n" for path in includes)


def dovecot_conf(site: Site, layout: HostLayout) -> str:
    """The provisioned DOVECOT_CONF (see dovecot_conf_text)."""
    d = f"{layout.etc}/{DOVECOT_DIR}"
    includes = [f"{d}/{DOVECOT_TLS_CONF}"] + ([f"{d}/{DOVECOT_JUNK_CONF}"] if site.rspamd else [])
    return dovecot_conf_text(address=site.backend_tunnel_addr, port=site.backend_imaps_port,
                             trusted=f"{site.gateway_tunnel_addr}/32", passwd=f"{layout.etc}/passwd",
                             check_passwd=f"{d}/{DOVECOT_CHECK_PASSWD}", maildir_root=f"{layout.data}/mail",
                             mail_user=layout.user, mail_group=layout.user, includes=includes)


DOVECOT_DROPIN = "dovecot.service.d/homemx.conf"  # under the unit dir: ordering for Debian's dovecot.service


def dovecot_service_dropin() -> str:
    """``dovecot.service.d/homemx.conf``: Dovecot listens on the tunnel address and reads the backend's
    certificate, so it starts after both; and it is started again if it exits, e.g. when it was
    started before the backend's first start made the certificate files (Debian's unit has no
    Restart=)."""
    return """# written by homemx provisioning
[Unit]
Wants=homemx-tunnel.service
After=homemx-tunnel.service homemx-backend.service

[Service]
Restart=on-failure
RestartSec=5s
"""


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


def backend_config(site: Site, layout: HostLayout) -> dict:
    """backend.toml as a dict: the [site] keys, then [backend.extra] merged in."""
    g = site.gateway_tunnel_addr
    b = site.backend_tunnel_addr
    server: dict[str, Any] = {"hostname": site.hostname, "data_dir": layout.data}
    if site.backend_metrics_listen:
        server["metrics_listen"] = site.backend_metrics_listen
    doc: dict[str, Any] = {"server": server}
    if site.acme:
        doc["acme"] = {"enabled": True, "contact": site.contact,
                       **({"directory": site.acme_directory} if site.acme_directory else {}),
                       "challenge": "http-01", "reload_hook": "touch " + dovecot_reload_trigger(layout)}
    else:
        cert, key = tls_paths(layout)
        doc["tls"] = {"cert": cert, "key": key}
    # the web face on the tunnel address behind the gateway's PROXY v2
    doc["http"] = {"enabled": True, "listen_http": f"{b}:{site.backend_http_port}",
                   "listen_https": f"{b}:{site.backend_https_port}", "proxy_protocol": True,
                   "trusted_proxies": [f"{g}/32"]}
    doc["users"] = {"passwd_file": layout.etc + "/passwd", "maildir_root": layout.data + "/mail"}
    domains: dict[str, Any] = {}
    for d in site.all_domains:
        # root: what cron, smartd and mdadm write to (homemx-sendmail root → root@<domain> on the lan
        # listener), as Debian's /etc/aliases sends root to the admin; the site's aliases may override
        domains[d] = {"aliases": {"postmaster": [site.first_user], "root": [site.first_user]}}
    for name, targets in site.aliases.items():
        local, _, d = name.rpartition("@") if "@" in name else (name, "", site.domain)
        domains[d]["aliases"][local] = list(targets)
    if site.catch_all:
        domains[site.domain]["catch_all"] = site.catch_all
    doc["domain"] = domains
    listeners = [{"name": name, "kind": name, "listen": f"{b}:{port}", "proxy_protocol": True,
                  "trusted_proxies": [f"{g}/32"]}
                 for name, port in (("mx", site.backend_mx_port), ("submission", site.backend_submission_port),
                                    ("submissions", site.backend_submissions_port))]
    if site.lan_listen:
        listeners.append({"name": "lan", "kind": "lan", "listen": site.lan_listen,
                          "trusted_networks": list(site.lan_trusted_networks)})
    doc["listener"] = listeners
    doc["dkim"] = [{"domain": d, **e} for d in site.all_domains for e in dkim_entries(site, layout, d)]
    delivery: dict[str, Any] = {"source_address": b}
    if site.smarthost:
        delivery["smarthost"] = site.smarthost
        if site.smarthost_hostname:
            delivery["smarthost_hostname"] = site.smarthost_hostname
        if site.smarthost_username:
            delivery |= {"smarthost_username": site.smarthost_username,
                         "smarthost_password_file": layout.path(site.smarthost_password_file)}
    doc["delivery"] = delivery
    doc["gateway"] = {"public_ipv4": [site.gateway_public_addr],
                      **({"public_ipv6": [site.gateway_public_addr6]} if site.gateway_public_addr6 else {})}
    dns = {**({"dmarc_rua": site.dmarc_rua} if site.dmarc_rua else {}),
           **({"mta_sts_mode": site.mta_sts_mode} if site.mta_sts_mode else {})}
    if dns:
        doc["dns"] = dns
    if site.rspamd:
        doc["rspamd"] = backend_rspamd_config()
    return merge(doc, site.backend.extra)


def backend_toml(site: Site, layout: HostLayout) -> str:
    return toml_text(backend_config(site, layout), "homemx backend: " + _OVERWRITTEN.format(role="backend"))


def rendered_problems(site: Site) -> list[tuple[str, str]]:
    """What the daemons' own schemas find wrong in the gateway.toml and backend.toml this site
    renders, as (site key, reason): a typo in [backend.extra] is found on the operator's machine,
    before anything is built or uploaded. Files the config names live on the host and are checked
    there (``config check`` before a restart), so "cannot read" is not a problem here."""
    from backend.config import ConfigError as BackendConfigError
    from backend.config import config_from_dict as backend_check
    from gateway.config import ConfigError as GatewayConfigError
    from gateway.config import config_from_dict as gateway_check

    problems = []
    for role, build, check, error in (
            ("gateway", lambda: gateway_config(site), gateway_check, GatewayConfigError),
            ("backend", lambda: backend_config(site, site.backend), backend_check, BackendConfigError)):
        try:
            check(build(), Path(f"/nonexistent/{role}.toml"))
        except error as e:
            extra = getattr(site, role).extra
            for key, reason in e.problems:
                if reason.startswith("cannot read "):
                    continue
                top = re.split(r"[.\[]", key, maxsplit=1)[0].strip('"')
                problems.append((f"{role}.extra.{key}", reason) if top in extra else
                                (f"site ({role}.toml {key})", reason))
    return problems


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


def backend_rspamd_config() -> dict:
    """The backend's ``[rspamd]`` table (keys as in backend/config: the one place provisioning names them)."""
    return {"url": "http://" + RSPAMD_WORKER, "timeout": "5s", "fail_closed": False}


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
