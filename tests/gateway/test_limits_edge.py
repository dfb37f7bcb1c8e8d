"""Pure parts: client keys, limiter arithmetic, DNSBL names and the pre-greeting state machine."""

from gateway import edge
from gateway.dnsbl import is_listing, query_name
from gateway.proxy import CLIENT, UPSTREAM, reset_is_close
from gateway.limits import REFUSE_GLOBAL, REFUSE_PER_CLIENT, REFUSE_RATE, Admission, ClientLimiter, GlobalCap, client_key


def test_client_keys():
    assert client_key("192.0.2.7") == "192.0.2.7/32"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7/32"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_token_bucket_with_injected_clock():
    now = [0.0]
    lim = ClientLimiter(max_per_client=100, rate=0.5, burst=2, clock=lambda: now[0])
    assert lim.check("k") is None
    assert lim.check("k") is None
    assert lim.check("k") == REFUSE_RATE
    now[0] = 1.9  # 0.95 tokens: still short
    assert lim.check("k") == REFUSE_RATE
    now[0] = 2.0  # refilled exactly one (the 1.9 check did not consume anything)
    assert lim.check("k") is None
    assert lim.check("other") is None


def test_per_client_and_global_caps_release():
    cap = GlobalCap(2)
    adm = Admission(cap, ClientLimiter(max_per_client=1, rate=100, burst=100))
    assert adm.admit("a") is None
    assert adm.admit("a") == REFUSE_PER_CLIENT
    assert cap.active == 1  # a refused connection gives its global slot back
    assert adm.admit("b") is None
    assert adm.admit("c") == REFUSE_GLOBAL
    adm.release("a")
    assert adm.admit("c") is None


def test_bucket_table_is_bounded():
    lim = ClientLimiter(max_per_client=5, rate=1, burst=1, tracked=3, clock=lambda: 0.0)
    for k in "abcdef":
        lim.check(k)
        lim.release(k)
    assert len(lim.buckets) == 3 and not lim.active


def test_dnsbl_query_names_rfc5782():
    assert query_name("192.0.2.99", "zen.example") == "99.2.0.192.zen.example"
    # RFC 5782 2.4 example
    assert query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
    )
    assert is_listing(["127.0.0.2"])
    assert not is_listing(["127.255.255.254"])  # Spamhaus error code, not a listing
    assert not is_listing([])


def test_pregreeting_table():
    pg = edge.PreGreeting("mx.example.org", "192.0.2.1")
    d = pg.client_bytes(b"EHLO bot\r\n")
    assert d.state == edge.REJECTED and d.outcome == edge.OUT_EARLY_TALKER
    assert d.reply == b"554 5.5.0 mx.example.org Protocol error: client sent data before the greeting\r\n"
    assert pg.wait_over().state == edge.REJECTED  # terminal states ignore later events

    pg = edge.PreGreeting("mx.example.org", "192.0.2.1")
    assert pg.wait_over().state == edge.CONNECTING
    d = pg.upstream_failed()
    assert d.reply == b"421 4.3.2 mx.example.org Service not available, try again later\r\n"

    pg = edge.PreGreeting("mx.example.org", "192.0.2.1")
    pg.wait_over()
    assert pg.banner().state == edge.PASSED
    assert pg.client_bytes(b"late").state == edge.PASSED

    pg = edge.PreGreeting("mx.example.org", "192.0.2.1")
    pg.wait_over()
    d = pg.client_reset()  # RST while dialling: silent, no reply to a socket that is gone
    assert (d.state, d.reply, d.outcome) == (edge.REJECTED, None, edge.OUT_CLIENT_RESET)
    assert pg.banner().state == edge.REJECTED

    pg = edge.PreGreeting("mx.example.org", "192.0.2.1")
    d = pg.dnsbl_listed("zen.example")
    assert d.reply.startswith(b"554 5.7.1 mx.example.org") and b"[192.0.2.1]" in d.reply


def test_reset_is_close_table():
    none = {CLIENT: False, UPSTREAM: False}
    # The upstream spoke last and all of it reached the client: the client may leave (TLS after 221).
    assert reset_is_close(CLIENT, none, UPSTREAM, none)
    # The client's request awaits an answer: it abandoned the exchange.
    assert not reset_is_close(CLIENT, none, CLIENT, none)
    # A chunk was being written to the client when it reset: data lost.
    assert not reset_is_close(CLIENT, none, UPSTREAM, {CLIENT: True, UPSTREAM: False})
    # The upstream had closed: whatever the client does next ends nothing.
    assert reset_is_close(CLIENT, {CLIENT: False, UPSTREAM: True}, CLIENT, none)
    # Both sides had sent EOF (the final FIN to a client that already reset fails).
    assert reset_is_close(CLIENT, {CLIENT: True, UPSTREAM: True}, CLIENT, none)
    # The upstream broke while the client waited for an answer; or before anything moved.
    assert not reset_is_close(UPSTREAM, none, CLIENT, none)
    assert not reset_is_close(CLIENT, none, None, none)
