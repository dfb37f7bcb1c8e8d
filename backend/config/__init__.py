"""Backend configuration: the schema of ``backend.toml``, validated as a whole before any socket binds.

The schema is declared on pydantic (docs/development.md says why): each ``[table]`` is a frozen model,
unknown keys are errors (a typo must never silently fall back to a default on a mail server), and
every mistake in the file is reported at once, one ``FILE: KEY: REASON`` line each (``ConfigError``).
Checks that involve several keys (and the files the config names) run at load too. The value parsers
are in ``values.py``, the turning of pydantic errors into lines in ``errors.py``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backend.config.errors import ConfigError, each_valid, fail, problems_of
from backend.config.values import (  # the parse_* functions are part of this package's API (cmd_dkim, tests)
    IP,
    Address,
    Domain,
    Duration,
    FilePath,
    HostPort,
    Networks,
    PositiveInt,
    Str,
    _addresses,
    _cannot_read,
    _ip,
    _list_of,
    _str,
    parse_domain,
    parse_duration,
    parse_hostport,
    parse_network,
    parse_size,
)

LISTENER_KINDS = ("mx", "submission", "submissions", "lan")
TLS_POLICIES = ("opportunistic", "required")
DKIM_ALGORITHMS = ("rsa", "ed25519")

# RFC 5321 4.5.4.1: retry no sooner than 30 min is the classic advice; like mox and Postfix we start
# sooner (most 4xx are greylisting) and grow, then give up after 5 days.
DEFAULT_RETRY_SCHEDULE = (300, 900, 1800, 3600, 7200, 14400, 28800)
DEFAULT_MAX_QUEUE_AGE = 5 * 86400



class _Table(BaseModel):
    """One TOML table: frozen once loaded, and a key the schema does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- tables


class ServerConfig(_Table):
    hostname: Domain  # public name: banner, EHLO, Received, Reporting-MTA
    data_dir: FilePath  # queue database, spool, Maildirs (unless maildir_root is set)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object per line (backend/logsetup.py), for Loki or journald to index.
    log_format: Literal["text", "json"] = "text"
    metrics_listen: HostPort | None = None


class TLSConfig(_Table):
    cert: FilePath | None = None
    key: FilePath | None = None

    @model_validator(mode="after")
    def _usable(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise fail([(("cert" if self.cert is None else "key",), "tls.cert and tls.key must be set together")])
        problems = [((name,), reason) for name in ("cert", "key") if (reason := _cannot_read(getattr(self, name)))]
        if not problems and self.cert is not None:
            import ssl

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as e:
                problems.append(_tls_pair_problem(self.cert, self.key, e))
        if problems:
            raise fail(problems)
        return self


def _tls_pair_problem(cert: Path, key: Path, error: Exception) -> tuple[tuple[str], str]:
    """Which of the two files is unusable and why, in words: OpenSSL says only "PEM lib" for
    either file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except ValueError:
        return ("cert",), f"{cert}: not a PEM certificate"
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        return ("key",), f"{key}: not a PEM private key (or encrypted: the daemon cannot ask for a passphrase)"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        return ("key",), f"{key}: not the private key of the certificate {cert}"
    return ("key",), f"certificate {cert} and key {key} do not load together: {error}"


class ListenerConfig(_Table):
    name: Str
    kind: Literal["mx", "submission", "submissions", "lan"]
    listen: HostPort
    proxy_protocol: StrictBool = False  # expect a PROXY v2 header (mx behind the gateway)
    trusted_proxies: Networks = ()
    trusted_networks: Networks = ()  # lan: submit without AUTH
    # Trusting every address (0.0.0.0/0, ::/0) makes the listener an open relay for whoever can reach
    # it; refused unless this says so (a listener reachable only from trusted hosts, e.g. a container bridge).
    allow_open_relay: StrictBool = False
    max_message_size: Annotated[int, PlainValidator(parse_size)] = 50 * 1024 * 1024
    max_recipients: PositiveInt = 100
    max_received_headers: PositiveInt = 30  # loop detection (Postfix hopcount_limit is 50, mox uses 50)
    # RFC 5321 4.5.3.2 gives 5 min for commands and 10 min for the DATA terminator; we apply one
    # idle timeout per read, which covers both orders of magnitude.
    timeout: Duration = 300.0
    auth_max_failures: PositiveInt = 10  # per real client address per auth_failure_window
    auth_failure_window: Duration = 60.0
    auth_failure_delay: Duration = 1.0  # after the n-th failure in the window, wait n × this before replying (≤ 10 s)
    # lan only (backend/smtp/masquerade.py): senders and recipients without a domain, with a
    # single-label domain or with one of local_hostnames get this domain (default: the first
    # [domain]), like Postfix's myorigin/masquerade_domains, instead of 501 5.1.3.
    masquerade_domain: Domain | None = None
    local_hostnames: Annotated[tuple[str, ...], PlainValidator(_list_of(lambda v: _hostname(v)))] = ()

    @model_validator(mode="after")
    def _trust_makes_sense(self) -> ListenerConfig:
        problems = []
        for key in ("masquerade_domain", "local_hostnames"):
            if self.kind != "lan" and getattr(self, key):
                problems.append(((key,), f"only a lan listener rewrites addresses (this one is {self.kind})"))
        if self.proxy_protocol and not self.trusted_proxies:
            problems.append((("trusted_proxies",), "proxy_protocol = true needs at least one trusted proxy address"))
        if self.kind in ("submission", "submissions") and self.trusted_networks:
            problems.append((("trusted_networks",), f"not allowed on a {self.kind} listener: AUTH is always required there"))
        everyone = [str(n) for n in self.trusted_networks if n.prefixlen == 0]
        if everyone and not self.allow_open_relay:
            problems.append((("trusted_networks",), f"{', '.join(everyone)} trusts every address: whoever reaches this "
                             "listener relays without AUTH (set allow_open_relay = true if that is meant)"))
        if problems:
            raise fail(problems)
        return self


def _hostname(v: Any) -> str:
    """A host name of the LAN (``nas``, ``nas.home.arpa``): one label or more."""
    text = _str(v).lower()
    if not all(re.match(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", label) for label in text.split(".")):
        raise ValueError(f"expected a host name such as nas or nas.home.arpa, got {text!r}")
    return text


@dataclass(frozen=True)
class DomainConfig:
    name: str
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # local part → target addresses
    catch_all: str | None = None  # address that receives mail for unknown local parts


class _DomainTable(_Table):
    """``[domain."example.org"]``: the name is the table's key."""

    aliases: dict[Annotated[str, PlainValidator(lambda v: _str(v).lower())],
                  Annotated[tuple[str, ...], PlainValidator(_addresses)]] = {}
    catch_all: Address | None = None


class DKIMKeyConfig(_Table):
    domain: Domain
    selector: Str
    algorithm: Literal["rsa", "ed25519"]
    private_key: FilePath

    @field_validator("private_key")
    @classmethod
    def _readable(cls, p: Path) -> Path:
        if reason := _cannot_read(p):
            raise ValueError(reason)
        return p


def _smarthost(v: Any) -> tuple[str, int]:
    return parse_hostport(v, 587)


def _retry_schedule(v: Any) -> tuple[float, ...]:
    schedule = _list_of(parse_duration)(v)
    if not schedule:
        raise ValueError("must list at least one interval")
    return schedule


class DeliveryConfig(_Table):
    source_address: IP | None = None  # bind outbound sockets here (the tunnel address)
    nameservers: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()  # empty: /etc/resolv.conf
    dns_port: PositiveInt = 53
    tls_policy: Literal["opportunistic", "required"] = "opportunistic"
    domain_tls_policy: dict[Annotated[str, PlainValidator(lambda v: _str(v).lower())],
                            Literal["opportunistic", "required"]] = {}
    mta_sts: StrictBool = True
    retry_schedule: Annotated[tuple[float, ...], PlainValidator(_retry_schedule)] = DEFAULT_RETRY_SCHEDULE
    max_queue_age: Duration = DEFAULT_MAX_QUEUE_AGE
    delay_notice_after: Duration | None = None  # send a "delayed" DSN once, after this long; None: never
    keep_final: Duration = 86400.0  # how long delivered/bounced entries stay visible in `queue list`
    concurrency: PositiveInt = 20
    per_destination_concurrency: PositiveInt = 4
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    remote_port: PositiveInt = 25  # tests point this at a non-privileged port
    paused: StrictBool = False  # maintenance: accept and queue, attempt no remote delivery (Postfix: defer_transports)
    smarthost: Annotated[tuple[str, int], PlainValidator(_smarthost)] | None = None
    smarthost_hostname: Str | None = None  # TLS server name of the smarthost (defaults to its address)
    smarthost_domains: Annotated[tuple[str, ...], PlainValidator(_list_of(parse_domain))] = ()  # empty: every domain
    smarthost_username: Str | None = None
    smarthost_password_file: FilePath | None = Field(default=None, validate_default=True)
    # "implicit": TLS from the first byte (RFC 8314 3.3, port 465); "starttls": RFC 3207 upgrade.
    # Default: implicit on port 465, STARTTLS on any other port.
    smarthost_tls: Literal["implicit", "starttls"] = "starttls"

    @model_validator(mode="before")
    @classmethod
    def _smarthost_tls_from_port(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "smarthost_tls" not in raw:
            try:
                port = _smarthost(raw["smarthost"])[1]
            except (KeyError, ValueError):
                return raw  # no smarthost, or its own error is reported
            raw = {**raw, "smarthost_tls": "implicit" if port == 465 else "starttls"}
        return raw

    @field_validator("smarthost_password_file")
    @classmethod
    def _password_file(cls, p: Path | None, info: ValidationInfo) -> Path | None:
        if p is None and info.data.get("smarthost_username") is not None:
            # Found now rather than as a 451 on every relayed message.
            raise ValueError("missing: smarthost_username is set, and its password is read from this file")
        if reason := _cannot_read(p):
            raise ValueError(reason)
        return p


class GatewayInfo(_Table):
    """What the backend knows about its gateway, for DNS records and the DNS check."""

    public_ipv4: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()
    public_ipv6: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()


class DNSConfig(_Table):
    dmarc_rua: Address | None = None
    # none: start by monitoring (aggregate reports at dmarc_rua), then quarantine once the reports
    # show only our gateway (docs/dns.md): a stricter start junks our own mail on any setup mistake.
    dmarc_policy: Literal["none", "quarantine", "reject"] = "none"
    mta_sts_mode: Literal["testing", "enforce"] | None = None  # None (disabled), testing, enforce
    mta_sts_id: Str | None = None
    tlsrpt_rua: Str | None = None
    # The daemon runs `dns check` this often (backend/dns/selfcheck.py); 0 turns it off.
    self_check_interval: Duration = 6 * 3600.0


DMARC_DISPOSITIONS = ("none", "quarantine", "reject")


class AuthConfig(_Table):
    """``[auth]``: the inbound checks on mx listeners (backend/auth/, docs/inbound-trust.md)."""

    enabled: StrictBool = True  # SPF, DKIM, ARC and DMARC on every message accepted on mx
    authserv_id: Domain | None = None  # RFC 8601 authserv-id of our Authentication-Results; default server.hostname
    # Apply the sender domain's published DMARC policy (reject → 550 5.7.1, quarantine → Junk); false:
    # verify and record only.
    dmarc_enforce: StrictBool = True
    # Mail on mx whose From is one of our domains and does not pass DMARC is refused, whatever our own
    # published policy says (our users send through submission, never through mx).
    own_domain_protection: StrictBool = True
    # Per sender domain (or its organizational domain), what to do on a DMARC fail instead of the
    # published policy: for senders whose mail is known broken ("none") or who publish none ("reject").
    dmarc_overrides: dict[Annotated[str, PlainValidator(lambda v: parse_domain(v))],
                          Literal["none", "quarantine", "reject"]] = {}
    timeout: Duration = 15.0  # all DNS work for one message; what is unanswered by then is a temperror


class RspamdConfig(_Table):
    """``[rspamd]``: the spam filter, spoken to over its HTTP protocol (backend/auth/rspamd.py).
    Without this table there is no spam filtering."""

    url: Annotated[str, PlainValidator(lambda v: _http_url(v))]
    timeout: Duration = 10.0
    # rspamd down or slow: false accepts the message (and counts it), true answers 451 4.7.1.
    fail_closed: StrictBool = False
    # Which listeners' mail is scanned: mx only by default (submission and lan are our own users).
    scan_listeners: Annotated[tuple[str, ...], PlainValidator(_list_of(_str))] = ("mx",)


def _http_url(v: Any) -> str:
    from urllib.parse import urlsplit

    text = _str(v)
    u = urlsplit(text)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text.rstrip("/")


class ACMEConfig(_Table):
    """``[acme]``: certificates from an ACME CA (RFC 8555) for the mail host name and the names the
    home serves over HTTPS (backend/tls/acme.py, docs/certificates.md). The account key, the
    certificate key and the certificate live in data_dir/acme/ (0600); [tls] cert/key, when set,
    are ignored while ACME is on."""

    enabled: StrictBool = False
    directory: Annotated[str, PlainValidator(lambda v: _http_url(v))] = "https://acme-v02.api.letsencrypt.org/directory"
    contact: Address | None = None  # the account's mailto: contact (expiry warnings from the CA)
    # http-01 (RFC 8555 8.3) through the gateway's port 80; tls-alpn-01 (RFC 8737) through 443;
    # dns-01 (8.4) by RFC 2136 update (dns01_server) or a hook command, for homes without 80/443.
    challenge: Literal["http-01", "tls-alpn-01", "dns-01"] = "http-01"
    # Extra names; the host name, and mta-sts.D and autoconfig.D for every local domain D when the
    # HTTPS face is on, are always included.
    names: Annotated[tuple[str, ...], PlainValidator(_list_of(parse_domain))] = ()
    ca_bundle: FilePath | None = None  # trust this CA file for the ACME server's own HTTPS (a lab's Pebble)
    key_type: Literal["ecdsa-p256", "rsa-2048"] = "ecdsa-p256"
    dns01_server: HostPort | None = None  # RFC 2136 primary to send UPDATEs to
    dns01_tsig_key_file: FilePath | None = None  # "name algorithm secret" (BIND's tsig-keygen format)
    dns01_hook: Str | None = None  # command run as: HOOK add|remove NAME VALUE (instead of RFC 2136)
    # Dovecot (or anything else using the same files) is told after a renewal: e.g. "systemctl reload dovecot".
    reload_hook: Str | None = None


class HTTPConfig(_Table):
    """``[http]``: the home's web face (backend/http/): MTA-STS policies, mail-client autoconfig
    and autodiscover, ACME http-01 tokens; plain HTTP redirects to HTTPS. Behind the gateway's
    80/443 passthrough with PROXY v2."""

    enabled: StrictBool = False
    listen_http: HostPort | None = None  # the gateway's :80 arrives here
    listen_https: HostPort | None = None  # the gateway's :443 arrives here
    proxy_protocol: StrictBool = False
    trusted_proxies: Networks = ()
    max_request_size: Annotated[int, PlainValidator(parse_size)] = 64 * 1024
    timeout: Duration = 30.0  # for a whole request, headers and body
    # Open connections per real client (an IPv4 address or an IPv6 /64); browsers open about 6.
    max_connections_per_client: PositiveInt = 16

    @model_validator(mode="after")
    def _proxies(self) -> HTTPConfig:
        if self.proxy_protocol and not self.trusted_proxies:
            raise fail([(("trusted_proxies",), "proxy_protocol = true needs at least one trusted proxy address")])
        return self


class APIConfig(_Table):
    """``[api]``: the HTTP send API for homelab apps (backend/http/api.py, docs/api.md): on the LAN,
    never through the gateway unless ``listen`` is an address the gateway forwards to."""

    enabled: StrictBool = False
    listen: HostPort | None = None  # e.g. the LAN address, port 8025
    tls: StrictBool = False  # serve HTTPS with the server certificate ([tls] or ACME)
    max_message_size: Annotated[int, PlainValidator(parse_size)] = 25 * 1024 * 1024
    # sandbox keys: messages are stored here (a Maildir), never delivered; default data_dir/sandbox/Maildir
    sandbox_maildir: FilePath | None = None
    # Delivery webhooks (backend/http/webhooks.py): the wait after each failed POST (the last one
    # repeats), when an event is given up, and how long one POST may take.
    webhook_retry_schedule: Annotated[tuple[float, ...], PlainValidator(_retry_schedule)] = (
        10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
    webhook_give_up_after: Duration = 3 * 86400.0
    webhook_timeout: Duration = 10.0


class _UsersTable(_Table):
    passwd_file: FilePath
    maildir_root: FilePath | None = None  # default: data_dir/mail


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two binds collide: same port, and the same address or a wildcard of the same family
    (asyncio makes IPv6 sockets IPv6-only, so 0.0.0.0 and [::] do not collide). Port 0 never does."""
    if a[1] != b[1] or a[1] == 0:
        return False
    ha, hb = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    return ha == hb or (ha.version == hb.version and (ha.is_unspecified or hb.is_unspecified))


def _fmt(hp: tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


class _BackendFile(_Table):
    """The whole of backend.toml."""

    server: ServerConfig = Field(default={}, validate_default=True)
    tls: TLSConfig = TLSConfig()
    acme: ACMEConfig = ACMEConfig()  # before listener: with ACME on, listeners need no [tls] cert
    listener: list[ListenerConfig] = Field(default=[], validate_default=True)
    domain: dict[Domain, _DomainTable] = Field(default={}, validate_default=True)
    users: _UsersTable = Field(default={}, validate_default=True)
    dkim: list[DKIMKeyConfig] = []
    delivery: DeliveryConfig = DeliveryConfig()
    gateway: GatewayInfo = GatewayInfo()
    dns: DNSConfig = DNSConfig()
    auth: AuthConfig = AuthConfig()
    rspamd: RspamdConfig | None = None
    http: HTTPConfig = HTTPConfig()
    api: APIConfig = APIConfig()

    @field_validator("listener", mode="wrap")
    @classmethod
    def _listeners_together(cls, value: Any, handler, info: ValidationInfo) -> list[ListenerConfig]:
        indexed, problems = each_valid(value, handler, ListenerConfig)
        if value == []:
            problems.append(((), "at least one [[listener]] table is required"))
        tls, server = info.data.get("tls"), info.data.get("server")
        if getattr(info.data.get("acme"), "enabled", False):
            tls = None  # the certificate comes from ACME (a self-signed placeholder until issued)
        binds: list[tuple[tuple[str, int], str]] = []
        if server is not None and server.metrics_listen is not None:
            binds.append((server.metrics_listen, "server.metrics_listen"))
        names: set[str] = set()
        for i, lc in indexed:
            if lc.name in names:
                problems.append(((i, "name"), f"duplicate listener name {lc.name!r}"))
            names.add(lc.name)
            other = next((owner for bound, owner in binds if _overlap(lc.listen, bound)), None)
            if other is not None:
                problems.append(((i, "listen"), f"{_fmt(lc.listen)} is already used by {other}"))
            binds.append((lc.listen, f"listener {lc.name!r}"))
            if lc.kind in ("submissions", "submission", "mx") and tls is not None and tls.cert is None:
                problems.append(((i, "kind"), f"a {lc.kind} listener needs [tls] cert and key"))
        if problems:
            raise fail(problems)
        return [lc for _, lc in indexed]

    @field_validator("domain")
    @classmethod
    def _at_least_one_domain(cls, domains: dict) -> dict:
        if not domains:
            raise ValueError('at least one [domain."example.org"] table is required')
        return domains

    @model_validator(mode="after")
    def _masquerade_to_our_domains(self) -> _BackendFile:
        # The rewritten sender must be one of ours: lan mail is accepted from our domains only and signed for them.
        problems = []
        for i, lc in enumerate(self.listener):
            if lc.masquerade_domain is not None and lc.masquerade_domain not in self.domain:
                problems.append((("listener", i, "masquerade_domain"),
                                 f"{lc.masquerade_domain} is not one of the [domain] tables"))
            for h in lc.local_hostnames:
                if h in self.domain:
                    problems.append((("listener", i, "local_hostnames"), f"{h} is a mail domain of ours, not a host"))
        if problems:
            raise fail(problems)
        return self


# ---------------------------------------------------------------- the loaded configuration


@dataclass(frozen=True)
class BackendConfig:
    path: Path
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    domains: dict[str, DomainConfig]
    passwd_file: Path
    maildir_root: Path  # mailbox of user@domain is maildir_root/domain/user/Maildir
    dkim: tuple[DKIMKeyConfig, ...]
    delivery: DeliveryConfig
    gateway: GatewayInfo
    dns: DNSConfig
    auth: AuthConfig = AuthConfig()
    rspamd: RspamdConfig | None = None
    acme: ACMEConfig = ACMEConfig()
    http: HTTPConfig = HTTPConfig()
    api: APIConfig = APIConfig()

    @property
    def acme_dir(self) -> Path:
        return self.server.data_dir / "acme"

    @property
    def authserv_id(self) -> str:
        return self.auth.authserv_id or self.server.hostname

    @property
    def queue_db(self) -> Path:
        return self.server.data_dir / "queue.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.server.data_dir / "spool"

    def maildir_for(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.maildir_root / domain.lower() / local.lower() / "Maildir"


def load_config(path: str | os.PathLike[str]) -> BackendConfig:
    """Load and validate a backend TOML file. Raises ConfigError listing every problem."""
    path = Path(path)
    return config_from_dict(_read_toml(path), path)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8: {e}") from None


class _DKIMTables(BaseModel):
    """The [[dkim]] tables of backend.toml, the rest of the file ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    dkim: list[DKIMKeyConfig] = []


def load_dkim_tables(path: str | os.PathLike[str]) -> tuple[DKIMKeyConfig, ...]:
    """Only the [[dkim]] tables of a backend TOML file: a running daemon re-reads them on SIGHUP
    (key rotation without a restart) while the rest of the file waits for a restart, so a problem
    elsewhere in the file does not stop new keys. Raises ConfigError."""
    path = Path(path)
    try:
        doc = _DKIMTables.model_validate(_read_toml(path), context={"base": path.parent.resolve()})
    except ValidationError as e:
        raise ConfigError(path, problems=problems_of(e)) from None
    return tuple(doc.dkim)


def config_from_dict(raw: dict, path: Path) -> BackendConfig:
    """Validate an already-parsed TOML document (tests build configs this way)."""
    try:
        doc = _BackendFile.model_validate(raw, context={"base": path.parent.resolve()})
    except ValidationError as e:
        raise ConfigError(path, problems=problems_of(e)) from None
    return BackendConfig(
        path=path,
        server=doc.server,
        tls=doc.tls,
        listeners=tuple(doc.listener),
        domains={name: DomainConfig(name, t.aliases, t.catch_all) for name, t in doc.domain.items()},
        passwd_file=doc.users.passwd_file,
        maildir_root=doc.users.maildir_root or doc.server.data_dir / "mail",
        dkim=tuple(doc.dkim),
        delivery=doc.delivery,
        gateway=doc.gateway,
        dns=doc.dns,
        auth=doc.auth,
        rspamd=doc.rspamd,
        acme=doc.acme,
        http=doc.http,
        api=doc.api,
    )
