"""Liveness of S2S connections: TCP keepalive on every S2S socket, inbound and
outbound ([s2s] tcp_keepalive), so the kernel finds a peer that vanished even on
a stream nobody writes to; off with 0."""

from __future__ import annotations

import asyncio
import socket

from router.net.component_client import ComponentClient

from .conftest import arun, free_port, running

SECRET = "secret-of-bot"


def keepalive_of(stream) -> tuple[int, int, int, int]:
    sock = stream.transport.get_extra_info("socket")
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


async def s2s_streams(relay, count: int, outbound: bool):
    for _ in range(200):
        found = [s for s in relay.streams if getattr(s, "outbound", None) is outbound]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {'outbound' if outbound else 'inbound'} S2S stream")


def test_inbound_and_outbound_s2s_sockets_probe_a_silent_peer(relay_spec):
    remote_port = free_port()
    spec = relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": SECRET},
                      routes={"far.test": remote_port}, s2s={"tcp_keepalive": 45})

    async def scenario():
        accepted = asyncio.Event()

        async def far_server(reader, writer):  # a remote server that accepts and says nothing
            accepted.set()
            await reader.read()
            writer.close()

        far = await asyncio.start_server(far_server, "127.0.0.1", remote_port)
        async with running(spec.config()) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", spec.s2s_port)
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                         b"xmlns:stream='http://etherx.jabber.org/streams' to='relay.test' version='1.0'>")
            (inbound,) = await s2s_streams(relay, 1, outbound=False)
            assert keepalive_of(inbound) == (1, 45, 10, 3)
            bot = ComponentClient()
            await bot.connect("127.0.0.1", spec.component_port, "bot.relay.test", SECRET)
            bot.send("<message from='bot@bot.relay.test' to='u@far.test' id='k1'><body>hi</body></message>")
            await asyncio.wait_for(accepted.wait(), 10)
            (outbound,) = await s2s_streams(relay, 1, outbound=True)
            assert keepalive_of(outbound) == (1, 45, 10, 3)
            writer.close()
            await bot.close()
        far.close()

    arun(scenario())


def test_zero_turns_tcp_keepalive_off(relay_spec):
    spec = relay_spec("relay", domains=("relay.test",), s2s={"tcp_keepalive": 0})

    async def scenario():
        async with running(spec.config()) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", spec.s2s_port)
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                         b"xmlns:stream='http://etherx.jabber.org/streams' to='relay.test' version='1.0'>")
            (inbound,) = await s2s_streams(relay, 1, outbound=False)
            assert keepalive_of(inbound)[0] == 0
            writer.close()

    arun(scenario())
