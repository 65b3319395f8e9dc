"""Admission limits (router.routing.limits) and the relay's keyed semaphores: counts that
refuse past their maximum, take all slots or none, and forget idle keys; and the domain
pairs one stream may carry (router.net.verifier, router.negotiation.pairs)."""

from __future__ import annotations

import asyncio

import uvloop

from relay_objects import CONFIG, REMOTE_SECRET, InProcessRelay, RecordingTransport, read
from router.config import parse_config
from router.negotiation.dialback import dialback_key
from router.negotiation.pairs import SET_FROM, Pair, with_pair
from router.net.connector import KeyedSemaphores
from router.net.s2s import S2SStream
from router.net.verifier import DialbackVerifier
from router.routing.limits import LOG_INTERVAL, OVERALL, Limit, admit, release


def test_admit_takes_every_slot_or_none_and_names_the_full_limit():
    overall, per_ip = Limit("max_connections", 3), Limit("max_connections_per_ip", 2)
    assert admit((overall, OVERALL), (per_ip, "10.0.0.1")) is None
    assert admit((overall, OVERALL), (per_ip, "10.0.0.1")) is None
    assert admit((overall, OVERALL), (per_ip, "10.0.0.1")) is per_ip
    assert overall.total() == 2  # the refused admission took nothing
    assert admit((overall, OVERALL), (per_ip, "10.0.0.2")) is None
    assert admit((overall, OVERALL), (per_ip, "10.0.0.3")) is overall
    release((overall, OVERALL), (per_ip, "10.0.0.1"))
    assert admit((overall, OVERALL), (per_ip, "10.0.0.3")) is None


def test_a_key_whose_count_drops_to_zero_is_forgotten():
    per_stream = Limit("max_pending_verifications_per_stream", 16)
    for key in range(1000):
        per_stream.take(key)
        per_stream.give(key)
    assert per_stream.counts == {}
    per_stream.give("never taken")  # a double release does not go negative or stay behind
    assert per_stream.counts == {}


def test_refusals_are_reported_at_most_once_per_interval_with_their_count():
    refusals = Limit("max_connections_per_ip", 1).refusals
    assert refusals.note(now=100.0) == 1  # the first one is said at once
    assert [refusals.note(now=100.0 + i) for i in range(1, 5)] == [0, 0, 0, 0]
    assert refusals.note(now=100.0 + LOG_INTERVAL) == 5  # the four held back, and this one


def test_keyed_semaphores_bound_holders_and_forget_idle_keys():
    async def scenario():
        semaphores = KeyedSemaphores()
        inside, peak, waits = 0, 0, []

        async def hold(key):
            nonlocal inside, peak
            async with semaphores.hold(key, 2, lambda: waits.append(key)):
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0.01)
                inside -= 1

        await asyncio.gather(*(hold("target") for _ in range(6)), hold("other"))
        assert peak <= 3 and len(waits) == 4  # two per key at a time: four waited for "target"
        assert len(semaphores) == 0

    uvloop.run(scenario())


class Authoritative(DialbackVerifier):
    """The relay's verifier with its limits, the authoritative servers answered in-process."""

    async def _verify(self, origin, event, slots):
        release(*slots)
        good = event.key == dialback_key(REMOTE_SECRET, event.receiving, event.originating, event.stream_id)
        origin.session.key_verified(event.token, "valid" if good else "invalid")
        origin.pump()


def test_a_stream_carries_at_most_max_pairs_per_stream_domain_pairs_pending_ones_counted():
    """A peer with a wildcard zone and its own authoritative server could authorize any number of
    domains over one stream, each a route: past limits.max_pairs_per_stream (verifications still
    pending count) a new one is answered <resource-constraint/>, an authorized one is not."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        relay = InProcessRelay(parse_config(CONFIG.replace("[log]", "[limits]\nmax_pairs_per_stream = 3\n[log]")), loop)
        relay.verifier = Authoritative(relay)
        relay.verifier.configure(relay.config.limits)
        stream, transport = S2SStream(relay, relay._inbound_session(False), outbound=False), RecordingTransport()
        stream.connection_made(transport)
        read(stream, b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                     b"xmlns:stream='http://etherx.jabber.org/streams' to='relay.test' version='1.0'>")

        def results(domains):
            return "".join(f"<db:result from='{d}' to='relay.test'>"
                           f"{dialback_key(REMOTE_SECRET, 'relay.test', d, stream.session.stream_id)}</db:result>"
                           for d in domains).encode()

        read(stream, results([f"d{n}.many.test" for n in range(10)]))  # one read: all ten asked before any answer
        loop.run_until_complete(asyncio.sleep(0.01))
        assert sorted(p.remote for p in stream.session.inbound_pairs) == ["d0.many.test", "d1.many.test", "d2.many.test"]
        sent = b"".join(transport.calls)
        assert sent.count(b"<resource-constraint") == 7 and b"limits.max_pairs_per_stream = 3" in sent
        assert relay.metrics.limits_hit.get("max_pairs_per_stream") == 7
        read(stream, results(["d1.many.test"]))  # already carried: verified again, not refused
        loop.run_until_complete(asyncio.sleep(0.01))
        assert relay.metrics.limits_hit.get("max_pairs_per_stream") == 7
        assert b"".join(transport.calls).count(b"type='valid'") == 4
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_the_pairs_of_a_stream_become_a_set_past_a_few():
    pairs = ()
    for n in range(SET_FROM + 4):
        pairs = with_pair(pairs, Pair("relay.test", f"d{n}.test"))
        assert type(pairs) is (tuple if n < SET_FROM else frozenset)
    assert len(pairs) == SET_FROM + 4 and ("relay.test", "d3.test") in pairs
    assert with_pair(pairs, Pair("relay.test", "d3.test")) is pairs
