"""Steps that must run ON a provisioned host because they touch its secrets: WireGuard and DKIM keys, the TLS key, the first user's password.

Run as ``VENV/bin/python -m provision.hostside '<json request>'``; it prints one JSON object. Only
public material ever appears in that output (public keys, DNS TXT values, "changed" flags), so the
operator's machine never receives a private key, and none is ever uploaded: every secret here is
generated where it is used. This module must not import Fabric (the hosts do not have it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path


def _write_if_changed(path: Path, text: str, mode: int, dry_run: bool) -> str:
    """Write ``text`` only when it differs; secrets are created 0600 from the first byte (no window)."""
    if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
        return "unchanged"
    if dry_run:
        return "would change"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return "changed"


def tunnel_key(req: dict) -> dict:
    """This end's WireGuard private key (created 0600 if absent); returns only the public key."""
    from wireguard import keys

    path = Path(req["key_file"])
    if not path.exists() and req.get("dry_run"):
        return {"public_key": None, "key": "would change"}
    priv, created = keys.load_or_create_private_key(path)
    return {"public_key": keys.public_key(priv), "key": "changed" if created else "unchanged"}


def tunnel_config(req: dict) -> dict:
    """Render this end's wg-quick file (and the gateway's egress table file) from the local private key."""
    from wireguard import egress, keys, wgquick

    key_file = Path(req["key_file"])
    conf = Path(req["conf_file"])
    dry = bool(req.get("dry_run"))
    if not key_file.exists() or not req.get("peer_public_key"):
        return {"conf": "would change", "egress": "would change" if req["role"] == "gateway" else "unchanged"}
    priv = key_file.read_text().strip()
    keys.decode_key(req["peer_public_key"])
    out = {"egress": "unchanged"}
    if req["role"] == "backend":
        cfg = wgquick.backend_config(private_key=priv, address=req["address"], gateway_public_key=req["peer_public_key"],
                                     gateway_endpoint=(req["endpoint_host"], int(req["endpoint_port"])),
                                     mtu=int(req.get("mtu", wgquick.DEFAULT_MTU)))
    else:
        nft_file = conf.with_suffix(".egress.nft")
        policy = egress.EgressPolicy(tunnel_if=conf.stem, public_if=req["public_if"],
                                     public_addr=ipaddress.IPv4Address(req["public_addr"]),
                                     backend_addr=ipaddress.IPv4Address(req["peer_address"]))
        out["egress"] = _write_if_changed(nft_file, egress.render(policy), 0o600, dry)
        cfg = wgquick.gateway_config(private_key=priv, address=req["address"], backend_public_key=req["peer_public_key"],
                                     backend_address=req["peer_address"], listen_port=int(req["listen_port"]),
                                     mtu=int(req.get("mtu", wgquick.DEFAULT_MTU)), egress_nft_file=str(nft_file))
    out["conf"] = _write_if_changed(conf, wgquick.render(cfg), 0o600, dry)
    return out


def dkim_keys(req: dict) -> dict:
    """Generate the DKIM keys named in the request if absent (they never leave this host); return the TXT lines."""
    from backend.dkim import keys as dkim_keys

    out = {"records": [], "keys": "unchanged"}
    for entry in req["keys"]:
        path = Path(entry["private_key"])
        if not path.exists():
            if req.get("dry_run"):
                out["keys"] = "would change"
                continue
            gen = dkim_keys.generate_key(req["domain"], entry["selector"], entry["algorithm"], path.parent)
            if gen.path != path:
                raise RuntimeError(f"dkim key written to {gen.path}, expected {path}")
            out["keys"] = "changed"
        value = dkim_keys.dkim_txt_record(path, entry["algorithm"])
        out["records"].append(f"{entry['selector']}._domainkey.{req['domain']}.\tIN\tTXT\t{dkim_keys.zone_txt_rdata(value)}")
    return out


def tls_selfsigned(req: dict) -> dict:
    """A self-signed certificate for the mail host name when none is there (the user may replace it later)."""
    from backend.tls.selfsigned import write_self_signed

    cert_p, key_p = Path(req["cert"]), Path(req["key"])
    if cert_p.exists() and key_p.exists():
        return {"tls": "unchanged"}
    if req.get("dry_run"):
        return {"tls": "would change"}
    cert_p.parent.mkdir(parents=True, exist_ok=True)
    key_p.parent.mkdir(parents=True, exist_ok=True)
    write_self_signed(cert_p, key_p, req["hostname"], days=825)
    return {"tls": "changed"}


def first_user(req: dict) -> dict:
    """Create the first mail user with a random password stored 0600 on this host (read it over ssh, then change it)."""
    from backend.receive.users import UserDB

    db = UserDB(Path(req["passwd_file"]))
    if db.exists(req["address"]):
        return {"user": "unchanged"}
    if req.get("dry_run"):
        return {"user": "would change"}
    password = secrets.token_urlsafe(18)
    _write_if_changed(Path(req["password_file"]), password + "\n", 0o600, False)
    db.add(req["address"], password)
    return {"user": "changed"}


def check(req: dict) -> dict:
    """Post-deploy check: the tunnel's newest handshake age, and (gateway side) a banner relayed from the backend."""
    from wireguard import status

    deadline = time.monotonic() + float(req.get("wait", 30))
    age = None
    while time.monotonic() < deadline:
        age = status.handshake_age(req["ifname"])
        if age is not None:
            break
        time.sleep(0.5)
    out = {"handshake_age": age, "handshake_fresh": age is not None and age < 180}
    if req.get("banner_addr"):
        banner = ""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((req["banner_addr"], int(req["banner_port"])), timeout=10) as s:
                    banner = s.recv(512).decode("ascii", "replace").strip()
            except OSError as e:
                banner = f"error: {e}"
            # 220 comes from the backend itself; the gateway alone can only say 421 (home unreachable)
            if banner.startswith("220"):
                break
            time.sleep(0.5)
        out["banner"] = banner
        out["backend_answers"] = banner.startswith("220")
    return out


def imap_check_account(req: dict) -> dict:
    """The IMAP-only account `fab check` logs in with: a random password kept here (root 0600, never
    sent anywhere) and its {BLF-CRYPT} hash in Dovecot's check passwd-file (root:<group> 0640)."""
    import shutil

    from backend.receive.users import hash_password, verify_password

    password_file, passwd_file = Path(req["password_file"]), Path(req["passwd_file"])
    try:
        password = password_file.read_text().strip()
        user, _, stored = passwd_file.read_text().splitlines()[0].partition(":")
        if user == req["user"] and verify_password(password.encode(), stored.split(":", 1)[0]):
            return {"account": "unchanged"}
    except (OSError, IndexError):
        pass
    if req.get("dry_run"):
        return {"account": "would change"}
    password = secrets.token_urlsafe(24)
    _write_if_changed(password_file, password + "\n", 0o600, False)
    _write_if_changed(passwd_file, f"{req['user']}:{hash_password(password)}\n", 0o640, False)
    shutil.chown(passwd_file, "root", req["group"])
    return {"account": "changed"}


def imap_check(req: dict) -> dict:
    """Log in over IMAPS at ``addr``:``port`` (the gateway's public address: home → internet → gateway
    → tunnel → Dovecot) with the check account, after checking that the certificate served is the
    home's own (``cert``): TLS ends at home, and the password goes to no one else. One line back."""
    import imaplib
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    deadline = time.monotonic() + float(req.get("wait", 10))
    try:
        password = Path(req["password_file"]).read_text().strip()
        ours = x509.load_pem_x509_certificate(Path(req["cert"]).read_bytes()).public_bytes(Encoding.DER)
    except (OSError, ValueError) as e:
        return {"imap_ok": False, "imap": f"FAILED: {e}"}
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # compared with the home's own below
    while True:
        try:
            with imaplib.IMAP4_SSL(req["addr"], int(req["port"]), ssl_context=ctx, timeout=10) as m:
                if m.sock.getpeercert(binary_form=True) != ours:
                    return {"imap_ok": False, "imap": "FAILED: the certificate served is not the home's"}
                m.login(req["user"], password)
                typ, _ = m.select("INBOX", readonly=True)
                return {"imap_ok": typ == "OK", "imap": f"OK (logged in as {req['user']}, INBOX {typ})"}
        except (OSError, imaplib.IMAP4.error, EOFError) as e:
            if time.monotonic() > deadline:
                return {"imap_ok": False, "imap": f"FAILED: {type(e).__name__}: {e}".rstrip(": ")}
            time.sleep(0.5)


ACTIONS = {"tunnel_key": tunnel_key, "tunnel_config": tunnel_config, "dkim_keys": dkim_keys,
           "tls_selfsigned": tls_selfsigned, "first_user": first_user, "check": check,
           "imap_check_account": imap_check_account, "imap_check": imap_check}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    req = json.loads(argv[0])
    result = ACTIONS[req["action"]](req)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
