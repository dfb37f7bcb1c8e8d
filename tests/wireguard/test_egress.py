"""Gateway egress table: exact rules, atomic apply, idempotent, clean removal (real nft in a namespace)."""

from __future__ import annotations

import ipaddress
import sys

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.netns import Lab
from wireguard import egress


def _policy(**kw) -> egress.EgressPolicy:
    args = dict(tunnel_if="hmx0", public_if="eth0", public_addr=ipaddress.IPv4Address("198.51.100.10"),
                backend_addr=ipaddress.IPv4Address("10.77.0.2"))
    args.update(kw)
    return egress.EgressPolicy(**args)


def test_rules_allow_only_tcp25_from_backend_and_snat_to_public_address():
    text = egress.render(_policy())
    assert 'iifname "hmx0" oifname "eth0" ip saddr 10.77.0.2 tcp dport 25 ct state new,established accept' in text
    assert 'oifname "eth0" ip saddr 10.77.0.2 tcp dport 25 snat ip to 198.51.100.10' in text
    assert 'iifname "hmx0" counter drop' in text and 'oifname "hmx0" counter drop' in text
    assert text.count("maxseg size set rt mtu") == 2
    # drops come after the accepts (nft evaluates in order)
    assert text.index("tcp dport 25 ct state") < text.index('iifname "hmx0" counter drop')
    assert "ip6" not in text


def test_ipv6_egress_needs_both_addresses():
    text = egress.render(_policy(public_addr6="2001:db8::10", backend_addr6="fd77::2"))
    assert "ip6 saddr fd77::2 tcp dport 25 snat ip6 to 2001:db8::10" in text
    with pytest.raises(egress.EgressError):
        _policy(public_addr6="2001:db8::10")


def test_bad_interface_names_never_reach_nft():
    with pytest.raises(egress.EgressError):
        _policy(public_if='eth0" accept')
    with pytest.raises(ValueError):
        _policy(tunnel_if="hmx0;flush")


@pytest.mark.netns
def test_apply_is_atomic_idempotent_and_removal_is_clean():
    require_root()
    require_tool("nft")
    with Lab() as lab:
        ns = lab.namespace("e")
        ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        policy = _policy(tunnel_if=lab.name("t"))
        script = lab.workdir / "egress.nft"
        egress.write_ruleset(policy, script)
        ns.run(["nft", "-f", str(script)])
        once = ns.run(["nft", "list", "ruleset"]).stdout
        ns.run(["nft", "-f", str(script)])
        assert ns.run(["nft", "list", "ruleset"]).stdout == once
        assert f"table inet homemx_{lab.name('t')}" in once and "snat ip to 198.51.100.10" in once
        # a broken script changes nothing (one transaction): the old table stays as it was
        bad = egress.render(policy).replace("snat ip to", "snat ip too")
        r = ns.run(["nft", "-f", "-"], input=bad, check=False)
        assert r.returncode != 0
        assert ns.run(["nft", "list", "ruleset"]).stdout == once
        # the table of another owner is never touched by our removal
        ns.run(["nft", "add", "table", "inet", "someone_else"])
        code = ("import sys; from wireguard import egress; "
                "print(egress.remove_table(sys.argv[1]), egress.remove_table(sys.argv[1]))")
        out = ns.run([sys.executable, "-c", code, policy.table])
        assert out.stdout.split() == ["True", "False"]
        assert ns.run(["nft", "list", "tables"]).stdout.split() == ["table", "inet", "someone_else"]

