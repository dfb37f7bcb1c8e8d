"""Dovecot for the lab's home: IMAPS over the backend's Maildirs and passwd-file, accepting PROXY v2 from the gateway.

Started in the foreground (``dovecot -F``) inside a namespace with a config file like a user's:
the same passwd-file as the backend (``{BLF-CRYPT}`` hashes), ``mail_location`` pointing at the
backend's ``<maildir_root>/<domain>/<user>/Maildir`` and an ``imaps`` listener with ``haproxy = yes``
that trusts only the gateway's tunnel address.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.lab.netns import Namespace

CONF = """
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap
listen = {address}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = plain
disable_plaintext_auth = yes
haproxy_trusted_networks = {trusted}
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{maildir_root}/%d/%n/Maildir
passdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_uid} home={maildir_root}/%d/%n
}}
service imap-login {{
  chroot =
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
service anvil {{
  chroot =
}}
"""


class Dovecot:
    def __init__(self, ns: Namespace, workdir: Path, *, address: str, port: int, cert: Path, key: Path,
                 passwd: Path, maildir_root: Path, trusted: str,
                 mail_uid: int):
        self.ns, self.dir, self.address, self.port = ns, workdir, address, port
        self.conf_text = dict(address=address, port=port, cert=cert, key=key, passwd=passwd,
                              maildir_root=maildir_root, trusted=trusted, mail_uid=mail_uid)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Dovecot":
        d = self.dir
        for sub in ("run", "state"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        conf = d / "dovecot.conf"
        conf.write_text(CONF.format(d=d, **self.conf_text))
        self.proc = self.ns.popen(["dovecot", "-F", "-c", str(conf)], stdout=open(d / "stdout.log", "ab"),
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        probe = "import socket,sys\ntry: socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close()\nexcept OSError: sys.exit(1)"
        while self.ns.run([sys.executable, "-c", probe, self.address, str(self.port)], check=False).returncode:
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
