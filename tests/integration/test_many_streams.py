"""Many concurrent bidi streams against one relay process."""

from __future__ import annotations

import asyncio
import re

import pytest
from lxml import etree

from .conftest import arun, free_port, relay_process
from .peer import Peer

STREAMS = 1000
CONNECT_CONCURRENCY = 64  # handshakes in flight at once; all streams stay open together


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels`` (in any order), 0 when absent."""
    for found, value in re.findall(rf"^{name}(?:{{(.*)}})? (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', found)) == labels:
            return float(value)
    return 0.0


@pytest.mark.slow
def test_thousand_concurrent_bidi_streams_each_exchange_a_message(relay_spec, pki, peers_cert, tmp_path):
    spec = relay_spec("many", domains=("relay.test",), echo=("echo.relay.test",), metrics_port=free_port(),
                      s2s={"negotiation_timeout": 120.0},
                      limits={"max_connections_per_ip": STREAMS})  # every peer connects from 127.0.0.1
    with relay_process(spec, tmp_path / "relay.toml") as process:
        async def scenario():
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def open_one(i: int) -> Peer:
                async with gate:
                    peer = await Peer.connect(spec.s2s_port, f"p{i}.peers.test", "echo.relay.test",
                                              cert=peers_cert, ca_path=pki.ca_path)
                    await peer.authenticated()
                    return peer

            peers = await asyncio.gather(*(open_one(i) for i in range(STREAMS)))
            metrics = await scrape(spec.metrics_port)
            assert sample(metrics, "xmpp_router_streams_open", direction="in", mechanism="sasl-external",
                          bidi="yes") == STREAMS
            assert sample(metrics, "xmpp_router_streams_open", direction="out", mechanism="sasl-external",
                          bidi="yes") == 0

            async def exchange(i: int, peer: Peer) -> None:
                peer.send(f"<message from='u@p{i}.peers.test' to='echo.relay.test' id='m{i}'><body>{i}</body></message>")
                reply = etree.fromstring(b"<w xmlns='jabber:server'>" + await peer.receive() + b"</w>")[0]
                assert (reply.get("id"), reply.get("to"), reply.findtext("{jabber:server}body")) == (
                    f"m{i}", f"u@p{i}.peers.test", str(i))

            await asyncio.gather(*(exchange(i, peer) for i, peer in enumerate(peers)))
            metrics = await scrape(spec.metrics_port)
            assert sample(metrics, "xmpp_router_stanzas_routed_total", destination="service") == STREAMS
            await asyncio.gather(*(peer.close() for peer in peers))

        arun(scenario(), timeout=120)
        process.terminate()
        assert process.wait(30) == 0
