"""SRV / XEP-0368 resolution against a real UDP DNS server on 127.0.0.1."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.config import StaticRoute
from router.config.defaults import DEFAULT_CONNECT_BLOCKLIST
from dnsserver import run_with_dns
from router.net.resolver import DEFAULT_S2S_PORT, RECORD_LIMITS, ResolutionError, SrvRecord, Target, order_records

MAX_SRV_RECORDS, MAX_ADDRESSES_PER_FAMILY = RECORD_LIMITS["SRV"][1], RECORD_LIMITS["A"][1]




def test_srv_targets_ordered_by_priority_with_addresses():
    zone = {
        ("_xmpp-server._tcp.peer.example", "SRV"): ["20 0 5269 backup.peer.example.", "10 0 5270 main.peer.example."],
        ("main.peer.example", "A"): ["127.0.0.2"],
        ("main.peer.example", "AAAA"): ["::1"],
        ("backup.peer.example", "A"): ["127.0.0.3"],
    }

    async def scenario(make, server):
        return await make().resolve("peer.example")

    assert run_with_dns(zone, scenario) == [
        Target("main.peer.example", 5270, False, ("::1", "127.0.0.2")),
        Target("backup.peer.example", 5269, False, ("127.0.0.3",)),
    ]


def test_xmpps_and_xmpp_records_are_merged_and_flagged():
    zone = {
        ("_xmpps-server._tcp.peer.example", "SRV"): ["5 0 5270 tls.peer.example.", "30 0 5270 tls2.peer.example."],
        ("_xmpp-server._tcp.peer.example", "SRV"): ["10 0 5269 plain.peer.example."],
        ("tls.peer.example", "A"): ["127.0.0.2"],
        ("tls2.peer.example", "A"): ["127.0.0.4"],
        ("plain.peer.example", "A"): ["127.0.0.3"],
    }

    async def scenario(make, server):
        return await make().resolve("peer.example")

    targets = run_with_dns(zone, scenario)
    assert [(t.host, t.port, t.direct_tls) for t in targets] == [
        ("tls.peer.example", 5270, True),
        ("plain.peer.example", 5269, False),
        ("tls2.peer.example", 5270, True),
    ]


def test_lone_dot_target_means_not_available_and_no_fallback():
    zone = {
        ("_xmpp-server._tcp.nope.example", "SRV"): ["0 0 0 ."],
        ("nope.example", "A"): ["127.0.0.2"],
    }

    async def scenario(make, server):
        with pytest.raises(ResolutionError) as info:
            await make().resolve("nope.example")
        return info.value, server.queries

    error, queries = run_with_dns(zone, scenario)
    assert error.condition == "remote-server-not-found"
    assert ("nope.example.", "A") not in queries  # no A/AAAA fallback


def test_xmpps_dot_only_drops_direct_tls():
    zone = {
        ("_xmpps-server._tcp.peer.example", "SRV"): ["0 0 0 ."],
        ("_xmpp-server._tcp.peer.example", "SRV"): ["10 0 5269 plain.peer.example."],
        ("plain.peer.example", "A"): ["127.0.0.3"],
    }

    async def scenario(make, server):
        return await make().resolve("peer.example")

    assert run_with_dns(zone, scenario) == [Target("plain.peer.example", 5269, False, ("127.0.0.3",))]


def test_xmpps_dot_without_xmpp_records_does_not_fall_back():
    zone = {("_xmpps-server._tcp.peer.example", "SRV"): ["0 0 0 ."], ("peer.example", "A"): ["127.0.0.2"]}

    async def scenario(make, server):
        with pytest.raises(ResolutionError):
            await make().resolve("peer.example")
        return server.queries

    assert ("peer.example.", "A") not in run_with_dns(zone, scenario)


def test_no_srv_falls_back_to_a_on_5269():
    zone = {("plain.example", "A"): ["127.0.0.5"]}

    async def scenario(make, server):
        return await make().resolve("plain.example")

    assert run_with_dns(zone, scenario) == [Target("plain.example", DEFAULT_S2S_PORT, False, ("127.0.0.5",))]


def test_srv_answered_but_targets_without_address_do_not_fall_back():
    zone = {
        ("_xmpp-server._tcp.peer.example", "SRV"): ["10 0 5269 gone.peer.example."],
        ("peer.example", "A"): ["127.0.0.2"],
    }

    async def scenario(make, server):
        with pytest.raises(ResolutionError, match="no address for the SRV targets"):
            await make().resolve("peer.example")
        return server.queries

    assert ("peer.example.", "A") not in run_with_dns(zone, scenario)


def test_a_domain_publishing_many_srv_targets_gets_lookups_for_the_lowest_priorities_only():
    """A remote writes its own DNS: 40 targets would be 80 address look-ups and 40 hosts
    raced, at addresses of its choosing. The lowest priorities are kept, named and counted."""
    zone = {("_xmpp-server._tcp.many.example", "SRV"): [f"{n % 4 + 1} 0 5269 h{n}.many.example." for n in range(40)]}
    zone |= {(f"h{n}.many.example", "A"): [f"127.0.1.{n}"] for n in range(40)}

    async def scenario(make, server):
        hits = []
        resolver = make(limit_hit=hits.append)
        targets = await resolver.resolve("many.example")
        assert await resolver.resolve("many.example") == targets  # the cache holds what is used: no second hit
        return targets, hits, sum(n for (name, kind), n in server.queries.items() if kind in ("A", "AAAA"))

    targets, hits, address_queries = run_with_dns(zone, scenario)
    assert len(targets) == MAX_SRV_RECORDS
    assert {t.host for t in targets} == {f"h{n}.many.example" for n in range(0, 40, 4)}  # priority 1: n % 4 == 0
    assert address_queries == 2 * MAX_SRV_RECORDS
    assert hits == ["srv_records"]


def test_a_target_with_many_addresses_is_tried_at_a_few_of_each_family():
    zone = {
        ("_xmpp-server._tcp.wide.example", "SRV"): ["10 0 5269 wide.example."],
        ("wide.example", "A"): [f"127.0.2.{n}" for n in range(30)],
        ("wide.example", "AAAA"): [f"2001:db8::{n:x}" for n in range(1, 11)],
    }

    async def scenario(make, server):
        hits = []
        return await make(limit_hit=hits.append).resolve("wide.example"), hits

    [target], hits = run_with_dns(zone, scenario)
    v6, v4 = target.addresses[:MAX_ADDRESSES_PER_FAMILY], target.addresses[MAX_ADDRESSES_PER_FAMILY:]
    assert len(v4) == MAX_ADDRESSES_PER_FAMILY and set(v4) <= set(zone[("wide.example", "A")])
    assert len(set(v6)) == MAX_ADDRESSES_PER_FAMILY and set(v6) <= set(zone[("wide.example", "AAAA")])
    assert hits == ["addresses_per_host", "addresses_per_host"]  # one per family


def test_a_target_publishing_many_tlsa_records_has_a_few_used():
    zone = {("_5269._tcp.xmpp.example", "TLSA"): [f"3 1 1 {n:064x}" for n in range(20)]}

    async def scenario(make, server):
        hits = []
        return await make(limit_hit=hits.append).tlsa("xmpp.example", 5269), hits

    answer, hits = run_with_dns(zone, scenario)
    assert len(answer.records) == RECORD_LIMITS["TLSA"][1] and hits == ["tlsa_records"]


def test_dns_cannot_point_the_relay_into_its_own_network():
    """s2s.connect_blocklist (by default loopback, private, link-local and other special
    ranges): such addresses from DNS are left out, IPv4-mapped IPv6 ones too, and a domain
    left with none is not reachable, saying why. A static route is the operator's: kept."""
    zone = {
        ("_xmpp-server._tcp.mixed.example", "SRV"): ["10 0 5269 inside.mixed.example.", "20 0 5269 out.mixed.example."],
        ("inside.mixed.example", "A"): ["10.1.2.3", "192.168.0.7"],
        ("inside.mixed.example", "AAAA"): ["::ffff:10.1.2.3", "fe80::1", "2002:a01:203::1"],
        ("out.mixed.example", "A"): ["93.184.216.34", "127.0.0.1"],
        ("out.mixed.example", "AAAA"): ["2606:2800:220:1::1"],
        ("_xmpp-server._tcp.internal.example", "SRV"): ["10 0 6379 169.254.169.254."],
        ("routed.example", "A"): ["10.9.9.9"],
    }

    async def scenario(make, server):
        hits = []
        resolver = make(limit_hit=hits.append, blocklist=DEFAULT_CONNECT_BLOCKLIST,
                        static_routes={"routed.example": StaticRoute("127.0.0.9", 5269)})
        mixed = await resolver.resolve("mixed.example")
        with pytest.raises(ResolutionError, match=r"only to addresses in s2s.connect_blocklist \(169.254.169.254\)"):
            await resolver.resolve("internal.example")
        return mixed, await resolver.resolve("routed.example"), hits

    mixed, routed, hits = run_with_dns(zone, scenario)
    assert mixed == [Target("out.mixed.example", 5269, False, ("2606:2800:220:1::1", "93.184.216.34"))]
    assert routed == [Target("127.0.0.9", 5269, False, ("127.0.0.9",))]
    assert hits == ["connect_blocklist", "connect_blocklist"]


def test_unknown_domain_is_resolution_error():
    async def scenario(make, server):
        with pytest.raises(ResolutionError, match="no SRV record and no A/AAAA"):
            await make().resolve("missing.example")
        return True

    assert run_with_dns({}, scenario)


def test_static_route_overrides_dns():
    zone = {
        ("_xmpp-server._tcp.peer.example", "SRV"): ["10 0 5269 main.peer.example."],
        ("main.peer.example", "A"): ["127.0.0.2"],
    }

    async def scenario(make, server):
        resolver = make(static_routes={"peer.example": StaticRoute("127.0.0.9", 15270, direct_tls=True)})
        return await resolver.resolve("peer.example"), sum(server.queries.values())

    targets, queries = run_with_dns(zone, scenario)
    assert targets == [Target("127.0.0.9", 15270, True, ("127.0.0.9",))]
    assert queries == 0


def test_answers_are_cached_for_their_ttl():
    zone = {
        ("_xmpp-server._tcp.peer.example", "SRV"): ["10 0 5269 main.peer.example."],
        ("main.peer.example", "A"): ["127.0.0.2"],
    }
    now = [1000.0]

    async def scenario(make, server):
        resolver = make(clock=lambda: now[0])
        first = await resolver.resolve("peer.example")
        await resolver.resolve("peer.example")
        after_two = server.queries[("_xmpp-server._tcp.peer.example.", "SRV")]
        now[0] += 301  # past the 300 s TTL
        again = await resolver.resolve("peer.example")
        return first, again, after_two, server.queries[("_xmpp-server._tcp.peer.example.", "SRV")]

    first, again, after_two, after_expiry = run_with_dns(zone, scenario, ttl=300)
    assert first == again
    assert after_two == 1
    assert after_expiry == 2


def test_weighted_order_within_a_priority():
    heavy = SrvRecord(10, 90, 5269, "heavy", False)
    light = SrvRecord(10, 10, 5269, "light", False)
    zero = SrvRecord(10, 0, 5269, "zero", False)
    low = SrvRecord(20, 1000, 5269, "low-priority", False)
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(500):
        ordered = order_records([low, zero, light, heavy], rng)
        assert sorted(r.host for r in ordered[:3]) == ["heavy", "light", "zero"]
        assert ordered[3] is low
        firsts[ordered[0].host] += 1
    # weights 90:10:0 -> heavy first about 90% of the time, zero-weight almost never
    assert firsts["heavy"] > firsts["light"] > firsts["zero"]
    assert firsts["heavy"] > 400
