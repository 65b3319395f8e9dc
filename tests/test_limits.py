"""Admission limits (router.routing.limits) and the relay's keyed semaphores: counts that
refuse past their maximum, take all slots or none, and forget idle keys."""

from __future__ import annotations

import asyncio

import uvloop

from router.routing.limits import LOG_INTERVAL, OVERALL, Limit, admit, release
from router.net.connector import KeyedSemaphores


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
