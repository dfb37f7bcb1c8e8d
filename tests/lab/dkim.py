"""DKIM checks shared by tests: dkimpy's verifier over every signature against a key table, the tags of each
DKIM-Signature, the ``homemx-backend dkim`` CLI in-process, and a network namespace whose nsd serves test keys to
OpenDKIM (``netns_dns``, a fixture importers name) with helpers to run opendkim-testmsg there."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import dkim as dkimpy
import pytest

from backend.cli import dkim as cmd_dkim
from backend.dkim import keys as dkim_keys
from tests.conftest import require_root, require_tool
from tests.lab.nsd import NSD, zone_text


def dns_table(keys):
    return {f"{k.selector}._domainkey.{k.domain}.".encode(): txt.encode() for k, txt in keys.values()}


def verify_all(signed: bytes, keys) -> list[bool]:
    """dkimpy's verifier on every signature (the independent verifiers run in test_dkim_verify)."""
    table = dns_table(keys)
    d = dkimpy.DKIM(signed)
    n = len([1 for name, _ in d.headers if name.lower() == b"dkim-signature"])
    results = []
    for i in range(n):
        try:
            results.append(d.verify(idx=i, dnsfunc=lambda name, timeout=5: table.get(name)))
        except dkimpy.ValidationError:  # dkimpy raises on a body hash mismatch
            results.append(False)
    return results


def sig_tags(signed: bytes) -> list[dict[str, str]]:
    unfolded = re.sub(rb"\r\n[ \t]", b" ", signed.partition(b"\r\n\r\n")[0]).decode()
    out = []
    for line in unfolded.split("\r\n"):
        if line.lower().startswith("dkim-signature:"):
            out.append({k.strip(): re.sub(r"\s+", "", v) for k, _, v in (t.partition("=") for t in line.split(":", 1)[1].split(";"))})
    return out


def run_dkim_cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd_dkim.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def netns_dns(tmp_path_factory):
    """A namespace with lo up, its own resolv.conf, and nsd on 127.0.0.1:53 serving the DKIM keys."""
    require_root()
    require_tool("ip", "/usr/sbin/nsd", "dig", "opendkim-testmsg")
    tmp = tmp_path_factory.mktemp("dkimverify")
    keys = []
    records = ""
    for alg, sel in (("rsa", "rsa1"), ("ed25519", "ed1")):
        g = dkim_keys.generate_key("example.org", sel, alg, tmp)
        keys.append(SimpleNamespace(domain="example.org", selector=sel, algorithm=alg, private_key=g.path))
        records += g.zone_line() + "\n"
    name = f"hmxdk-{uuid.uuid4().hex[:8]}"
    etc = Path("/etc/netns") / name
    ns = None
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        ns = NSD(
            {"example.org": zone_text("example.org", records, ns_address="127.0.0.1")},
            address="127.0.0.1",
            port=53,
            netns_exec=["ip", "netns", "exec", name],
            workdir=tmp / "nsd",
        )
        ns.start()
        yield SimpleNamespace(name=name, keys=keys)
    finally:
        if ns is not None:
            ns.close()
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name])
        shutil.rmtree(etc, ignore_errors=True)


def run_in(ns, cmd, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns.name, *cmd], input=data, capture_output=True, timeout=60)


def only_signature(signed: bytes, algorithm: str) -> bytes:
    """The message with only the DKIM-Signature whose a= is ``algorithm`` (folded lines included)."""
    head, _, body = signed.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept = [f for f in fields if not f.lower().startswith(b"dkim-signature:") or re.search(rb"a=" + algorithm.encode() + rb";", f)]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def opendkim(ns, message: bytes) -> subprocess.CompletedProcess:
    return run_in(ns, ["opendkim-testmsg"], message)
