"""Authentication-Results (RFC 8601) as homemx writes it, and the removal of forged fields."""

from backend.auth import headers as H
from backend.auth.results import ARCVerdict, DKIMVerdict, DMARCVerdict, SPFVerdict

ID = "mail.example.org"


def test_forged_results_for_our_authserv_id_are_removed_and_others_kept():
    header = (
        b"Received: from x\r\n"
        b"Authentication-Results: mail.example.org; dkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: MAIL.EXAMPLE.ORG.;\r\n\tspf=pass smtp.mailfrom=bank.example\r\n"
        b"Authentication-Results: (comment) mail.example.org 1; dmarc=pass\r\n"
        b"Authentication-Results: mx.google.com; dkim=pass header.d=list.example\r\n"
        b"authentication-results:mail.example.org;none\r\n"
        b"X-Spam-Flag: NO\r\n"
        b"X-Spam-Status: No, score=-5\r\n"
        b"X-Spamd-Result: default: False [-5.00 / 15.00]\r\n"
        b"Subject: hello\r\n"
        b"\r\n"
    )
    out, removed = H.strip_untrusted(header, ID)
    assert removed == 7
    assert out == (
        b"Received: from x\r\n"
        b"Authentication-Results: mx.google.com; dkim=pass header.d=list.example\r\n"
        b"Subject: hello\r\n"
        b"\r\n"
    )


def test_a_subdomain_or_superstring_of_our_id_is_not_ours():
    header = (b"Authentication-Results: mail.example.org.evil.example; dkim=pass\r\n"
              b"Authentication-Results: xmail.example.org; dkim=pass\r\n\r\n")
    assert H.strip_untrusted(header, ID) == (header, 0)


def test_results_field_names_each_method_with_its_properties():
    ar = H.authentication_results(
        ID,
        spf=[SPFVerdict("mailfrom", "example.com", "pass"), SPFVerdict("helo", "mx.example.com", "none")],
        dkim=[DKIMVerdict("example.com", "s1", "fail", "body hash did not verify", "rsa-sha256", "abcdefgh"),
              DKIMVerdict("example.com", "s2", "pass", "", "ed25519-sha256", "ijklmnop")],
        dmarc=DMARCVerdict("pass", "example.com", "example.com", "reject", "none", True, True),
        arc=ARCVerdict("none"),
    )
    assert ar == (
        b"Authentication-Results: mail.example.org;\r\n"
        b"\tspf=pass smtp.mailfrom=example.com;\r\n"
        b"\tspf=none smtp.helo=mx.example.com;\r\n"
        b'\tdkim=fail reason="body hash did not verify" header.d=example.com header.s=s1 header.a=rsa-sha256'
        b" header.b=abcdefgh;\r\n"
        b"\tdkim=pass header.d=example.com header.s=s2 header.a=ed25519-sha256 header.b=ijklmnop;\r\n"
        b"\tdmarc=pass header.from=example.com policy.dmarc=none;\r\n"
        b"\tarc=none\r\n"
    )


def test_values_that_are_not_tokens_are_quoted_and_cannot_break_the_field():
    ar = H.authentication_results(ID, spf=[SPFVerdict("helo", 'a "b"\r\nX-Evil: 1', "none")])
    assert b"\r\nX-Evil" not in ar and ar.count(b"\r\n") == 3  # three lines: id, spf, dkim=none
    assert b'smtp.helo="a bX-Evil: 1"' in ar
