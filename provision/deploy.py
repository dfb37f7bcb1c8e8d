"""Provisioning logic over SSH (Fabric connections): packages, user, venv from an uploaded wheelhouse, configs, keys, units, restarts, post-deploy check.

Every item is compared before it is written and reported as changed / unchanged / would change
(dry run); a service restarts only when something it reads changed. Secrets are made on their own
host by provision.hostside; only public keys travel between hosts. ``Remote`` records every upload,
command and reply so tests can prove no private key ever crossed the wire.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import render
from . import wheels as wheel_resolver
from .site import HostLayout, Site

PACKAGES = ("wireguard-tools", "nftables", "python3-venv")
# Home host only, unless the site turns rspamd off. rspamd keeps its Bayes statistics (what it
# learns from moves to and out of Junk) in Redis: Debian's redis-server listens on loopback only.
SPAM_FILTER_PACKAGES = ("rspamd", "redis-server")
USERSPACE_WG_PACKAGE = "wireguard-go"  # where the kernel has no WireGuard module


class ProvisionError(RuntimeError):
    """A step that failed on a host; ``str()`` is one line: ``ROLE (SSH): STEP: REASON``."""

    def __init__(self, message: str, role: str = "", host: str = "", step: str = ""):
        self.role, self.host, self.step, self.reason = role, host, step, " ".join(message.split())
        where = f"{role} ({host})" if host else role
        super().__init__(": ".join(x for x in (where, step, self.reason) if x))


# What reaching a host can raise below Fabric: paramiko's own errors, sockets (refused, unreachable,
# timeout, name resolution), and invoke's when a command cannot be started at all.
def _transport_errors() -> tuple[type[BaseException], ...]:
    import invoke.exceptions
    import paramiko

    return (OSError, EOFError, paramiko.SSHException, invoke.exceptions.Failure, invoke.exceptions.ThreadException)


def transport_reason(e: BaseException) -> str:
    """One line for a connection failure: paramiko's "Unable to connect to port 22 on 127.0.0.1"
    wraps the socket errors that say why (refused, unreachable); those are what a person can act on."""
    errors = getattr(e, "errors", None)  # paramiko.ssh_exception.NoValidConnectionsError
    if isinstance(errors, dict) and errors:
        e = next(iter(errors.values()))
    return " ".join(str(e).split()) or type(e).__name__


@dataclass
class Report:
    """What a run did, per host and item, and which services it restarted (or would)."""

    items: list[tuple[str, str, str]] = field(default_factory=list)
    restarts: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (host, path, unified diff of what is there → what provisioning writes); a secret's is never shown
    diffs: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, host: str, item: str, status: str) -> str:
        self.items.append((host, item, status))
        return status

    @property
    def changed(self) -> list[tuple[str, str, str]]:
        return [i for i in self.items if i[2] != "unchanged"]

    def text(self) -> str:
        lines = [f"{h:<8} {item:<40} {st}" for h, item, st in self.items]
        for h, path, diff in self.diffs:
            lines += [f"{h:<8} diff {path}", *diff.splitlines()]
        lines += [f"{h:<8} restart {svc}" for h, svc in self.restarts]
        lines += self.notes
        lines.append("nothing changed" if not self.changed and not self.restarts else
                     f"{len(self.changed)} item(s) changed, {len(self.restarts)} restart(s)")
        return "\n".join(lines)


class Remote:
    """One host: a Fabric connection, its layout, and a record of everything sent and received."""

    def __init__(self, conn, layout: HostLayout, role: str, report: Report, dry_run: bool = False):
        self.conn, self.layout, self.role, self.report, self.dry_run = conn, layout, role, report, dry_run
        self.uploads: list[bytes] = []
        self.commands: list[str] = []
        self.replies: list[str] = []
        self.touched: set[str] = set()  # items that changed on this run (drives restarts)
        self.step = "connect"  # what is being done, for the one-line error when it fails

    def error(self, reason: str) -> ProvisionError:
        return ProvisionError(reason, self.role, self.layout.ssh, self.step)

    def _run(self, cmd: str):
        self.commands.append(cmd)
        try:
            r = self.conn.run(cmd, hide=True, warn=True, in_stream=False)
        except _transport_errors() as e:
            raise self.error(transport_reason(e)) from None
        self.replies.append(r.stdout + r.stderr)
        return r

    def run(self, cmd: str, check: bool = True) -> str:
        r = self._run(cmd)
        if check and r.exited != 0:
            raise self.error(f"`{cmd}` failed ({r.exited}): {(r.stderr or r.stdout).strip()}")
        return r.stdout if r.exited == 0 else ""

    def ok(self, cmd: str) -> bool:
        return self._run(cmd).exited == 0

    def upload(self, data: bytes, path: str) -> None:
        self.uploads.append(data)
        try:
            self.conn.put(io.BytesIO(data), path)
        except _transport_errors() as e:
            raise self.error(f"upload {path}: {transport_reason(e)}") from None

    def mark(self, item: str, status: str) -> str:
        self.step = item
        self.report.add(self.role, item, status)
        if status != "unchanged":
            self.touched.add(item)
        return status

    def ensure_dir(self, path: str, mode: int, owner: str, group: str) -> str:
        self.step = path
        cur = self.run(f"stat -c '%a %U %G' {shlex.quote(path)}", check=False).strip()
        if cur == f"{mode:o} {owner} {group}":
            return self.mark(path, "unchanged")
        if not self.dry_run:
            self.run(f"install -d -m {mode:o} -o {owner} -g {group} {shlex.quote(path)}")
        return self.mark(path, "would change" if self.dry_run else "changed")

    def ensure_file(self, path: str, data: bytes, mode: int, owner: str, group: str, item: str | None = None,
                    secret: bool | None = None) -> str:
        """Upload only when the content hash or mode/owner differs (never for secrets: those stay host-side).

        When the content differs from a file already there, the report holds a unified diff of it
        (a hand edit shows, dry run or not) — except for a secret (by default: a file only its owner
        may read), which says "secret, not shown" and whose content is never read back."""
        q = shlex.quote(path)
        item = item or path
        self.step = item
        cur = self.run(f"sha256sum {q} && stat -c '%a %U %G' {q}", check=False).split()
        want = [hashlib.sha256(data).hexdigest(), path, f"{mode:o}", owner, group]
        if cur == want:
            return self.mark(item, "unchanged")
        if cur and cur[0] != want[0]:
            self.report.diffs.append((self.role, path, self._diff(path, data, mode & 0o077 == 0 if secret is None
                                                                  else secret)))
        if not self.dry_run:
            tmp = f"{path}.homemx-tmp"
            if not cur or cur[0] != want[0]:
                self.upload(data, tmp)
            else:
                self.run(f"cp -p {q} {shlex.quote(tmp)}")
            self.run(f"chown {owner}:{group} {shlex.quote(tmp)} && chmod {mode:o} {shlex.quote(tmp)}"
                     f" && mv -f {shlex.quote(tmp)} {q}")
        return self.mark(item, "would change" if self.dry_run else "changed")

    def _diff(self, path: str, data: bytes, secret: bool) -> str:
        if secret:
            return "secret, not shown"
        try:
            new = data.decode()
            old = self.run(f"cat {shlex.quote(path)}")
        except (UnicodeDecodeError, ProvisionError):
            return "binary or unreadable, not shown"
        return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                            f"{path} (on {self.role})", f"{path} (from site.toml)"))

    def hostside(self, action: str, **req) -> dict:
        """Run a provision.hostside action with the host's venv Python; only public results come back."""
        self.step = action
        req.update(action=action, dry_run=self.dry_run)
        py = f"{self.layout.venv}/bin/python"
        if self.dry_run and not self.ok(f"test -x {py}"):
            return {}
        out = self.run(f"{py} -m provision.hostside {shlex.quote(json.dumps(req))}")
        return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- the wheels (operator side)
# provision/wheels.py: homemx's own wheel, built on the operator's machine, and for each host the
# dependency wheels for that host's own python3 and platform (host_wheels below asks the host).


# ---------------------------------------------------------------- steps on every host

def ensure_packages(r: Remote) -> None:
    """System packages, checked with dpkg-query first: nothing installed is installed again."""
    pkgs = list(PACKAGES)
    # no kernel module (containers, some VPSes, this lab): the userspace implementation
    if not r.ok("modinfo wireguard >/dev/null 2>&1 || test -d /sys/module/wireguard"):
        pkgs.append(USERSPACE_WG_PACKAGE)
    install_missing(r, pkgs)


def install_missing(r: Remote, pkgs: list[str] | tuple[str, ...]) -> str:
    """Install whichever of ``pkgs`` dpkg does not list as installed; one report item either way
    (its name is returned)."""
    probe = "; ".join(f"dpkg-query -W -f='${{Status}}' {p} 2>/dev/null | grep -q 'ok installed' || echo {p}"
                      for p in pkgs)
    r.step = "packages " + " ".join(pkgs)
    missing = r.run(probe, check=False).split()
    if not missing:
        r.mark("packages " + " ".join(pkgs), "unchanged")
        return "packages " + " ".join(pkgs)
    if r.layout.install_packages and not r.dry_run:
        # UCF_FORCE_CONFFOLD: a config file provisioning wrote before the package (Dovecot's
        # dovecot.conf, managed by ucf) is kept, not replaced by the package's and started with it.
        r.run("DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
              "UCF_FORCE_CONFFOLD=1 apt-get install -y -qq --no-install-recommends " + " ".join(missing))
    r.mark("packages " + " ".join(missing), "would change" if r.dry_run or not r.layout.install_packages else "changed")
    return "packages " + " ".join(missing)


def ensure_user(r: Remote) -> None:
    u = r.layout.user
    r.step = f"user {u}"
    if r.ok(f"id -u {u}"):
        r.mark(f"user {u}", "unchanged")
        return
    if not r.dry_run:
        r.run(f"useradd --system --user-group --no-create-home --home-dir {shlex.quote(r.layout.data)} "
              f"--shell /usr/sbin/nologin {u}")
    r.mark(f"user {u}", "would change" if r.dry_run else "changed")


def host_wheels(r: Remote, wheels) -> tuple[str, list[Path]] | None:
    """The wheels this host installs and its tag: ``wheels`` is a provision.wheels.HostWheels (resolved
    for the host's own python3 and platform, asked over SSH) or a plain list (installed as given).
    None in a dry run on a host that has no python3 yet (the packages step would bring it)."""
    if isinstance(wheels, (list, tuple)):
        return "as given", list(wheels)
    r.step = "wheels for this host's python3"
    try:
        py, files = wheels.for_host(r.run, "")
    except ProvisionError:
        if r.dry_run:
            return None
        raise
    except wheel_resolver.WheelError as e:
        raise r.error(str(e)) from None
    return py.tag, files


def ensure_venv(r: Remote, wheels) -> None:
    """Upload changed wheels (resolved for this host: host_wheels), then (re)install only when the
    set of wheels changed; a venv of another Python version than the host's python3 is made anew."""
    lay = r.layout
    resolved = host_wheels(r, wheels)
    if resolved is None:
        r.mark("venv", "would change")
        return
    tag, wheels = resolved
    wh = str(Path(lay.venv).parent / "wheelhouse")
    r.ensure_dir(str(Path(lay.venv).parent), 0o755, "root", "root")
    r.ensure_dir(wh, 0o755, "root", "root")
    # one round trip for every wheel's hash; upload only the ones that differ
    have = {}
    for line in r.run(f"cd {shlex.quote(wh)} 2>/dev/null && sha256sum -- *.whl", check=False).splitlines():
        digest, _, name = line.partition("  ")
        have[name] = digest
    stale = [w for w in wheels if have.get(w.name) != hashlib.sha256(w.read_bytes()).hexdigest()]
    extra = sorted(set(have) - {w.name for w in wheels})
    if not r.dry_run:
        for w in stale:
            r.upload(w.read_bytes(), f"{wh}/{w.name}")
        if extra:
            r.run("rm -f " + " ".join(shlex.quote(f"{wh}/{n}") for n in extra))
    r.mark(f"wheelhouse ({len(wheels)} wheels, {tag})",
           "unchanged" if not stale and not extra else "would change" if r.dry_run else "changed")
    stamp_text = "\n".join(sorted(f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}" for w in wheels)) + "\n"
    stamp = f"{lay.venv}/.homemx-wheels"
    if r.run(f"cat {shlex.quote(stamp)}", check=False) == stamp_text and r.ok(f"test -x {lay.venv}/bin/homemx-backend"):
        r.mark("venv", "unchanged")
        return
    if not r.dry_run:
        homemx = next(w.name for w in wheels if w.name.startswith("homemx-"))
        version = "import sys; print(*sys.version_info[:2])"
        venv_py = f"{lay.venv}/bin/python"
        if not r.ok(f"test -x {venv_py}"):
            r.run(f"python3 -m venv {shlex.quote(lay.venv)}")
        elif r.run(f"{venv_py} -c {shlex.quote(version)}", check=False) != r.run(f"python3 -c {shlex.quote(version)}"):
            r.run(f"python3 -m venv --clear {shlex.quote(lay.venv)}")  # the host's python3 changed (an upgrade)
        r.run(f"{lay.venv}/bin/pip install -q --no-index --find-links {wh} --force-reinstall {wh}/{homemx}")
        r.upload(stamp_text.encode(), stamp)
    r.mark("venv", "would change" if r.dry_run else "changed")


def base(r: Remote, wheels: list[Path]) -> None:
    lay = r.layout
    ensure_packages(r)
    ensure_user(r)
    r.ensure_dir(lay.etc, 0o750, "root", lay.user)
    r.ensure_dir(f"{lay.etc}/wireguard", 0o700, "root", "root")
    ensure_venv(r, wheels)


def tunnel_public_key(r: Remote, site: Site) -> str | None:
    """Make this host's WireGuard key on the host (if absent) and return its PUBLIC key only."""
    res = r.hostside("tunnel_key", key_file=render.wg_key_path(site, r.layout))
    r.mark("wireguard key", res.get("key", "would change"))
    return res.get("public_key")


# ---------------------------------------------------------------- roles

def _units(r: Remote, files: dict[str, str]) -> None:
    r.ensure_dir(r.layout.units, 0o755, "root", "root")
    for sub in sorted({name.rsplit("/", 1)[0] for name in files if "/" in name}):  # drop-in directories
        r.ensure_dir(f"{r.layout.units}/{sub}", 0o755, "root", "root")
    for name, text in files.items():
        r.ensure_file(f"{r.layout.units}/{name}", text.encode(), 0o644, "root", "root", item=f"unit {name}")


def deploy_gateway(r: Remote, site: Site, wheels: list[Path], backend_public_key: str | None,
                   prepared: bool = False) -> None:
    """The VPS end. ``prepared``: base() and the key were already done by deploy_both."""
    lay = r.layout
    if not prepared:
        base(r, wheels)
        tunnel_public_key(r, site)
    if r.ensure_file(f"{lay.etc}/gateway.toml", render.gateway_toml(site).encode(), 0o640, "root", lay.user,
                     item="gateway.toml") == "changed":
        r.run(f"{lay.venv}/bin/homemx-gateway config check -c {lay.etc}/gateway.toml")
    commands_on_path(r, site)
    if backend_public_key:
        res = r.hostside("tunnel_config", role="gateway", key_file=render.wg_key_path(site, lay),
                         conf_file=render.wg_conf_path(site, lay), peer_public_key=backend_public_key,
                         address=f"{site.gateway_tunnel_addr}/{site.tunnel_prefixlen}", listen_port=site.wg_port,
                         public_if=site.gateway_public_if, public_addr=site.gateway_public_addr,
                         peer_address=site.backend_tunnel_addr)
        r.mark("wireguard conf", res.get("conf", "would change"))
        r.mark("egress rules", res.get("egress", "would change"))
    elif r.dry_run:
        r.mark("wireguard conf", "would change")
        r.mark("egress rules", "would change")
    else:
        r.report.notes.append("gateway: no backend public key yet: tunnel file not written (use the `both` task)")
    _units(r, {"homemx-tunnel.service": render.tunnel_unit(site, lay, "gateway"),
               "homemx-gateway.service": render.gateway_unit(site, lay)})
    _restart(r, {"homemx-tunnel.service": ("wireguard conf", "egress rules", "wireguard key",
                                           "unit homemx-tunnel.service", "venv"),
                 "homemx-gateway.service": ("gateway.toml", "unit homemx-gateway.service", "venv")})


def deploy_backend(r: Remote, site: Site, wheels: list[Path], gateway_public_key: str | None,
                   tls_cert: bytes | None = None, tls_key: bytes | None = None, prepared: bool = False) -> list[str]:
    """The home end. Returns the DKIM TXT lines to publish (public)."""
    lay = r.layout
    if not prepared:
        base(r, wheels)
        tunnel_public_key(r, site)
    r.ensure_dir(lay.data, 0o750, lay.user, lay.user)
    r.ensure_dir(f"{lay.etc}/dkim", 0o750, "root", lay.user)
    r.ensure_dir(f"{lay.etc}/tls", 0o750, "root", lay.user)
    if gateway_public_key:
        host, port = site.endpoint, site.wg_port
        res = r.hostside("tunnel_config", role="backend", key_file=render.wg_key_path(site, lay),
                         conf_file=render.wg_conf_path(site, lay), peer_public_key=gateway_public_key,
                         address=f"{site.backend_tunnel_addr}/{site.tunnel_prefixlen}",
                         endpoint_host=host, endpoint_port=port)
        r.mark("wireguard conf", res.get("conf", "would change"))
    elif r.dry_run:
        r.mark("wireguard conf", "would change")
    else:
        r.report.notes.append("backend: no gateway public key yet: tunnel file not written (use the `both` task)")
    # DKIM: generated here, at home; only the TXT records come back
    # one hostside call per mail domain (site.domains adds domains); one report item for them all
    results = [r.hostside("dkim_keys", domain=d, keys=render.dkim_entries(site, lay, d)) for d in site.all_domains]
    res = {"keys": next((x.get("keys", "would change") for x in results if x.get("keys", "would change") != "unchanged"),
                        "unchanged"),
           "records": [line for x in results for line in x.get("records", [])]}
    if r.mark("dkim keys", res["keys"]) == "changed":
        for e in (e for d in site.all_domains for e in render.dkim_entries(site, lay, d)):
            r.run(f"chown {lay.user}:{lay.user} {shlex.quote(e['private_key'])} && chmod 600 {shlex.quote(e['private_key'])}")
    # With ACME (the default) the backend obtains its certificate itself, at home, and serves a
    # self-signed placeholder until the first one is issued: nothing to make here.
    cert, key = render.tls_paths(lay)
    if not site.acme and tls_cert is not None and tls_key is not None:
        # the user's own certificate: the one secret the operator brings, so it is uploaded (0600)
        r.ensure_file(cert, tls_cert, 0o644, "root", lay.user, item="tls certificate")
        r.ensure_file(key, tls_key, 0o600, lay.user, lay.user, item="tls key")
    elif not site.acme:
        if r.mark("tls certificate", r.hostside("tls_selfsigned", cert=cert, key=key, hostname=site.hostname)
                  .get("tls", "would change")) == "changed":
            r.run(f"chown {lay.user}:{lay.user} {shlex.quote(key)} && chmod 600 {shlex.quote(key)}")
    conf_status = r.ensure_file(f"{lay.etc}/backend.toml", render.backend_toml(site, lay).encode(), 0o640, "root",
                                lay.user, item="backend.toml")
    passwd = f"{lay.etc}/passwd"
    if r.mark("first user " + site.first_user,
              r.hostside("first_user", passwd_file=passwd, address=site.first_user,
                         password_file=f"{lay.etc}/first-user.password").get("user", "would change")) == "changed":
        r.run(f"chown root:{lay.user} {passwd} && chmod 640 {passwd}")
    if conf_status == "changed":
        # validated on the host, against the files it names, before anything restarts
        r.step = "backend.toml"
        r.run(f"{lay.venv}/bin/homemx-backend config check -c {lay.etc}/backend.toml")
    sendmail_link(r)
    commands_on_path(r, site)
    rspamd_inputs = spam_filter(r) if site.rspamd else ()
    if site.prometheus_rules_dir:
        alert_rules(r, site)
    dovecot_inputs = dovecot(r, site)
    _units(r, {"homemx-tunnel.service": render.tunnel_unit(site, lay, "backend"),
               "homemx-backend.service": render.backend_unit(site, lay),
               **render.dovecot_reload_units(lay),
               render.DOVECOT_DROPIN: render.dovecot_service_dropin()})
    _restart(r, {"rspamd.service": rspamd_inputs,
                 "homemx-dovecot-reload.path": ("unit homemx-dovecot-reload.path", "unit homemx-dovecot-reload.service"),
                 "homemx-tunnel.service": ("wireguard conf", "wireguard key", "unit homemx-tunnel.service", "venv"),
                 "homemx-backend.service": ("backend.toml", "dkim keys", "tls certificate", "tls key",
                                            "unit homemx-backend.service", "venv", "homemx-tunnel.service"),
                 # after the backend: Dovecot reads the certificate files the backend makes
                 "dovecot.service": (*dovecot_inputs, "tls certificate", "tls key", f"unit {render.DOVECOT_DROPIN}",
                                     "homemx-tunnel.service")})
    return res.get("records", [])


SENDMAIL = "/usr/sbin/sendmail"


def sendmail_link(r: Remote) -> None:
    """/usr/sbin/sendmail → the venv's homemx-sendmail, for cron, smartd, mdadm and NAS tools
    (docs/operator-guide.md, Homelab apps): made only where nothing is there, or moved when it is
    already a link to a homemx-sendmail. Another MTA's sendmail (Postfix, Exim, msmtp...) is never
    replaced: the report says so."""
    link, target = r.layout.path(SENDMAIL), f"{r.layout.venv}/bin/homemx-sendmail"
    q = shlex.quote(link)
    current = r.run(f"readlink -- {q}", check=False).strip()
    if current == target:
        r.mark(SENDMAIL, "unchanged")
        return
    ours = current.endswith("/homemx-sendmail")
    if not ours and r.ok(f"test -e {q} || test -L {q}"):
        what = f"a link to {current}" if current else "a file"
        r.report.notes.append(f"{r.role}: {SENDMAIL} is {what} (another MTA's): left alone; homelab tools can "
                              f"run {r.layout.venv_dir}/bin/homemx-sendmail instead")
        return
    if not r.dry_run:
        # -n with -f replaces only our own old link; without ours, plain ln -s never overwrites
        r.run(f"mkdir -p {shlex.quote(link.rsplit('/', 1)[0])} && "
              f"ln -s{'fn' if ours else ''} -- {shlex.quote(target)} {q}")
    r.mark(SENDMAIL, "would change" if r.dry_run else "changed")


BIN_DIR = "/usr/local/bin"
PATHS_FILE = "homemx-paths.json"  # read by backend/cli/run.py and wireguard/cli.py


def commands_on_path(r: Remote, site: Site) -> None:
    """The README's commands as written on this host (issue 15.9): ``homemx-backend`` (home) or
    ``homemx-gateway`` (VPS) in /usr/local/bin as a link to the venv's console script, and the venv's
    homemx-paths.json naming this host's config and tunnel file, which the commands use without -c.
    A file of that name that is not a link to a homemx script is never replaced: the report says so."""
    lay, name = r.layout, f"homemx-{r.role}"
    paths = {f"{r.role}_config": f"{lay.etc}/{r.role}.toml", "tunnel_config": render.wg_conf_path(site, lay)}
    r.ensure_file(f"{lay.venv}/{PATHS_FILE}", (json.dumps(paths, indent=2) + "\n").encode(), 0o644, "root", "root",
                  item="command defaults")
    link, target = lay.path(f"{BIN_DIR}/{name}"), f"{lay.venv}/bin/{name}"
    q = shlex.quote(link)
    current = r.run(f"readlink -- {q}", check=False).strip()
    item = f"{BIN_DIR}/{name}"
    if current == target:
        r.mark(item, "unchanged")
        return
    ours = current.endswith(f"/{name}")  # ours from an earlier venv place
    if not ours and r.ok(f"test -e {q} || test -L {q}"):
        what = f"a link to {current}" if current else "a file"
        r.report.notes.append(f"{r.role}: {item} is {what}, not ours: left alone; run {lay.venv_dir}/bin/{name}")
        return
    if not r.dry_run:
        r.run(f"mkdir -p {shlex.quote(link.rsplit('/', 1)[0])} && ln -s{'fn' if ours else ''} -- {shlex.quote(target)} {q}")
    r.mark(item, "would change" if r.dry_run else "changed")


def alert_rules(r: Remote, site: Site) -> None:
    """The Prometheus alert rules (provision/monitoring/homemx-alerts.yml) into the operator's rules directory.

    Prometheus is the operator's: we neither change its directory's mode nor reload it (the report
    says a reload is due)."""
    path = render.alert_rules_path(site, r.layout)
    rules_dir = shlex.quote(path.rsplit("/", 1)[0])
    if not r.dry_run and not r.ok(f"test -d {rules_dir}"):
        r.run(f"install -d -m 755 {rules_dir}")
    if r.ensure_file(path, render.ALERT_RULES.read_bytes(), 0o644, "root", "root", item="prometheus rules") == "changed":
        r.report.notes.append(f"backend: alert rules updated in {path}: reload Prometheus (systemctl reload prometheus)")


def spam_filter(r: Remote) -> tuple[str, ...]:
    """rspamd (Debian's package) with homemx's local.d settings, both workers on loopback only; and the
    Dovecot files for the Junk folder and learning from moves (docs/inbound-trust.md).

    The rspamd files go to the package's own local.d (under the layout's root); the settings are
    checked on the host with ``rspamadm configtest`` before rspamd restarts. The Dovecot side (Junk
    folder, learning from moves) is written by dovecot(). Returns the report items rspamd reads (a
    change restarts it)."""
    lay = r.layout
    packages = install_missing(r, SPAM_FILTER_PACKAGES)
    if lay.systemctl:
        # homemx writes nothing Redis reads: it only has to run (the package enables it, unless
        # installed with service starts forbidden, or disabled since)
        if r.ok("systemctl is-enabled -q redis-server && systemctl is-active -q redis-server"):
            r.mark("redis-server running", "unchanged")
        else:
            if not r.dry_run:
                r.run("systemctl enable -q --now redis-server")
            r.mark("redis-server running", "would change" if r.dry_run else "changed")
    confdir = lay.path(render.RSPAMD_CONFDIR)
    files = render.rspamd_local_files()
    for d in sorted({str(Path(rel).parent) for rel in files}):
        r.ensure_dir(f"{confdir}/{d}", 0o755, "root", "root")
    statuses = [r.ensure_file(f"{confdir}/{rel}", text.encode(), 0o644, "root", "root", item=f"rspamd {rel}")
                for rel, text in files.items()]
    if "changed" in statuses:
        # the package's rspamd.conf reads local.d under LOCAL_CONFDIR: check it with what was written
        r.run(f"rspamadm --var=LOCAL_CONFDIR={shlex.quote(confdir)} configtest -c {render.RSPAMD_CONF}")
    return (packages, *(f"rspamd {rel}" for rel in files))


def dovecot(r: Remote, site: Site) -> tuple[str, ...]:
    """Dovecot at home (IMAPS behind the gateway): its whole configuration (Debian's dovecot.conf
    replaced by provisioning's, see render.dovecot_conf), the certificate include, the IMAP-only
    check account made on this host, the packages, and (with the spam filter) the Junk/IMAPSieve
    files. The configuration is written BEFORE the packages are installed, so the package's
    postinst never starts Debian's stock one (every address, PAM). Checked with ``doveconf`` on the
    host once the certificate it names exists. Returns the report items Dovecot reads."""
    lay = r.layout
    d = f"{lay.etc}/{render.DOVECOT_DIR}"
    conf = lay.path(render.DOVECOT_CONF)
    r.ensure_dir(d, 0o755, "root", "root")
    r.ensure_dir(conf.rsplit("/", 1)[0], 0o755, "root", "root")
    statuses = [r.ensure_file(conf, render.dovecot_conf(site, lay).encode(), 0o644, "root", "root",
                              item="dovecot.conf")]
    statuses.append(dovecot_tls(r, site))
    statuses.append(r.mark("imap check account", r.hostside(
        "imap_check_account", user=render.DOVECOT_CHECK_USER, group=lay.user,
        passwd_file=f"{d}/{render.DOVECOT_CHECK_PASSWD}",
        password_file=f"{d}/{render.DOVECOT_CHECK_PASSWORD}").get("account", "would change")))
    packages = install_missing(r, render.DOVECOT_PACKAGES + ((render.DOVECOT_SIEVE_PACKAGE,) if site.rspamd else ()))
    inputs = [packages, "dovecot.conf", f"dovecot {render.DOVECOT_TLS_CONF}"]
    if site.rspamd:
        dovecot_junk(r)
        inputs += [f"dovecot {render.DOVECOT_JUNK_CONF}", "dovecot sieve binaries",
                   *(f"dovecot {name}" for name in render.dovecot_junk_files())]
    cert = (render.acme_live_paths(lay) if site.acme else render.tls_paths(lay))[0]
    if not r.dry_run and r.touched & set(inputs) and r.ok("command -v doveconf >/dev/null"):
        if r.ok(f"test -f {shlex.quote(cert)}"):
            r.step = "dovecot.conf"
            r.run(f"doveconf -n -c {shlex.quote(conf)} >/dev/null")
        else:
            r.report.notes.append(f"backend: {conf} not checked yet: {cert} is made at the backend's first start")
    return tuple(inputs)


def dovecot_tls(r: Remote, site: Site) -> str:
    """Dovecot's certificate include (<etc>/dovecot/homemx-tls.conf): the backend's ACME files (or
    [tls] files); a renewal reaches Dovecot through the reload path unit."""
    d = f"{r.layout.etc}/dovecot"
    r.ensure_dir(d, 0o755, "root", "root")
    return r.ensure_file(f"{d}/{render.DOVECOT_TLS_CONF}", render.dovecot_tls_conf(site, r.layout).encode(), 0o644,
                         "root", "root", item=f"dovecot {render.DOVECOT_TLS_CONF}")


def dovecot_junk(r: Remote) -> None:
    """The Junk folder and learning files for Dovecot in <etc>/dovecot, and their Sieve
    scripts compiled where Pigeonhole's sievec is installed (dovecot-sieve; else a note says so)."""
    junk = f"{r.layout.etc}/dovecot"
    r.ensure_dir(junk, 0o755, "root", "root")
    statuses = [r.ensure_file(f"{junk}/{name}", text.encode(), mode, "root", "root", item=f"dovecot {name}")
                for name, (text, mode) in render.dovecot_junk_files().items()]
    statuses.append(r.ensure_file(f"{junk}/{render.DOVECOT_JUNK_CONF}", render.dovecot_junk_conf(junk).encode(),
                                  0o644, "root", "root", item=f"dovecot {render.DOVECOT_JUNK_CONF}"))
    commands = render.dovecot_sievec(junk)
    binaries = [shlex.quote(argv[-1].removesuffix(".sieve") + ".svbin") for argv in commands]
    if set(statuses) == {"unchanged"} and r.ok("test -f " + " -a -f ".join(binaries)):
        r.mark("dovecot sieve binaries", "unchanged")
        return
    if not r.ok("command -v sievec >/dev/null"):
        r.report.notes.append("backend: sievec not found (install dovecot-sieve): Junk learning scripts not compiled")
        return
    if not r.dry_run:
        for argv in commands:
            r.run(shlex.join(argv))
    r.mark("dovecot sieve binaries", "would change" if r.dry_run else "changed")


def _restart(r: Remote, deps: dict[str, tuple[str, ...]]) -> None:
    """Restart (in order) only the services whose inputs changed; a restarted tunnel restarts its dependents."""
    if any(i.startswith("unit ") for i in r.touched) and r.layout.systemctl and not r.dry_run:
        r.run("systemctl daemon-reload")
    for svc, inputs in deps.items():
        if not (r.touched & set(inputs)):
            continue
        r.report.restarts.append((r.role, svc))
        r.touched.add(svc)
        r.step = f"restart {svc}"
        if r.layout.systemctl and not r.dry_run:
            r.run(f"systemctl enable -q {svc} && systemctl restart {svc}")


def deploy_both(site: Site, gw_conn, be_conn, wheels: list[Path], dry_run: bool = False,
                tls_cert: bytes | None = None, tls_key: bytes | None = None) -> tuple[Report, Remote, Remote, list[str]]:
    """Gateway then backend, exchanging only the two WireGuard PUBLIC keys."""
    report = Report()
    g = Remote(gw_conn, site.gateway, "gateway", report, dry_run)
    b = Remote(be_conn, site.backend, "backend", report, dry_run)
    # keys first, each on its own host, so each side's tunnel file can name its peer
    base(g, wheels)
    base(b, wheels)
    g_pub = tunnel_public_key(g, site)
    b_pub = tunnel_public_key(b, site)
    deploy_gateway(g, site, wheels, b_pub, prepared=True)
    records = deploy_backend(b, site, wheels, g_pub, tls_cert, tls_key, prepared=True)
    return report, g, b, records


def connection(layout: HostLayout):
    """A Fabric connection to a host of the site file (its ssh target, optional ProxyCommand and key)."""
    from fabric import Connection

    # a host that drops SSH fails within this many seconds instead of hanging the run
    kw: dict = {"connect_timeout": CONNECT_TIMEOUT}
    if layout.ssh_proxy:
        kw["gateway"] = layout.ssh_proxy
    if layout.ssh_key:
        kw["connect_kwargs"] = {"key_filename": layout.ssh_key}
    return Connection(layout.ssh, **kw)


CONNECT_TIMEOUT = 15


def reachable(conn, layout: HostLayout, role: str) -> None:
    """Open the SSH connection now (before anything is built), or raise a one-line ProvisionError
    naming the host: ``gateway (root@vps.example.net): connect: [Errno 111] Connection refused``."""
    try:
        conn.open()
    except _transport_errors() as e:
        raise ProvisionError(transport_reason(e), role, layout.ssh, "connect") from None


def check(site: Site, gw_conn, be_conn, wait: float = 30) -> dict:
    """After deploying: a fresh handshake on both ends, a 220 banner from the backend through the
    gateway, and an IMAPS login through the gateway (``backend["imap"]``: one line)."""
    report = Report()
    g = Remote(gw_conn, site.gateway, "gateway", report)
    b = Remote(be_conn, site.backend, "backend", report)
    home = b.hostside("check", ifname=render.ifname(site, site.backend), wait=wait)
    gw = g.hostside("check", ifname=render.ifname(site, site.gateway), wait=wait, banner_addr=site.gateway_public_addr,
                    banner_port=site.submission_port)
    # IMAPS as a mail client does it, from the home host to the gateway's public address and back
    # through the tunnel to Dovecot; the check account's password never leaves the home host.
    d = f"{site.backend.etc}/{render.DOVECOT_DIR}"
    cert = (render.acme_live_paths(site.backend) if site.acme else render.tls_paths(site.backend))[0]
    home.update(b.hostside("imap_check", addr=site.gateway_public_addr, port=site.imaps_port,
                           user=render.DOVECOT_CHECK_USER, password_file=f"{d}/{render.DOVECOT_CHECK_PASSWORD}",
                           cert=cert, wait=min(wait, 10)))
    return {"backend": home, "gateway": gw,
            "ok": bool(home.get("handshake_fresh") and gw.get("handshake_fresh") and gw.get("backend_answers")
                       and home.get("imap_ok"))}
