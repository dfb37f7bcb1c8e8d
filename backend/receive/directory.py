"""Who lives here: local domains, mailboxes, aliases, catch-alls, and which addresses a user may send as."""

from __future__ import annotations

from backend.config import BackendConfig
from backend.queue.model import NewRecipient
from backend.receive.users import UserDB

MAX_ALIAS_DEPTH = 8  # alias chains deeper than this are a configuration loop
# Role mailboxes every domain has with no configuration: postmaster (RFC 5321 4.5.1: MUST exist;
# also the default DMARC rua, backend/dns/records.py) and abuse (RFC 2142 2, where blocklists and
# receivers send complaints). A user, alias or catch-all of the domain takes precedence.
ROLE_ADDRESSES = ("postmaster", "abuse")


class Directory:
    def __init__(self, config: BackendConfig, users: UserDB):
        self.config = config
        self.users = users

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.config.domains

    @staticmethod
    def _base(address: str) -> str:
        """``user+tag@d`` → ``user@d`` (sub-addressing, RFC 5233 style)."""
        local, _, domain = address.rpartition("@")
        if "+" in local:
            local = local.split("+", 1)[0]
        return f"{local}@{domain}"

    def resolve(self, address: str) -> list[str] | None:
        """Final destinations of a local-domain address: mailboxes here and/or remote addresses.
        None if nobody receives it (the caller answers 550 5.1.1 at RCPT)."""
        return self._resolve(address.lower(), 0, set())

    def _resolve(self, address: str, depth: int, expanded: set[str]) -> list[str] | None:
        local, _, domain = address.rpartition("@")
        dom = self.config.domains.get(domain)
        if dom is None:
            return [address]  # not ours: a remote address
        # Each address is expanded once per resolution. An alias loop (a -> b -> a) then ends at
        # once, and a second path to the same address adds nothing new (its destinations are
        # already in the result): without this, aliases that name each other cost fan-out^depth
        # lookups, on the event loop, at RCPT time (5 aliases naming each other: 2 million).
        if depth > MAX_ALIAS_DEPTH or address in expanded:
            return None
        expanded.add(address)
        for candidate in dict.fromkeys([address, self._base(address)]):
            if self.users.exists(candidate):
                return [candidate]
            cl = candidate.rpartition("@")[0]
            if cl in dom.aliases:
                out: list[str] = []
                for target in dom.aliases[cl]:
                    r = self._resolve(target.lower(), depth + 1, expanded)
                    if r is None:
                        continue
                    out.extend(x for x in r if x not in out)
                return out or None
        if dom.catch_all and dom.catch_all != address:
            return self._resolve(dom.catch_all.lower(), depth + 1, expanded)
        if self._base(address).rpartition("@")[0] in ROLE_ADDRESSES:
            admin = self.users.first_user(domain)
            return [admin] if admin else None
        return None

    def recipients(self, address: str) -> list[NewRecipient] | None:
        """The queue recipients a RCPT of ``address`` (parsed, local@domain) becomes: the final
        destinations of a local address (aliases expanded), the address itself when it is remote;
        None when nobody here receives it (550 5.1.1 at RCPT, 400 in the HTTP API)."""
        targets = self.resolve(address) if self.is_local_domain(address.rpartition("@")[2]) else [address]
        if targets is None:
            return None
        return [NewRecipient(address=t, orig_address=address, local=self.is_mailbox(t)) for t in targets]

    def is_mailbox(self, address: str) -> bool:
        return self.users.exists(address)

    def owns(self, user: str, address: str) -> bool:
        """May ``user`` (an authenticated login) use ``address`` as envelope sender or From?
        Its own address, its own sub-addresses, and aliases that deliver to it."""
        user = user.lower()
        address = address.lower()
        if address == user or self._base(address) == user:
            return True
        local, _, domain = self._base(address).rpartition("@")
        dom = self.config.domains.get(domain)
        if dom is None or (local not in dom.aliases and local not in ROLE_ADDRESSES):
            return False
        return user in (self.resolve(f"{local}@{domain}") or [])
