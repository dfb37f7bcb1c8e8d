"""A real Postfix inside a lab namespace: the remote MTA receiving into Maildirs and a real sending MTA with a queue.

Configuration lives in /etc/netns/NS/postfix (a copy of Debian's /etc/postfix with our main.cf and
chroot off), so ``ip netns exec NS postfix ...`` sees it as /etc/postfix: no alternate_config_directories
needed (LAB-NOTES). Queue, data directory, log and mailboxes live under ``workdir``.

    pf = Postfix(ns, workdir, address="198.51.100.1", domain="remote.test", mailboxes=["bob"])
    pf.start(); pf.messages("bob"); pf.set_recipient_access({"later@remote.test": "450 4.2.0 busy"})
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.lab.netns import Namespace

MAILBOX_UID = 65534  # nobody: the virtual(8) agent refuses root; no lab user needs to be created


class Postfix:
    def __init__(self, ns: Namespace, workdir: Path, *, address: str, domain: str, mailboxes: list[str],
                 hostname: str | None = None, mynetworks: tuple[str, ...] = ("127.0.0.0/8",)):
        self.ns = ns
        self.dir = workdir
        self.address = address
        self.domain = domain
        self.hostname = hostname or f"mx.{domain}"
        self.mailboxes = mailboxes
        self.mynetworks = mynetworks
        self.log_path = workdir / "postfix.log"
        self.mail_dir = workdir / "mail"
        self.proc: subprocess.Popen | None = None
        self.etc: Path | None = None

    # ------------------------------------------------------------ files

    def write(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        self.mail_dir.mkdir(exist_ok=True)
        shutil.chown(self.mail_dir, MAILBOX_UID, MAILBOX_UID)
        (d / "data").mkdir(exist_ok=True)
        shutil.chown(d / "data", "postfix")
        self.log_path.touch()
        etc = Path("/etc/netns") / self.ns.name / "postfix"
        if etc.exists():
            shutil.rmtree(etc)
        # Debian's postfix-files, dynamicmaps.cf, post-install... are needed by `postfix start`.
        shutil.copytree("/etc/postfix", etc, symlinks=True)
        self.etc = etc
        main = f"""compatibility_level = 3.6
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = {self.domain}
mydestination =
inet_interfaces = {self.address}
inet_protocols = ipv4
smtp_bind_address = {self.address}
mynetworks = {' '.join(self.mynetworks)}
queue_directory = {d}/spool
data_directory = {d}/data
maillog_file = {self.log_path}
maillog_file_prefixes = {d}
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.mail_dir}
virtual_mailbox_maps = texthash:/etc/postfix/vmailbox
virtual_uid_maps = static:{MAILBOX_UID}
virtual_gid_maps = static:{MAILBOX_UID}
smtpd_recipient_restrictions = check_recipient_access texthash:/etc/postfix/rcpt_access, permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = may
smtp_connect_timeout = 5s
# Short retry times so a queued message is retried within seconds in the lab.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
bounce_queue_lifetime = 0
"""
        (etc / "main.cf").write_text(main)
        (etc / "vmailbox").write_text("".join(f"{m}@{self.domain} {m}/Maildir/\n" for m in self.mailboxes))
        (etc / "rcpt_access").write_text("")
        # Debian's master.cf chroots the daemons into the queue directory; nothing would resolve there.
        self.ns.run(["postconf", "-F", "*/*/chroot = n"])
        (d / "spool").mkdir(exist_ok=True)
        # Creates the queue's subdirectories with Postfix's own owners and modes.
        self.ns.run(["postfix", "post-install", "create-missing"], check=False)

    def set_recipient_access(self, table: dict[str, str]) -> None:
        """Replace the check_recipient_access table (e.g. {"x@dom": "450 4.2.0 busy"}), effective at once.

        A restart, not ``postfix reload``: an smtpd serving a session the client keeps open (the
        backend reuses sessions) would keep answering from the old table.
        """
        assert self.etc is not None
        (self.etc / "rcpt_access").write_text("".join(f"{k} {v}\n" for k, v in table.items()))
        if self.running():
            self.stop()
            self.start()

    # ------------------------------------------------------------ life cycle

    def start(self) -> "Postfix":
        if self.etc is None:
            self.write()
        self.proc = self.ns.popen(["postfix", "start-fg"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postfix did not start in {self.ns.name}:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        r = self.ns.run([sys.executable, "-c", _PROBE, self.address, "25"], check=False)
        return r.returncode == 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.running():
            return
        self.ns.run(["postfix", "stop"], check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def flush(self) -> None:
        """postqueue -f: retry every deferred message now (also clears the dead-destination state)."""
        self.ns.run(["postqueue", "-f"])

    def queue(self) -> str:
        return self.ns.run(["postqueue", "-p"], check=False).stdout

    # ------------------------------------------------------------ mailboxes

    def messages(self, mailbox: str) -> list[bytes]:
        new = self.mail_dir / mailbox / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
"""
