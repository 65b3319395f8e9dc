"""The synthetic S2S load generator counts right and catches a faulty target.

Unit part: the ledger and the fates it gives every stanza, the echo
component's bounce file, the XEP-0185 key, XEP-0198 h checks and the relay
config options (no sockets). Integration part: a real Prosody serves
`bench.test` through the generator's echo component; once the component is
honest (everything must come back exactly once), once it is made to drop,
duplicate, misroute and bounce chosen stanzas, which the generator must report
one for one. And the relay itself, with XEP-0198 acks on every stream, and
two relay nodes whose bus reaches nats-server over TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

from bench.loadlib import echo, procstat, runner, sm, streams, targets, wire
from bench.loadlib.tracker import Tracker, percentiles
from router._fastparse import Tokenizer
from tests.integration.natsd import nats_binary
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
    template = wire.stanza_template(7, "bench.test", cycle)
    small, large = template.render_run(0, 1, 123456), template.render_run(cycle.index(1000), 1, 123456)
    assert abs(len(small) - 200) <= 10 and abs(len(large) - 1000) <= 10
    assert b"id='7.0.123456'" in small and b"from='u@g0008.load.test/r'" in small


def test_a_run_of_stanzas_is_each_stanza_with_its_id_and_size():
    cycle = wire.size_cycle(wire.parse_size_mix("200:3,1000:1"))
    template = wire.stanza_template(3, "bench.test", cycle)
    run = template.render_run(95, 12, 4567)  # across the end of the size cycle, seq from 2 to 3 digits
    events = Tokenizer().feed(TARGET_HEADER + run)[1:]
    assert [e.id for e in events] == [f"3.{seq}.4567" for seq in range(95, 107)]
    assert all(abs(e.end - e.start - cycle[seq % len(cycle)]) <= 10 for seq, e in zip(range(95, 107), events))
    assert events[0].from_ == "u@g0004.load.test/r" and events[0].to == "echo@bench.test"
    assert template.render_run(0, 0, 1) == b""
    with pytest.raises(ValueError):
        template.render_run(-1, 1, 1)


class Written:
    """A transport that keeps what is written (the sans-socket tests below)."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data

    def is_closing(self):
        return False

    def close(self):
        pass


TARGET_HEADER = wire.response_header("bench.test", "g0002.load.test", "s1")


def _echo(seq: int, to_domain: str = "g0002.load.test", kind: str = "normal") -> bytes:
    return (f"<message from='t@bench.test' to='u@{to_domain}/r' type='{kind}' id='1.{seq}.100'>"
            f"<body>echo {seq}</body></message>").encode()


def _outbound_reads(chunks: list[bytes]) -> tuple:
    """Simulated server 1's bidi stream, XEP-0198 on, five stanzas sent; the target's bytes read in ``chunks``.
    Returns the context, the stream, what the stream wrote back, and the streams its refill was due for."""
    async def scenario():
        ctx = runner.LoadContext(runner.LoadConfig(streams=2, saturate=True, window=5))
        ctx.sending = True
        ctx.tracker.window = (0, 1 << 60)
        stream = streams.OutboundStream(ctx, 1)
        stream.transport = Written()
        stream.bidi, stream.sm_offered = True, True
        stream.established()
        stream.send(5, 100)
        sent = len(stream.transport.data)
        for chunk in chunks:
            stream.feed(chunk)
        refill_due = set(ctx.dirty) if ctx.flush_scheduled else set()  # the loop runs the refill after this
        return ctx, stream, bytes(stream.transport.data[sent:]), refill_due

    return asyncio.run(scenario())


def test_a_streams_echoes_are_accounted_in_order_with_its_ack_requests_whole_byte_by_byte_and_cut():
    reads = (TARGET_HEADER + b"<enabled xmlns='urn:xmpp:sm:3'/>" + _echo(0) + _echo(1)
             + b"<r xmlns='urn:xmpp:sm:3'/>"  # the target asks after two echoes: h is 2, not what follows
             + _echo(2) + _echo(3, "g0001.load.test")  # stream 0's domain on stream 1: misrouted
             + _echo(4, kind="error") + _echo(9) + b"<r xmlns='urn:xmpp:sm:3'/>")
    whole = _outbound_reads([reads])
    for ctx, stream, written, refill_due in (whole, _outbound_reads([reads[i:i + 1] for i in range(len(reads))])):
        assert written == b"<a xmlns='urn:xmpp:sm:3' h='2'/><a xmlns='urn:xmpp:sm:3' h='6'/>"
        ledger = ctx.tracker.ledgers[1]
        assert (ledger.received, ledger.settled, ctx.tracker.misrouted) == (3, 4, 2)  # seq 9 was never sent
        assert ledger.fates()["bounced"] == 1 and len(ctx.tracker.latencies_us) == 3
        assert refill_due == {1}  # room in the window: the next refill sends
    ctx, stream, _, _ = _outbound_reads([reads + _echo(5)[:40]])  # trailing data: a stanza still incomplete
    assert stream.acks.received == 6 and ctx.tracker.ledgers[1].received == 3


def test_the_echo_component_answers_each_stanza_whole_and_byte_by_byte():
    stanzas = (b"<message from='u@g0001.load.test/r' to='t@bench.test' id='a&amp;b'><body>1</body></message>"
               b"<message from='u@g0001.load.test/r' to='t@bench.test' id='2'/>"
               b"<iq type='get' from='g0001.load.test' to='bench.test' id='q'><ping xmlns='urn:xmpp:ping'/></iq>"
               b"<message type='error' from='u@g0001.load.test/r' to='t@bench.test' id='0.4.9'/>"
               b"<presence from='u@g0001.load.test/r' to='t@bench.test'/>"
               b"<message from='u@g0001.load.test/r' to='t@bench.test'><body>3</body></message>")
    expected = (b"<message from='t@bench.test' to='u@g0001.load.test/r' id='a&amp;b'><body>1</body></message>"
                b"<message from='t@bench.test' to='u@g0001.load.test/r' id='2'></message>"
                b"<iq type='result' from='bench.test' to='g0001.load.test' id='q'/>"
                b"<message from='t@bench.test' to='u@g0001.load.test/r'><body>3</body></message>")
    reads = (b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' "
             b"from='bench.test' id='c1'><handshake/>" + stanzas)

    async def scenario(chunks):
        component = echo.EchoComponent("bench.test", "secret", False, asyncio.get_running_loop().create_future())
        component.transport = Written()
        for chunk in chunks:
            component.get_buffer(len(chunk))[:len(chunk)] = chunk
            component.buffer_updated(len(chunk))
        return component

    for chunks in ([reads], [reads[i:i + 1] for i in range(len(reads))]):
        component = asyncio.run(scenario(chunks))
        assert component.transport.data.endswith(b"</handshake>" + expected)
        assert component.counts == {"messages": 3, "errors": 1, "iq": 1, "other": 1}
        assert component.bounced_ids == ["0.4.9"]


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


def test_every_stanza_sent_has_one_fate_and_a_dead_streams_unacknowledged_ones_were_not_taken():
    tracker = Tracker(2)
    tracker.sent(0, 6)
    tracker.sent(1, 4)
    tracker.arrived("0.0.1", 0, 5, b"")
    tracker.bounced("0.1.1", b"")  # an error with the stanza's id came back
    tracker.echo_bounced(["0.2.1"])  # its echo bounced to the component
    tracker.arrived("0.4.1", 0, 5, b"")  # taken though never acknowledged: echoed
    tracker.died(0, 4)  # its peer had acknowledged 0..3: 3 is lost, 5 was not taken
    assert tracker.awaited() == 1 + 4
    tracker.arrived("1.1.1", 1, 5, b"")
    tracker.arrived("1.0.1", 1, 5, b"")  # older than one already echoed on its stream
    tracker.bounced("1.1.1", b"")  # echoed and bounced: two fates
    tracker.bounced("7.0.1", b"<message type='error'/>")  # not ours: an error of the run
    totals = tracker.totals()
    assert totals["fates"] == {"echoed": 3, "bounced": 1, "echo_bounced": 1, "not_taken": 1, "lost": 3,
                               "more_than_one": 1}
    assert sum(totals["fates"].values()) == totals["sent"] == 10 and totals["lost"] == 3
    assert totals["echo_returned"] == 5  # echoed or bounced back to the component: what the component saw come back
    assert (totals["out_of_order"], totals["error_stanzas"], totals["duplicated"]) == (1, 1, 0)
    assert totals["dead_streams"] == [{"stream": 0, "sent": 6, "acknowledged": 4, "echoed": 2, "bounced": 1,
                                       "echo_bounced": 1, "not_taken": 1, "lost": 1, "more_than_one": 0}]
    assert totals["samples"]["lost"] == ["stream 0: 1 of 6 missing, seq [3]", "stream 1: 2 of 4 missing, seq [2, 3]"]


def test_the_echo_components_bounces_reach_the_generator_through_its_stats_file(tmp_path):
    class Component:  # what write_stats reads of an EchoComponent
        counts = {"messages": 3, "errors": 0, "iq": 0, "other": 0}
        bounced_ids: list[str] = ["0.1.5"]

    path, taken = str(tmp_path / "echo-stats.json"), []
    echo.write_stats(path, Component)
    bounces = echo.Bounces(path, taken.extend)  # a sweep's later point: the earlier bounces are not its
    Component.bounced_ids = ["0.1.5", "0.2.6", "1.0.7"]
    echo.write_stats(path, Component)
    bounces.poll()
    bounces.poll()
    assert taken == ["0.2.6", "1.0.7"]
    echo.Bounces(None, taken.extend).poll()  # no file: nothing to take


def test_an_ack_beyond_what_was_sent_is_an_error_and_h_wraps_at_2_to_the_32():
    acks = sm.StreamAcks(counting_in=False)
    acks.sent = 5
    assert acks.acknowledge(3) is None and acks.acked == 3
    assert "acknowledges 6 stanzas but 5 were sent" in acks.acknowledge(6)
    assert acks.acknowledge(2) is not None and acks.acked == 3  # going back is no ack of 2^32 - 1 more
    acks.sent, acks.acked = sm.H_MODULUS + 2, sm.H_MODULUS - 1
    assert acks.acknowledge(1) is None and acks.acked == sm.H_MODULUS + 1  # XEP-0198 §4: h wraps
    assert sm.ack(sm.H_MODULUS + 7) == b"<a xmlns='urn:xmpp:sm:3' h='7'/>"


def test_relay_options_replace_add_and_create_config_settings():
    config = '[s2s]\nbidi = "always"\n\n[log]\nlevel = "WARNING"\n'
    changed = targets.with_options(config, ["s2s.stream_management=false", "s2s.bidi=never", "log.level=INFO",
                                            "cluster.workers=2"])
    assert __import__("tomllib").loads(changed) == {
        "s2s": {"stream_management": False, "bidi": "never"}, "log": {"level": "INFO"}, "cluster": {"workers": 2}}
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        targets.relay_option("stream_management=false")


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

    def answer_one(self, el, buf, out):
        stream, seq, _ = (int(x) for x in el.id.split("."))
        key = (stream, seq)
        if key == DROP:
            return
        if key == BOUNCE:
            out += (f"<message type='error' from='{el.to}' to='{el.from_}' id='{el.id}'><error type='cancel'>"
                    "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>").encode()
            return
        before = len(out)
        super().answer_one(el, buf, out)
        if key == DUPLICATE:
            out += out[before:]
        elif key == MISROUTE:
            out[before:] = out[before:].replace(wire.load_domain(2).encode(), wire.load_domain(0).encode())


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


async def _run_with(component_cls, target, listen_port, cfg: runner.LoadConfig | None = None) -> dict:
    transport, _ = await _component(component_cls, target)
    try:
        return await asyncio.wait_for(runner.run_point(cfg or _config(target, listen_port)), 60)
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
    assert d["fates"]["bounced"] == 1 and d["error_stanzas"] == 0  # the bounce is its stanza's fate
    assert d["lost"] == 2  # the dropped one, the misrouted one
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


# --- against the relay, XEP-0198 on ------------------------------------------------


@pytest.fixture
def relay(tmp_path):
    bundle = targets.Pki(tmp_path / "certs")
    # the relay asks for an ack every 10 stanzas it sends, so its <r/> come within a short point
    target = targets.make_target("relay", tmp_path, bundle, tls=False, cpu=None, relay_options=["s2s.sm_ack_every=10"])
    listen_port = harness.free_port("127.0.0.1")
    target.start(targets.load_routes(STREAMS, "127.0.0.1", listen_port))
    yield target, listen_port
    target.stop()


@pytest.mark.parametrize("bidi", [True, False], ids=["echoes-on-our-streams", "echoes-on-the-relays-streams"])
@pytest.mark.timeout(120)
def test_xep_0198_acks_count_every_stanza_both_ways_against_the_relay(relay, bidi):
    """Our streams enable XEP-0198 and ask for acks; the relay's <r/> are answered on whichever stream
    carries the echoes (ours with bidi, the ones it opens to us without); every h is possible and in
    the end covers everything, on both sides."""
    target, listen_port = relay
    cfg = dataclasses.replace(_config(target, listen_port), target_pids={"relay": target.pid}, bidi=bidi,
                              sm_ack_every=20)
    result = asyncio.run(_run_with(echo.EchoComponent, target, listen_port, cfg))
    h, d, acks = result["handshakes"], result["delivery"], result["stream_management"]
    assert (h["established"], h["bidi"]) == (STREAMS, STREAMS if bidi else 0)
    assert (acks["offered"], acks["enabled"], acks["refused"]) == (STREAMS, STREAMS, 0)
    assert acks["enabled_by_target"] == (0 if bidi else 1)  # one stream of the relay's carries all three pairs
    assert acks["ack_requests_sent"] > 2 * STREAMS and acks["acks_received"] >= acks["ack_requests_sent"]
    assert acks["ack_requests_answered"] > 0
    assert (acks["h_errors"], acks["unacknowledged_at_end"], acks["final_requests_unanswered"]) == (0, 0, 0)
    assert acks["acknowledged"] == d["sent"] > 100
    assert (d["lost"], d["duplicated"], d["misrouted"], d["error_stanzas"], d["unparseable"]) == (0, 0, 0, 0, 0)
    target.stop()  # its log is complete: our answers left the relay nothing to re-send, and no h it refused
    logs = target.logs()
    assert "unacknowledged (XEP-0198)" not in logs and "undefined-condition" not in logs, logs


# --- two relay nodes on a nats-server reached over TLS (bench --bus-tls) ----------


@pytest.mark.timeout(120)
def test_the_hop_target_with_its_bus_on_tls_carries_every_stanza_both_ways(tmp_path):
    """n1 holds our streams and n2 the echo component, so every stanza crosses the bus there
    and back; nats-server requires TLS, and the members trust its certificate by the run's CA."""
    nats_binary()  # skips without nats-server, as the cluster tests do (fails under CI)
    bundle = targets.Pki(tmp_path / "certs")
    target = targets.make_target("relay-hop", tmp_path, bundle, tls=False, cpu=None, bus_tls=True)
    listen_port = harness.free_port("127.0.0.1")
    target.start(targets.load_routes(STREAMS, "127.0.0.1", listen_port))
    try:
        assert 'nats = ["tls://localhost:' in (tmp_path / "relay-hop" / "n1.toml").read_text()
        cfg = dataclasses.replace(_config(target, listen_port), target_pids={"relay-hop": target.pid})
        result = asyncio.run(_run_with(echo.EchoComponent, target, listen_port, cfg))
    finally:
        target.stop()
    d = result["delivery"]
    assert d["sent"] > 100 and (d["lost"], d["duplicated"], d["misrouted"], d["error_stanzas"]) == (0, 0, 0, 0), d
    metrics = (tmp_path / "relay-hop" / "metrics-n2.txt").read_text()
    received = re.search(r'xmpp_router_bus_stanzas_total\{direction="received",hop="node"\} (\S+)', metrics)
    assert received and float(received.group(1)) >= d["sent"]  # every stanza came to n2 over the bus
