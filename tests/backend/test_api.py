"""The HTTP send API (backend/http/api.py) and its keys (backend/http/apikeys.py, `apikey` CLI):
keys stored hashed and revocable, sends in every mode over real sockets with aiohttp and curl,
idempotent retries, a table of bad requests that queue nothing, a SIGKILL right after a 202."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat

import pytest

from backend.http.apikeys import APIKeyError, KeyStore
from tests.backend.helpers import listener_block, run_cli, write_config

# -- keys ---------------------------------------------------------------------------------------


def test_a_key_is_stored_hashed_and_verified_until_revoked(tmp_path):
    path = tmp_path / "apikeys.sqlite3"
    store = KeyStore(path)
    key, token, secret = store.create("ci", ["ci@example.org", "@Apps.Example.org"], rate_per_minute=5,
                                      webhook_url="http://127.0.0.1:1/hook")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.senders == ("ci@example.org", "@apps.example.org")
    assert store.verify(token) == key
    assert store.webhook_secret(key.id) == secret and secret.startswith("whsec_")
    # Only the hash is in the file, never the token.
    raw = path.read_bytes() + (path.with_name(path.name + "-wal").read_bytes()
                               if path.with_name(path.name + "-wal").exists() else b"")
    assert token.encode() not in raw
    row = sqlite3.connect(path).execute("SELECT token_sha256 FROM apikey").fetchone()
    assert row[0] == hashlib.sha256(token.encode()).hexdigest()
    assert key.allows_sender("CI@example.org") and key.allows_sender("any@apps.example.org")
    assert not key.allows_sender("other@example.org") and not key.allows_sender("x@sub.apps.example.org")
    assert store.verify(token + "x") is None and store.verify("nonsense") is None
    assert store.revoke(key.id) and not store.revoke(key.id)
    assert store.verify(token) is None
    assert store.get(key.id).revoked is not None
    store.close()


@pytest.mark.parametrize("kwargs, error", [
    ({"senders": []}, "at least one sender"),
    ({"senders": ["not an address"]}, "not an address or @domain"),
    ({"senders": ["a@[127.0.0.1]"]}, "not an address"),
    ({"mode": "redirect"}, "needs --redirect-to"),
    ({"mode": "bcc"}, "needs --bcc-to"),
    ({"mode": "loud"}, "mode must be one of"),
    ({"rate_per_minute": 0}, "at least 1"),
    ({"webhook_url": "ftp://x"}, "http:// or https://"),
])
def test_key_creation_refuses_what_cannot_work(tmp_path, kwargs, error):
    store = KeyStore(tmp_path / "k.sqlite3")
    kwargs.setdefault("senders", ["a@example.org"])
    with pytest.raises(APIKeyError, match=error):
        store.create("x", **kwargs)
    assert store.list() == []


def test_cli_create_prints_the_token_once_list_and_revoke(tmp_path):
    cfg = write_config(tmp_path, listener_block("lan", "lan"))
    r = run_cli("apikey", "create", "-c", str(cfg), "--name", "nas", "--sender", "nas@example.org",
                "--mode", "redirect", "--redirect-to", "bob@example.org", "--rate", "10",
                "--webhook", "http://127.0.0.1:9/hook")
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert fields["token"].startswith("hmx_") and fields["webhook secret"].startswith("whsec_")
    assert "shown only now" in r.stderr
    store = KeyStore(tmp_path / "data" / "apikeys.sqlite3")
    assert store.verify(fields["token"]).id == fields["id"]
    r = run_cli("apikey", "list", "-c", str(cfg), "--json")
    listed = json.loads(r.stdout)
    assert [k["id"] for k in listed] == [fields["id"]]
    assert listed[0]["mode"] == "redirect" and listed[0]["redirect_to"] == ["bob@example.org"]
    assert fields["token"] not in r.stdout and fields["webhook secret"] not in r.stdout
    r = run_cli("apikey", "list", "-c", str(cfg))
    assert "nas" in r.stdout and "active" in r.stdout and fields["token"] not in r.stdout
    assert run_cli("apikey", "revoke", "-c", str(cfg), fields["id"]).returncode == 0
    assert store.verify(fields["token"]) is None
    r = run_cli("apikey", "revoke", "-c", str(cfg), fields["id"])
    assert r.returncode == 1 and "no key" in r.stderr
    r = run_cli("apikey", "create", "-c", str(cfg), "--name", "x", "--sender", "x@example.org", "--mode", "bcc")
    assert r.returncode == 1 and "needs --bcc-to" in r.stderr
