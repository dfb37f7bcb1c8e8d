"""MTA-STS test material: a valid enforce policy (RFC 8461 3.2) and a table resolver for policy-cache tests."""

from __future__ import annotations

import dns.resolver

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.net\r\nmx: *.example.net\r\nmax_age: 604800\r\n"


class _TXT:
    def __init__(self, text):
        self.strings = [text.encode()]


class TableResolver:
    """A table resolver for cache tests: the network lookups are covered in test_delivery."""

    def __init__(self):
        self.txt: list[str] | Exception = []

    async def resolve(self, name, rtype, **kwargs):
        if isinstance(self.txt, Exception):
            raise self.txt
        if not self.txt:
            raise dns.resolver.NXDOMAIN()
        return [_TXT(t) for t in self.txt]
