"""The demo's DNS: an authoritative nameserver on loopback for the demo's own domains, serving the
records ``homemx-backend dns records`` prints, and REFUSED for every other name.

With it the demo's inbound checks (SPF, DKIM, DMARC) and ``dns check`` work on real records: mail
claiming example.test from an address the SPF record does not list is refused by own-domain
protection, and a lookup for any other domain (a remote sender's SPF, a remote recipient's MX) is
answered REFUSED at once, so it ends in a quick temperror or a deferred delivery, never in a
timeout. The demo has no internet, and this server never forwards or recurses.

``DemoZones`` is the protocol core (wire query in, wire response out, no sockets); ``DemoDNS`` serves
it over UDP and TCP (RFC 7766: a client that gets a truncated UDP answer retries over TCP) on its
own event loop in a thread, so the backend resolves through it exactly as through a remote server.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

from backend.config import BackendConfig
from backend.dns.records import DEFAULT_TTL, build_ptr_records, build_records, fqdn

# RFC 2308 5: the SOA minimum is the TTL of negative answers; short, so a record added to the
# config shows up soon after a restart of the demo even in a caching client.
NEGATIVE_TTL = 60
UDP_PLAIN_LIMIT = 512  # RFC 1035 4.2.1: a UDP message without EDNS (RFC 6891 6.2.5)
TCP_IDLE_TIMEOUT = 10.0  # RFC 7766 6.2.3: a server closes idle connections; seconds, not minutes


def demo_zones(config: BackendConfig, ttl: int = DEFAULT_TTL) -> list[dns.zone.Zone]:
    """One zone per domain of ``config``, holding the lines ``dns records`` prints for it (the same
    Record.zone_line text, so what the demo serves is what an operator would paste), and one per
    gateway address holding its PTR (what ``dns records --ptr`` prints), each with the SOA and NS
    at its apex (RFC 1035 5.2) naming the mail host. A record outside every domain (a mail host
    named under another domain) is left out: we are not authoritative for it."""
    host = fqdn(config.server.hostname)
    ptrs = build_ptr_records(config)
    records = [*build_records(config), *ptrs]
    zones = []
    for origin_text in [fqdn(d) for d in sorted(config.domains)] + [r.name for r in ptrs]:
        origin = dns.name.from_text(origin_text)
        lines = [
            f"{origin} {ttl} IN SOA {host} hostmaster.{host} 1 3600 600 86400 {NEGATIVE_TTL}",
            f"{origin} {ttl} IN NS {host}",
        ]
        lines += [r.zone_line(ttl) for r in records if dns.name.from_text(r.name).is_subdomain(origin)]
        zones.append(dns.zone.from_text("\n".join(lines) + "\n", origin=origin, relativize=False))
    return zones


class DemoZones:
    """Authoritative answers from a set of zones: bytes of a query in, bytes of a response out."""

    def __init__(self, zones: list[dns.zone.Zone]):
        # Longest origin first: a query goes to the most specific zone holding it.
        self.zones = sorted(zones, key=lambda z: len(z.origin), reverse=True)

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        return next((z for z in self.zones if name.is_subdomain(z.origin)), None)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The response to ``query`` (a parsed query, QR clear)."""
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        zone = self._zone_for(q.name)
        # RFC 1035 4.1.1: REFUSED, the server declines for policy reasons. We answer only for our
        # own zones and never recurse, and we transfer no zone (RFC 5936 allows refusing AXFR).
        if zone is None or q.rdclass != dns.rdataclass.IN or q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        node = zone.get_node(q.name)
        if node is not None:
            if q.rdtype == dns.rdatatype.ANY:
                rdatasets = list(node.rdatasets)
            else:
                found = node.get_rdataset(dns.rdataclass.IN, q.rdtype)
                rdatasets = [found] if found is not None else []
            for rds in rdatasets:
                rrset = dns.rrset.RRset(q.name, rds.rdclass, rds.rdtype)
                rrset.update(rds)
                response.answer.append(rrset)
            if rdatasets:
                return response
        # RFC 2308: NXDOMAIN when nothing exists at or below the name (RFC 8020: a name with
        # descendants, like _domainkey.example.test, exists), else NODATA; both carry the SOA.
        if node is None and not any(n.is_subdomain(q.name) for n in zone.nodes):
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa = zone.find_rdataset(zone.origin, dns.rdatatype.SOA)
        negative = dns.rrset.RRset(zone.origin, dns.rdataclass.IN, dns.rdatatype.SOA)
        negative.update(soa)
        negative.ttl = min(soa.ttl, soa[0].minimum)  # RFC 2308 3
        response.authority.append(negative)
        return response

    def respond(self, wire: bytes, udp: bool) -> bytes | None:
        """The wire response to the wire query ``wire``; None when nothing must be sent (a
        response, or too short to carry the id a reply would need)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            if len(wire) < 12 or wire[2] & 0x80:  # no header, or a response: never answer those
                return None
            # RFC 1035 4.1.1: FORMERR, the server was unable to interpret the query.
            formerr = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
            formerr.flags = dns.flags.QR
            formerr.set_rcode(dns.rcode.FORMERR)
            return formerr.to_wire()
        if query.flags & dns.flags.QR:
            return None
        response = self.answer(query)
        limit = 65535
        if udp:
            limit = max(UDP_PLAIN_LIMIT, query.payload) if query.edns >= 0 else UDP_PLAIN_LIMIT
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 2181 9: what does not fit is not cut short: the answer goes empty with TC set,
            # and the client asks again over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | (response.flags & dns.flags.AA)
            return truncated.to_wire()


class _UDPResponder(asyncio.DatagramProtocol):
    def __init__(self, zones: DemoZones):
        self.zones = zones
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = self.zones.respond(data, udp=True)
        if reply is not None:
            self.transport.sendto(reply, addr)


class DemoDNS:
    """``DemoZones`` served on ``host``:``port`` over UDP and TCP, on an event loop of its own in
    a daemon thread: ``start()`` binds (an OSError, such as a port in use, is raised there) and
    returns once both sockets answer; ``close()`` stops it."""

    def __init__(self, zones: DemoZones, host: str = "127.0.0.1", port: int = 53):
        self.zones = zones
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> None:
        # Bound here, in the caller's thread, so a port in use stops the demo like the backend's
        # own listeners do, with one line.
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((self.host, self.port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, self.port))
            tcp.listen()
        except OSError:
            udp.close()
            tcp.close()
            raise
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._serve(udp, tcp, ready))
            except BaseException as e:  # noqa: BLE001 - handed to start(), which raises it
                failed.append(e)
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="demo-dns", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread = None
            raise failed[0]

    def close(self) -> None:
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._thread = None

    async def _serve(self, udp: socket.socket, tcp: socket.socket, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        transport, _ = await self._loop.create_datagram_endpoint(lambda: _UDPResponder(self.zones), sock=udp)
        server = await asyncio.start_server(self._serve_tcp, sock=tcp)
        ready.set()
        try:
            await self._stop.wait()
        finally:
            transport.close()
            server.close()
            await server.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # RFC 1035 4.2.2 / RFC 7766 8: each message prefixed by its two-byte length; several
        # queries may come on one connection.
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    wire = await reader.readexactly(size)
                reply = self.zones.respond(wire, udp=False)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the client went away or idled out: nothing to report
        finally:
            writer.close()
