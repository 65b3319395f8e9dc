"""`router.net.component_client.ComponentClient` against real XEP-0114 ports (Prosody, ejabberd)."""

from __future__ import annotations

import pytest
import uvloop

from router.net.component_client import ComponentClient, ComponentClosed, ComponentStreamError
from router.wire.namespaces import COMPONENT_NS

from .harness import SECURE

pytestmark = pytest.mark.interop


@pytest.fixture
def prosody_a(federation):
    fed = federation(SECURE)
    peer = fed.prosody("a.test", "127.0.0.2")
    fed.start()
    return peer


def test_handshake_then_iq_round_trip(prosody_a):
    """After the handshake the component can ask Prosody's VirtualHost for a ping and get the result."""

    async def scenario():
        async with await prosody_a.component() as client:
            assert client.stream_id  # Prosody's stream id (a UUID) seeded the handshake digest
            client.send(
                "<iq type='get' from='pinger@a.test' to='localhost' id='ping-1'>"
                "<ping xmlns='urn:xmpp:ping'/></iq>"
            )
            reply = await client.receive(timeout=5)
            assert reply.tag == f"{{{COMPONENT_NS}}}iq"
            assert (reply.get("type"), reply.get("id"), reply.get("to")) == ("result", "ping-1", "pinger@a.test")

    uvloop.run(scenario())


def test_wrong_secret_raises_stream_error(federation):
    """Both servers refuse a bad handshake digest with <not-authorized/>; the client says so."""
    fed = federation(SECURE)
    peers = [fed.prosody("a.test", "127.0.0.2"), fed.ejabberd("c.test", "127.0.0.4")]
    fed.start()

    async def scenario(peer):
        client = ComponentClient()
        with pytest.raises(ComponentStreamError) as refused:
            await client.connect(peer.ip, peer.component_port, peer.domain, "not-the-secret", timeout=5)
        await client.close()
        return refused.value

    for peer in peers:
        error = uvloop.run(scenario(peer))
        assert error.condition == "not-authorized", (peer, error)


def test_receive_times_out_when_nothing_arrives(prosody_a):
    async def scenario():
        async with await prosody_a.component() as client:
            with pytest.raises(TimeoutError):
                await client.receive(timeout=0.2)

    uvloop.run(scenario())


def test_server_shutdown_ends_receive(prosody_a):
    """Prosody closes component streams on SIGTERM; a waiting `receive` reports it instead of hanging."""

    async def scenario():
        async with await prosody_a.component() as client:
            prosody_a.process.terminate()
            with pytest.raises(ComponentClosed):
                await client.receive(timeout=10)

    uvloop.run(scenario())
