"""The HTTP send API (backend/http/api.py) and its keys (backend/http/apikeys.py, `apikey` CLI):
keys stored hashed and revocable, sends in every mode over real sockets with aiohttp and curl,
idempotent retries, a table of bad requests that queue nothing, a SIGKILL right after a 202."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import hashlib
import json
import os
import re
import sqlite3
import ssl
import stat
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from backend.dkim import keys as dkim_keys
from backend.http.apikeys import APIKeyError, KeyStore
from tests.backend.helpers import (
    ALICE,
    BOB,
    DOMAIN,
    listener_block,
    maildir_files,
    run_cli,
    running_backend,
    wait_for,
    wait_for_sync,
    write_config,
)
from tests.conftest import require_tool
from tests.lab.backend import Daemon, daemons  # noqa: F401 - fixture
from tests.lab.ports import free_port
from tests.lab.dkim import verify_all

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


# -- the API over real sockets ------------------------------------------------------------------

REMOTE = "friend@remote.example"


@dataclasses.dataclass
class Lab:
    tmp: Path
    cfg: Path
    dkim_keys: dict
    backend: object = None
    tokens: dict = dataclasses.field(default_factory=dict)  # key name -> (APIKey, token)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.backend.api.bound_port()}"

    def auth(self, name: str = "prod") -> dict:
        return {"Authorization": f"Bearer {self.tokens[name][1]}"}

    def sandbox_files(self) -> list[Path]:
        new = self.tmp / "data" / "sandbox" / "Maildir" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def queued(self) -> list:
        return self.backend.queue.list()


KEYS = {
    "prod": dict(senders=["app@example.org", "@apps.example.org"]),
    "sandbox": dict(senders=["app@example.org"], mode="sandbox"),
    "redirect": dict(senders=["app@example.org"], mode="redirect", redirect_to=[BOB]),
    "bcc": dict(senders=["app@example.org"], mode="bcc", bcc_to=[BOB]),
    "slow": dict(senders=["app@example.org"], rate_per_minute=2),
    "other": dict(senders=["other@example.org"]),
}


def api_config(tmp: Path, port: int = 0, lan_port: int = 0) -> tuple[Path, dict]:
    g = dkim_keys.generate_key(DOMAIN, "s1", "ed25519", tmp)
    keys = {"ed25519": (SimpleNamespace(domain=DOMAIN, selector="s1", algorithm="ed25519", private_key=g.path),
                        g.txt_value)}
    extra = (f'[api]\nenabled = true\nlisten = "127.0.0.1:{port}"\n\n'
             f'[[dkim]]\ndomain = "{DOMAIN}"\nselector = "s1"\nalgorithm = "ed25519"\nprivate_key = "{g.path}"\n')
    cfg = write_config(tmp, listener_block("lan", "lan", f"127.0.0.1:{lan_port}", trusted_networks=["127.0.0.0/8"]),
                       extra=extra)
    return cfg, keys


def make_keys(tmp: Path) -> dict:
    store = KeyStore(tmp / "data" / "apikeys.sqlite3")
    out = {name: store.create(name, **kw)[:2] for name, kw in KEYS.items()}
    store.close()
    return out


@pytest_asyncio.fixture
async def lab(tmp_path):
    cfg, keys = api_config(tmp_path)
    lab = Lab(tmp_path, cfg, keys, tokens=make_keys(tmp_path))
    async with running_backend(cfg) as b:
        lab.backend = b
        yield lab


async def post(lab: Lab, doc, key: str = "prod", headers: dict | None = None, raw: bytes | None = None):
    h = {**lab.auth(key), **(headers or {})}
    async with aiohttp.ClientSession() as s:
        if raw is not None:
            h.setdefault("Content-Type", "message/rfc822")
            async with s.post(lab.url + "/v1/messages", data=raw, headers=h) as r:
                return r.status, await r.json(content_type=None), r.headers
        async with s.post(lab.url + "/v1/messages", json=doc, headers=h) as r:
            return r.status, await r.json(content_type=None), r.headers


async def get(lab: Lab, path: str, key: str = "prod"):
    async with aiohttp.ClientSession() as s:
        async with s.get(lab.url + path, headers=lab.auth(key)) as r:
            return r.status, await r.json(content_type=None)


def header_fields(message: bytes, name: str) -> list[str]:
    header = message.replace(b"\r\n", b"\n").partition(b"\n\n")[0].decode()
    unfolded = re.sub(r"\n[ \t]+", " ", header)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\n")
            if line.lower().startswith(name.lower() + ":")]


MESSAGE = {
    "from": "Home App <app@example.org>",
    "to": [ALICE, REMOTE],
    "subject": "Backup done ✓",
    "text": "The nightly backup finished.\n",
    "html": "<p>The nightly backup <b>finished</b>.</p>",
    "attachments": [{"filename": "log.txt", "content_type": "text/plain",
                     "content": base64.b64encode(b"all good\n").decode()},
                    {"filename": "r.bin", "content": base64.b64encode(bytes(range(256))).decode()}],
    "headers": {"X-App": "backup"},
    "tags": ["backup", "nightly"],
}


@pytest.mark.asyncio
async def test_production_send_is_queued_signed_traced_delivered_and_reported(lab):
    status, body, _ = await post(lab, MESSAGE)
    assert status == 202, body
    qid = body["id"]
    assert body["recipients"] == [ALICE, REMOTE] and body["mode"] == "production"
    # Durable by the time of the 202: the queue has it, with the key that sent it.
    entry = lab.backend.queue.get(qid)
    assert entry.api_key == lab.tokens["prod"][0].id and entry.listener == "api"
    assert {r.address for r in entry.recipients} == {ALICE, REMOTE}
    stored = lab.backend.queue.content(qid)
    assert verify_all(stored, lab.dkim_keys) == [True]  # signed as a submission is
    received = header_fields(stored, "Received")[0]
    assert "with HTTP id " + qid in received and "[127.0.0.1]" in received
    assert header_fields(stored, "Date") and header_fields(stored, "Message-ID")
    files = await wait_for(lambda: maildir_files(lab.tmp, ALICE))
    msg = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "Backup done ✓" and msg["X-App"] == "backup"
    assert msg["From"].addresses[0].addr_spec == "app@example.org"
    assert msg.get_body(("plain",)).get_content() == "The nightly backup finished.\n"
    assert "<b>finished</b>" in msg.get_body(("html",)).get_content()
    atts = {a.get_filename(): a.get_content() for a in msg.iter_attachments()}
    assert atts == {"log.txt": "all good\n", "r.bin": bytes(range(256))}
    # What became of it, per recipient; another key cannot see it.
    status, st = await wait_for_status(lab, qid, lambda st: {r["address"]: r["state"] for r in st["recipients"]}
                                       .get(ALICE) == "delivered")
    rs = {r["address"]: r for r in st["recipients"]}
    assert rs[REMOTE]["state"] in ("queued", "deferred") and st["tags"] == ["backup", "nightly"]
    assert st["sender"] == "app@example.org" and isinstance(st["webhooks"], list)
    status, problem = await get(lab, f"/v1/messages/{qid}", key="other")
    assert status == 404 and problem["type"] == "/v1/problems/not-found"
    metrics = generate_latest(lab.backend.metrics.registry).decode()
    key_id = lab.tokens["prod"][0].id
    assert f'homemx_backend_api_messages_total{{key="{key_id}",mode="production"}} 1.0' in metrics
    assert f'homemx_backend_api_requests_total{{key="{key_id}",status="202"}} 1.0' in metrics


async def wait_for_status(lab: Lab, qid: str, predicate):
    deadline = time.monotonic() + 10
    while True:
        status, st = await get(lab, f"/v1/messages/{qid}")
        assert status == 200, st
        if predicate(st):
            return status, st
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.05)


async def curl(*args: str) -> tuple[int, dict | None, str]:
    """curl as a user would run it; (status, JSON body, headers)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-D", "-", "-o", "/dev/stdout", "--max-time", "20", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    head, _, body = out.decode().partition("\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.strip() else None, head


@pytest.mark.asyncio
async def test_curl_json_and_raw_message(lab, tmp_path):
    require_tool("curl")
    status, body, _ = await curl(
        "-H", f"Authorization: Bearer {lab.tokens['prod'][1]}", "-H", "Content-Type: application/json",
        "--data", json.dumps({"from": "app@example.org", "to": ALICE, "subject": "from curl", "text": "hi"}),
        lab.url + "/v1/messages")
    assert status == 202, body
    # No tags, no Idempotency-Key: the queue alone says which key sent it.
    assert (await get(lab, f"/v1/messages/{body['id']}"))[0] == 200
    assert (await get(lab, f"/v1/messages/{body['id']}", key="other"))[0] == 404
    raw = (b"From: Cron <app@example.org>\nTo: alice@example.org\nBcc: bob@example.org\n"
           b"X-Homemx-Original-Recipients: forged@example.org\nSubject: raw\n\nraw body\n")
    (tmp_path / "msg.eml").write_bytes(raw)
    status, body2, _ = await curl(
        "-H", f"Authorization: Bearer {lab.tokens['prod'][1]}", "-H", "Content-Type: message/rfc822",
        "--data-binary", f"@{tmp_path / 'msg.eml'}", lab.url + "/v1/messages")
    assert status == 202, body2
    assert body2["recipients"] == [ALICE, BOB]
    files = await wait_for(lambda: len(maildir_files(lab.tmp, ALICE)) == 2 and maildir_files(lab.tmp, BOB))
    got = files[0].read_bytes()
    assert b"raw body" in got and not header_fields(got, "Bcc")  # RFC 5322 3.6.3: the Bcc field is not sent
    assert not header_fields(got, "X-Homemx-Original-Recipients")  # a forged one is dropped
    assert lab.backend.queue.get(body2["id"]).sender == "app@example.org"


@pytest.mark.asyncio
async def test_sandbox_keeps_the_message_and_queues_nothing(lab):
    status, body, _ = await post(lab, {**MESSAGE, "bcc": "carol@remote.example"}, key="sandbox")
    assert status == 202, body
    assert body["mode"] == "sandbox"
    assert lab.queued() == []  # never queued, never delivered
    [f] = lab.sandbox_files()
    content = f.read_bytes()
    assert header_fields(content, "X-Homemx-Sandbox-Recipients") == [f"{ALICE}, {REMOTE}, carol@remote.example"]
    assert header_fields(content, "Subject") and header_fields(content, "Message-ID")
    assert body["id"] in header_fields(content, "Received")[0]
    status, st = await get(lab, f"/v1/messages/{body['id']}", key="sandbox")
    assert status == 200 and {r["state"] for r in st["recipients"]} == {"captured"}
    assert maildir_files(lab.tmp, ALICE) == []


@pytest.mark.asyncio
async def test_redirect_replaces_every_recipient_and_names_the_originals(lab):
    status, body, _ = await post(lab, {**MESSAGE, "cc": "carol@remote.example"}, key="redirect")
    assert status == 202 and body["recipients"] == [BOB], body
    [entry] = lab.queued()
    assert [r.address for r in entry.recipients] == [BOB]
    [f] = await wait_for(lambda: maildir_files(lab.tmp, BOB))
    got = f.read_bytes()
    assert header_fields(got, "X-Homemx-Original-Recipients") == [f"{ALICE}, {REMOTE}, carol@remote.example"]
    assert maildir_files(lab.tmp, ALICE) == []


@pytest.mark.asyncio
async def test_bcc_mode_delivers_and_archives_a_copy(lab):
    status, body, _ = await post(lab, {**MESSAGE, "to": ALICE}, key="bcc")
    assert status == 202 and body["recipients"] == [ALICE, BOB], body
    await wait_for(lambda: maildir_files(lab.tmp, ALICE) and maildir_files(lab.tmp, BOB))
    archived = maildir_files(lab.tmp, BOB)[0].read_bytes()
    assert header_fields(archived, "To") == [ALICE] and not header_fields(archived, "Bcc")


@pytest.mark.asyncio
async def test_idempotent_retry_returns_the_first_answer_and_queues_nothing(lab):
    h = {"Idempotency-Key": "order-42"}
    first = await post(lab, MESSAGE, headers=h)
    # A retry, and two concurrent ones: all get the first answer.
    again = await asyncio.gather(*(post(lab, MESSAGE, headers=h) for _ in range(3)))
    assert first[0] == 202 and all(a[0] == 202 and a[1] == first[1] for a in again)
    assert all(a[2].get("Idempotent-Replayed") == "true" for a in again)
    assert [e.id for e in lab.queued()] == [first[1]["id"]]
    # The same key with another body is a client bug, not a retry.
    status, problem, _ = await post(lab, {**MESSAGE, "subject": "other"}, headers=h)
    assert status == 422 and problem["type"] == "/v1/problems/idempotency-key-reused"
    # Keys are per API key: another key may use the same string.
    status, body, _ = await post(lab, {**MESSAGE, "from": "other@example.org"}, key="other", headers=h)
    assert status == 202 and body["id"] != first[1]["id"]
    assert len(lab.queued()) == 2


@pytest.mark.asyncio
async def test_idempotent_concurrent_first_requests_queue_one_message(lab):
    h = {"Idempotency-Key": "race"}
    answers = await asyncio.gather(*(post(lab, MESSAGE, headers=h) for _ in range(5)))
    assert {a[0] for a in answers} == {202} and len({a[1]["id"] for a in answers}) == 1
    assert len(lab.queued()) == 1


BAD = [
    # (description, key or None for no Authorization, content type, body, status, problem type)
    ("no key", None, "application/json", MESSAGE, 401, "unauthorized"),
    ("unknown key", "hmx_" + "x" * 43, "application/json", MESSAGE, 401, "unauthorized"),
    ("malformed JSON", "prod", "application/json", b'{"from": ', 400, "malformed-json"),
    ("not an object", "prod", "application/json", b"[1]", 400, "malformed-json"),
    ("no from", "prod", "application/json", {"to": ALICE, "text": "x"}, 400, "missing-field"),
    ("no recipient", "prod", "application/json", {"from": "app@example.org", "text": "x"}, 400, "missing-field"),
    ("no body", "prod", "application/json", {"from": "app@example.org", "to": ALICE}, 400, "missing-field"),
    ("unknown field", "prod", "application/json", {**MESSAGE, "priority": 1}, 400, "invalid-field"),
    ("invalid to", "prod", "application/json", {**MESSAGE, "to": "not an address"}, 400, "invalid-address"),
    ("percent hack", "prod", "application/json", {**MESSAGE, "to": "a%b@remote.example"}, 400, "invalid-address"),
    ("address literal", "prod", "application/json", {**MESSAGE, "cc": "a@[192.0.2.1]"}, 400, "invalid-address"),
    ("unknown local user", "prod", "application/json", {**MESSAGE, "to": "nobody@example.org"}, 400,
     "unknown-recipient"),
    ("header injection", "prod", "application/json", {**MESSAGE, "subject": "x\r\nBcc: evil@remote.example"}, 400,
     "invalid-field"),
    ("own header", "prod", "application/json", {**MESSAGE, "headers": {"DKIM-Signature": "x"}}, 400, "invalid-field"),
    ("bad base64", "prod", "application/json", {**MESSAGE, "attachments": [{"filename": "a", "content": "!!"}]},
     400, "invalid-field"),
    ("too many recipients", "prod", "application/json",
     {**MESSAGE, "to": [f"u{i}@remote.example" for i in range(101)]}, 400, "too-many-recipients"),
    ("sender not allowed", "prod", "application/json", {**MESSAGE, "from": "alice@example.org"}, 403,
     "sender-not-allowed"),
    # The key allows @apps.example.org, but homemx signs and sends for its own domains only (the
    # accept pipeline's lan rule).
    ("sender not ours", "prod", "application/json", {**MESSAGE, "from": "x@apps.example.org"}, 403,
     "sender-not-allowed"),
    ("sender of another key", "other", "application/json", MESSAGE, 403, "sender-not-allowed"),
    ("raw From not allowed", "prod", "message/rfc822", b"From: alice@example.org\r\nTo: bob@example.org\r\n\r\nx\r\n",
     403, "sender-not-allowed"),
    ("raw without From", "prod", "message/rfc822", b"To: bob@example.org\r\n\r\nx\r\n", 400, "malformed-message"),
    ("wrong content type", "prod", "text/plain", b"hello", 415, "unsupported-media-type"),
    ("too large", "prod", "application/json",
     {**MESSAGE, "text": "x" * (64 * 1024)}, 413, "too-large"),
    ("body over the read limit", "prod", "application/json",
     {**MESSAGE, "text": "x" * (160 * 1024)}, 413, "too-large"),
]


@pytest.mark.asyncio
async def test_bad_requests_get_their_problem_and_queue_nothing(tmp_path):
    cfg, _ = api_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[api]\n", '[api]\nmax_message_size = "32k"\n'))
    tokens = make_keys(tmp_path)
    revoked = KeyStore(tmp_path / "data" / "apikeys.sqlite3")
    rkey, rtoken, _ = revoked.create("old", ["app@example.org"])
    revoked.revoke(rkey.id)
    revoked.close()
    rows = BAD + [("revoked key", rtoken, "application/json", MESSAGE, 401, "unauthorized")]
    async with running_backend(cfg) as b:
        url = f"http://127.0.0.1:{b.api.bound_port()}/v1/messages"
        async with aiohttp.ClientSession() as s:
            for what, key, ctype, body, status, kind in rows:
                token = tokens[key][1] if key in tokens else key
                h = {"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})}
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                async with s.post(url, data=data, headers=h) as r:
                    problem = await r.json(content_type=None)
                    assert (r.status, problem["type"]) == (status, "/v1/problems/" + kind), (what, problem)
                    assert r.headers["Content-Type"] == "application/problem+json", what
                    assert problem["status"] == status and problem["title"] and problem["detail"], what
        assert b.queue.list() == []
        assert not (tmp_path / "data" / "sandbox").exists()
        metrics = generate_latest(b.metrics.registry).decode()
        assert 'homemx_backend_api_rejections_total{key="-",reason="unauthorized"} 3.0' in metrics


@pytest.mark.asyncio
async def test_a_chunked_body_over_the_limit_is_413_and_queues_nothing(tmp_path):
    cfg, _ = api_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[api]\n", '[api]\nmax_message_size = "32k"\n'))
    token = make_keys(tmp_path)["prod"][1]

    async def chunks():  # no Content-Length: only reading finds out
        yield b'{"from": "app@example.org", "to": "alice@example.org", "text": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'

    async with running_backend(cfg) as b:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{b.api.bound_port()}/v1/messages", data=chunks(),
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                assert r.status == 413 and (await r.json(content_type=None))["type"] == "/v1/problems/too-large"
        assert b.queue.list() == []


@pytest.mark.asyncio
async def test_over_the_rate_limit_is_429_with_retry_after(lab):
    for _ in range(2):
        assert (await post(lab, MESSAGE, key="slow"))[0] == 202
    status, problem, headers = await post(lab, MESSAGE, key="slow")
    assert status == 429 and problem["type"] == "/v1/problems/rate-limited"
    assert 1 <= int(headers["Retry-After"]) <= 30  # 2 a minute: a token every 30 s
    assert len(lab.queued()) == 2


@pytest.mark.asyncio
async def test_a_queue_that_cannot_commit_is_503_and_nothing_is_queued(lab):
    # A real fault: the queue's writer refuses once it is closed (what a dead writer thread does).
    lab.backend.queue.close()
    status, problem, _ = await post(lab, MESSAGE)
    assert status == 503 and problem["type"] == "/v1/problems/unavailable"
    with sqlite3.connect(lab.tmp / "data" / "queue.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM message").fetchone()[0] == 0


@pytest.mark.asyncio
async def test_openapi_lists_exactly_the_served_routes(lab):
    from backend.http.api import ROUTES

    async with aiohttp.ClientSession() as s:
        async with s.get(lab.url + "/v1/openapi.json") as r:
            assert r.status == 200
            doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(m, p) for m, p, _ in ROUTES}
    # And the served routes answer (not 404) where the document says.
    for method, path, _ in ROUTES:
        async with aiohttp.ClientSession() as s:
            async with s.request(method, lab.url + path.replace("{id}", "0123456789ABCDEF0")) as r:
                assert r.status != 404 or path.endswith("{id}"), (method, path, r.status)
    status, problem = await get(lab, "/v1/nothing")
    assert status == 404 and problem["type"] == "/v1/problems/not-found"
    async with aiohttp.ClientSession() as s:
        async with s.delete(lab.url + "/v1/messages") as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"


def test_sigkill_right_after_the_202_still_delivers_after_restart(tmp_path, daemons):
    """A real `homemx-backend run`, killed with SIGKILL as soon as the 202 is read. Alice's Maildir
    cannot be made (a file stands where its directory goes), so the message cannot have been
    delivered before the kill: what the restarted daemon delivers came from the durable queue."""
    api_port, lan_port = free_port(), free_port()
    cfg, _ = api_config(tmp_path, api_port, lan_port)
    tokens = make_keys(tmp_path)
    blocker = tmp_path / "data" / "mail" / DOMAIN / "alice"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    d = Daemon(cfg).start(api_port)
    daemons.append(d)
    req = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/v1/messages", method="POST",
        data=json.dumps({"from": "app@example.org", "to": ALICE, "subject": "kill9", "text": "survives"}).encode(),
        headers={"Authorization": f"Bearer {tokens['prod'][1]}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        assert r.status == 202
        qid = json.loads(r.read())["id"]
    d.kill9()
    blocker.unlink()
    d2 = Daemon(cfg).start(api_port)
    daemons.append(d2)
    assert run_cli("queue", "retry", "-c", str(cfg)).returncode == 0  # the blocked attempt deferred it
    [f] = wait_for_sync(lambda: maildir_files(tmp_path, ALICE), 20)
    assert b"survives" in f.read_bytes() and qid.encode() in f.read_bytes()
    # The restarted daemon knows which key sent it.
    req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/messages/{qid}",
                                 headers={"Authorization": f"Bearer {tokens['prod'][1]}"})
    st = wait_for_sync(lambda: (lambda s: s if s["recipients"][0]["state"] == "delivered" else None)(
        json.loads(urllib.request.urlopen(req, timeout=10).read())), 20)
    assert st["recipients"][0]["address"] == ALICE


@pytest.mark.asyncio
async def test_https_with_the_server_certificate(tmp_path):
    cfg, keys = api_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[api]\n", "[api]\ntls = true\n"))
    tokens = make_keys(tmp_path)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))
    ctx.check_hostname = False  # the certificate names mail.example.org; we connect to 127.0.0.1
    async with running_backend(cfg) as b:
        url = f"https://127.0.0.1:{b.api.bound_port()}/v1/messages"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={"from": "app@example.org", "to": ALICE, "text": "over TLS"}, ssl=ctx,
                              headers={"Authorization": f"Bearer {tokens['prod'][1]}"}) as r:
                assert r.status == 202
                qid = (await r.json())["id"]
            with pytest.raises(aiohttp.ClientError):  # no plain HTTP on that port
                async with s.get(url.replace("https", "http")):
                    pass
        assert "with HTTPS id " + qid in header_fields(b.queue.content(qid), "Received")[0]
        assert verify_all(b.queue.content(qid), keys) == [True]


@pytest.mark.asyncio
async def test_a_client_that_never_finishes_its_request_is_cut_off(tmp_path):
    cfg, _ = api_config(tmp_path)
    cfg.write_text(cfg.read_text() + '\n[http]\ntimeout = "1s"\n')
    token = make_keys(tmp_path)["prod"][1]
    async with running_backend(cfg) as b:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.api.bound_port())
        # Headers that never end (aiohttp's keep-alive timer), then a body that never ends (ours).
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", b.api.bound_port())
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert b.queue.list() == []


DOCS_API = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.mark.asyncio
async def test_the_curl_examples_of_docs_api_md_work_as_written(tmp_path):
    """Every ```sh example of docs/api.md that talks to $HOMEMX_API, run by bash as written."""
    require_tool("curl")
    blocks = [b.split("```", 1)[0] for b in DOCS_API.read_text().split("```sh\n")[1:]]
    examples = [b for b in blocks if "$HOMEMX_API" in b]
    assert len(examples) == 5
    cfg, _ = api_config(tmp_path)
    store = KeyStore(tmp_path / "data" / "apikeys.sqlite3")
    _, token, _ = store.create("nas", ["nas@example.org"])
    store.close()
    async with running_backend(cfg) as b:
        env = {"PATH": os.environ["PATH"], "HOMEMX_API": f"http://127.0.0.1:{b.api.bound_port()}",
               "HOMEMX_TOKEN": token}
        answers = []
        for example in examples:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-e", "-o", "pipefail", "-c", example, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, (example, err)
            answers.append(json.loads(out))
            if "id" in answers[-1] and "MESSAGE_ID" not in env:
                env["MESSAGE_ID"] = answers[-1]["id"]
        sends = [a for a, e in zip(answers, examples) if "/v1/messages\"" in e]
        assert len(sends) == 3 and all(a["recipients"] == [ALICE] for a in sends), answers
        status = next(a for a, e in zip(answers, examples) if "$MESSAGE_ID" in e)
        assert status["id"] == sends[0]["id"] and status["tags"] == ["backup"]
        assert any("openapi" in a for a in answers)
        files = await wait_for(lambda: len(maildir_files(tmp_path, ALICE)) == 3 and maildir_files(tmp_path, ALICE))
        got = b"".join(f.read_bytes() for f in files)
        assert b"sda,42%" in got or base64.b64encode(b"disk,free\nsda,42%\n") in got
        assert b"sdb: 8 reallocated sectors." in got
