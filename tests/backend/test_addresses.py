"""Path parsing and relay disguises (pure)."""

import pytest

from backend.smtp.paths import PathError, parse_path, split_path_and_params

DISGUISES = {
    "source route": "<@example.org:victim@elsewhere.net>",
    "source route two hops": "<@a.example.org,@b.example.org:victim@elsewhere.net>",
    "percent hack": "<victim%elsewhere.net@example.org>",
    "quoted at": '<"victim@elsewhere.net"@example.org>',
    "quoted percent": '<"victim%elsewhere.net"@example.org>',
    "quoted escaped at": '<"victim\\@elsewhere.net"@example.org>',
    "bang path": "<elsewhere.net!victim@example.org>",
    "bare bang path": "<elsewhere.net!victim>",
    "double at": "<victim@elsewhere.net@example.org>",
    "trailing dot": "<alice@example.org.>",
    "address literal": "<alice@[192.0.2.1]>",
    "nul": "<alice\x00@example.org>",
    "cr": "<alice@example.org\r>",
    "no domain": "<alice>",
    "empty label": "<alice@example..org>",
}


@pytest.mark.parametrize("path", DISGUISES.values(), ids=DISGUISES.keys())
def test_disguises_refused_with_5xx(path):
    with pytest.raises(PathError) as e:
        parse_path(path)
    assert e.value.reply[0] == "5"
    assert e.value.reply[4] == "5"  # enhanced status class 5


def test_unclosed_bracket():
    with pytest.raises(PathError) as e:
        split_path_and_params("<alice@example.org")
    assert e.value.reply.startswith("501 5.1.3")


@pytest.mark.parametrize(
    "path,local,domain",
    [
        ("<alice@example.org>", "alice", "example.org"),
        ("<Alice.Smith+tag@Example.ORG>", "Alice.Smith+tag", "example.org"),
        ('<"john doe"@example.org>', '"john doe"', "example.org"),
        ("<jörg@bücher.example>", "jörg", "bücher.example"),
    ],
)
def test_valid_paths(path, local, domain):
    a = parse_path(path)
    assert (a.local, a.domain) == (local, domain)


def test_null_path_only_where_allowed():
    assert parse_path("<>", allow_null=True) is None
    with pytest.raises(PathError):
        parse_path("<>")


def test_params_are_split_off_and_quoted_gt_kept():
    assert split_path_and_params("<a@example.org> SIZE=100 BODY=8BITMIME") == ("<a@example.org>", "SIZE=100 BODY=8BITMIME")
    assert split_path_and_params('<"a>b"@example.org> X') == ('<"a>b"@example.org>', "X")


def test_length_limits():
    with pytest.raises(PathError):
        parse_path("<" + "a" * 65 + "@example.org>")


def test_fast_address_split_gives_what_the_email_parser_gives():
    """HomeSMTP._getaddr splits the common path shapes itself (issue 17: aiosmtpd's parser cost
    ~15% of the event loop); for every input, fast path or not, the result is aiosmtpd's."""
    import itertools

    from aiosmtpd.smtp import SMTP

    from backend.receive.smtpd import HomeSMTP, _SIMPLE_PATH

    locals_ = ["a", "A.b+c", "x-y_z", "!#$%&'*+/=?^`{|}~", "a..b", ".a", "a.", '"a b"', "ü", "a(b)", ""]
    domains = ["b.c", "B-1.example.org", "x", "[1.2.3.4]", "-a.b", "a-.b", "é.de", "a..b", "a.b."]
    shapes = ["<{l}@{d}>", "<{l}@{d}>{r}", "{l}@{d}", "< {l}@{d} >", "<@r.s:{l}@{d}>{r}", "<{l}@{d}"]
    rests = ["", " ", " SIZE=10", "  SIZE=10 BODY=8BITMIME", "\tSIZE=1", "SIZE=1", " (c) SIZE=1", ' X="q"', " \\x"]
    args = {shape.format(l=lo, d=d, r=r) for shape, lo, d, r in itertools.product(shapes, locals_, domains, rests)}
    args |= {"<>", "<> SIZE=5", "<>SIZE=5", "< >", "<<a@b.c>>", "<a@b.c> <d@e.f>", ""}
    fast = 0
    for limit in (0, 3):
        ours = HomeSMTP.__new__(HomeSMTP)
        theirs = SMTP.__new__(SMTP)
        ours.local_part_limit = theirs.local_part_limit = limit
        for arg in sorted(args):
            try:
                want = SMTP._getaddr(theirs, arg)
            except Exception:  # the email parser's own crashes: ours says "cannot parse"
                want = (None, None)
            assert ours._getaddr(arg) == want, arg
            fast += bool(arg and _SIMPLE_PATH.match(arg))
    assert fast > 100  # the fast path is taken for the common shapes, not bypassed
