"""Dovecot for the lab's home: IMAPS over the backend's Maildirs and passwd-file, accepting PROXY v2 from the gateway.

Started in the foreground (``dovecot -F``) inside a namespace (or on this host's loopback when
``ns`` is None) with the configuration provisioning writes (provision.render.dovecot_conf_text,
verbatim, after a header that only places its run/state dirs and logs in the work dir): the same
passwd-file as the backend (``{BLF-CRYPT}`` hashes), the backend's
``<maildir_root>/<domain>/<user>/Maildir``, an ``imaps`` listener with ``haproxy = yes`` that
trusts only the gateway's tunnel address, special-use folders, and the Junk folder with rspamd
learning from moves, included from the very files provisioning gives a user
(provision.render.dovecot_junk_conf).

``cert``/``key`` may be the backend's ACME live files (data_dir/acme/live/): Dovecot then serves the
certificate the backend obtained, and ``reload_command`` (``doveadm reload`` for this instance) is the
backend's ``[acme] reload_hook``. With ``run_as`` (a uid, the backend's) Dovecot runs wholly as that
user ("rootless", every internal and login process too), so the backend's hook may signal it; a
root Dovecot would need a root helper for that (provisioning's path unit, docs/certificates.md).
"""

from __future__ import annotations

import grp
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provision import render
from tests.lab.netns import Namespace

# Where this instance keeps its processes, sockets and logs (a real host uses Dovecot's defaults), and
# the users it runs as. Everything after it is the configuration provisioning writes
# (provision.render.dovecot_conf_text), verbatim.
LAB_HEADER = """# lab placement (tests/lab/dovecot.py); the provisioned configuration follows
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
service imap-login {{
  chroot =
}}
service anvil {{
  chroot =
}}
"""

# haproxy=False only: a listener for clients that connect directly (unit tests of the mailbox side).
NO_PROXY = """# lab only: clients connect directly, without the gateway's PROXY header
service imap-login {
  inet_listener imaps {
    haproxy = no
  }
}
"""


class Dovecot:
    """``haproxy``: the imaps listener requires a PROXY v2 header (as behind the gateway); False for
    clients that connect directly. ``rspamd_controller``: where the learning programs send moves."""

    def __init__(self, ns: Namespace | None, workdir: Path, *, address: str, port: int, cert: Path, key: Path,
                 passwd: Path, maildir_root: Path, trusted: str,
                 mail_uid: int, haproxy: bool = True, rspamd_controller: str = render.RSPAMD_CONTROLLER,
                 run_as: int | None = None):
        self.ns, self.dir, self.address, self.port = ns, workdir, address, port
        self.rspamd_controller = rspamd_controller
        self.run_as = run_as
        users = dict(internal_user="dovecot", internal_group="dovecot", login_user="dovenull")
        if run_as is not None:
            pw = pwd.getpwuid(run_as)
            group = grp.getgrgid(pw.pw_gid).gr_name
            users = dict(internal_user=pw.pw_name, internal_group=group, login_user=pw.pw_name)
        self.users = users
        self.haproxy = haproxy
        self.settings = dict(address=address, port=port, trusted=trusted, passwd=str(passwd),
                             maildir_root=str(maildir_root), mail_user=str(mail_uid),
                             mail_group=grp.getgrgid(pwd.getpwuid(mail_uid).pw_gid).gr_name)
        self.cert, self.key = cert, key
        self.conf = workdir / "dovecot.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def reload_command(self) -> str:
        """``doveadm reload`` for this instance (SIGHUP to its master: it reads its config, and so the
        certificate files, again; connections already open keep theirs)."""
        return shlex.join(["doveadm", "-c", str(self.conf), "reload"])

    def _popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, **kw) if self.ns is None else self.ns.popen(argv, **kw)

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        if self.ns is None:
            return subprocess.run(argv, capture_output=True)
        return self.ns.run(argv, check=False)

    def _write_junk_files(self) -> Path:
        """The user's Junk/learning files, as provisioning renders them."""
        sieve = self.dir / "sieve"
        sieve.mkdir(parents=True, exist_ok=True)
        sieve.chmod(0o755)
        for name, (text, mode) in render.dovecot_junk_files(self.rspamd_controller).items():
            (sieve / name).write_text(text)
            (sieve / name).chmod(mode)
        conf = sieve / render.DOVECOT_JUNK_CONF
        conf.write_text(render.dovecot_junk_conf(str(sieve)))
        return conf

    def config_text(self) -> str:
        """The lab's placement header, then the configuration provisioning renders for these settings."""
        d = self.dir
        tls = d / render.DOVECOT_TLS_CONF
        tls.write_text(f"ssl_cert = <{self.cert}\nssl_key = <{self.key}\n")
        check_passwd = d / render.DOVECOT_CHECK_PASSWD
        check_passwd.touch()
        provisioned = render.dovecot_conf_text(**self.settings, check_passwd=str(check_passwd),
                                               includes=[str(tls), str(self._write_junk_files())])
        return LAB_HEADER.format(d=d, **self.users) + provisioned + ("" if self.haproxy else NO_PROXY)

    def _compile_sieve(self) -> None:
        for argv in render.dovecot_sievec(str(self.dir / "sieve")):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stdout}{r.stderr}")

    def start(self) -> "Dovecot":
        d = self.dir
        for sub in ("run", "state"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        conf = self.conf
        conf.write_text(self.config_text())
        self._compile_sieve()
        argv = ["dovecot", "-F", "-c", str(conf)]
        if self.run_as is not None:
            # Its run/state dirs and logs are written by the master, now this user.
            for log in ("dovecot.log", "stdout.log"):
                (d / log).touch()
            for path in (d / "run", d / "state", d / "dovecot.log", d / "stdout.log"):
                shutil.chown(path, self.run_as, pwd.getpwuid(self.run_as).pw_gid)
            argv = ["setpriv", f"--reuid={self.run_as}", f"--regid={pwd.getpwuid(self.run_as).pw_gid}",
                    "--clear-groups", *argv]
        self.proc = self._popen(argv, stdout=open(d / "stdout.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        probe = "import socket,sys\ntry: socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close()\nexcept OSError: sys.exit(1)"
        while self._run([sys.executable, "-c", probe, self.address, str(self.port)]).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dovecot did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        out = ""
        for name in ("dovecot.log", "stdout.log"):
            p = self.dir / name
            if p.exists():
                out += p.read_text(errors="replace")
        return out


class ProvisionedDovecot(Dovecot):
    """Dovecot started (as root, like Debian's unit) from a configuration file provisioning wrote
    (``conf``: the deployed dovecot.conf, included as it is after the lab's placement header), for
    tests of a provisioned home. ``address``/``port``: where it listens (to wait for it)."""

    def __init__(self, ns: Namespace | None, workdir: Path, conf: str | Path, *, address: str, port: int,
                 extra: str = ""):
        self.ns, self.dir, self.address, self.port = ns, workdir, address, port
        self.run_as = None
        self.users = dict(internal_user="dovecot", internal_group="dovecot", login_user="dovenull")
        self.provisioned, self.extra = Path(conf), extra
        self.conf = workdir / "dovecot.conf"
        self.proc = None

    def config_text(self) -> str:
        """``extra``: lines after the provisioned file (a test's control, e.g. Debian's PAM passdb)."""
        return LAB_HEADER.format(d=self.dir, **self.users) + f"!include {self.provisioned}\n" + self.extra

    def _compile_sieve(self) -> None:  # provisioning compiled the deployed scripts
        pass
