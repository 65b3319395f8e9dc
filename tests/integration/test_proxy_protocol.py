"""The PROXY protocol on inbound S2S listeners against a running relay: a load
balancer (a real TCP proxy here, like HAProxy's ``send-proxy``) puts a v1 or v2
header before a real S2S stream, and the relay shows, logs and limits the
header's address; a connection without a header, from outside
``listen.proxy_trusted`` or with no header in time is closed without a word of
XMPP; the direct-TLS listener (XEP-0368) behind PROXY does its TLS after it."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from ipaddress import ip_address

import pytest
from cryptography import x509

from router.admin.streams import describe
from router.config import parse_config
from router.net.proxy_header import V2_SIGNATURE
from router.net.s2s import S2SStream

from .conftest import arun, free_port, running
from .peer import Peer
from .test_s2s import component, parse

STREAM_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                 b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                 b"from='p1.peers.test' to='relay.test' version='1.0'>")
READ_TIMEOUT = 10.0


def proxied(spec, listeners=("s2s",), trusted=("127.0.0.1/32",)):
    """``spec``'s config with ``[listen] proxy_protocol`` and ``proxy_trusted``, as an operator writes them."""
    keys = f"proxy_protocol = {json.dumps(list(listeners))}\nproxy_trusted = {json.dumps(list(trusted))}\n"
    return parse_config(spec.toml().replace("[listen]\n", "[listen]\n" + keys, 1), spec.base,
                        source=f"<test relay {spec.name}>")


def v1(source: str, sport: int, dport: int) -> bytes:
    family = "TCP4" if ip_address(source).version == 4 else "TCP6"
    destination = "127.0.0.1" if family == "TCP4" else "::1"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(source: str, sport: int, dport: int) -> bytes:
    """A binary PROXY command; an IPv6 source also carries a TLV (skipped by the relay)."""
    address = ip_address(source)
    if address.version == 4:
        body = address.packed + ip_address("127.0.0.1").packed + struct.pack("!HH", sport, dport)
        family = 0x11
    else:
        body = address.packed + ip_address("::1").packed + struct.pack("!HH", sport, dport) + b"\x04\x00\x02ok"
        family = 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class LoadBalancer:
    """A TCP proxy on 127.0.0.1 that forwards each connection to ``backend`` (from
    127.0.0.1) behind the PROXY header ``header(client_address)`` returns. With
    ``together`` the header and the client's first bytes leave in one write, so
    the relay reads the peer's data with the header."""

    def __init__(self, backend: int, header, *, together: bool = False) -> None:
        self.backend, self.header, self.together = backend, header, together
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_reader, client_writer) -> None:
        self.tasks.add(asyncio.current_task())
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.backend)
            header = self.header(client_writer.get_extra_info("peername"))
            writer.write(header + (await client_reader.read(65536) if self.together else b""))
            await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
        finally:
            if writer is not None:
                writer.close()
            client_writer.close()

    async def stop(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def _pipe(reader, writer) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


async def connect_from(source_ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source_ip, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def answer(reader) -> bytes:
    """What the relay sends until its features or the end of its stream (or of TCP)."""
    data = b""
    while b"</stream:features>" not in data and b"</stream:stream>" not in data:
        chunk = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
        if not chunk:
            break
        data += chunk
    return data


def inbound_streams(relay) -> list[S2SStream]:
    return [s for s in relay.streams if isinstance(s, S2SStream) and not s.outbound]


async def until(condition) -> None:
    """Wait, a bounded time, until the relay reached ``condition()``."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the relay did not get there in 5 seconds")


@pytest.fixture
def relay(relay_spec):
    return relay_spec("relay", domains=("relay.test",), echo=("echo.relay.test",))


async def echo_round_trip(peer: Peer) -> None:
    await peer.authenticated()
    peer.send("<message from='juliet@p1.peers.test/b' to='echo.relay.test' id='e1'><body>hi</body></message>")
    for _ in range(5):  # the reply, after at most a few stanzas of the relay's own (a ping)
        reply = parse(await peer.receive())
        if reply.get("id") == "e1":
            break
    assert (reply.get("from"), reply.get("id")) == ("echo.relay.test", "e1")


def test_v1_header_names_the_peer_and_the_stream_negotiates_with_the_bytes_that_followed_it(relay, pki, peers_cert,
                                                                                               caplog):
    """The header and the peer's stream header arrive in one read: the relay parses
    the one and hands the other to the session; the stream's peer is the client."""

    async def scenario():
        async with running(proxied(relay)) as r:
            balancer = LoadBalancer(relay.s2s_port, lambda client: v1(client[0], client[1], relay.s2s_port),
                                    together=True)
            port = await balancer.start()
            peer = await Peer.connect(port, "p1.peers.test", "echo.relay.test", cert=peers_cert,
                                      ca_path=pki.ca_path, source_ip="127.0.0.2")
            await echo_round_trip(peer)
            client_port = peer.writer.get_extra_info("sockname")[1]
            [stream] = inbound_streams(r)
            assert (stream.peer, stream.ip) == (f"127.0.0.2:{client_port}", "127.0.0.2")
            assert stream.transport.get_extra_info("peername")[0] == "127.0.0.1"  # the balancer's socket
            assert describe(stream, r.loop.time())["peer"] == f"127.0.0.2:{client_port}"  # ctl streams
            assert r.admission.connections_per_ip.counts == {"127.0.0.2": 1}
            assert stream.mechanism == "sasl-external"
            assert f"s2s inbound stream opened peer=127.0.0.2:{client_port} domain=- via=127.0.0.1:" in caplog.text
            await peer.close()
            await balancer.stop()

    arun(scenario())


def test_v2_header_with_an_ipv6_source_names_the_peer(relay, pki, peers_cert):
    async def scenario():
        async with running(proxied(relay)) as r:
            balancer = LoadBalancer(relay.s2s_port, lambda client: v2("2001:db8::7", 40000, relay.s2s_port))
            port = await balancer.start()
            peer = await Peer.connect(port, "p1.peers.test", "echo.relay.test", cert=peers_cert,
                                      ca_path=pki.ca_path)
            await echo_round_trip(peer)
            [stream] = inbound_streams(r)
            assert (stream.peer, stream.ip) == ("2001:db8::7:40000", "2001:db8::7")
            assert r.admission.connections_per_ip.counts == {"2001:db8::7": 1}
            await peer.close()
            await balancer.stop()

    arun(scenario())


def test_the_per_ip_limit_counts_the_header_address_not_the_balancer(relay_spec):
    """Every connection comes from the balancer's 127.0.0.1; with
    max_connections_per_ip = 1, a second one for the same PROXY source is refused
    with <policy-violation/> naming that source, one for another source is admitted."""
    spec = relay_spec("relay", domains=("relay.test",), limits={"max_connections_per_ip": 1})

    async def scenario():
        async with running(proxied(spec)) as r:
            connections = []
            for n, (source, version) in enumerate([("198.51.100.1", v1), ("198.51.100.1", v2),
                                                   ("198.51.100.2", v2)]):
                connections.append(await connect_from("127.0.0.1", spec.s2s_port))
                connections[-1][1].write(version(source, 40000, spec.s2s_port) + STREAM_HEADER)
                await until(lambda: r.metrics.limits_hit.get("max_connections_per_ip")
                            + r.admission.connections.total() == n + 1)  # one at a time, in order
            first, second, third = [await answer(reader) for reader, _ in connections]
            assert b"<stream:features" in first and b"<stream:features" in third
            assert b"<policy-violation" in second and b"too many connections from 198.51.100.1" in second
            assert r.admission.connections_per_ip.counts == {"198.51.100.1": 1, "198.51.100.2": 1}
            assert r.metrics.limits_hit.get("max_connections_per_ip") == 1
            for _, writer in connections:
                writer.close()

    arun(scenario())


def test_a_connection_without_a_header_is_closed_without_xmpp(relay, caplog):
    async def scenario():
        async with running(proxied(relay)) as r:
            reader, writer = await connect_from("127.0.0.1", relay.s2s_port)
            writer.write(STREAM_HEADER)
            assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""  # TCP's close, not a stream error
            assert r.metrics.negotiations_failed.get("in", "proxy-header") == 1
            assert "invalid PROXY header peer=127.0.0.1:" in caplog.text
            assert "does not start with a PROXY protocol header: b\"<?xml version='1\"" in caplog.text  # 16 bytes
            assert r.admission.connections.total() == 0
            writer.close()

    arun(scenario())


def test_a_connection_from_outside_proxy_trusted_is_refused_at_once(relay, caplog):
    async def scenario():
        async with running(proxied(relay, trusted=("127.0.0.1/32",))) as r:
            reader, writer = await connect_from("127.0.0.2", relay.s2s_port)
            writer.write(v1("203.0.113.9", 40000, relay.s2s_port) + STREAM_HEADER)  # it may claim any address
            assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""
            assert r.metrics.limits_hit.get("proxy_trusted") == 1
            assert ("refused 1 connection(s) to a PROXY protocol listener from outside listen.proxy_trusted "
                    "(last from 127.0.0.2)") in caplog.text
            assert r.admission.connections.total() == 0 and "203.0.113.9" not in caplog.text
            writer.close()

    arun(scenario())


def test_a_header_that_does_not_come_within_negotiation_timeout_ends_the_connection(relay_spec, caplog):
    spec = relay_spec("relay", domains=("relay.test",), s2s={"negotiation_timeout": 1})

    async def scenario():
        async with running(proxied(spec)) as r:
            reader, writer = await connect_from("127.0.0.1", spec.s2s_port)
            writer.write(b"PROXY TCP4 ")  # and nothing more
            assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""
            assert r.metrics.negotiations_failed.get("in", "policy-violation") == 1
            assert "s2s inbound connection closed before its stream began peer=127.0.0.1:" in caplog.text
            assert "not authenticated within 1 seconds" in caplog.text
            writer.close()

    arun(scenario())


def test_direct_tls_behind_proxy_does_tls_after_the_header_and_sni_picks_the_certificate(relay_spec, pki):
    """Relay A reaches B's XEP-0368 listener through the balancer: B reads the
    header (and not the ClientHello sent with it), then does TLS (ALPN xmpp-server,
    the certificate SNI names) and the stream authenticates with SASL EXTERNAL;
    B's stream names the header's source."""
    a = relay_spec("a", domains=("a.test",), components={"bot.a.test": "sa"})
    b = relay_spec("b", domains=("b.test",), components={"bot.b.test": "sb"}, direct_tls_port=free_port())
    balancer_port = free_port()
    a.routes["bot.b.test"] = {"port": balancer_port, "direct_tls": True}
    b.routes["bot.a.test"] = a.s2s_port

    async def scenario():
        # the header and the ClientHello in one write: B must read no byte past the header
        balancer = LoadBalancer(b.direct_tls_port, lambda client: v2("192.0.2.44", 50000, b.direct_tls_port),
                                together=True)
        await balancer.start(balancer_port)
        async with running(a.config()) as relay_a, running(proxied(b, listeners=("s2s_direct_tls",))) as relay_b:
            bot_a = await component(a, "bot.a.test", "sa")
            bot_b = await component(b, "bot.b.test", "sb")
            bot_a.send("<message from='x@bot.a.test' to='y@bot.b.test' id='behind-proxy'/>")
            assert (await bot_b.receive()).get("id") == "behind-proxy"
            outbound = relay_a.table.remote[("bot.a.test", "bot.b.test")]
            inbound = relay_b.table.remote[("bot.b.test", "bot.a.test")]
            assert inbound.direct_tls and inbound.peer == "192.0.2.44:50000"
            assert inbound.mechanism == "sasl-external"
            ssl_object = outbound.transport.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "xmpp-server"
            presented = x509.load_der_x509_certificate(ssl_object.getpeercert(True))
            expected = x509.load_pem_x509_certificate(pki.credential("bot.b.test")[0].read_bytes())
            assert presented == expected  # not b.test's, the listener's default
            await bot_a.close()
            await bot_b.close()
        await balancer.stop()

    arun(scenario())


def test_shutdown_closes_a_connection_still_waiting_for_its_header_without_xmpp(relay):
    async def scenario():
        async with running(proxied(relay)) as r:
            reader, writer = await connect_from("127.0.0.1", relay.s2s_port)
            writer.write(b"PROXY TCP4 ")
            await until(lambda: r.router.bytes_received().get(("s2s",), 0) == 11)  # read: no reset at close
        assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""  # no <system-shutdown/> to the balancer
        writer.close()

    arun(scenario())


def test_a_refusal_on_the_direct_tls_listener_before_tls_is_tcp_close_not_plaintext(relay_spec):
    """Behind PROXY the direct-TLS listener counts the connection before TLS: a
    refused one cannot get a stream error (no TLS yet), only TCP's close."""
    spec = relay_spec("relay", domains=("relay.test",), direct_tls_port=free_port(),
                      limits={"max_connections_per_ip": 1})

    async def scenario():
        async with running(proxied(spec, listeners=("s2s_direct_tls",))) as r:
            first = await connect_from("127.0.0.1", spec.direct_tls_port)
            first[1].write(v1("198.51.100.1", 40000, spec.direct_tls_port))  # then TLS would follow
            await until(lambda: r.admission.connections.total() == 1)
            second = await connect_from("127.0.0.1", spec.direct_tls_port)
            second[1].write(v1("198.51.100.1", 40001, spec.direct_tls_port))
            assert await asyncio.wait_for(second[0].read(), READ_TIMEOUT) == b""
            assert r.metrics.limits_hit.get("max_connections_per_ip") == 1
            assert r.metrics.negotiations_failed.get("in", "policy-violation") == 1
            assert r.admission.connections_per_ip.counts == {"198.51.100.1": 1}
            for _, writer in (first, second):
                writer.close()

    arun(scenario())
