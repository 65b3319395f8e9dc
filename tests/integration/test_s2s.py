"""S2S streams against a running relay: negotiation (STARTTLS, SASL EXTERNAL,
dialback, bidi), routing in every direction, piggybacked pairs, bounces, and bad
input on live streams."""

from __future__ import annotations

import asyncio
import re

import pytest
from cryptography import x509
from lxml import etree

from router.net.component_client import ComponentClient
from router.wire.namespaces import STANZAS_NS
from router.metrics import PREFIX
from router.negotiation import events as ev
from router.negotiation.pairs import Pair
from router.trust.pki import make_ca, make_leaf

from .conftest import arun, free_port, running
from .peer import AuthoritativeServer, Peer, PeerClosed
from .rawstream import RawComponent
from .test_many_streams import sample, scrape


def observed(relay, histogram: str, **labels: str) -> float:
    """How many events the relay's histogram ``histogram`` counted with ``labels``."""
    return relay.metrics.registry.exposition.get_sample_value(f"xmpp_router_{histogram}_count", labels) or 0


def opened(relay) -> int:
    """Outbound TCP connections the relay made (streams and verify-only)."""
    return relay.metrics.outbound_connections.get("stream") + relay.metrics.outbound_connections.get("verify")


@pytest.fixture
def relay(relay_spec):
    return relay_spec("relay", domains=("relay.test",), echo=("echo.relay.test",),
                      components={"bot.relay.test": "bot-secret"})


async def component(spec, domain, secret) -> ComponentClient:
    client = ComponentClient()
    await client.connect("127.0.0.1", spec.component_port, domain, secret)
    return client


def error_condition(stanza) -> tuple[str, str]:
    error = stanza.find("{jabber:component:accept}error")
    return error.get("type"), etree.QName(error[0]).localname


def parse_component(data: bytes) -> etree._Element:
    """Parse bytes in the component stream's context (no prefixes declared but stream:)."""
    return etree.fromstring(b"<w xmlns='jabber:component:accept'>" + data + b"</w>")[0]


def parse(data: bytes) -> etree._Element:
    return etree.fromstring(b"<w xmlns='jabber:server'>" + data + b"</w>")[0]


def test_peer_authenticates_with_sasl_external_and_gets_echo_over_bidi(relay, pki, peers_cert):
    async def scenario():
        async with running(relay.config()) as r:
            peer = await Peer.connect(relay.s2s_port, "p1.peers.test", "echo.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path)
            await peer.authenticated()
            assert peer.session.bidi
            peer.send("<message from='juliet@p1.peers.test/b' to='echo.relay.test' id='e1' type='chat'>"
                      "<body>Art thou not Romeo?</body></message>")
            reply = parse(await peer.receive())
            assert (reply.get("from"), reply.get("to"), reply.get("id")) == ("echo.relay.test", "juliet@p1.peers.test/b", "e1")
            assert reply.findtext("{jabber:server}body") == "Art thou not Romeo?"
            assert opened(r) == 0  # the reply used the inbound bidi stream
            # one SASL EXTERNAL authentication, usable in both directions thanks to bidi
            assert r.metrics.negotiations_completed.get("in", "sasl-external") == 1
            assert r.metrics.negotiations_completed.get("out", "sasl-external") == 1
            await peer.close()

    arun(scenario())


def test_peer_trust_anchors_replace_the_generic_store_for_that_peer(relay_spec, pki, peers_cert, tmp_path):
    """RFC 6120 §13.6: with its own anchors configured, a peer's certificate must chain to
    them; the test CA every other peer uses no longer proves it (EXTERNAL is not offered,
    and with secure authentication required the relay closes with <policy-violation/>)."""
    other_ca = tmp_path / "partner-ca.pem"
    other_ca.write_bytes(make_ca("Partner CA").cert_pem())
    outcomes = {}
    for name, anchor in (("pinned-elsewhere", other_ca), ("pinned-to-its-ca", pki.ca_path)):
        spec = relay_spec(name, domains=("relay.test",), echo=("echo.relay.test",),
                          policy={"secure_auth": True}, peer_trust_anchors={"p1.peers.test": anchor})

        async def scenario():
            async with running(spec.config()):
                peer = await Peer.connect(spec.s2s_port, "p1.peers.test", "echo.relay.test",
                                          cert=peers_cert, ca_path=pki.ca_path)
                try:
                    await peer.authenticated()
                    return "authenticated"
                except PeerClosed as closed:
                    return closed.condition
                finally:
                    await peer.close()

        outcomes[name] = arun(scenario())
    assert outcomes == {"pinned-elsewhere": "policy-violation", "pinned-to-its-ca": "authenticated"}


# ---------------------------------------------------------------------- relay to relay

@pytest.fixture
def pair_of_relays(relay_spec):
    """Relays A (a.test) and B (b.test), each with two components, routed to each other."""
    a = relay_spec("a", domains=("a.test",), echo=("echo.a.test",),
                   components={"bot.a.test": "sa", "bot2.a.test": "sa2"})
    b = relay_spec("b", domains=("b.test",), echo=("echo.b.test",),
                   components={"bot.b.test": "sb", "bot2.b.test": "sb2"})
    a.routes.update({d: b.s2s_port for d in ("b.test", "bot.b.test", "bot2.b.test", "echo.b.test")})
    b.routes.update({d: a.s2s_port for d in ("a.test", "bot.a.test", "bot2.a.test", "echo.a.test")})
    return a, b


def test_component_to_remote_component_and_back_over_bidi(pair_of_relays):
    a, b = pair_of_relays

    async def scenario():
        async with running(a.config()) as relay_a, running(b.config()) as relay_b:
            bot_a = await component(a, "bot.a.test", "sa")
            bot_b = await component(b, "bot.b.test", "sb")
            for i in range(20):
                bot_a.send(f"<message from='romeo@bot.a.test/orchard' to='juliet@bot.b.test' id='r{i}' type='chat'>"
                           f"<body>line {i}</body></message>")
            got = [await bot_b.receive() for _ in range(20)]
            assert [m.get("id") for m in got] == [f"r{i}" for i in range(20)]  # in order
            assert got[3].findtext("{jabber:component:accept}body") == "line 3"
            bot_b.send("<message from='juliet@bot.b.test' to='romeo@bot.a.test/orchard' id='back'><body>hi</body></message>")
            back = await bot_a.receive()
            assert (back.get("id"), back.get("from")) == ("back", "juliet@bot.b.test")
            # one TCP connection: A's outbound stream, used by B in reverse (bidi)
            assert (opened(relay_a), opened(relay_b)) == (1, 0)
            stream = relay_b.table.remote[("bot.b.test", "bot.a.test")]
            assert not stream.outbound and stream.bidi and stream.mechanism == "sasl-external"
            await bot_a.close()
            await bot_b.close()

    arun(scenario())


def test_pairs_starting_together_share_one_new_connection(pair_of_relays):
    a, b = pair_of_relays

    async def scenario():
        async with running(a.config()) as relay_a, running(b.config()):
            bot_a = await component(a, "bot.a.test", "sa")
            bot2_a = await component(a, "bot2.a.test", "sa2")
            bot_b = await component(b, "bot.b.test", "sb")
            bot_a.send("<message from='x@bot.a.test' to='y@bot.b.test' id='one'/>")
            bot2_a.send("<message from='x@bot2.a.test' to='y@bot.b.test' id='two'/>")
            got = {(await bot_b.receive()).get("id") for _ in range(2)}
            assert got == {"one", "two"}
            assert opened(relay_a) == 1
            for client in (bot_a, bot2_a, bot_b):
                await client.close()

    arun(scenario())


def test_without_bidi_each_direction_gets_its_own_connection(pair_of_relays):
    a, b = pair_of_relays
    a.s2s["bidi"] = "off"  # A never requests bidi, so B must open its own stream back

    async def scenario():
        async with running(a.config()) as relay_a, running(b.config()) as relay_b:
            bot_a = await component(a, "bot.a.test", "sa")
            bot_b = await component(b, "bot.b.test", "sb")
            bot_a.send("<message from='x@bot.a.test' to='y@bot.b.test' id='there'/>")
            assert (await bot_b.receive()).get("id") == "there"
            bot_b.send("<message from='y@bot.b.test' to='x@bot.a.test' id='back'/>")
            assert (await bot_a.receive()).get("id") == "back"
            assert (opened(relay_a), opened(relay_b)) == (1, 1)
            assert relay_b.table.remote[("bot.b.test", "bot.a.test")].outbound
            assert not relay_a.table.remote[("bot.a.test", "bot.b.test")].bidi
            await bot_a.close()
            await bot_b.close()

    arun(scenario())


def test_dialback_with_untrusted_certificate_verifies_over_another_connection(pair_of_relays):
    a, b = pair_of_relays
    a.trusted = False  # A's certificates are self-signed: B must use dialback (XEP-0178 §3 step 11b)

    async def scenario():
        async with running(a.config()) as relay_a, running(b.config()) as relay_b:
            bot_a = await component(a, "bot.a.test", "sa")
            bot_b = await component(b, "bot.b.test", "sb")
            bot_a.send("<message from='romeo@bot.a.test' to='juliet@bot.b.test' id='db1'><body>x</body></message>")
            assert (await bot_b.receive()).get("id") == "db1"
            origin = relay_b.table.remote[("bot.b.test", "bot.a.test")]
            assert origin.mechanism == "dialback" and origin.bidi
            # B verified the key over a connection of its own to A (never the one carrying the request)
            assert opened(relay_b) == 1
            assert opened(relay_a) == 1
            bot_b.send("<message from='juliet@bot.b.test' to='romeo@bot.a.test' id='db2'/>")
            assert (await bot_a.receive()).get("id") == "db2"
            # the histograms saw the negotiations, B's verification and the stanza A queued meanwhile
            assert observed(relay_b, "dialback_verification_seconds", result="valid") == 1
            assert observed(relay_a, "negotiation_seconds", direction="out") >= 1
            assert observed(relay_b, "negotiation_seconds", direction="in") >= 1
            assert observed(relay_a, "queue_wait_seconds", outcome="sent") == 1
            await bot_a.close()
            await bot_b.close()

    arun(scenario())


def test_piggybacked_pairs_share_one_connection(pair_of_relays):
    a, b = pair_of_relays
    a.trusted = False  # dialback for every pair, so B advertises dialback errors on the final stream

    async def scenario():
        async with running(a.config()) as relay_a, running(b.config()) as relay_b:
            bot_a = await component(a, "bot.a.test", "sa")
            bot2_a = await component(a, "bot2.a.test", "sa2")
            bot_b = await component(b, "bot.b.test", "sb")
            bot2_b = await component(b, "bot2.b.test", "sb2")
            bot_a.send("<message from='x@bot.a.test' to='y@bot.b.test' id='first'/>")
            assert (await bot_b.receive()).get("id") == "first"
            # sender multiplexing: a new local domain on the same stream (dialback for it)
            bot2_a.send("<message from='x@bot2.a.test' to='y@bot.b.test' id='sender-mux'/>")
            assert (await bot_b.receive()).get("id") == "sender-mux"
            # target multiplexing: a new remote domain served at the same address and port
            bot_a.send("<message from='x@bot.a.test' to='y@bot2.b.test' id='target-mux'/>")
            assert (await bot2_b.receive()).get("id") == "target-mux"
            assert opened(relay_a) == 1
            # B verified each of the three keys over a verify-only connection of its own, never
            # over the stream that carried the request, although that stream reaches A too (XEP-0288 §2.2)
            assert opened(relay_b) == 3
            stream = relay_a.table.remote[("bot.a.test", "bot.b.test")]
            assert relay_a.table.remote[("bot2.a.test", "bot.b.test")] is stream
            assert relay_a.table.remote[("bot.a.test", "bot2.b.test")] is stream
            for client in (bot_a, bot2_a, bot_b, bot2_b):
                await client.close()

    arun(scenario())


# ---------------------------------------------------------------------- bounces


def test_unreachable_unresolvable_and_slow_remotes_bounce_to_the_sender(relay_spec):
    async def silent(reader, writer):  # accepts TCP, never says a word
        await reader.read()
        writer.close()

    async def refusing(reader, writer):  # answers the header with a stream error that says why
        await reader.readuntil(b">")
        writer.write(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                     b"xmlns='jabber:server' id='r1' from='refusing.test' version='1.0'><stream:error>"
                     b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text "
                     b"xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Your server's certificate is not trusted"
                     b"</text></stream:error></stream:stream>")
        await reader.read()
        writer.close()

    async def scenario():
        slow = await asyncio.start_server(silent, "127.0.0.1", 0)
        refuser = await asyncio.start_server(refusing, "127.0.0.1", 0)
        spec = relay_spec(
            "relay", domains=("relay.test",), components={"bot.relay.test": "s"},
            routes={"dead.test": free_port(), "nowhere.test": "nonexistent.invalid:5269",
                    "slow.test": slow.sockets[0].getsockname()[1],
                    "refusing.test": refuser.sockets[0].getsockname()[1]},
            s2s={"negotiation_timeout": 1.0, "connect_timeout": 1.0},
        )
        try:
            async with running(spec.config()) as relay:
                bot = await component(spec, "bot.relay.test", "s")
                for remote in ("dead.test", "nowhere.test", "slow.test", "refusing.test"):
                    # an IQ result and an error stanza never bounce; the message does
                    bot.send(f"<iq from='bot.relay.test' to='{remote}' id='res-{remote}' type='result'/>")
                    bot.send(f"<message from='bot.relay.test' to='{remote}' id='err-{remote}' type='error'/>")
                    bot.send(f"<message from='u@bot.relay.test' to='v@{remote}' id='m-{remote}'><body>x</body></message>")
                bounces, texts = {}, {}
                for _ in range(4):
                    stanza = await bot.receive(timeout=10)
                    assert stanza.get("type") == "error"
                    bounces[stanza.get("id")] = (stanza.get("from"), stanza.get("to"), error_condition(stanza))
                    texts[stanza.get("id")] = stanza.findtext(f"{{jabber:component:accept}}error/{{{STANZAS_NS}}}text")
                assert bounces == {
                    "m-dead.test": ("v@dead.test", "u@bot.relay.test", ("wait", "remote-server-timeout")),
                    "m-nowhere.test": ("v@nowhere.test", "u@bot.relay.test", ("cancel", "remote-server-not-found")),
                    "m-slow.test": ("v@slow.test", "u@bot.relay.test", ("wait", "remote-server-timeout")),
                    "m-refusing.test": ("v@refusing.test", "u@bot.relay.test", ("wait", "remote-server-timeout")),
                }
                # each bounce says why the remote could not be reached
                assert texts["m-dead.test"].startswith("cannot reach dead.test: cannot connect: 127.0.0.1:")
                assert texts["m-nowhere.test"].startswith("cannot reach nowhere.test: cannot resolve")
                # the relay's negotiation timeout or the pair's wait, whichever fires first
                assert re.fullmatch(r"cannot reach slow.test: .*not (authenticated|authorized) within 1 seconds",
                                    texts["m-slow.test"]), texts["m-slow.test"]
                assert texts["m-refusing.test"] == ("cannot reach refusing.test: the peer closed the stream with "
                                                    "<not-authorized/>: Your server's certificate is not trusted")
                assert relay.metrics.stanzas_bounced.get("remote-server-timeout") == 3
                assert observed(relay, "queue_wait_seconds", outcome="bounced") == 12  # three stanzas per remote
                assert not relay.table.pending  # nothing left queued
                with pytest.raises(TimeoutError):
                    await bot.receive(timeout=0.3)  # and nothing else came back
                await bot.close()
        finally:
            slow.close()
            refuser.close()

    arun(scenario())


def test_failed_tls_handshake_bounce_says_why(relay_spec):
    """A remote that offers STARTTLS, says <proceed/> and then sends no TLS: the
    queued stanza bounces with the handshake failure in its <text/>."""
    async def broken_tls(reader, writer):
        await reader.readuntil(b">")
        writer.write(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                     b"xmlns='jabber:server' id='t1' from='broken.test' version='1.0'><stream:features>"
                     b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>")
        await reader.readuntil(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        writer.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await reader.read(1)  # the ClientHello
        writer.write(b"this is not a TLS record" * 4)
        await reader.read()
        writer.close()

    async def scenario():
        server = await asyncio.start_server(broken_tls, "127.0.0.1", 0)
        spec = relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": "s"},
                          routes={"broken.test": server.sockets[0].getsockname()[1]},
                          s2s={"negotiation_timeout": 5.0, "connect_timeout": 5.0})
        try:
            async with running(spec.config()):
                bot = await component(spec, "bot.relay.test", "s")
                bot.send("<message from='u@bot.relay.test' to='v@broken.test' id='t'><body>x</body></message>")
                stanza = await bot.receive(timeout=10)
                assert (stanza.get("id"), error_condition(stanza)) == ("t", ("wait", "remote-server-timeout"))
                text = stanza.findtext(f"{{jabber:component:accept}}error/{{{STANZAS_NS}}}text")
                assert text.startswith("cannot reach broken.test: TLS handshake failed: "), text
                await bot.close()
        finally:
            server.close()

    arun(scenario())


def test_stanza_for_offline_component_bounces_back_over_s2s(relay, pki, peers_cert):
    async def scenario():
        async with running(relay.config()):
            peer = await Peer.connect(relay.s2s_port, "p1.peers.test", "bot.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path)
            await peer.authenticated()
            peer.send("<message from='juliet@p1.peers.test' to='someone@bot.relay.test' id='off'><body>?</body></message>")
            error = parse(await peer.receive())
            assert (error.get("type"), error.get("id"), error.get("to")) == ("error", "off", "juliet@p1.peers.test")
            assert error.find("{jabber:server}error/{%s}service-unavailable" % STANZAS_NS) is not None
            await peer.close()

    arun(scenario())


# ---------------------------------------------------------------------- bad input on live streams


@pytest.mark.parametrize(
    "bad, condition, counter",
    [
        ("<message from='romeo@montague.test' to='echo.relay.test'><body>spoof</body></message>", "invalid-from",
         "stanzas_rejected"),
        ("<message from='j@p1.peers.test' to='x@elsewhere.test'><body>relay me</body></message>", "host-unknown",
         "stanzas_rejected"),
        ("<message from='j@p1.peers.test'><body>no to</body></message>", "improper-addressing", "stanzas_rejected"),
        ("<message from='j@p1.peers.test' to='echo.relay.test'><!--x--><body>hi</body></message>", "restricted-xml",
         "parse_errors"),
        ("<message from='j@p1.peers.test' to='echo.relay.test'><body>hi</message>", "not-well-formed", "parse_errors"),
        ("<message from='j@p1.peers.test' to='echo.relay.test'><body>" + "x" * 600_000 + "</body></message>",
         "policy-violation", "parse_errors"),
        ("<message xmlns='jabber:client' from='j@p1.peers.test' to='echo.relay.test'/>", "invalid-namespace",
         "stanzas_rejected"),
    ],
    ids=["spoofed-from", "foreign-to", "missing-to", "comment", "mismatched-tag", "oversize", "client-namespace"],
)
def test_bad_input_on_authenticated_stream(relay, pki, peers_cert, bad, condition, counter):
    """The bad stream ends with the right stream error, the metrics endpoint counts it
    as a parse error or a rejected stanza (and not as the other), and the good one goes on."""
    relay.metrics_port = free_port()
    other = {"parse_errors": "stanzas_rejected", "stanzas_rejected": "parse_errors"}[counter]

    async def scenario():
        async with running(relay.config()):
            good = await Peer.connect(relay.s2s_port, "good.peers.test", "echo.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path)
            bad_peer = await Peer.connect(relay.s2s_port, "p1.peers.test", "echo.relay.test",
                                          cert=peers_cert, ca_path=pki.ca_path)
            await good.authenticated()
            await bad_peer.authenticated()
            bad_peer.send(bad)
            closed = await bad_peer.stream_error()
            assert closed.condition == condition
            assert closed.text
            for i in range(3):  # the other stream keeps delivering
                good.send(f"<message from='g@good.peers.test' to='echo.relay.test' id='g{i}'/>")
                assert parse(await good.receive()).get("id") == f"g{i}"
            metrics = await scrape(relay.metrics_port)
            assert sample(metrics, f"{PREFIX}{counter}_total", condition=condition) == 1
            assert sample(metrics, f"{PREFIX}{other}_total", condition=condition) == 0
            await good.close()

    arun(scenario())


def test_stanza_before_authentication_is_not_authorized(relay):
    async def scenario():
        async with running(relay.config()):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.s2s_port)
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                         b"xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='echo.relay.test' "
                         b"from='early.peers.test' version='1.0'>"
                         b"<message from='j@early.peers.test' to='echo.relay.test'><body>early</body></message>")
            data = await reader.read()  # until the relay closes the connection
            assert b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in data
            assert data.endswith(b"</stream:stream>")
            assert b"<body>" not in data  # not processed, not echoed
            writer.close()

    arun(scenario())


def test_unauthenticated_stream_is_closed_after_the_negotiation_timeout(relay):
    relay.s2s.update(negotiation_timeout=0.5)

    async def scenario():
        async with running(relay.config()):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.s2s_port)
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                         b"xmlns='jabber:server' to='relay.test' from='lazy.peers.test' version='1.0'>")
            data = await reader.read()
            assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in data
            assert b"not authenticated within" in data
            writer.close()

    arun(scenario())


def test_keepalives_and_idle_timeout(relay, pki, peers_cert):
    relay.s2s.update(keepalive_interval=0.2, idle_timeout=1.0)

    async def scenario():
        async with running(relay.config()):
            peer = await Peer.connect(relay.s2s_port, "p1.peers.test", "echo.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path)
            await peer.authenticated()
            reads_before = len(peer.reads)
            closed = await peer.stream_error()  # we stay silent
            assert closed.condition == "connection-timeout"
            # meanwhile the relay kept the stream alive with single spaces (RFC 6120 §4.6.1)
            assert peer.reads[reads_before:].count(b" ") >= 2

    arun(scenario())


# ------------------------- classic dialback: the XEP-0220 example domains, secrets and conversation

CAPULET_SECRET = "s3cr3tf0rd14lb4ck"  # the XEP-0220 example secret of capulet.example
MONTAGUE_SECRET = "d14lb4ck43v3r-montague"  # XEP-0220's d14lb4ck43v3r is below the config's minimum length


def test_unreachable_authoritative_server_is_a_dialback_error_not_a_stream_error(relay_spec, pki):
    """The originating domain's authoritative server cannot be reached: the relay answers
    the db:result with a dialback error naming why (XEP-0220 §2.5, table condition
    remote-connection-failed) and the stream stays open for other pairs."""
    spec = relay_spec("as-down", domains=("montague.example",), tls=False, policy={"require_encryption": False},
                      routes={"capulet.example": free_port()})  # nothing listens there

    async def scenario():
        async with running(spec.config()):
            peer = await Peer.connect(spec.s2s_port, "capulet.example", "montague.example", cert=None,
                                      ca_path=pki.ca_path, secret=CAPULET_SECRET, require_encryption=False)
            with pytest.raises(PeerClosed) as refused:
                await peer.authenticated()
            assert refused.value.condition == "auth-failed"
            [failed] = [e for e in peer.events if isinstance(e, ev.AuthFailed)]
            assert (failed.pair, failed.condition) == (
                Pair("capulet.example", "montague.example"), "remote-connection-failed")
            assert peer.closed is None and not peer.session.closed  # not a stream error
            await peer.close()

    arun(scenario())


def test_classic_dialback_return_connection_and_piggybacking(relay_spec, pki):
    """The XEP-0220 example conversation (capulet.example -> montague.example): no TLS, no
    bidi. The relay (montague.example) verifies the peer's keys with capulet's authoritative
    server over connections of its own (XEP-0220 §2.1.2), sends errors on a return connection
    (RFC 6120 §4.9.1.4), and accepts a piggybacked sender (XEP-0220 §2.6.1)."""

    async def scenario():
        authority = AuthoritativeServer({"capulet.example", "rooms.capulet.example"}, CAPULET_SECRET, MONTAGUE_SECRET)
        as_port = await authority.start()
        spec = relay_spec("montague", domains=("montague.example",), tls=False, secret=MONTAGUE_SECRET,
                          policy={"require_encryption": False},
                          routes={"capulet.example": as_port, "rooms.capulet.example": as_port})
        try:
            async with running(spec.config()) as relay:
                peer = await Peer.connect(spec.s2s_port, "capulet.example", "montague.example",
                                          cert=None, ca_path=pki.ca_path, secret=CAPULET_SECRET,
                                          require_encryption=False, other_domains=("rooms.capulet.example",))
                await peer.authenticated()
                origin_id = peer.session.stream_id
                # Step 2 went to the authoritative server, never back over TCP#1 (XEP-0220 §2.1.2)
                assert any(b"<db:verify" in data and origin_id.encode() in data for data in authority.inputs)
                assert not any(b"db:verify" in data for data in peer.reads)
                peer.send("<message from='juliet@capulet.example/balcony' id='ju2ba41c' to='romeo@montague.example' "
                          "type='chat' xml:lang='en'><body>Art thou not Romeo, and a Montague?</body></message>")
                # the relay's domain takes no messages: the error comes back on a return connection
                error = parse(await asyncio.wait_for(authority.stanzas.get(), 10))
                assert (error.get("type"), error.get("id"), error.get("from"), error.get("to")) == (
                    "error", "ju2ba41c", "romeo@montague.example", "juliet@capulet.example/balcony")
                assert error.find("{jabber:server}error/{%s}service-unavailable" % STANZAS_NS) is not None
                assert opened(relay) >= 2  # a verify-only connection and the return connection
                assert not peer.stanzas  # nothing was sent back over TCP#1 (no bidi)
                # piggybacking: a new sender domain on the same stream
                assert peer.session.request_pair(Pair("rooms.capulet.example", "montague.example"))
                await peer._flush()
                while Pair("rooms.capulet.example", "montague.example") not in peer.session.outbound_pairs:
                    await peer._read()
                peer.send("<iq from='nurse@rooms.capulet.example/r' to='montague.example' id='g7' type='get'>"
                          "<ping xmlns='urn:xmpp:ping'/></iq>")
                pong = parse(await asyncio.wait_for(authority.stanzas.get(), 10))
                assert (pong.get("type"), pong.get("id"), pong.get("to")) == ("result", "g7", "nurse@rooms.capulet.example/r")
                await peer.close()
        finally:
            await authority.stop()

    arun(scenario())


def test_direct_tls_route_xep_0368(pair_of_relays):
    a, b = pair_of_relays
    b.direct_tls_port = free_port()
    a.routes["bot.b.test"] = {"port": b.direct_tls_port, "direct_tls": True}

    async def scenario():
        async with running(a.config()) as relay_a, running(b.config()) as relay_b:
            bot_a = await component(a, "bot.a.test", "sa")
            bot_b = await component(b, "bot.b.test", "sb")
            bot_a.send("<message from='x@bot.a.test' to='y@bot.b.test' id='direct'/>")
            assert (await bot_b.receive()).get("id") == "direct"
            outbound = relay_a.table.remote[("bot.a.test", "bot.b.test")]
            inbound = relay_b.table.remote[("bot.b.test", "bot.a.test")]
            assert outbound.direct_tls and inbound.direct_tls
            assert outbound.target == ("127.0.0.1", b.direct_tls_port)
            assert outbound.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "xmpp-server"
            assert inbound.mechanism == "sasl-external"  # certificates checked as with STARTTLS
            await bot_a.close()
            await bot_b.close()

    arun(scenario())


def test_reload_applies_new_policy_and_certificate_without_dropping_streams(relay, pki, peers_cert):
    async def scenario():
        async with running(relay.config()) as r:
            old = await Peer.connect(relay.s2s_port, "p1.peers.test", "echo.relay.test",
                                     cert=peers_cert, ca_path=pki.ca_path)
            await old.authenticated()
            old_cert = old.writer.get_extra_info("ssl_object").getpeercert(True)
            # a new certificate for the domain, and a deny rule for the peer's domain
            fresh = make_leaf(pki.ca, "echo.relay.test", srv_ids=["echo.relay.test"])
            cert_path, key_path = fresh.write(pki.directory, "echo.relay.test.renewed")
            relay.pki.issued[("echo.relay.test", True)] = (cert_path, key_path)
            relay.policy["deny"] = ["*.denied.test"]
            r.reload(relay.config())
            renewed = await Peer.connect(relay.s2s_port, "p2.peers.test", "echo.relay.test",
                                         cert=peers_cert, ca_path=pki.ca_path)
            await renewed.authenticated()
            new_cert = renewed.writer.get_extra_info("ssl_object").getpeercert(True)
            assert new_cert != old_cert
            assert x509.load_der_x509_certificate(new_cert).serial_number == fresh.cert.serial_number
            denied = await Peer.connect(relay.s2s_port, "x.denied.test", "echo.relay.test",
                                        cert=peers_cert, ca_path=pki.ca_path)
            closed = await denied.stream_error()
            assert closed.condition == "policy-violation"
            # the stream from before the reload still delivers
            old.send("<message from='j@p1.peers.test' to='echo.relay.test' id='kept'/>")
            assert parse(await old.receive()).get("id") == "kept"
            for peer in (old, renewed):
                await peer.close()

    arun(scenario())


def test_namespace_and_language_fixups_towards_a_component(relay_spec, pki, peers_cert):
    """Bytes are forwarded untouched unless the component would read them
    differently: own jabber:server namespace, a header-bound prefix, or a
    stream-level xml:lang that the component stream does not declare."""
    spec = relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": "bot-secret"})

    async def scenario():
        async with running(spec.config()):
            bot = await RawComponent.connect(spec.component_port, "bot.relay.test", "bot-secret")
            peer = await Peer.connect(spec.s2s_port, "p1.peers.test", "bot.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path, lang="fr")
            await peer.authenticated()
            plain = "<message from='j@p1.peers.test' to='r@bot.relay.test' id='plain' xml:lang='de'><body>x</body></message>"
            peer.send(plain)
            assert await bot.read_until(b"</message>") == plain.encode()  # forwarded as is
            peer.send("<message from='j@p1.peers.test' to='r@bot.relay.test' id='lang'><body>y</body></message>")
            lang = parse_component(await bot.read_until(b"</message>"))
            assert lang.get("{http://www.w3.org/XML/1998/namespace}lang") == "fr"
            peer.send("<message xmlns='jabber:server' from='j@p1.peers.test' to='r@bot.relay.test' id='ns' xml:lang='fr'>"
                      "<body>z</body></message>")
            ns = parse_component(await bot.read_until(b"</message>"))
            assert ns.tag == "{jabber:component:accept}message"
            assert ns.find("{jabber:component:accept}body").text == "z"
            peer.send("<message from='j@p1.peers.test' to='r@bot.relay.test' id='prefix' xml:lang='fr'>"
                      "<db:x/></message>")
            prefixed = parse_component(await bot.read_until(b"</message>"))
            assert prefixed[0].tag == "{jabber:server:dialback}x"
            await peer.close()
            await bot.close()

    arun(scenario())


def test_queue_limits_bounce_overflow_at_once_and_the_rest_on_timeout(relay_spec):
    async def silent(reader, writer):
        await reader.read()
        writer.close()

    async def scenario():
        slow = await asyncio.start_server(silent, "127.0.0.1", 0)
        spec = relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": "s"},
                          routes={"slow.test": slow.sockets[0].getsockname()[1]},
                          s2s={"negotiation_timeout": 1.5, "queue_max_stanzas": 3})
        try:
            async with running(spec.config()):
                bot = await component(spec, "bot.relay.test", "s")
                for i in range(5):
                    bot.send(f"<message from='u@bot.relay.test' to='v@slow.test' id='q{i}'/>")
                first = [await bot.receive(timeout=1.0) for _ in range(2)]  # before the timeout
                assert [(m.get("id"), error_condition(m)) for m in first] == [
                    ("q3", ("wait", "resource-constraint")), ("q4", ("wait", "resource-constraint"))]
                rest = [await bot.receive(timeout=10) for _ in range(3)]
                assert [(m.get("id"), error_condition(m)) for m in rest] == [
                    (f"q{i}", ("wait", "remote-server-timeout")) for i in range(3)]
                await bot.close()
        finally:
            slow.close()

    arun(scenario())


def test_a_remote_server_that_stops_reading_never_pauses_the_component(relay_spec, pki, peers_cert):
    """A remote server that stops reading does not slow the component feeding it
    (the component serves every remote domain): the relay queues up to
    write_queue_max for it and bounces the rest to the component with
    <resource-constraint/>. Every stanza is accounted for: the peer, once it
    reads, gets the queued ones byte for byte and in order; the others bounced."""
    high, queue_max = 256 * 1024, 1024 * 1024
    spec = relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": "bot-secret"},
                      s2s={"write_high_water": high, "write_low_water": 64 * 1024, "write_queue_max": queue_max})
    total, size = 600, 32_000
    payload = [(f"<message from='r@bot.relay.test' to='j@p1.peers.test' id='t{i}'><body>"
                + "z" * size + "</body></message>").encode() for i in range(total)]

    async def scenario():
        async with running(spec.config()) as relay:
            peer = await Peer.connect(spec.s2s_port, "p1.peers.test", "bot.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path, rcvbuf=16384)
            await peer.authenticated()
            peer.writer.transport.pause_reading()
            bot = await RawComponent.connect(spec.component_port, "bot.relay.test", "bot-secret")
            for data in payload:  # the component is never paused: every write drains
                bot.send(data)
                await asyncio.wait_for(bot.writer.drain(), 5.0)
            bounces = await bot.read_until(b"id='t%d'" % (total - 1))
            bounces += await bot.read_until(b"</message>")
            stream = relay.table.remote[("bot.relay.test", "p1.peers.test")]
            assert not stream.outbound  # the peer's bidi stream carries it
            assert not relay.table.local["bot.relay.test"]._blockers
            assert stream.transport.get_write_buffer_size() <= queue_max + 256 * 1024
            bounced = re.findall(rb"<message from='j@p1.peers.test' to='r@bot.relay.test' id='t(\d+)' type='error'>"
                                 rb"<error type='wait'><resource-constraint ", bounces)
            first_bounced = int(bounced[0])
            assert [int(i) for i in bounced] == list(range(first_bounced, total))
            peer.writer.transport.resume_reading()
            received = [await peer.receive() for _ in range(first_bounced)]
            assert received == payload[:first_bounced]
            assert relay.metrics.stanzas_bounced.get("resource-constraint") == total - first_bounced
            await peer.close()
            await bot.close()

    arun(scenario(), timeout=120)


def test_shutdown_closes_s2s_streams_with_system_shutdown(relay, pki, peers_cert):
    async def scenario():
        async with running(relay.config()) as r:
            peer = await Peer.connect(relay.s2s_port, "p1.peers.test", "echo.relay.test",
                                      cert=peers_cert, ca_path=pki.ca_path)
            await peer.authenticated()
            stopping = asyncio.ensure_future(r.stop(timeout=5.0))
            closed = await peer.stream_error()
            assert closed.condition == "system-shutdown"
            await peer.close()
            await stopping
            assert not r.streams

    arun(scenario())


def test_a_failing_negotiation_is_logged_at_warning_with_the_claimed_domain(relay, caplog):
    """The domain the peer's header claims is in every line of an inbound stream
    before it authenticates, and a stream error we send is a warning."""
    async def scenario():
        async with running(relay.config()):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.s2s_port)
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                         b"xmlns:stream='http://etherx.jabber.org/streams' from='claimed.example' "
                         b"to='relay.test' version='1.0'><message from='a@claimed.example' to='b@relay.test'/>")
            data = await asyncio.wait_for(reader.read(), 10)
            assert b"<not-authorized" in data
            writer.close()

    arun(scenario())
    closed = [r for r in caplog.records if r.getMessage().startswith("s2s stream closed by us")]
    assert closed and closed[0].levelname == "WARNING", [(r.levelname, r.getMessage()) for r in closed]
    assert "domain=claimed.example" in closed[0].getMessage()
