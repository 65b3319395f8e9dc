"""What an idle stream keeps in the relay: the structural half of the memory goal
(10,000 idle authenticated bidi streams in one process, at most 4 KiB each; the
RSS figure itself is measured by ``python -m bench.load --rate 0``).

An idle stream holds no receive buffer, no instance dict, no timer of its own,
no parsed negotiation element and no private empty sets."""

from __future__ import annotations

import asyncio

from router.negotiation.pairs import NO_PAIRS, NO_REQUESTS, Pair
from router.net.s2s import S2SStream
from router.net.stream import NO_STREAMS

from .conftest import arun, running
from .peer import Peer
from .test_components import SECRET_A, component


def assert_idle(stream) -> None:
    assert len(stream.tokenizer.buffer) == 0  # released after the last read was acted on
    assert not hasattr(stream, "__dict__")
    assert stream._close_timer is None  # idle and keepalive clocks are the relay's one sweep
    assert stream._closed_waiter is None
    assert stream._blockers is NO_STREAMS and stream._waiting_sources is NO_STREAMS


def test_idle_authenticated_bidi_stream_keeps_only_its_routing_state(relay_spec, pki, peers_cert):
    spec = relay_spec("idle", domains=("relay.test",), echo=("echo.relay.test",))

    async def scenario():
        async with running(spec.config()) as relay:
            peer = await Peer.connect(spec.s2s_port, "p1.peers.test", "echo.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path)
            await peer.authenticated()
            peer.send("<message from='j@p1.peers.test' to='echo.relay.test' id='once'><body>hi</body></message>")
            assert b"id='once'" in (await peer.receive()).replace(b'"', b"'")
            [stream] = [s for s in relay.streams if isinstance(s, S2SStream)]
            assert stream.authenticated and stream.bidi
            assert_idle(stream)
            session = stream.session
            assert not hasattr(session, "__dict__")
            # the bidi stream carries one pair both ways, one shared Pair(local, remote) in each tuple
            assert set(session.inbound_pairs) == set(session.outbound_pairs) == {Pair("echo.relay.test", "p1.peers.test")}
            assert session._tree_cache is None  # the lxml tree of the last negotiation element is gone
            assert session._requested is NO_PAIRS and session.results_out is NO_PAIRS
            assert session.results_in is NO_REQUESTS and session.verifies_out is NO_REQUESTS
            assert session._wanted == () and session._verify_queue == ()
            # reading still works after the buffer was given back
            peer.send("<message from='j@p1.peers.test' to='echo.relay.test' id='again'/>")
            assert b"again" in await peer.receive()
            await asyncio.sleep(0)
            assert len(stream.tokenizer.buffer) == 0
            await peer.close()

    arun(scenario())


def test_idle_component_stream_holds_no_receive_buffer(relay_spec):
    spec = relay_spec("idle", domains=("relay.test",), components={"a.relay.test": SECRET_A},
                      echo=("echo.relay.test",))

    async def scenario():
        async with running(spec.config()) as relay:
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            a.send("<message from='a.relay.test' to='echo.relay.test' id='c1'/>")
            assert (await a.receive()).get("id") == "c1"
            assert_idle(relay.table.local["a.relay.test"])
            await a.close()

    arun(scenario())
