"""Hostile remote servers: one peer must never slow, starve or exhaust the relay
for the others (DESIGN.md "Flow control: a slow or hostile peer only ever hurts
itself"). Each scenario runs over real sockets on loopback addresses."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from router.config.defaults import DEFAULT_CONNECT_BLOCKLIST
from router.net.component_client import ComponentClient

from .conftest import arun, free_port, relay_process, running
from .peer import AuthoritativeServer, Peer
from .test_many_streams import sample, scrape

HIGH, LOW = 256 * 1024, 64 * 1024
# The queue limit is checked per stanza against what was handed to the transport:
# the stanzas of the source read in progress may go past it.
ONE_READ = 256 * 1024


async def echo_component(port: int, domain: str, secret: str) -> tuple[ComponentClient, asyncio.Task]:
    """A XEP-0114 component that echoes the body of every message it gets (errors excepted)."""
    client = ComponentClient()
    await client.connect("127.0.0.1", port, domain, secret)

    async def serve() -> None:
        while True:
            message = await client.receive(timeout=None)
            if message.get("type") == "error":
                continue
            body = message.findtext("{jabber:component:accept}body") or ""
            client.send(f"<message from='{message.get('to')}' to='{message.get('from')}' id='{message.get('id')}'>"
                        f"<body>{body}</body></message>")

    return client, asyncio.ensure_future(serve())


def test_a_peer_that_stops_reading_does_not_freeze_a_shared_component(relay_spec, pki, peers_cert):
    """A bidi peer floods a component and stops reading its replies. The relay keeps
    reading the component (a source shared by every remote domain): the flood's
    replies beyond write_queue_max bounce to the component, and ten other peers
    keep getting their replies. Before, flow control paused the component for
    the whole federation."""
    spec = relay_spec("relay", domains=("relay.test",), components={"echo-c.relay.test": "echo-secret"},
                      s2s={"write_high_water": HIGH, "write_low_water": LOW, "write_queue_max": 4 * HIGH})
    per_peer, peers_count = 110, 10

    async def scenario():
        async with running(spec.config()) as relay:
            component, echoing = await echo_component(spec.component_port, "echo-c.relay.test", "echo-secret")
            attacker = await Peer.connect(spec.s2s_port, "p0.peers.test", "echo-c.relay.test", cert=peers_cert,
                                          ca_path=pki.ca_path, rcvbuf=4096)
            await attacker.authenticated()
            attacker.writer.transport.pause_reading()  # and never reads again
            body = "f" * 4000
            flood = "".join(f"<message from='a@p0.peers.test' to='x@echo-c.relay.test' id='f{i}'><body>{body}</body>"
                            f"</message>" for i in range(100)).encode()
            to_attacker, extra = None, 20
            for _ in range(300):  # up to 120 MB of flood: until the relay's stream to the attacker is full
                to_attacker = relay.table.remote.get(("echo-c.relay.test", "p0.peers.test"))
                if to_attacker is not None and to_attacker.paused:
                    extra -= 1  # 8 MB more once it is: well past write_queue_max
                    if not extra:
                        break
                attacker.send(flood)
                await asyncio.sleep(0.02)
            assert to_attacker is not None and to_attacker.paused

            legit = [await Peer.connect(spec.s2s_port, f"p{i}.peers.test", "echo-c.relay.test", cert=peers_cert,
                                        ca_path=pki.ca_path) for i in range(1, peers_count + 1)]
            for peer in legit:
                await peer.authenticated()
            received = [0] * peers_count

            async def exchange(i: int, peer: Peer) -> None:
                for n in range(per_peer):
                    peer.send(f"<message from='u@p{i + 1}.peers.test' to='bot@echo-c.relay.test' id='m{n}'>"
                              f"<body>hi</body></message>")
                while received[i] < per_peer:
                    await peer.receive()
                    received[i] += 1

            started = time.monotonic()
            await asyncio.wait([asyncio.ensure_future(exchange(i, p)) for i, p in enumerate(legit)], timeout=5.0)
            elapsed = time.monotonic() - started
            total = sum(received)
            assert total >= 0.9 * per_peer * peers_count, (total, elapsed)
            assert to_attacker.full_since is not None
            assert relay.metrics.limits_hit.get("write_queue_max") > 0
            assert relay.metrics.stanzas_bounced.get("resource-constraint") > 0
            assert to_attacker.transport.get_write_buffer_size() <= 4 * HIGH + ONE_READ
            echoing.cancel()
            for peer in legit:
                await peer.close()
            attacker.writer.transport.abort()
            await component.close()

    arun(scenario(), timeout=60)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_bounce_flood_from_a_peer_that_never_reads_is_bounded_and_closed(relay_spec, pki, peers_cert, tmp_path):
    """A bidi peer that never reads sends to an offline local domain: every stanza
    bounces into its own stream. The relay stops reading it (it hurts only
    itself), memory stays bounded, and once it has written nothing for
    write_stall_timeout the stream is closed with <resource-constraint/>."""
    spec = relay_spec("relay", domains=("relay.test",), components={"offline.relay.test": "nobody-connects"},
                      metrics_port=free_port(),
                      s2s={"write_high_water": HIGH, "write_low_water": LOW, "write_stall_timeout": 2.0,
                           "close_timeout": 1.0})
    flood_seconds = 4.0
    with relay_process(spec, tmp_path / "relay.toml") as process:
        async def scenario():
            attacker = await Peer.connect(spec.s2s_port, "p0.peers.test", "offline.relay.test", cert=peers_cert,
                                          ca_path=pki.ca_path, rcvbuf=4096)
            await attacker.authenticated()
            attacker.writer.transport.pause_reading()
            before = rss_bytes(process.pid)
            chunk = "".join(f"<message from='a@p0.peers.test' to='x@offline.relay.test' id='b{i}'/>"
                            for i in range(1000)).encode()
            peak, sent = before, 0
            deadline = time.monotonic() + flood_seconds
            while time.monotonic() < deadline and not attacker.writer.is_closing():
                if attacker.writer.transport.get_write_buffer_size() < 1 << 20:
                    attacker.send(chunk)
                    sent += 1000
                await asyncio.sleep(0.005)
                peak = max(peak, rss_bytes(process.pid))
            growth = peak - before
            print(f"bounce flood: {sent} stanzas offered in {flood_seconds:g} s, relay RSS "
                  f"{before / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB (+{growth / 2**20:.1f} MiB)")
            assert growth < 32 * 2**20, growth
            metrics = ""
            for _ in range(100):  # the stall close comes within write_stall_timeout + the sweep
                metrics = await scrape(spec.metrics_port)
                if sample(metrics, "xmpp_router_limits_hit_total", limit="write_stall_timeout") >= 1:
                    break
                await asyncio.sleep(0.1)
            assert sample(metrics, "xmpp_router_limits_hit_total", limit="write_stall_timeout") == 1
            assert sample(metrics, "xmpp_router_streams_open", direction="in", mechanism="sasl-external",
                          bidi="yes") == 0
            attacker.writer.transport.abort()

        arun(scenario(), timeout=60)
    log = (tmp_path / "relay.log").read_text()
    assert re.search(r"wrote nothing of \d+ queued bytes for 2 seconds \(s2s.write_stall_timeout\)", log)


class WildcardZone(asyncio.DatagramProtocol):
    """A DNS server on loopback: every ``_xmpp-server._tcp.<x>.flood.test`` points
    to one address and port (a server that accepts and never answers)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.queries = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries += 1
        response = dns.message.make_response(query)
        if rdtype == "SRV" and name.startswith("_xmpp-server._tcp.") and name.endswith(".flood.test."):
            response.answer.append(dns.rrset.from_text(name, 300, "IN", "SRV", f"0 0 {self.port} sink.flood.test."))
        elif rdtype == "A" and name == "sink.flood.test.":
            response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "127.0.0.1"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_db_result_flood_from_one_connection_is_bounded(relay_spec, pki):
    """One unauthenticated stream asks dialback for thousands of domains. Each would
    cost a DNS look-up and an outbound verification connection; the relay keeps
    at most limits.max_pending_verifications_per_stream of them (and per IP),
    opens at most limits.max_verify_connections_per_target connections to one
    authoritative server, and answers the rest <resource-constraint/> at once.
    A peer on another address still authenticates meanwhile."""
    per_stream, per_ip, per_target, domains = 16, 24, 4, 2000
    authority = AuthoritativeServer({"legit.test"}, "peer-dialback-secret-0123", "integration-dialback-secret")

    async def scenario():
        loop = asyncio.get_running_loop()
        open_now = peak_open = 0

        async def silent(reader, writer):  # an authoritative server that never answers
            nonlocal open_now, peak_open
            open_now += 1
            peak_open = max(peak_open, open_now)
            try:
                await reader.read()
            finally:
                open_now -= 1
                writer.close()

        sink = await asyncio.start_server(silent, "127.0.0.1", 0)
        zone_transport, zone = await loop.create_datagram_endpoint(
            lambda: WildcardZone(sink.sockets[0].getsockname()[1]), local_addr=("127.0.0.1", 0))
        as_port = await authority.start()
        spec = relay_spec("relay", domains=("relay.test",), tls=False, policy={"require_encryption": False},
                          routes={"legit.test": as_port}, s2s={"negotiation_timeout": 5.0},
                          limits={"max_pending_verifications_per_stream": per_stream,
                                  "max_pending_verifications_per_ip": per_ip,
                                  "max_verify_connections_per_target": per_target})
        try:
            async with running(spec.config()) as relay:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
                resolver.port = zone_transport.get_extra_info("sockname")[1]
                relay.resolver.dns = resolver  # the resolver's injection point: our zone, on loopback
                fds_before = open_fds()
                header = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                          "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                          "to='relay.test' version='1.0'>")
                floods = []
                for n in range(2):
                    reader, writer = await asyncio.open_connection("127.0.0.1", spec.s2s_port)
                    writer.write(header.encode() + "".join(
                        f"<db:result from='d{n}-{i}.flood.test' to='relay.test'>{'k' * 64}</db:result>"
                        for i in range(domains)).encode())
                    floods.append((reader, writer))
                answers = [b"", b""]

                async def read_errors(n: int, expected: int) -> None:
                    reader = floods[n][0]
                    while answers[n].count(b"<resource-constraint") < expected:
                        data = await reader.read(65536)
                        assert data, answers[n][-300:]
                        answers[n] += data

                await asyncio.wait_for(read_errors(0, domains - per_stream), 10.0)
                # the second stream from the same address gets only what is left of the per-IP limit
                await asyncio.wait_for(read_errors(1, domains - (per_ip - per_stream)), 10.0)
                await asyncio.sleep(0.2)
                assert relay.verifier.pending.total() == per_ip
                assert b"limits.max_pending_verifications_per_stream = 16" in answers[0]
                assert b"limits.max_pending_verifications_per_ip = 24" in answers[1]
                assert peak_open <= per_target
                assert open_fds() - fds_before < 60  # 2 floods + 4 verify connections (both ends) + DNS
                assert relay.metrics.limits_hit.get("max_pending_verifications_per_stream") == domains - per_stream
                assert relay.metrics.limits_hit.get("max_verify_connections_per_target") > 0, (peak_open, zone.queries)

                legit = await Peer.connect(spec.s2s_port, "legit.test", "relay.test", cert=None,
                                           ca_path=pki.ca_path, require_encryption=False, source_ip="127.0.0.2")
                await asyncio.wait_for(legit.authenticated(), 5.0)
                await legit.close()
                for _, writer in floods:
                    writer.close()
        finally:
            zone_transport.close()
            sink.close()
            await authority.stop()

    arun(scenario(), timeout=60)


def test_connection_flood_hits_named_limits_and_legitimate_peers_still_connect(relay_spec, pki, peers_cert, caplog):
    """Connections beyond limits.max_connections_per_ip get <policy-violation/>,
    beyond limits.max_pre_auth_connections <resource-constraint/>, each with a
    text naming the limit, a metric and a warning; a peer on another address
    still authenticates."""
    per_ip, pre_auth = 20, 50
    spec = relay_spec("relay", domains=("relay.test",), echo=("echo.relay.test",),
                      limits={"max_connections_per_ip": per_ip, "max_pre_auth_connections": pre_auth})

    async def hold(source_ip: str):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source_ip, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", spec.s2s_port))
        return await asyncio.open_connection(sock=sock)

    async def refusal(reader) -> bytes:
        try:
            return await asyncio.wait_for(reader.read(4096), 0.3)
        except asyncio.TimeoutError:
            return b""  # still open: admitted

    async def scenario():
        async with running(spec.config()) as relay:
            one_ip = [await hold("127.0.0.1") for _ in range(per_ip + 10)]
            answers = [await refusal(reader) for reader, _ in one_ip]
            refused = [a for a in answers if a]
            assert len(refused) == 10
            assert all(b"<policy-violation" in a and b"limits.max_connections_per_ip = 20" in a for a in refused)
            # from other addresses: 20 + 20 more fill pre-auth (50), the rest are refused
            others = [await hold(f"127.0.0.{3 + i // per_ip}") for i in range(40)]
            answers = [await refusal(reader) for reader, _ in others]
            refused = [a for a in answers if a]
            assert len(refused) == 40 - (pre_auth - per_ip)
            assert all(b"<resource-constraint" in a and b"limits.max_pre_auth_connections = 50" in a for a in refused)
            assert relay.metrics.limits_hit.get("max_connections_per_ip") == 10
            assert relay.metrics.limits_hit.get("max_pre_auth_connections") == 10
            assert relay.admission.pre_auth.total() == pre_auth
            # the flood gives up; a legitimate peer gets in
            for _, writer in one_ip + others:
                writer.close()
            for _ in range(100):
                if relay.admission.pre_auth.total() == 0:
                    break
                await asyncio.sleep(0.02)
            assert relay.admission.pre_auth.total() == 0 and relay.admission.connections.total() == 0
            peer = await Peer.connect(spec.s2s_port, "p1.peers.test", "echo.relay.test", cert=peers_cert,
                                      ca_path=pki.ca_path, source_ip="127.0.0.2")
            await peer.authenticated()
            assert relay.admission.pre_auth.total() == 0 and relay.admission.connections.total() == 1
            peer.send("<message from='u@p1.peers.test' to='echo.relay.test' id='hello'><body>hi</body></message>")
            assert b"id='hello'" in (await peer.receive()).replace(b'"', b"'")
            await peer.close()

    arun(scenario(), timeout=60)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("limits.max_connections_per_ip = 20" in w for w in warnings)
    assert any("limits.max_pre_auth_connections = 50" in w for w in warnings)


def test_stanzas_for_too_many_new_remote_domains_bounce(relay_spec):
    """Each remote domain waiting for a stream costs a DNS look-up and a connection
    attempt: beyond s2s.max_outbound_queues, a stanza for one more domain bounces
    to its sender with <resource-constraint/> at once."""
    async def scenario():
        async def silent(reader, writer):
            await reader.read()
            writer.close()

        slow = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = slow.sockets[0].getsockname()[1]
        spec = relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": "bot-secret"},
                          routes={f"r{i}.test": port for i in range(5)},
                          s2s={"max_outbound_queues": 3, "negotiation_timeout": 5.0})
        try:
            async with running(spec.config()) as relay:
                bot = ComponentClient()
                await bot.connect("127.0.0.1", spec.component_port, "bot.relay.test", "bot-secret")
                for i in range(5):
                    bot.send(f"<message from='u@bot.relay.test' to='v@r{i}.test' id='q{i}'/>")
                bounces = [await asyncio.wait_for(bot.receive(), 3.0) for _ in range(2)]
                assert sorted(b.get("id") for b in bounces) == ["q3", "q4"]
                assert all(b.find("{jabber:component:accept}error/"
                                  "{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") is not None
                           for b in bounces)
                assert len(relay.table.pending) == 3
                assert relay.metrics.limits_hit.get("max_outbound_queues") == 2
                await bot.close()
        finally:
            slow.close()

    arun(scenario(), timeout=30)


def test_a_peer_cannot_point_the_relays_dialback_connection_into_its_own_network(relay_spec):
    """The relay verifies a dialback key by connecting to the claimed domain's
    authoritative server, found in DNS the claimant writes. With the default
    s2s.connect_blocklist, a domain whose SRV target is on loopback (here a listener
    standing for an internal service) is not connected to: the key fails with
    remote-server-not-found, and nothing reaches the listener."""

    async def scenario():
        loop = asyncio.get_running_loop()
        reached = []

        async def internal(reader, writer):  # what an attacker would like the relay to talk to
            reached.append(await reader.read(100))
            writer.close()

        service = await asyncio.start_server(internal, "127.0.0.1", 0)
        zone_transport, _ = await loop.create_datagram_endpoint(
            lambda: WildcardZone(service.sockets[0].getsockname()[1]), local_addr=("127.0.0.1", 0))
        spec = relay_spec("relay", domains=("relay.test",), tls=False, policy={"require_encryption": False},
                          s2s={"connect_blocklist": list(DEFAULT_CONNECT_BLOCKLIST)})
        try:
            async with running(spec.config()) as relay:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
                resolver.port = zone_transport.get_extra_info("sockname")[1]
                relay.resolver.dns = resolver
                reader, writer = await asyncio.open_connection("127.0.0.1", spec.s2s_port)
                writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                             b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                             b"to='relay.test' version='1.0'>"
                             b"<db:result from='evil.flood.test' to='relay.test'>" + b"k" * 64 + b"</db:result>")
                answer = b""
                while not re.search(rb"<db:result[^>]*type=", answer):  # the verdict on the key
                    data = await asyncio.wait_for(reader.read(65536), 10.0)
                    assert data, answer[-300:]
                    answer += data
                writer.close()
                assert re.search(rb"<db:result[^>]*type='(error|invalid)'", answer), answer[-400:]
                assert reached == []
                assert relay.metrics.limits_hit.get("connect_blocklist") >= 1
        finally:
            zone_transport.close()
            service.close()

    arun(scenario())
