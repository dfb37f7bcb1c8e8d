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
