"""The synthetic S2S load generator counts right and catches a faulty target.

Unit part: the ledger and the XEP-0185 key (no sockets). Integration part: a
real Prosody serves `bench.test` through the generator's echo component; once
the component is honest (everything must come back exactly once), once it is
made to drop, duplicate, misroute and bounce chosen stanzas, which the
generator must report one for one.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from bench.loadlib import echo, procstat, runner, targets, wire
from bench.loadlib.tracker import Tracker, percentiles
from tests.interop import harness

# --- no sockets ---------------------------------------------------------------


def test_dialback_key_matches_the_xep_0185_and_0220_vectors():
    assert wire.dialback_key("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F") == (
        "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643")
    assert wire.dialback_key("d14lb4ck43v3r", "capulet.example", "montague.example", "417GAF25") == (
        "225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d")


def test_stanzas_have_the_sizes_of_the_mix_and_a_parseable_id():
    cycle = wire.size_cycle(wire.parse_size_mix("200:3,1000:1"))
    assert cycle.count(200) == 75 and cycle.count(1000) == 25
    template = wire.StanzaTemplate(7, "bench.test", cycle)
    small, large = template.render(0, 123456), template.render(cycle.index(1000), 123456)
    assert abs(len(small) - 200) <= 10 and abs(len(large) - 1000) <= 10
    assert b"id='7.0.123456'" in small and b"from='u@g0008.load.test/r'" in small


def test_tracker_counts_loss_duplicates_misrouting_and_windowed_latency():
    tracker = Tracker(2)
    tracker.window = (1000, 2000)
    tracker.sent(0, 3)
    tracker.sent(1, 2)
    assert tracker.arrived("0.0.1500", 0, 1700, b"") == 0
    assert tracker.arrived("0.0.1500", 0, 1800, b"") == 0  # again: duplicate
    assert tracker.arrived("0.2.500", 0, 900, b"") == 0  # out of order, sent before the window
    assert tracker.arrived("1.0.1500", 0, 1600, b"<m/>") is None  # stream 1's stanza at stream 0's domain
    assert tracker.arrived("1.5.1500", 1, 1600, b"") is None  # never sent
    assert tracker.arrived("garbage", 1, 1600, b"") is None
    totals = tracker.totals()
    assert (totals["sent"], totals["received"], totals["lost"]) == (5, 2, 3)
    assert (totals["duplicated"], totals["misrouted"], totals["unparseable"]) == (1, 2, 1)
    assert tracker.latencies_us == [200] and tracker.delivered_in_window == 1
    assert percentiles([1000, 2000, 3000, 4000])["p50"] == 2.0


def test_proc_sampling_sees_this_process():
    sample = procstat.sample(__import__("os").getpid())
    assert sample is not None and sample.rss_bytes > 1 << 20 and sample.cpu_s > 0


# --- against a real Prosody -----------------------------------------------------

needs_prosody = pytest.mark.skipif("prosody" in harness.missing_peers(),
                                        reason=f"Prosody is not installed: {harness.ENABLE_HINT}")

STREAMS = 3
DROP, DUPLICATE, MISROUTE, BOUNCE = (0, 3), (1, 5), (2, 7), (0, 9)  # (stream, seq)


class FaultyEcho(echo.EchoComponent):
    """Echoes like the real component except for four chosen stanzas."""

    def stanza(self, el, buf, out):
        stream, seq, _ = (int(x) for x in el.id.split("."))
        key = (stream, seq)
        if key == DROP:
            return
        if key == BOUNCE:
            out.append(f"<message type='error' from='{el.to}' to='{el.from_}' id='{el.id}'><error type='cancel'>"
                       "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>".encode())
            return
        before = len(out)
        super().stanza(el, buf, out)
        if key == DUPLICATE:
            out.extend(out[before:])
        elif key == MISROUTE:
            out[before] = out[before].replace(wire.load_domain(2).encode(), wire.load_domain(0).encode())


@pytest.fixture
def prosody(tmp_path):
    bundle = targets.Pki(tmp_path / "certs")
    target = targets.make_target("prosody", tmp_path, bundle, tls=False, cpu=None)
    listen_port = harness.free_port("127.0.0.1")
    target.start(targets.load_routes(STREAMS, "127.0.0.1", listen_port))
    yield target, listen_port
    target.stop()


def _config(target, listen_port) -> runner.LoadConfig:
    return runner.LoadConfig(
        target_host=target.s2s[0], target_port=target.s2s[1], target_domain=target.domain,
        listen_port=listen_port, streams=STREAMS, rate=150, duration=1.0, warmup=0.3, drain=3.0,
        handshake_timeout=15.0, target_pids={"prosody": target.pid}, progress=False,
    )


async def _component(component_cls, target):
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    transport, component = await loop.create_connection(
        lambda: component_cls(target.domain, target.secret, False, ready), *target.component)
    try:
        await asyncio.wait_for(ready, 10)
    except BaseException:
        transport.close()
        raise
    return transport, component


async def _run_with(component_cls, target, listen_port) -> dict:
    transport, _ = await _component(component_cls, target)
    try:
        return await asyncio.wait_for(runner.run_point(_config(target, listen_port)), 60)
    finally:
        transport.close()


@pytest.mark.interop
@needs_prosody
@pytest.mark.timeout(120)
def test_every_stanza_comes_back_once_through_an_honest_echo(prosody):
    target, listen_port = prosody
    result = asyncio.run(_run_with(echo.EchoComponent, target, listen_port))
    h, d = result["handshakes"], result["delivery"]
    assert (h["established"], h["failed"], h["bidi"]) == (STREAMS, 0, STREAMS)
    assert h["verifies_answered"] == STREAMS  # Prosody checked every dialback key with the generator
    assert d["sent"] > 100 and d["received"] == d["sent"]
    assert (d["lost"], d["duplicated"], d["misrouted"], d["error_stanzas"], d["unparseable"]) == (0, 0, 0, 0, 0)
    assert result["latency_ms"]["count"] > 50 and result["cpu_percent"]["prosody"] is not None


@pytest.mark.interop
@needs_prosody
@pytest.mark.timeout(120)
def test_drops_duplicates_misroutes_and_bounces_are_each_reported(prosody):
    target, listen_port = prosody
    result = asyncio.run(_run_with(FaultyEcho, target, listen_port))
    d = result["delivery"]
    assert d["sent"] > 30  # every chosen sequence number was sent
    assert d["duplicated"] == 1
    assert d["misrouted"] == 1 and "id='2.7." in d["samples"]["misrouted"][0] and wire.load_domain(0) in d["samples"]["misrouted"][0]
    assert d["error_stanzas"] == 1 and "service-unavailable" in d["samples"]["error"][0]
    assert d["lost"] == 3  # the dropped one, the misrouted one, the bounced one
    assert d["received"] == d["sent"] - 3


@pytest.mark.interop
@needs_prosody
@pytest.mark.timeout(120)
def test_a_sweep_that_reuses_domains_loses_nothing(prosody):
    """Each point closes the connections the target opened to it, so the next point's echoes
    for the same simulated domains cannot land in the previous point's ledger."""
    target, listen_port = prosody
    cfg = dataclasses.replace(_config(target, listen_port), saturate=True, window=4)

    async def sweep():
        transport, _ = await _component(echo.EchoComponent, target)
        try:
            return await asyncio.wait_for(runner.run_sweep(cfg, [1, STREAMS], pause_s=0.2), 90)
        finally:
            transport.close()

    first, second = asyncio.run(sweep())
    for point in (first, second):
        d = point["delivery"]
        assert d["sent"] > 20 and (d["lost"], d["duplicated"], d["misrouted"]) == (0, 0, 0), d
