"""Outbound S2S over IPv6 and IPv4 (RFC 8305 Happy Eyeballs), and an S2S listener
on ::1: relays in-process, their peers' addresses served by a real UDP DNS server
on 127.0.0.1 (the relay's resolver is pointed at it)."""

from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager

import dns.asyncresolver

from router.config import parse_config
from router.net.s2s import S2SStream
from router.wire.namespaces import STANZAS_NS
from test_eyeballs import closed_port, connecting_to, needs_ipv6, stalled_listener
from dnsserver import ZoneServer

from .conftest import arun, running
from .test_s2s import component, error_condition, opened

pytestmark = needs_ipv6


@asynccontextmanager
async def dns_server(zone: dict):
    """A DNS server answering ``zone`` on 127.0.0.1; yields a resolver asking it."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: ZoneServer(zone), local_addr=("127.0.0.1", 0))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = transport.get_extra_info("sockname")[1]
    try:
        yield resolver
    finally:
        transport.close()


def peer_zone(domain: str, port: int) -> dict:
    """``domain``'s one SRV target, with an IPv6 and an IPv4 address (AAAA first)."""
    return {(f"_xmpp-server._tcp.{domain}", "SRV"): [f"0 0 {port} host.{domain}."],
            (f"host.{domain}", "AAAA"): ["::1"], (f"host.{domain}", "A"): ["127.0.0.1"]}


def outbound(relay) -> list[S2SStream]:
    return [s for s in relay.streams if isinstance(s, S2SStream) and s.outbound]


def test_a_stalled_ipv6_address_is_overtaken_by_ipv4_long_before_connect_timeout(relay_spec):
    """The peer's AAAA address never answers (its accept queue is full), its A
    address is a relay: the stanza gets through over IPv4 after the connection
    attempt delay, not after ``connect_timeout`` (30 s, past the 15 s the test waits);
    the IPv6 attempt is cancelled and no stream but the winner's exists."""
    async def scenario():
        with stalled_listener("::1") as port:
            a = relay_spec("a", domains=("a.test",), components={"bot.a.test": "sa"},
                           s2s={"connect_timeout": 30.0, "negotiation_timeout": 30.0})
            b = relay_spec("b", domains=("b.test",), echo=("echo.b.test",), s2s_port=port)
            async with dns_server(peer_zone("echo.b.test", port)) as dns_resolver, \
                    running(a.config()) as relay_a, running(b.config()):
                relay_a.resolver.dns = dns_resolver
                bot = await component(a, "bot.a.test", "sa")
                bot.send("<message from='romeo@bot.a.test' to='echo.b.test' id='he1'><body>hi</body></message>")
                reply = await bot.receive(timeout=15)
                stream = relay_a.table.remote[("bot.a.test", "echo.b.test")]
                seen = (reply.get("id"), reply.get("from"), stream.target == ("127.0.0.1", port), stream.target_host,
                        opened(relay_a), outbound(relay_a) == [stream])
                await bot.close()
            return seen, connecting_to(port)

    seen, left_connecting = arun(scenario())
    assert seen[:4] == ("he1", "echo.b.test", True, "host.echo.b.test")
    assert seen[4:] == (1, True)  # one connection made, one outbound stream: the loser never became one
    assert left_connecting == 0  # the stalled IPv6 connect was cancelled, its socket closed


def test_when_every_address_fails_the_bounce_names_each(relay_spec, caplog):
    """Both addresses refuse: the queued stanza bounces with each address's error,
    in the order they were tried (IPv6 first), and each failure is logged."""
    port = closed_port("127.0.0.1")

    async def scenario():
        a = relay_spec("a", domains=("a.test",), components={"bot.a.test": "sa"}, s2s={"connect_timeout": 5.0})
        async with dns_server(peer_zone("gone.test", port)) as dns_resolver, running(a.config()) as relay_a:
            relay_a.resolver.dns = dns_resolver
            bot = await component(a, "bot.a.test", "sa")
            bot.send("<message from='romeo@bot.a.test' to='juliet@gone.test' id='gone'><body>x</body></message>")
            bounce = await bot.receive(timeout=15)
            await bot.close()
            return (bounce.get("id"), error_condition(bounce),
                    bounce.findtext(f"{{jabber:component:accept}}error/{{{STANZAS_NS}}}text"), outbound(relay_a))

    bounced, condition, text, streams = arun(scenario())
    assert (bounced, condition, streams) == ("gone", ("wait", "remote-server-timeout"), [])
    assert re.fullmatch(rf"cannot reach gone\.test: cannot connect: \[::1\]:{port}: .+; 127\.0\.0\.1:{port}: .+",
                        text), text
    for address in (f"[::1]:{port}", f"127.0.0.1:{port}"):
        assert f"s2s connect attempt failed remote=gone.test address={address}: " in caplog.text


def test_s2s_to_a_relay_listening_on_ipv6_loopback(relay_spec):
    """``[listen] s2s = "[::1]:0"``: a relay reaches it over ::1 (static route
    ``[::1]:port``), authenticates, and the echo comes back over the same stream."""
    async def scenario():
        b = relay_spec("b", domains=("b.test",), echo=("echo.b.test",))
        toml = b.toml().replace(f"s2s = '127.0.0.1:{b.s2s_port}'", "s2s = '[::1]:0'")
        assert "s2s = '[::1]:0'" in toml
        async with running(parse_config(toml, b.base, source="<test relay b on ::1>")) as relay_b:
            host, port = relay_b.listening["s2s"]
            a = relay_spec("a", domains=("a.test",), components={"bot.a.test": "sa"},
                           routes={"echo.b.test": f"[::1]:{port}"})
            async with running(a.config()) as relay_a:
                bot = await component(a, "bot.a.test", "sa")
                bot.send("<message from='romeo@bot.a.test' to='echo.b.test' id='v6'><body>hi</body></message>")
                reply = await bot.receive(timeout=15)
                out = relay_a.table.remote[("bot.a.test", "echo.b.test")]
                inbound = [s for s in relay_b.streams if isinstance(s, S2SStream) and not s.outbound]
                seen = (host, reply.get("id"), out.target == ("::1", port), [(s.ip, s.authenticated) for s in inbound],
                        opened(relay_b))
                await bot.close()
            return seen

    assert arun(scenario()) == ("::1", "v6", True, [("::1", True)], 0)  # the reply came back over bidi
