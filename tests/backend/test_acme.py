"""ACME at home against a real Pebble (Debian's pebble) resolving through a real nsd: issuance with
http-01 and tls-alpn-01 (Pebble connects to our ports and validates for real), the renewal state
across restarts, Pebble down (backoff recorded, the old certificate kept), injected badNonce errors,
one account for every issuance, the ``cert`` commands. Plus the pure schedule functions."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from backend.config import load_config
from backend.metrics import BackendMetrics
from backend.tls import certfiles, renew
from backend.tls.acme import ACCOUNT_FILE, ACCOUNT_KEY, wanted_names
from backend.tls.challenges import Challenges
from backend.tls.selfsigned import write_self_signed
from tests.backend.helpers import ALICE, BACKEND_CLI, HOSTNAME, RawSMTP, listener_block, running_backend, wait_for, write_config
from tests.lab.nsd import NSD, zone_text
from tests.lab.pebble import Pebble, pebble_version
from tests.lab.ports import free_port

NAMES = [HOSTNAME, "mta-sts.example.org"]  # HOSTNAME is mail.example.org
ZONE = "mail A 127.0.0.1\nmta-sts A 127.0.0.1\n"


# ---------------------------------------------------------------- pure schedule


def _info(not_before=0.0, lifetime=90 * 86400.0, names=tuple(NAMES), placeholder=False, serial=1):
    return certfiles.CertInfo(names, "CN=x", serial, not_before, not_before + lifetime, placeholder)


def test_renewal_time_is_two_thirds_with_bounded_jitter():
    info = _info(not_before=1000.0)
    lo, mid, hi = (renew.renewal_time(info, lambda v=v: v) for v in (0.0, 0.5, 1.0))
    assert mid == pytest.approx(1000 + 60 * 86400)
    assert mid - lo == pytest.approx(0.03 * 90 * 86400) and hi - mid == pytest.approx(0.03 * 90 * 86400)


def test_backoff_doubles_from_a_minute_to_a_day():
    flat = lambda: 0.5  # noqa: E731 - no jitter
    assert [renew.backoff(n, flat) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert renew.backoff(30, flat) == 86400
    assert 54 <= renew.backoff(1, lambda: 0.0) and renew.backoff(1, lambda: 1.0) <= 66


def test_next_due():
    now = 5_000_000.0
    state = renew.RenewalState()
    assert renew.next_due(state, None, NAMES, now) == now  # nothing live
    assert renew.next_due(state, _info(placeholder=True), NAMES, now) == now  # self-signed stand-in
    assert renew.next_due(state, _info(names=(HOSTNAME,)), NAMES, now) == now  # a name was added
    planned = renew.RenewalState(next_attempt=now + 99, serial=1)
    assert renew.next_due(planned, _info(serial=1), NAMES, now) == now + 99  # as planned, not re-jittered
    assert renew.next_due(planned, _info(serial=2), NAMES, now) != now + 99  # another certificate: plan anew
    failing = renew.RenewalState(next_attempt=now + 60, failures=1)
    assert renew.next_due(failing, None, NAMES, now) == now + 60  # backing off even with nothing live


# ---------------------------------------------------------------- the lab


class Lab:
    """nsd serving the names -> 127.0.0.1, Pebble validating on our http/tls ports, the config."""

    def __init__(self, tmp: Path, *, challenge: str = "http-01", nonce_reject: int = 0, acme_extra: str = ""):
        self.tmp = tmp
        self.acme_extra = acme_extra
        self.http_port, self.tls_port = free_port(), free_port()
        self.nsd = NSD({"example.org": zone_text("example.org", ZONE)})
        self.challenge = challenge
        self.nonce_reject = nonce_reject

    def __enter__(self) -> "Lab":
        self.nsd.__enter__()
        try:
            self.pebble = Pebble(dns=f"127.0.0.1:{self.nsd.port}", http_port=self.http_port, tls_port=self.tls_port,
                                 nonce_reject=self.nonce_reject).__enter__()
        except BaseException:
            self.nsd.close()
            raise
        self.config_path = write_config(self.tmp, listener_block("mx", "mx"), extra=f"""
[acme]
enabled = true
directory = "{self.pebble.directory}"
ca_bundle = "{self.pebble.ca_file}"
contact = "postmaster@example.org"
challenge = "{self.challenge}"
names = ["mta-sts.example.org"]
{self.acme_extra}
""")
        self.config = load_config(self.config_path)
        return self

    def __exit__(self, *exc) -> None:
        self.pebble.close()
        self.nsd.close()


@pytest.fixture
def lab(tmp_path):
    with Lab(tmp_path) as lab:
        yield lab


async def _http01_server(challenges: Challenges, port: int) -> web.AppRunner:
    """The smallest HTTP-01 responder (RFC 8555 8.3) over the shared store."""

    async def token(request):
        body = challenges.http01_response(request.match_info["token"])
        return web.Response(text=body) if body is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", token)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _tls_server(challenges: Challenges, port: int, tmp: Path, seen: set) -> asyncio.base_events.Server:
    """Port 443's part in TLS-ALPN-01: a front context switched per SNI to the challenge context.
    ``seen`` collects the SNI switched to a challenge and the ALPN negotiated, of every handshake."""
    write_self_signed(tmp / "front.pem", tmp / "front.key", HOSTNAME)
    front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    front.load_cert_chain(tmp / "front.pem", tmp / "front.key")

    def pick(obj, name, _ctx):
        alt = challenges.tls_alpn_context(name)
        if alt is not None:
            obj.context = alt
            seen.add(("sni", name))

    front.sni_callback = pick

    async def serve(reader, writer):
        seen.add(("alpn", writer.get_extra_info("ssl_object").selected_alpn_protocol()))
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", port, ssl=front)


def _renewer(config, challenges: Challenges, metrics=None, **kw) -> renew.Renewer:
    async def run_blocking(fn, *args):
        return await asyncio.to_thread(fn, *args)

    return renew.Renewer(config, challenges, metrics, run_blocking, **kw)


async def _served_certificate(fullchain: Path, key: Path, root_pem: bytes, name: str) -> x509.Certificate:
    """Serve the pair on a real socket and connect as a client that trusts only ``root_pem`` and
    checks ``name``: what a mail client trusting Pebble's root would see."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(fullchain, key)

    async def serve(reader, writer):
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    client = ssl.create_default_context(cadata=root_pem.decode())
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1], ssl=client,
                                                  server_hostname=name)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der)
    finally:
        srv.close()
        await srv.wait_closed()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _new_accounts(pebble: Pebble) -> int:
    # Pebble logs one "POST /sign-me-up" per newAccount request (RFC 8555 7.3).
    return len(re.findall(r"POST /sign-me-up", pebble.log()))


# ---------------------------------------------------------------- issuance


@pytest.mark.asyncio
async def test_http01_issuance_replaces_the_placeholder(tmp_path, capsys):
    # The reload hook (Dovecot's, in real life) copies what is live when it runs.
    hooked = tmp_path / "hook-saw.pem"
    live = tmp_path / "data" / "acme" / "live" / "fullchain.pem"
    with Lab(tmp_path, acme_extra=f'reload_hook = "cp {live} {hooked}"') as lab:
        await _http01_issuance(lab, capsys)
        assert hooked.read_bytes() == live.read_bytes()  # ran after the new pair was live


async def _http01_issuance(lab: Lab, capsys) -> None:
    assert renew.prepare(lab.config)  # first start: a self-signed stand-in, so TLS works at once
    fullchain, key = certfiles.live_paths(lab.config.acme_dir)
    assert certfiles.read_live(lab.config.acme_dir).placeholder
    challenges = Challenges()
    metrics = BackendMetrics()
    http = await _http01_server(challenges, lab.http_port)
    try:
        r = _renewer(lab.config, challenges, metrics)
        t0 = time.monotonic()
        assert await r.attempt(), lab.pebble.log()[-2000:]
        took = time.monotonic() - t0
    finally:
        await http.cleanup()
    with capsys.disabled():
        print(f"\n[pebble {pebble_version()}] http-01 issuance for {len(NAMES)} names: {took:.2f} s")
    cert = await _served_certificate(fullchain, key, lab.pebble.issuer_root(), "mta-sts.example.org")
    assert sorted(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)) == sorted(NAMES)
    assert "Pebble" in cert.issuer.rfc4514_string()
    # Keys generated here, private; answers removed once the order is done.
    acme_dir = lab.config.acme_dir
    assert _mode(acme_dir) == 0o700 and _mode(acme_dir / ACCOUNT_KEY) == 0o600 and _mode(key) == 0o600
    assert challenges.http01 == {}
    state = renew.load_state(acme_dir)
    info = certfiles.read_live(acme_dir)
    assert (state.last_result, state.failures, state.serial) == ("success", 0, info.serial)
    assert abs(state.next_attempt - (info.not_before + info.lifetime * 2 / 3)) <= 0.031 * info.lifetime
    assert metrics.registry.get_sample_value("homemx_backend_cert_expiry_timestamp_seconds") == info.not_after
    assert metrics.registry.get_sample_value("homemx_backend_cert_renewal_attempts_total", {"result": "success"}) == 1


@pytest.mark.asyncio
async def test_tls_alpn01_issuance(tmp_path, caplog):
    # A failing reload hook is logged; the certificate stays installed.
    with Lab(tmp_path, challenge="tls-alpn-01", acme_extra='reload_hook = "echo no dovecot here; exit 3"') as lab:
        challenges = Challenges()
        seen: set = set()
        srv = await _tls_server(challenges, lab.tls_port, tmp_path, seen)
        try:
            assert await _renewer(lab.config, challenges).attempt(), lab.pebble.log()[-2000:]
        finally:
            srv.close()
            await srv.wait_closed()
        fullchain, key = certfiles.live_paths(lab.config.acme_dir)
        cert = await _served_certificate(fullchain, key, lab.pebble.issuer_root(), HOSTNAME)
        assert not certfiles.cert_info(fullchain.read_bytes()).placeholder
        assert cert.serial_number == certfiles.read_live(lab.config.acme_dir).serial
        assert challenges.tls_alpn_context(HOSTNAME) is None  # removed after the order
        # Pebble validated each name on our port, over acme-tls/1 only.
        assert seen == {("sni", name) for name in NAMES} | {("alpn", "acme-tls/1")}
        assert [r.getMessage() for r in caplog.records if "reload_hook" in r.getMessage()] == [
            "reload_hook 'echo no dovecot here; exit 3' exited 3: no dovecot here"]


@pytest.mark.asyncio
async def test_bad_nonces_are_retried(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="homemx.acme")
    # Pebble rejects half of all good nonces; the library alone retries once, so an order of ~15
    # signed requests would fail almost surely without our retries.
    with Lab(tmp_path, nonce_reject=50) as lab:
        challenges = Challenges()
        http = await _http01_server(challenges, lab.http_port)
        try:
            assert await _renewer(lab.config, challenges).attempt(), renew.load_state(lab.config.acme_dir).last_error
        finally:
            await http.cleanup()
        retries = [r for r in caplog.records if "badNonce" in r.getMessage()]
        # ~15 signed requests at 50 %: about as many rejections, several of them twice in a row.
        assert len(retries) >= 2
        # Each rejected request fetched a fresh nonce (RFC 8555 7.2) before it was sent again.
        assert lab.pebble.log().count("HEAD /nonce-plz") >= len(retries)


@pytest.mark.asyncio
async def test_account_registered_once_and_reused(lab):
    challenges = Challenges()
    http = await _http01_server(challenges, lab.http_port)
    try:
        r = _renewer(lab.config, challenges)
        assert await r.attempt()
        account = json.loads((lab.config.acme_dir / ACCOUNT_FILE).read_text())
        first = certfiles.read_live(lab.config.acme_dir).serial
        assert await _renewer(lab.config, challenges).attempt()  # a fresh Renewer: as after a restart
    finally:
        await http.cleanup()
    assert json.loads((lab.config.acme_dir / ACCOUNT_FILE).read_text())["uri"] == account["uri"]
    assert _new_accounts(lab.pebble) == 1
    assert certfiles.read_live(lab.config.acme_dir).serial != first
    # Two archives kept at most: the live one and the one before.
    assert len(list((lab.config.acme_dir / certfiles.ARCHIVE).iterdir())) == 2


@pytest.mark.asyncio
async def test_pebble_down_backs_off_and_keeps_the_old_certificate(lab, caplog):
    challenges = Challenges()
    metrics = BackendMetrics()
    http = await _http01_server(challenges, lab.http_port)
    try:
        assert await _renewer(lab.config, challenges, metrics).attempt()
        old = certfiles.read_live(lab.config.acme_dir)
        lab.pebble.stop()
        r = _renewer(lab.config, challenges, metrics)
        before = time.time()
        assert not await r.attempt()
        s1 = renew.load_state(lab.config.acme_dir)
        assert (s1.failures, s1.last_result) == (1, "failure")
        assert s1.last_error == f"cannot reach the CA ({lab.pebble.directory}): Connection refused"
        assert before + 54 <= s1.next_attempt <= time.time() + 66  # 1 min ± 10 %
        assert not await r.attempt()
        s2 = renew.load_state(lab.config.acme_dir)
        assert s2.failures == 2 and before + 108 <= s2.next_attempt <= time.time() + 132  # doubled
        assert certfiles.read_live(lab.config.acme_dir).serial == old.serial  # still live
        assert metrics.registry.get_sample_value("homemx_backend_cert_expiry_timestamp_seconds") == old.not_after
        assert metrics.registry.get_sample_value("homemx_backend_cert_renewal_failures") == 2
        assert metrics.registry.get_sample_value("homemx_backend_cert_renewal_attempts_total", {"result": "failure"}) == 2
        assert len([r for r in caplog.records if "not issued" in r.getMessage()]) == 2
        assert not [r for r in caplog.records if r.exc_info]  # a network failure is no traceback

        # A restart keeps the backoff: the next attempt is the one recorded, not "at once".
        assert renew.next_due(renew.load_state(lab.config.acme_dir), certfiles.read_live(lab.config.acme_dir),
                              wanted_names(lab.config), time.time()) == s2.next_attempt
        # Pebble back (it forgot every account: a new one is registered); a new process whose
        # clock is past the backoff renews on its own.
        lab.pebble.start()
        r2 = _renewer(lab.config, challenges, metrics, now=lambda: time.time() + 200)
        task = asyncio.create_task(r2.run())
        try:
            await wait_for(lambda: r2.attempts >= 1, timeout=30)
        finally:
            task.cancel()
        s3 = renew.load_state(lab.config.acme_dir)
        assert (s3.failures, s3.last_result) == (0, "success"), s3.last_error
        assert certfiles.read_live(lab.config.acme_dir).serial != old.serial
        assert metrics.registry.get_sample_value("homemx_backend_cert_renewal_failures") == 0
    finally:
        await http.cleanup()


@pytest.mark.asyncio
async def test_renewal_state_survives_a_restart(lab):
    challenges = Challenges()
    http = await _http01_server(challenges, lab.http_port)
    try:
        assert await _renewer(lab.config, challenges).attempt()
    finally:
        await http.cleanup()
    state = renew.load_state(lab.config.acme_dir)
    info = certfiles.read_live(lab.config.acme_dir)
    # A new process plans the very attempt recorded (same jitter), far in the future; nothing due.
    due = renew.next_due(renew.load_state(lab.config.acme_dir), info, wanted_names(lab.config), time.time())
    assert due == state.next_attempt > time.time() + 86400
    # A name added to the config makes it due at once.
    lab.config_path.write_text(lab.config_path.read_text().replace(
        'names = ["mta-sts.example.org"]', 'names = ["mta-sts.example.org", "autoconfig.example.org"]'))
    cfg = load_config(lab.config_path)
    now = time.time()
    assert renew.next_due(state, info, wanted_names(cfg), now) == now


# ---------------------------------------------------------------- the cert commands


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BACKEND_CLI, "cert", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.asyncio
async def test_cert_status_and_renew_now_through_the_daemon(lab):
    r = await asyncio.to_thread(_cli, "status", "-c", str(lab.config_path), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["certificate"] is None  # nothing yet: says so, exit 1
    renew.prepare(lab.config)
    challenges = Challenges()
    http = await _http01_server(challenges, lab.http_port)
    renewer = _renewer(lab.config, challenges)
    await renewer.listen_for_requests()
    try:
        # `cert renew --now` asks the running daemon (here: this renewer) and waits for the outcome.
        proc = await asyncio.create_subprocess_exec(BACKEND_CLI, "cert", "renew", "--now", "-c", str(lab.config_path),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_for(lambda: renewer._forced, timeout=30)
        task = asyncio.create_task(renewer.run())
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        task.cancel()
    finally:
        renewer.close()
        await http.cleanup()
    info = certfiles.read_live(lab.config.acme_dir)
    assert proc.returncode == 0, (out, err)
    assert f"{info.serial:x}" in out.decode()
    assert not (lab.config.acme_dir / renew.WAKE_SOCKET).exists()

    r = await asyncio.to_thread(_cli, "status", "-c", str(lab.config_path), "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    cert = status["certificate"]
    assert sorted(cert["names"]) == sorted(NAMES) and cert["serial"] == f"{info.serial:x}"
    assert "Pebble" in cert["issuer"] and 1800 < cert["days_left"] <= 1830  # Pebble's 5-year default
    assert status["renewal"]["last_result"] == "success" and status["renewal"]["failures"] == 0
    assert status["wanted_names"] == NAMES and status["missing_names"] == []
    text = await asyncio.to_thread(_cli, "status", "-c", str(lab.config_path))
    assert text.returncode == 0 and "next renewal" in text.stdout and HOSTNAME in text.stdout


def test_cert_renew_now_without_a_daemon_says_so(lab):
    r = _cli("renew", "--now", "-c", str(lab.config_path))
    assert r.returncode == 1 and "no running backend" in r.stderr


# ---------------------------------------------------------------- the whole backend


def _backend_config(lab: Lab, challenge: str) -> Path:
    """mx (STARTTLS) and submissions (465) listeners, the web face on the ports Pebble validates."""
    listeners = listener_block("mx", "mx") + listener_block("submissions", "submissions")
    return write_config(lab.tmp, listeners, extra=f"""
[acme]
enabled = true
directory = "{lab.pebble.directory}"
ca_bundle = "{lab.pebble.ca_file}"
contact = "postmaster@example.org"
challenge = "{challenge}"

[http]
enabled = true
listen_http = "127.0.0.1:{lab.http_port}"
listen_https = "127.0.0.1:{lab.tls_port}"
""")


async def _tls_serial(port: int, root: bytes, name: str, *, starttls: bool) -> tuple[int, RawSMTP]:
    """Handshake as a client trusting only Pebble's root (name checked); the serial it was shown."""
    ctx = ssl.create_default_context(cadata=root.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    smtp = RawSMTP(reader, writer)
    if starttls:
        assert (await smtp.reply()).startswith("220")
        assert (await smtp.cmd("EHLO client.example")).startswith("250")
        assert (await smtp.cmd("STARTTLS")).startswith("220")
    await writer.start_tls(ctx, server_hostname=name)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number, smtp


@pytest.mark.asyncio
@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_backend_issues_at_start_and_renews_without_restart(tmp_path, challenge):
    """The acceptance path on loopback: the backend starts with a placeholder, its renewer obtains
    a certificate through the backend's own web face (port 80 tokens or 443 acme-tls/1), and STARTTLS,
    465 and HTTPS show it without a restart; a forced renewal shows a new serial to new handshakes
    while an SMTP session opened before it completes its transaction."""
    zone = ZONE + "autoconfig A 127.0.0.1\n"
    with Lab(tmp_path, challenge=challenge) as lab:
        lab.nsd.reload({"example.org": zone_text("example.org", zone)})
        cfg_path = _backend_config(lab, challenge)
        async with running_backend(cfg_path) as b:
            acme_dir = b.config.acme_dir
            await wait_for(lambda: b.renewer.attempts >= 1, timeout=60)
            first = certfiles.read_live(acme_dir)
            assert not first.placeholder, renew.load_state(acme_dir).last_error
            assert set(first.names) == {HOSTNAME, "mta-sts.example.org", "autoconfig.example.org"}
            root = lab.pebble.issuer_root()
            mx, sub = b.bound_port("mx"), b.bound_port("submissions")
            serial, old_session = await _tls_serial(mx, root, HOSTNAME, starttls=True)
            assert serial == first.serial  # the listener bound with the placeholder now serves the issued one
            assert (await _tls_serial(sub, root, HOSTNAME, starttls=False))[0] == first.serial
            https, _ = await _tls_serial(lab.tls_port, root, "mta-sts.example.org", starttls=False)
            assert https == first.serial

            # A session opened before the renewal, mid-transaction.
            assert (await old_session.cmd("EHLO client.example")).startswith("250")
            assert (await old_session.cmd("MAIL FROM:<sender@example.net>")).startswith("250")
            assert (await old_session.cmd(f"RCPT TO:<{ALICE}>")).startswith("250")

            b.renewer.request_now()  # what `cert renew --now` sends
            await wait_for(lambda: b.renewer.attempts >= 2, timeout=60)
            second = certfiles.read_live(acme_dir)
            assert second.serial != first.serial
            assert (await _tls_serial(sub, root, HOSTNAME, starttls=False))[0] == second.serial
            assert (await _tls_serial(mx, root, HOSTNAME, starttls=True))[0] == second.serial

            assert (await old_session.cmd("DATA")).startswith("354")
            assert (await old_session.cmd("Subject: before the renewal\r\n\r\nbody\r\n.")).startswith("250")
            der = old_session.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert x509.load_der_x509_certificate(der).serial_number == first.serial  # it kept its own
            old_session.close()
            assert b.challenges.http01 == {} and b.challenges.tls_alpn_context(HOSTNAME) is None


# ---------------------------------------------------------------- dns-01


@pytest.mark.asyncio
async def test_dns01_by_rfc2136_update_with_tsig(tmp_path):
    """dns-01 through a real RFC 2136 primary (Knot) that Pebble resolves through: our TSIG-signed
    UPDATE puts the TXT records, Pebble finds them, and they are deleted after the order."""
    from tests.lab.knot import Knot

    with Knot({"example.org": zone_text("example.org", ZONE)}) as knot, \
            Pebble(dns=f"127.0.0.1:{knot.port}", http_port=free_port(), tls_port=free_port()) as pebble:
        cfg_path = write_config(tmp_path, listener_block("mx", "mx"), extra=f"""
[acme]
enabled = true
directory = "{pebble.directory}"
ca_bundle = "{pebble.ca_file}"
challenge = "dns-01"
names = ["mta-sts.example.org"]
dns01_server = "127.0.0.1:{knot.port}"
dns01_tsig_key_file = "{knot.key_file}"
""")
        config = load_config(cfg_path)
        assert await _renewer(config, Challenges()).attempt(), renew.load_state(config.acme_dir).last_error
        info = certfiles.read_live(config.acme_dir)
        assert sorted(info.names) == sorted(NAMES) and "Pebble" in info.issuer
        log = knot.log()
        assert log.count("DDNS, processing 1 updates") >= 4, log  # an add and a delete per name
        import dns.resolver

        for name in NAMES:  # cleaned up
            with pytest.raises(dns.resolver.NXDOMAIN):
                knot.resolver().resolve(f"_acme-challenge.{name}", "TXT")


HOOK = r'''#!{python}
"""dns01_hook for the test: publishes through pebble-challtestsrv's management API."""
import json, sys, urllib.request
action, name, value = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(f"{{action}} {{name}} {{value}}\n")
path, body = ("/set-txt", {{"host": name + ".", "value": value}}) if action == "add" else ("/clear-txt", {{"host": name + "."}})
urllib.request.urlopen("http://127.0.0.1:{port}" + path, data=json.dumps(body).encode(), timeout=5).read()
'''


@pytest.mark.asyncio
async def test_dns01_by_hook(tmp_path):
    """dns-01 through the operator's hook (HOOK add|remove NAME VALUE), here publishing into Pebble's
    own challenge DNS server (pebble-challtestsrv), which Pebble resolves through."""
    import sys

    dns_port, mgmt = free_port(udp=True), free_port()
    srv = subprocess.Popen(["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns_port}", "-management", f"127.0.0.1:{mgmt}",
                            "-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv6", ""],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        def up():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{mgmt}/clear-txt", data=b'{"host":"x."}', timeout=1).read()
                return True
            except OSError:
                return False

        await wait_for(up, timeout=15)
        calls = tmp_path / "hook-calls"
        hook = tmp_path / "dns-hook"
        hook.write_text(HOOK.format(python=sys.executable, calls=str(calls), port=mgmt))
        hook.chmod(0o755)
        with Pebble(dns=f"127.0.0.1:{dns_port}", http_port=free_port(), tls_port=free_port()) as pebble:
            cfg_path = write_config(tmp_path, listener_block("mx", "mx"), extra=f"""
[acme]
enabled = true
directory = "{pebble.directory}"
ca_bundle = "{pebble.ca_file}"
challenge = "dns-01"
names = ["mta-sts.example.org"]
dns01_hook = "{hook}"
""")
            config = load_config(cfg_path)
            assert await _renewer(config, Challenges()).attempt(), renew.load_state(config.acme_dir).last_error
        lines = calls.read_text().splitlines()
        assert sorted(line.split()[:2] for line in lines) == sorted(
            [[a, f"_acme-challenge.{n}"] for n in NAMES for a in ("add", "remove")])
        assert sorted(certfiles.read_live(config.acme_dir).names) == sorted(NAMES)
    finally:
        srv.terminate()
        srv.wait(timeout=10)


# ---------------------------------------------------------------- config


def test_with_acme_on_listeners_need_no_tls_certificate(tmp_path):
    from backend.config import ConfigError

    path = write_config(tmp_path, listener_block("mx", "mx") + listener_block("submissions", "submissions"))
    text = re.sub(r"\[tls\]\ncert = .*\nkey = .*\n", "", path.read_text())
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"needs \[tls\] cert and key"):
        load_config(path)
    path.write_text(text + '\n[acme]\nenabled = true\ndirectory = "https://127.0.0.1:14000/dir"\n')
    cfg = load_config(path)
    assert cfg.tls.cert is None and cfg.acme.enabled
