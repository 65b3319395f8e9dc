"""XEP-0478 stream limits and XEP-0199 pings against a running relay: our features announce our limits;
a remote server's max-bytes is obeyed (larger stanzas bounce with <policy-violation/>, queued or not) and
its idle-seconds kept with whitespace; a quiet stream is pinged, an answer (on the stream itself or on the
peer's own stream to us) keeps it and goes to nobody, silence closes it with <connection-timeout/>."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

from lxml import etree

from router.negotiation.features import StreamLimits
from router.wire.namespaces import STANZAS_NS

from .conftest import arun, running
from .peer import AuthoritativeServer, Peer
from .rawstream import RawComponent

BOT, BOT_SECRET = "bot.relay.test", "bot-secret"
FAR_SECRET = "far-dialback-secret-0123"
RELAY_SECRET = "relay-dialback-secret-0123"
PING_ID = re.compile(rb"<iq type='get' from='bot\.relay\.test' to='far\.test' id='(ping-[0-9a-f]+)'>"
                     rb"<ping xmlns='urn:xmpp:ping'/></iq>")
POLL = 0.02
POLLS = 750  # 15 s


async def until(predicate, what: str):
    """Poll ``predicate`` until it returns something truthy (at most 15 s)."""
    for _ in range(POLLS):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(POLL)
    raise AssertionError(f"timed out waiting for {what}")


def far_server(limits: StreamLimits | None = None) -> AuthoritativeServer:
    """far.test: a remote server the relay connects to, announcing ``limits`` in its features."""
    server = AuthoritativeServer({"far.test"}, FAR_SECRET, RELAY_SECRET)
    server.config = replace(server.config, stream_limits=limits)
    return server


def relay_to_far(relay_spec, port: int, **s2s):
    return relay_spec("relay", domains=("relay.test",), components={BOT: BOT_SECRET}, echo=("echo.relay.test",),
                      tls=False, policy={"require_encryption": False}, routes={"far.test": port}, s2s=s2s,
                      secret=RELAY_SECRET)


def message(stanza_id: str, size: int) -> bytes:
    """A message from the component to far.test of exactly ``size`` bytes."""
    head = f"<message from='u@{BOT}' to='v@far.test' id='{stanza_id}'><body>".encode()
    tail = b"</body></message>"
    return head + b"x" * (size - len(head) - len(tail)) + tail


def parse_component(data: bytes) -> etree._Element:
    return etree.fromstring(b"<w xmlns='jabber:component:accept'>" + data + b"</w>")[0]


def parse_server(data: bytes) -> etree._Element:
    return etree.fromstring(b"<w xmlns='jabber:server'>" + data + b"</w>")[0]


async def stanza_with(server: AuthoritativeServer, marker: bytes) -> bytes:
    """The next stanza ``server`` received that contains ``marker`` (pings before it are skipped)."""
    for _ in range(100):
        stanza = await asyncio.wait_for(server.stanzas.get(), 15)
        if marker in stanza:
            return stanza
        assert PING_ID.search(stanza), stanza
    raise AssertionError(f"no stanza with {marker!r} among 100 pings")


def connection_with(server: AuthoritativeServer, marker: bytes) -> bytearray:
    """The input of ``server``'s connection that carried ``marker``."""
    return next(data for data in server.inputs if marker in data)


def test_a_remote_servers_max_bytes_is_obeyed_queued_or_not(relay_spec):
    """XEP-0478 §3: a stanza larger than the peer's max-bytes "SHOULD NOT be sent on that stream"; its sender
    gets <policy-violation/> with a text naming the limit. Both while the stream is set up (the queue) and on
    the open stream (the compiled path hands it to the slow one)."""

    async def scenario():
        far = far_server(StreamLimits(10000, 0))
        spec = relay_to_far(relay_spec, await far.start(), ping_interval=0)
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                bot.send(message("small1", 9000) + message("big1", 20000))  # queued while connecting
                first = await asyncio.wait_for(far.stanzas.get(), 15)
                assert b"id='small1'" in first and len(first) == 9000
                assert relay.table.remote[(BOT, "far.test")].peer_max_bytes == 10000
                bot.send(message("big2", 20000) + message("small2", 9000))  # on the open stream
                second = await asyncio.wait_for(far.stanzas.get(), 15)
                assert b"id='small2'" in second and len(second) == 9000
                assert far.stanzas.empty()
                for stanza_id in ("big1", "big2"):
                    bounce = parse_component(await bot.read_until(b"</message>"))
                    assert (bounce.get("id"), bounce.get("type"), bounce.get("to")) == (stanza_id, "error", f"u@{BOT}")
                    error = bounce.find("{jabber:component:accept}error")
                    assert error.get("type") == "modify" and error.get("by") is None  # §3: no 'by'
                    assert error.find(f"{{{STANZAS_NS}}}policy-violation") is not None
                    assert "at most 10000 bytes" in error.find(f"{{{STANZAS_NS}}}text").text
                assert relay.metrics.limits_hit.get("peer_max_bytes") == 2
                assert relay.metrics.stanzas_bounced.get("policy-violation") == 2
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())


def test_a_bidi_peer_announcing_max_bytes_in_its_request_is_obeyed(relay_spec, pki, peers_cert):
    """XEP-0478 §2.2: on a bidi stream the initiator sees no features of ours and we none of its: its limits
    come inside its <bidi/> request, and what we send back over that stream keeps to them."""
    spec = relay_spec("relay", domains=("relay.test",), components={BOT: BOT_SECRET}, s2s={"ping_interval": 0})

    async def scenario():
        async with running(spec.config()) as relay:
            bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
            peer = await Peer.connect(spec.s2s_port, "p1.peers.test", BOT, cert=peers_cert, ca_path=pki.ca_path,
                                      stream_limits=StreamLimits(10000, 0))
            await peer.authenticated()
            stream = relay.table.remote[(BOT, "p1.peers.test")]
            assert stream.bidi and not stream.outbound and stream.peer_max_bytes == 10000
            big = message("big", 20000).replace(b"far.test", b"p1.peers.test")
            small = message("small", 9000).replace(b"far.test", b"p1.peers.test")
            bot.send(big + small)
            assert b"id='small'" in await peer.receive()
            bounce = parse_component(await bot.read_until(b"</message>"))
            assert bounce.get("id") == "big" and bounce.find(f".//{{{STANZAS_NS}}}policy-violation") is not None
            await peer.close()
            await bot.close()

    arun(scenario())


def test_an_echo_too_large_for_the_askers_server_comes_back_as_policy_violation(relay_spec, pki):
    """XEP-0478 §3 for the relay's own answers: the echo service's reply would exceed far.test's max-bytes,
    so the asker gets <policy-violation/> (over the relay's stream to far.test) instead."""

    async def scenario():
        far = far_server(StreamLimits(10000, 0))
        spec = relay_to_far(relay_spec, await far.start(), ping_interval=0)
        try:
            async with running(spec.config()) as relay:
                peer = await Peer.connect(spec.s2s_port, "far.test", "echo.relay.test", cert=None,
                                          ca_path=pki.ca_path, secret=FAR_SECRET, bidi="off",
                                          require_encryption=False)
                await peer.authenticated()
                asked = "<message from='j@far.test/r' to='echo.relay.test' id='{}'><body>{}</body></message>"
                peer.send(asked.format("short", "hi"))  # its echo opens the relay's stream to far.test
                echoed = parse_server(await asyncio.wait_for(far.stanzas.get(), 15))
                assert echoed.get("id") == "short" and echoed.get("type") is None
                assert relay.table.remote[("echo.relay.test", "far.test")].peer_max_bytes == 10000
                peer.send(asked.format("long", "y" * 12000))
                answer = parse_server(await asyncio.wait_for(far.stanzas.get(), 15))
                assert (answer.get("id"), answer.get("type"), answer.get("to")) == ("long", "error", "j@far.test/r")
                assert answer.find(f"{{jabber:server}}error/{{{STANZAS_NS}}}policy-violation") is not None
                assert relay.metrics.limits_hit.get("peer_max_bytes") == 1
                await peer.close()
        finally:
            await far.stop()

    arun(scenario())


def test_our_features_carry_our_limits_unless_turned_off(relay_spec, pki, peers_cert):
    """XEP-0478 §2.1: max-bytes is policy.max_stanza_bytes, idle-seconds s2s.idle_timeout."""
    on = relay_spec("on", domains=("relay.test",), policy={"max_stanza_bytes": 300000}, s2s={"idle_timeout": 500})
    off = relay_spec("off", domains=("relay.test",), s2s={"advertise_limits": False})

    async def scenario():
        for spec, expected in ((on, StreamLimits(300000, 500)), (off, StreamLimits(0, 0))):
            async with running(spec.config()):
                peer = await Peer.connect(spec.s2s_port, "p1.peers.test", "relay.test", cert=peers_cert,
                                          ca_path=pki.ca_path)
                await peer.authenticated()
                assert peer.session.advertised.limits == expected
                announced = b"<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>300000</max-bytes>" \
                            b"<idle-seconds>500</idle-seconds></limits>"
                assert (announced in b"".join(peer.reads)) == (spec is on)
                await peer.close()

    arun(scenario())


def test_a_remote_server_announcing_idle_seconds_gets_whitespace_within_them(relay_spec):
    """XEP-0478 §2.1 idle-seconds: the peer acts on a stream quiet that long; our keepalive_interval (300 s)
    would be too late, so whitespace goes out at half of it (RFC 6120 §4.6.1)."""

    async def scenario():
        far = far_server(StreamLimits(0, 4))
        spec = relay_to_far(relay_spec, await far.start(), ping_interval=0)
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                bot.send(message("hello", 200))
                await asyncio.wait_for(far.stanzas.get(), 15)
                assert relay.table.remote[(BOT, "far.test")].peer_idle_seconds == 4
                received = connection_with(far, b"id='hello'")
                after = received.index(b"</message>") + len(b"</message>")
                await until(lambda: b" " in received[after:], "a whitespace keepalive")
                assert received[after:].strip(b" ") == b""  # nothing but whitespace
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())


def test_a_silent_remote_server_has_its_stream_closed_after_an_unanswered_ping(relay_spec):
    """XEP-0199 §4.3 server-to-server ping; RFC 6120 §4.6.2: no answer, the stream is broken: <connection-timeout/>.
    The pair is not lost: the next stanza opens a new stream."""

    async def scenario():
        far = far_server()
        spec = relay_to_far(relay_spec, await far.start(), ping_interval=1, ping_timeout=1)
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                bot.send(message("before", 200))
                await stanza_with(far, b"id='before'")
                received = connection_with(far, b"id='before'")
                await until(lambda: b"</stream:stream>" in received, "the relay closing its stream")
                assert PING_ID.search(received)
                assert re.search(rb"<stream:error><connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                                 rb"<text [^>]*>no answer to an XEP-0199 ping from bot\.relay\.test to far\.test "
                                 rb"within 1 seconds</text></stream:error></stream:stream>$", bytes(received))
                assert relay.metrics.pings.get("sent") >= 1 and relay.metrics.pings.get("timeout") == 1
                assert not relay.liveness.awaited  # the unanswered ping's id is no longer waited for
                bot.send(message("after", 200))
                await stanza_with(far, b"id='after'")
                assert connection_with(far, b"id='after'") is not received
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())


def test_a_bidi_peer_that_answers_keeps_its_stream_and_the_answer_goes_to_nobody(relay_spec, pki, peers_cert):
    """XEP-0199 §4.3: a result or an error (a server without ping) both prove the peer alive; the answer is the
    relay's own, so the component owning the pinging domain never sees it."""
    spec = relay_spec("relay", domains=("relay.test",), components={BOT: BOT_SECRET},
                      s2s={"ping_interval": 1, "ping_timeout": 5})

    async def scenario():
        async with running(spec.config()) as relay:
            bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
            peer = await Peer.connect(spec.s2s_port, "p1.peers.test", BOT, cert=peers_cert, ca_path=pki.ca_path)
            await peer.authenticated()
            stream = relay.table.remote[(BOT, "p1.peers.test")]
            assert not stream.outbound and stream.bidi
            for answer in ("result", "error", "result"):  # a second ping only leaves once the first is answered
                ping = parse_server(await peer.receive())
                assert (ping.tag, ping.get("type"), ping.get("from"), ping.get("to")) == (
                    "{jabber:server}iq", "get", BOT, "p1.peers.test")
                assert ping.find("{urn:xmpp:ping}ping") is not None
                error = "<error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>" \
                        "</error>" if answer == "error" else ""
                peer.send(f"<iq type='{answer}' from='p1.peers.test' to='{BOT}' id='{ping.get('id')}'>{error}</iq>")
            peer.send(f"<message from='j@p1.peers.test' to='r@{BOT}' id='sentinel'/>")
            forwarded = await bot.read_until(b"id='sentinel'")
            assert b"<iq" not in forwarded  # the answers, sent before the sentinel, were not forwarded
            assert relay.table.remote[(BOT, "p1.peers.test")] is stream and not stream.closing
            assert relay.metrics.pings.get("answered") == 3 and relay.metrics.pings.get("timeout") == 0
            await peer.close()
            await bot.close()

    arun(scenario())


def test_an_answer_on_the_peers_own_stream_keeps_our_outbound_stream(relay_spec, pki):
    """Without bidi the answer to a ping on our outbound stream comes back on the peer's stream to us
    (XEP-0199 §4.3 addresses it to our domain): it still proves the peer processes ours."""

    async def scenario():
        far = far_server()
        spec = relay_to_far(relay_spec, await far.start(), ping_interval=1, ping_timeout=5)
        try:
            async with running(spec.config()) as relay:
                peer = await Peer.connect(spec.s2s_port, "far.test", BOT, cert=None, ca_path=pki.ca_path,
                                          secret=FAR_SECRET, bidi="off", require_encryption=False)
                await peer.authenticated()  # far.test's stream to us, ready before ours to it is pinged
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                bot.send(message("hello", 200))
                await stanza_with(far, b"id='hello'")
                outbound = relay.table.remote[(BOT, "far.test")]
                assert outbound.outbound and not outbound.bidi
                received = connection_with(far, b"id='hello'")
                answered = set()
                for _ in range(2):  # a second ping only leaves once the first is answered
                    ping_id = await until(lambda: next((m.group(1) for m in PING_ID.finditer(received)
                                                        if m.group(1) not in answered), None), "a ping")
                    answered.add(ping_id)
                    peer.send(f"<iq type='result' from='far.test' to='{BOT}' id='{ping_id.decode()}'/>")
                peer.send(f"<message from='j@far.test' to='r@{BOT}' id='sentinel'/>")
                assert b"<iq" not in await bot.read_until(b"id='sentinel'")
                assert relay.table.remote[(BOT, "far.test")] is outbound and not outbound.closing
                assert relay.metrics.pings.get("answered") == 2 and relay.metrics.pings.get("timeout") == 0
                await peer.close()
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())


def test_behind_a_cluster_bus_only_streams_that_carry_their_own_answer_are_pinged(relay_spec, nats_url):
    """Without bidi the answer would come on far.test's own stream to us, which the bus may give to another
    worker or node that knows nothing of the ping: pinging would close live streams. The peer's idle-seconds
    still gets its whitespace (two keepalives = two sweeps in which a ping was due)."""

    async def scenario():
        far = far_server(StreamLimits(0, 2))
        spec = relay_to_far(relay_spec, await far.start(), ping_interval=1, ping_timeout=1)
        spec.cluster = {"node": "n1", "nats": [nats_url]}
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                bot.send(message("hello", 200))
                await stanza_with(far, b"id='hello'")
                received = connection_with(far, b"id='hello'")
                after = received.index(b"</message>") + len(b"</message>")
                await until(lambda: received[after:].count(b" ") >= 2, "two whitespace keepalives")
                assert not PING_ID.search(received) and relay.metrics.pings.get("sent") == 0
                assert not relay.table.remote[(BOT, "far.test")].closing
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())
