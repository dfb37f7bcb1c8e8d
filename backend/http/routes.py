"""What the home's web face answers, by listener, Host and path: the MTA-STS policy (RFC 8461),
mail-client autoconfig and autodiscover, ACME HTTP-01 tokens (RFC 8555 8.3) and the redirect of
plain HTTP to HTTPS.

Theory of operation. The names the face serves are the mail host name and, for each local domain
D: D itself, mta-sts.D, autoconfig.D and autodiscover.D. A request is routed by (port, Host,
path) in ``Site.answer``, which returns a route name (the metrics label and log field) and a
response; anything not listed here is 404, a Host that is no DNS name is 400.

    port 80   /.well-known/acme-challenge/TOKEN   any Host      the key authorization, or 404
    port 80   anything else                        our names     301 to https://Host/path?query
    port 443  /.well-known/mta-sts.txt             mta-sts.D     the policy `dns records` describes
    port 443  /mail/config-v1.1.xml                autoconfig.D  Thunderbird autoconfig for D
    port 443  /.well-known/autoconfig/mail/config-v1.1.xml       (any of our names) the same
    port 443  /autodiscover/autodiscover.xml       our names     Outlook POX autodiscover (POST)

The policy and the autoconfig documents depend on the config only, so they are built once.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Awaitable, Callable, Protocol

from aiohttp import web

from backend.config import BackendConfig
from backend.dns.records import mta_sts_policy
from backend.http.clientconfig import (
    OUTLOOK_SCHEMA,
    AutodiscoverRequestError,
    autoconfig_xml,
    autodiscover_address,
    autodiscover_error_xml,
    autodiscover_xml,
)
from backend.smtp.paths import PathError, parse_address

MTA_STS_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 3.3
AUTOCONFIG_PATH = "/mail/config-v1.1.xml"  # on autoconfig.D (Thunderbird)
AUTOCONFIG_WELL_KNOWN_PATH = "/.well-known/autoconfig/mail/config-v1.1.xml"  # on D (Thunderbird)
AUTODISCOVER_PATH = "/autodiscover/autodiscover.xml"  # Outlook sends it in any case (/Autodiscover/Autodiscover.xml)
ACME_PREFIX = "/.well-known/acme-challenge/"  # RFC 8555 8.3

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # RFC 8555 8.1: base64url, no padding

READ_METHODS = ("GET", "HEAD")


class Challenges(Protocol):
    """What the face needs of the ACME challenge store (backend/tls/challenges.py)."""

    def http01_response(self, token: str) -> str | None: ...


class RequestRefused(Exception):
    """The request cannot be answered as asked: ``status`` (4xx) and a short reason for the log
    (never echoed to the client)."""

    def __init__(self, status: int, reason: str, allow: str | None = None):
        super().__init__(reason)
        self.status = status
        self.allow = allow  # RFC 9110 15.5.6: a 405 says which methods the resource has

    def response(self) -> web.Response:
        headers = {"Allow": self.allow} if self.allow else {}
        phrase = HTTPStatus(self.status).phrase
        return text(self.status, f"{self.status} {phrase}\n", Connection="close", **headers)


def host_name(header: str | None) -> str | None:
    """The DNS name a Host header names (RFC 9110 7.2), lower case, without port or root dot;
    None when there is no header or it names no DNS name (an address literal, garbage)."""
    if not header:
        return None
    host = header.strip().lower()
    if host.startswith("["):
        return None  # an IPv6 literal: none of our names
    name, _, port = host.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    if all(label.isdigit() for label in labels):
        return None  # an IPv4 literal
    return name


def text(status: int, body: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", charset="utf-8", headers=headers)


async def _answer(response: web.StreamResponse) -> web.StreamResponse:
    return response


async def _not_found() -> web.Response:
    return text(404, "404 Not Found\n")


def _read_only(request: web.BaseRequest) -> None:
    if request.method not in READ_METHODS:
        raise RequestRefused(405, f"method {request.method}", allow="GET, HEAD")


class Site:
    """The face's routes over one backend config (and the live ACME challenge store)."""

    def __init__(self, config: BackendConfig, challenges: Challenges | None, max_request_size: int):
        self.config = config
        self.challenges = challenges
        self.max_request_size = max_request_size
        self.primary_domain = next(iter(config.domains))
        # name -> (what it is, its domain): the Host values we answer for.
        self.names: dict[str, tuple[str, str | None]] = {config.server.hostname.lower(): ("host", None)}
        for d in config.domains:
            for kind, name in (("domain", d), ("mta-sts", f"mta-sts.{d}"), ("autoconfig", f"autoconfig.{d}"),
                               ("autodiscover", f"autodiscover.{d}")):
                self.names.setdefault(name, (kind, d))
        # RFC 8461: no [dns] mta_sts_mode, no _mta-sts record is published, so no policy is served.
        self.policies = {d: mta_sts_policy(config, d) for d in config.domains} if config.dns.mta_sts_mode else {}
        self.autoconfig = {d: autoconfig_xml(config, d) for d in config.domains}

    async def answer(self, request: web.BaseRequest, https: bool) -> tuple[str, web.StreamResponse, str | None]:
        """(route name, response, why it was refused or None) for one request."""
        route = "bad-request"
        try:
            route, respond = self._pick(request, https)
            return route, await respond(), None
        except RequestRefused as e:
            return route, e.response(), str(e)

    def _pick(self, request: web.BaseRequest, https: bool) -> tuple[str, Callable[[], Awaitable[web.StreamResponse]]]:
        path = request.path
        host = host_name(request.headers.get("Host"))
        if not https:
            if path.startswith(ACME_PREFIX):
                return "acme-http-01", lambda: self._acme(request, path[len(ACME_PREFIX):])
            if host is None or host not in self.names:
                return "unknown-host", _not_found
            # RFC 8461 3.3 wants the policy over HTTPS only, and clients should use TLS for the
            # rest too: everything else on port 80 goes to the same URL over https.
            location = f"https://{host}{request.rel_url.raw_path_qs}"
            return "redirect", lambda: _answer(web.Response(status=301, headers={"Location": location}))
        if host is None:
            raise RequestRefused(400, "no usable Host")
        kind, domain = self.names.get(host, (None, None))
        if kind is None:
            return "unknown-host", _not_found
        if path == MTA_STS_PATH and kind == "mta-sts":
            return "mta-sts", lambda: self._policy(request, domain)
        if (path == AUTOCONFIG_PATH and kind == "autoconfig") or path == AUTOCONFIG_WELL_KNOWN_PATH:
            return "autoconfig", lambda: self._autoconfig(request, domain)
        if path.lower() == AUTODISCOVER_PATH:
            return "autodiscover", lambda: self._autodiscover(request)
        return "not-found", _not_found

    async def _policy(self, request: web.BaseRequest, domain: str) -> web.Response:
        _read_only(request)
        policy = self.policies.get(domain)
        # RFC 8461 3.3: media type text/plain.
        return text(200, policy) if policy is not None else await _not_found()

    async def _autoconfig(self, request: web.BaseRequest, domain: str | None) -> web.Response:
        _read_only(request)
        body = self.autoconfig[domain or self._domain_asked(request)]
        return web.Response(body=body, content_type="application/xml", charset="utf-8")

    def _domain_asked(self, request: web.BaseRequest) -> str:
        """On the mail host name: the domain of Thunderbird's ``emailaddress`` parameter when it
        is one of ours, else the first configured domain."""
        try:
            domain = parse_address(request.query.get("emailaddress", "")).domain
        except PathError:
            return self.primary_domain
        return domain if domain in self.config.domains else self.primary_domain

    async def _acme(self, request: web.BaseRequest, token: str) -> web.Response:
        _read_only(request)
        answer = self.challenges.http01_response(token) if self.challenges and _TOKEN.match(token) else None
        if answer is None:
            return await _not_found()
        # RFC 8555 8.3: the body is the key authorization; the RFC's example serves it as octets.
        return web.Response(body=answer.encode("ascii"), content_type="application/octet-stream")

    async def _autodiscover(self, request: web.BaseRequest) -> web.Response:
        xml = "application/xml"
        if request.method == "GET":
            # No address to answer for; Exchange answers a GET with this error, which tells a
            # probing client the endpoint exists.
            return web.Response(body=autodiscover_error_xml("600", "Invalid Request"), content_type=xml, charset="utf-8")
        if request.method != "POST":
            raise RequestRefused(405, f"method {request.method}", allow="GET, POST")
        body = await read_body(request, self.max_request_size)
        try:
            address, schema = autodiscover_address(body)
        except AutodiscoverRequestError as e:
            raise RequestRefused(400, str(e)) from None
        if schema not in (None, OUTLOOK_SCHEMA):
            # An ActiveSync (mobilesync) request: there is no such service here.
            return await _not_found()
        if address.domain not in self.config.domains:
            return await _not_found()  # not one of our domains; whether the user exists is never said
        return web.Response(body=autodiscover_xml(self.config, address), content_type=xml, charset="utf-8")


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: a larger announced length is refused before any
    of it is read, a chunked body as soon as it grows past the limit (413)."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestRefused(413, f"body of {request.content_length} bytes")
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise RequestRefused(413, f"body over {limit} bytes")
    return bytes(body)
