"""ACME (RFC 8555) at home: the account (registered once, its key and URL kept in acme_dir), and one
issuance — new order, the challenges answered (http-01, tls-alpn-01 or dns-01), finalize with a
fresh certificate key, the chain downloaded.

Built on certbot's ``acme`` package (the reference client: JWS, nonces, account, order and
finalize handling); it is synchronous (requests), so ``issue`` runs in one of the backend's worker
threads (Backend.run_blocking) and never on the event loop. Installing the result and deciding
when to call ``issue`` belong to backend/tls/renew.py.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from backend.config import BackendConfig
from backend.durable import write_atomic, write_secret
from backend.tls.certfiles import ensure_dir, private_key_pem
from backend.tls.challenges import Challenges, tls_alpn_certificate

log = logging.getLogger("homemx.acme")

ACCOUNT_KEY = "account.key"
ACCOUNT_FILE = "account.json"
USER_AGENT = "homemx (certbot acme)"
NETWORK_TIMEOUT = 30  # seconds per HTTP request to the CA
ORDER_TIMEOUT = 180.0  # validation and finalization of one order
# RFC 8555 6.5: a badNonce error carries a fresh nonce and the request may simply be sent again.
# The library retries once; a CA (or Pebble's PEBBLE_WFE_NONCEREJECT) may reject several in a row.
BAD_NONCE_RETRIES = 20
DNS_PROPAGATION_TIMEOUT = 120.0
DNS_TTL = 60


class ACMEError(Exception):
    """An issuance failed; the message says where (account, order, which name's challenge, finalize)."""


@dataclass(frozen=True)
class Issued:
    fullchain_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]


def wanted_names(config: BackendConfig) -> list[str]:
    """The names the certificate must cover: the mail host name; mta-sts.D and autoconfig.D for
    every local domain D when the HTTPS face is on (RFC 8461 3.3: the policy host's certificate);
    then [acme] names. Lower-case, each once, in that order."""
    names = [config.server.hostname]
    if config.http.enabled:
        for domain in config.domains:
            names += [f"mta-sts.{domain}", f"autoconfig.{domain}"]
    names += list(config.acme.names)
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.lower().rstrip("."), None)
    return list(seen)


# ---------------------------------------------------------------- keys and account


def _new_key(key_type: str):
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def load_or_create_account_key(acme_dir: Path):
    """The account key (EC P-256), generated here once and kept 0600."""
    path = Path(acme_dir) / ACCOUNT_KEY
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            write_secret(path, private_key_pem(key))
        except FileExistsError:  # another process made one meanwhile: use theirs
            return serialization.load_pem_private_key(path.read_bytes(), password=None)
        return key


def read_account(acme_dir: Path) -> dict | None:
    try:
        return json.loads((Path(acme_dir) / ACCOUNT_FILE).read_text())
    except (OSError, ValueError):
        return None


class _Network(acme_client.ClientNetwork):
    def post(self, *args, **kwargs):
        for attempt in range(BAD_NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as e:
                if e.code != "badNonce" or attempt == BAD_NONCE_RETRIES - 1:
                    raise
                log.debug("badNonce from the CA; sending again (%d)", attempt + 1)
        raise AssertionError("unreachable")


class Account:
    """A client logged in to the CA with our account: registered on first use, then reused."""

    def __init__(self, config: BackendConfig):
        self.config = config
        self.acme_dir = config.acme_dir
        ensure_dir(self.acme_dir)
        self.key = jose.JWKEC(key=load_or_create_account_key(self.acme_dir))
        verify = str(config.acme.ca_bundle) if config.acme.ca_bundle else True
        self.net = _Network(self.key, alg=jose.ES256, verify_ssl=verify, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
        directory = acme_client.ClientV2.get_directory(config.acme.directory, self.net)
        self.client = acme_client.ClientV2(directory, self.net)
        stored = read_account(self.acme_dir)
        if stored and stored.get("directory") == config.acme.directory and stored.get("uri"):
            self.net.account = messages.RegistrationResource(uri=stored["uri"], body=messages.Registration())
        else:
            self.register()

    def register(self) -> None:
        """newAccount (RFC 8555 7.3), terms agreed, contact from [acme] contact; the URL is kept."""
        self.net.account = None
        contact = self.config.acme.contact
        reg = messages.NewRegistration.from_data(email=contact, terms_of_service_agreed=True)
        try:
            regr = self.client.new_account(reg)
            uri = regr.uri
        except errors.ConflictError as e:  # RFC 8555 7.3.1: this key already has an account
            uri = e.location
            self.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        record = {"directory": self.config.acme.directory, "uri": uri, "created": int(time.time())}
        write_atomic(self.acme_dir / ACCOUNT_FILE, json.dumps(record, indent=2).encode() + b"\n", 0o600)
        log.info("ACME account registered at %s: %s", self.config.acme.directory, uri)


# ---------------------------------------------------------------- challenges


class _TLSALPN01Response(acme_challenges.KeyAuthorizationChallengeResponse):
    # acme 5 no longer models tls-alpn-01 (it reaches us as UnrecognizedChallenge); the answer
    # POSTed is "{}" like for every challenge (RFC 8555 7.5.1), which this class serializes to.
    typ = "tls-alpn-01"


def _key_authorization(token: str, account_key: jose.JWK) -> str:
    # RFC 8555 8.1: token || '.' || base64url(JWK thumbprint, RFC 7638)
    return f"{token}.{jose.b64encode(account_key.thumbprint()).decode()}"


def _challenge_type(challb: messages.ChallengeBody) -> str:
    chall = challb.chall
    if isinstance(chall, acme_challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type"))
    return str(chall.typ)


class _Answers:
    """The answers put out for one order, removed again whatever happens."""

    def __init__(self, config: BackendConfig, challenges: Challenges, account_key: jose.JWK):
        self.config = config
        self.challenges = challenges
        self.account_key = account_key
        self._undo: list = []
        self._dns = DNS01Publisher(config) if config.acme.challenge == "dns-01" else None

    def put(self, name: str, challb: messages.ChallengeBody) -> acme_challenges.ChallengeResponse:
        kind = _challenge_type(challb)
        if kind == "http-01":
            chall = challb.chall
            token = chall.encode("token")
            self.challenges.put_http01(token, chall.key_authorization(self.account_key))
            self._undo.append(lambda: self.challenges.remove_http01(token))
            return chall.response(self.account_key)
        if kind == "tls-alpn-01":
            token = str(challb.chall.jobj["token"])
            keyauth = _key_authorization(token, self.account_key)
            self.challenges.put_tls_alpn(name, *tls_alpn_certificate(name, keyauth))
            self._undo.append(lambda: self.challenges.remove_tls_alpn(name))
            return _TLSALPN01Response(key_authorization=keyauth)
        if kind == "dns-01":
            chall = challb.chall
            record, value = chall.validation_domain_name(name), chall.validation(self.account_key)
            self._dns.add(record, value)
            self._undo.append(lambda: self._dns.remove(record, value))
            return chall.response(self.account_key)
        raise ACMEError(f"{name}: no support for challenge {kind}")

    def ready(self) -> None:
        """Block until every answer is visible to the CA (dns-01: on the primary)."""
        if self._dns is not None:
            self._dns.wait_visible()

    def remove_all(self) -> None:
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as e:  # noqa: BLE001 - a left-over TXT record is logged, not fatal
                log.warning("ACME challenge clean-up failed: %s", e)
        self._undo.clear()


# ---------------------------------------------------------------- dns-01


def read_tsig_key(path: Path):
    """A dnspython keyring from a TSIG key file: BIND's ``key "name" { algorithm A; secret "S"; };``
    (what tsig-keygen prints) or one line ``name algorithm secret``."""
    import dns.name
    import dns.tsig

    text = Path(path).read_text()
    m = re.search(r'key\s+"?([^"\s{]+)"?\s*\{[^}]*?algorithm\s+([\w-]+)\s*;[^}]*?secret\s+"([^"]+)"', text, re.S)
    if m:
        name, algorithm, secret = m.groups()
    else:
        parts = text.split()
        if len(parts) != 3:
            raise ACMEError(f"{path}: not a TSIG key (BIND key clause or 'name algorithm secret')")
        name, algorithm, secret = parts
    return dns.tsig.Key(dns.name.from_text(name), secret, dns.name.from_text(algorithm))


class DNS01Publisher:
    """TXT records for dns-01 (RFC 8555 8.4): an RFC 2136 UPDATE (TSIG-signed when a key file is
    set) to [acme] dns01_server, or the operator's hook (``HOOK add|remove NAME VALUE``)."""

    def __init__(self, config: BackendConfig):
        self.acme = config.acme
        self.pending: list[tuple[str, str]] = []
        if not self.acme.dns01_hook and not self.acme.dns01_server:
            raise ACMEError("dns-01 needs [acme] dns01_server or dns01_hook")
        self.key = read_tsig_key(self.acme.dns01_tsig_key_file) if self.acme.dns01_tsig_key_file else None

    def _hook(self, action: str, name: str, value: str) -> None:
        cmd = [*shlex.split(self.acme.dns01_hook), action, name, value]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=DNS_PROPAGATION_TIMEOUT)
        if r.returncode != 0:
            raise ACMEError(f"dns01_hook {action} {name}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}")

    def _resolver(self):
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        host, port = self.acme.dns01_server
        r.nameservers, r.port = [host], port
        r.timeout, r.lifetime = 3.0, 10.0
        r.cache = None
        return r

    def _update(self, action: str, name: str, value: str) -> None:
        import dns.name
        import dns.query
        import dns.rcode
        import dns.resolver
        import dns.update

        fqdn = dns.name.from_text(name)
        zone = dns.resolver.zone_for_name(fqdn, resolver=self._resolver())  # the primary tells us its zone
        upd = dns.update.UpdateMessage(zone, keyring=self.key, keyname=self.key.name if self.key else None,
                                       keyalgorithm=self.key.algorithm if self.key else None)
        rel = fqdn.relativize(zone)
        txt = '"' + value + '"'
        if action == "add":
            upd.add(rel, DNS_TTL, "TXT", txt)
        else:
            upd.delete(rel, "TXT", txt)
        host, port = self.acme.dns01_server
        resp = dns.query.tcp(upd, host, port=port, timeout=10)
        if resp.rcode() != dns.rcode.NOERROR:
            raise ACMEError(f"RFC 2136 update {action} {name} at {host}:{port}: {dns.rcode.to_text(resp.rcode())}")

    def add(self, name: str, value: str) -> None:
        if self.acme.dns01_hook:
            self._hook("add", name, value)
        else:
            self._update("add", name, value)
        self.pending.append((name, value))

    def remove(self, name: str, value: str) -> None:
        if self.acme.dns01_hook:
            self._hook("remove", name, value)
        else:
            self._update("remove", name, value)

    def wait_visible(self) -> None:
        """Wait until the primary answers every TXT value put (with a hook and no dns01_server we
        trust the hook to return only when its record is published, like certbot's manual hooks)."""
        if not self.acme.dns01_server:
            return
        import dns.exception
        import dns.resolver

        r = self._resolver()
        deadline = time.monotonic() + DNS_PROPAGATION_TIMEOUT
        for name, value in self.pending:
            while True:
                try:
                    answer = r.resolve(name, "TXT")
                    if any(b"".join(rr.strings).decode() == value for rr in answer):
                        break
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout, dns.resolver.NoNameservers):
                    pass
                if time.monotonic() > deadline:
                    raise ACMEError(f"dns-01: {name} TXT not visible at the primary within {DNS_PROPAGATION_TIMEOUT:.0f} s")
                time.sleep(1)


# ---------------------------------------------------------------- one issuance


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests error (requests -> urllib3 -> the socket's OSError):
    'Connection refused' rather than three wrappers' worth of text."""
    for _ in range(10):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else getattr(e, "reason", None)
        if not isinstance(inner, BaseException):
            inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    return f"{type(e).__name__}: {str(e)[:200]}"


def _describe(e: BaseException) -> str:
    if isinstance(e, errors.ValidationError):
        parts = []
        for authzr in e.failed_authzrs:
            ident = authzr.body.identifier.value
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    parts.append(f"{ident}: {ch.error.code or ch.error.typ}: {ch.error.detail}")
        return "validation failed: " + "; ".join(parts)
    if isinstance(e, messages.Error):
        return f"{e.code or e.typ}: {e.detail}"
    if isinstance(e, requests.RequestException):
        url = e.request.url if e.request is not None else "the CA"
        return f"cannot reach the CA ({url}): {_root_cause(e)}"
    if isinstance(e, errors.TimeoutError):
        return f"the order was not ready within {ORDER_TIMEOUT:.0f} s"
    if isinstance(e, errors.IssuanceError):
        return f"finalize refused: {e.error.code or e.error.typ}: {e.error.detail}"
    return f"{type(e).__name__}: {e}"


def issue(config: BackendConfig, challenges: Challenges, names: list[str] | None = None) -> Issued:
    """Obtain a certificate for ``names`` (default ``wanted_names``) with a new key. Blocking: run
    it in a worker thread. Raises ACMEError with a one-line reason."""
    names = names or wanted_names(config)
    try:
        account = Account(config)
        return _order(config, account, challenges, names)
    except ACMEError:
        raise
    except (errors.Error, messages.Error, jose.errors.Error, requests.RequestException, OSError, ValueError) as e:
        raise ACMEError(_describe(e)) from e


def _order(config: BackendConfig, account: Account, challenges: Challenges, names: list[str]) -> Issued:
    cert_key = _new_key(config.acme.key_type)
    key_pem = private_key_pem(cert_key)
    csr_pem = crypto_util.make_csr(key_pem, names)
    try:
        orderr = account.client.new_order(csr_pem)
    except messages.Error as e:
        # RFC 8555 7.3: the CA forgot us (a test CA restarted, an account deactivated): register again.
        if e.code not in ("accountDoesNotExist", "unauthorized"):
            raise
        log.info("ACME account %s unknown to the CA (%s); registering a new one", account.net.account.uri, e.code)
        account.register()
        orderr = account.client.new_order(csr_pem)
    answers = _Answers(config, challenges, account.key)
    try:
        to_answer = []
        for authzr in orderr.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # RFC 8555 7.1.4: an authorization still valid from an earlier order
            name = authzr.body.identifier.value
            challb = next((c for c in authzr.body.challenges if _challenge_type(c) == config.acme.challenge), None)
            if challb is None:
                offered = ", ".join(_challenge_type(c) for c in authzr.body.challenges)
                raise ACMEError(f"{name}: the CA does not offer {config.acme.challenge} (offers {offered})")
            to_answer.append((challb, answers.put(name, challb)))
        answers.ready()
        for challb, response in to_answer:
            account.client.answer_challenge(challb, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        orderr = account.client.poll_and_finalize(orderr, deadline)
    finally:
        answers.remove_all()
    return Issued(fullchain_pem=orderr.fullchain_pem.encode(), key_pem=key_pem, names=tuple(names))
