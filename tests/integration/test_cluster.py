"""Relays joined by the cluster bus (a real nats-server on loopback): stanzas for a
component connected to another node, replies to a remote server whose stream
another node holds, a component connected twice, and every fault accounted
for (bounced, never lost)."""

from __future__ import annotations

import asyncio
import signal

import nats
import pytest

from router.cluster.frames import decode_answers
from router.negotiation import events as ev
from router.negotiation import sm
from router.net.component_client import ComponentClient
from router.trust.pki import make_leaf

from .conftest import arun, relay_process, running, settled
from . import natsd
from .natsd import nats_server
from .peer import Peer

SECRETS = {"a.comp.test": "secret-a", "b.comp.test": "secret-b", "c.comp.test": "secret-c", "s.comp.test": "secret-s"}
SETTLE = 8.0  # seconds a scenario waits at most for the members to hear each other


@pytest.fixture
def node(relay_spec, nats_url):
    """Factory: the spec of node ``name`` of one cluster (same domains, secrets, bus)."""

    def make(name: str, cluster: dict | None = None, **kwargs):
        return relay_spec(name, domains=("relay.test",), components=dict(SECRETS), echo=("echo.relay.test",),
                          cluster={"node": name, "nats": [nats_url], **(cluster or {})}, **kwargs)

    return make


async def component(port: int, domain: str) -> ComponentClient:
    client = ComponentClient()
    await client.connect("127.0.0.1", port, domain, SECRETS[domain])
    return client


async def heard(relay, *members: str) -> None:
    """Until ``relay`` has heard every one of ``members`` announce a component."""
    if await settled(lambda: all(relay.bus.members._seen.get(m) for m in members), SETTLE):
        return
    raise AssertionError(f"{relay.bus.member} did not hear {members}: {sorted(relay.bus.members._seen)}")


async def heard_since(relay, member: str, since: float) -> None:
    """Until ``relay`` has an announcement ``member`` made after ``since`` (loop time): a
    member announces only once its data connection is open, so stanzas sent now reach it
    (an older announcement may be its dead predecessor's)."""
    if await settled(lambda: (relay.bus.members._seen.get(member) or (None, since))[1] > since, SETTLE):
        return
    raise AssertionError(f"{relay.bus.member} heard nothing from {member} since {since}")


async def holds(relay, domain: str) -> None:
    if await settled(lambda: relay.bus.members.component_holders(domain), SETTLE):
        return
    raise AssertionError(f"{relay.bus.member} never heard that {domain} is connected elsewhere")


async def answered(relay, count: int) -> None:
    """Until ``relay`` heard that ``count`` stanzas it sent over the bus were taken (an
    answer comes up to ANSWER_INTERVAL after the stanzas were delivered)."""
    await settled(lambda: relay.metrics.bus_stanzas.get("sent", "node") >= count, SETTLE)
    assert relay.metrics.bus_stanzas.get("sent", "node") == count


async def acked(peer: Peer) -> None:
    """Until the peer read an XEP-0198 <a/>."""
    while not any(isinstance(e, ev.Acked) for e in peer.events):
        await peer._read()


def message(i: int, frm: str, to: str) -> str:
    return f"<message from='{frm}' to='{to}' id='m{i}'><body>n{i}</body></message>"


async def across(r1, n1, n2) -> tuple[ComponentClient, ComponentClient]:
    """a.comp.test on n1 and b.comp.test on n2, once a first stanza (m0) from a reached b."""
    a = await component(n1.component_port, "a.comp.test")
    b = await component(n2.component_port, "b.comp.test")
    await holds(r1, "b.comp.test")
    a.send(message(0, "x@a.comp.test", "y@b.comp.test"))
    assert (await b.receive()).get("id") == "m0"
    return a, b


def test_a_component_on_another_node_gets_stanzas_in_order_and_answers(node):
    n1, n2 = node("n1"), node("n2")

    async def scenario():
        async with running(n1.config()) as r1, running(n2.config()) as r2:
            a = await component(n1.component_port, "a.comp.test")
            b = await component(n2.component_port, "b.comp.test")
            await holds(r1, "b.comp.test")
            await holds(r2, "a.comp.test")
            for i in range(100):
                a.send(message(i, "x@a.comp.test", "y@b.comp.test/r"))
            got = [await b.receive() for _ in range(100)]
            assert [m.get("id") for m in got] == [f"m{i}" for i in range(100)]
            assert got[0].tag == "{jabber:component:accept}message"
            b.send(message(0, "y@b.comp.test/r", "x@a.comp.test"))
            reply = await a.receive()
            assert (reply.get("from"), reply.get("id")) == ("y@b.comp.test/r", "m0")
            await answered(r1, 100)
            assert r2.metrics.bus_stanzas.get("received", "node") == 100
            await a.close()
            await b.close()

    arun(scenario())


def test_a_nats_that_requires_tls_and_a_password_carries_the_bus(node, pki, tmp_path, monkeypatch):
    """Both of a member's connections (nats-py's and the data connection) use the URL's
    TLS and credentials; the server's certificate is checked against SSL_CERT_FILE."""
    cert, key = make_leaf(pki.ca, "localhost", dns_ids=["localhost"]).write(tmp_path, "nats")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_path))
    options = ("--tls", "--tlscert", str(cert), "--tlskey", str(key), "--user", "relay", "--pass", "s3cret")
    with nats_server(tmp_path, options=options) as url:
        bus = {"nats": [f"tls://relay:s3cret@localhost:{url.rsplit(':', 1)[1]}"]}
        n1, n2 = node("n1", cluster=bus), node("n2", cluster=bus)

        async def scenario():
            async with running(n1.config()) as r1, running(n2.config()):
                a, b = await across(r1, n1, n2)
                await answered(r1, 1)
                assert r1.bus.line.transport.get_extra_info("ssl_object") is not None
                await a.close()
                await b.close()

        arun(scenario())


def test_a_batch_over_the_nats_servers_max_payload_bounces_and_the_bus_goes_on(node, tmp_path):
    """NATS closes a connection that publishes past its max_payload: the member refuses
    such a batch itself, with resource-constraint, and the next one goes through."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4096\n")
    with nats_server(tmp_path, options=("-c", str(conf))) as url:
        n1, n2 = node("n1", cluster={"nats": [url]}), node("n2", cluster={"nats": [url]})

        async def scenario():
            async with running(n1.config()) as r1, running(n2.config()):
                a, b = await across(r1, n1, n2)
                a.send(f"<message from='x@a.comp.test' to='y@b.comp.test' id='big'><body>{'z' * 5000}</body></message>")
                bounce = await asyncio.wait_for(a.receive(), 5)
                assert (bounce.get("id"), bounce.get("type")) == ("big", "error")
                assert bounce.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") is not None
                assert b"max_payload (4096)" in bounce_text(bounce)
                assert r1.metrics.limits_hit.get("nats_max_payload") == 1
                a.send(message(1, "x@a.comp.test", "y@b.comp.test"))
                assert (await asyncio.wait_for(b.receive(), 5)).get("id") == "m1"
                await a.close()
                await b.close()

        arun(scenario())


def test_a_component_connected_twice_gets_each_stanza_once(node):
    """c.comp.test is connected to n1 and n2; s.comp.test, on n3, sends from many JIDs:
    both connections receive, every stanza arrives once, each sender's in order."""
    n1, n2, n3 = node("n1"), node("n2"), node("n3")

    async def scenario():
        async with running(n1.config()), running(n2.config()), running(n3.config()) as r3:
            c1 = await component(n1.component_port, "c.comp.test")
            c2 = await component(n2.component_port, "c.comp.test")
            s = await component(n3.component_port, "s.comp.test")
            await heard(r3, "n1.0", "n2.0")
            await settled(lambda: len(r3.bus.members._components.get("c.comp.test", ())) == 2, SETTLE)
            senders, per_sender = 20, 10
            for i in range(per_sender):
                for k in range(senders):
                    s.send(message(i, f"u{k}@s.comp.test", "svc@c.comp.test"))
            got: dict[str, list] = {"c1": [], "c2": []}

            async def drain(name, client):
                while True:
                    got[name].append(await client.receive())

            tasks = [asyncio.ensure_future(drain("c1", c1)), asyncio.ensure_future(drain("c2", c2))]
            await settled(lambda: len(got["c1"]) + len(got["c2"]) >= senders * per_sender, SETTLE)
            await asyncio.sleep(0.3)  # a duplicate would arrive now
            for task in tasks:
                task.cancel()
            assert got["c1"] and got["c2"]  # spread over both connections
            every = [(m.get("from"), m.get("id")) for m in got["c1"] + got["c2"]]
            assert len(every) == len(set(every)) == senders * per_sender
            for k in range(senders):
                ids = [m.get("id") for m in got["c1"] + got["c2"] if m.get("from") == f"u{k}@s.comp.test"]
                assert ids == [f"m{i}" for i in range(per_sender)]  # one sender: one connection, in order

    arun(scenario())


def test_a_reply_reaches_a_remote_server_through_the_node_holding_its_stream(node, pki, peers_cert):
    """peer.peers.test streams to n1 (bidi, so n1 may send back on it); b.comp.test is
    on n2: the peer's stanza crosses to n2, b's reply crosses back to n1's stream."""
    n1, n2 = node("n1"), node("n2")

    async def scenario():
        async with running(n1.config()) as r1, running(n2.config()) as r2:
            b = await component(n2.component_port, "b.comp.test")
            peer = await Peer.connect(n1.s2s_port, "peer.peers.test", "b.comp.test", cert=peers_cert,
                                      ca_path=pki.ca_path, bidi="encrypted")
            await peer.authenticated()
            await holds(r1, "b.comp.test")
            await settled(lambda: r2.bus.members.pair_holders(("b.comp.test", "peer.peers.test")), SETTLE)
            peer.send(message(1, "u@peer.peers.test/r", "bot@b.comp.test"))
            got = await b.receive()
            assert (got.get("from"), got.get("id")) == ("u@peer.peers.test/r", "m1")
            b.send(message(2, "bot@b.comp.test", "u@peer.peers.test/r"))
            reply = await asyncio.wait_for(peer.receive(), 5)
            assert b"id='m2'" in reply or b'id="m2"' in reply
            await answered(r2, 1)
            await b.close()

    arun(scenario())


def test_a_component_connected_nowhere_bounces_service_unavailable(node):
    n1, n2 = node("n1"), node("n2")

    async def scenario():
        async with running(n1.config()) as r1, running(n2.config()):
            a = await component(n1.component_port, "a.comp.test")
            await heard(r1, "n2.0")
            a.send(message(1, "x@a.comp.test", "y@b.comp.test"))
            bounce = await a.receive()
            assert (bounce.get("type"), bounce.get("id")) == ("error", "m1")
            assert bounce.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None
            await a.close()

    arun(scenario())


def test_a_node_that_dies_makes_its_stanzas_bounce_and_one_that_returns_takes_traffic(node, tmp_path):
    """n2 runs in its own process with b.comp.test; it is killed (no goodbye): what a
    sends to b bounces (nothing vanishes); a new n2 takes the traffic again."""
    n1, n2 = node("n1"), node("n2")

    async def scenario(process_of_n2):
        async with running(n1.config()) as r1:
            a, b = await across(r1, n1, n2)
            process_of_n2.kill()
            process_of_n2.wait()
            killed = asyncio.get_running_loop().time()
            for i in range(1, 21):
                a.send(message(i, "x@a.comp.test", "y@b.comp.test"))
            bounces = [await a.receive(timeout=15) for _ in range(20)]
            assert sorted(int(m.get("id")[1:]) for m in bounces) == list(range(1, 21))
            assert all(m.get("type") == "error" for m in bounces)
            with relay_process(n2, tmp_path / "n2-again.toml"):
                b = await component(n2.component_port, "b.comp.test")
                await heard_since(r1, "n2.0", killed)
                await holds(r1, "b.comp.test")
                a.send(message(99, "x@a.comp.test", "y@b.comp.test"))
                assert (await b.receive(timeout=10)).get("id") == "m99"
            await a.close()

    with relay_process(n2, tmp_path / "n2.toml") as process:
        arun(scenario(process), timeout=60)


def test_an_ack_counts_a_stanza_only_once_the_member_took_it_or_it_bounced(node, pki, peers_cert, tmp_path):
    """XEP-0198 §4: h counts stanzas "handled", and an acknowledged stanza is no longer the
    sender's to re-send: n1 must not acknowledge one that still waits on the bus. n2 (its
    own process, holding b.comp.test) is stopped: the peer's <r/> gets no <a/> until the
    batch's bus_timeout bounces the stanza, then <a h='2'/> follows the bounce."""
    bus_timeout = 2.0
    n1, n2 = node("n1", cluster={"bus_timeout": bus_timeout}), node("n2")

    async def scenario(process_of_n2):
        async with running(n1.config()) as r1:
            b = await component(n2.component_port, "b.comp.test")
            peer = await Peer.connect(n1.s2s_port, "peer.peers.test", "b.comp.test", cert=peers_cert,
                                      ca_path=pki.ca_path, bidi="encrypted", stream_management=True)
            await peer.authenticated()
            await holds(r1, "b.comp.test")
            peer.send(message(1, "u@peer.peers.test/r", "bot@b.comp.test"))
            assert (await asyncio.wait_for(b.receive(), 5)).get("id") == "m1"
            assert any(isinstance(e, ev.SmStarted) for e in peer.events)
            await answered(r1, 1)  # n2 has nothing of ours left to answer
            process_of_n2.send_signal(signal.SIGSTOP)  # alive on NATS, answers nothing
            try:
                # 20 <r/>s: 16 answers wait (MAX_DEFERRED_ACKS), the last of them answers 5
                peer.send(message(2, "u@peer.peers.test/r", "bot@b.comp.test") + sm.REQUEST.decode() * 20)
                with pytest.raises(asyncio.TimeoutError):  # n2 holds m2: no <a/> may count it yet
                    await asyncio.wait_for(acked(peer), bus_timeout / 2)
                await asyncio.wait_for(acked(peer), bus_timeout + 5)
                bounce = await peer.receive()
                assert b"id='m2'" in bounce and b"type='error'" in bounce
                while len([e for e in peer.events if isinstance(e, ev.Acked)]) < 16:
                    await asyncio.wait_for(peer._read(), 5)
                assert [e.h for e in peer.events if isinstance(e, ev.Acked)] == [2] * 16
                assert r1.metrics.limits_hit.get("max_deferred_acks") == 4
                kinds = [type(e) for e in peer.events]
                assert kinds.index(ev.Acked) > max(i for i, kind in enumerate(kinds) if kind is ev.Stanza)
            finally:
                process_of_n2.send_signal(signal.SIGCONT)
            await peer.close()

    with relay_process(n2, tmp_path / "n2.toml") as process:
        arun(scenario(process), timeout=60)


def test_a_lost_data_connection_bounces_what_waits_at_once_and_opens_again(node, tmp_path):
    """n1's data connection to NATS drops (its socket is cut) while a batch waits for
    n2's answer (n2 is stopped): the stanza bounces at once, not at bus_timeout, and n1
    opens a new connection by itself. n2, resumed, still delivers the batch it had: a
    stanza delivered and bounced, never lost (docs/cluster.md)."""
    n1, n2 = node("n1", cluster={"bus_timeout": 60.0}), node("n2")

    async def scenario(process_of_n2):
        async with running(n1.config()) as r1:
            a, b = await across(r1, n1, n2)
            await answered(r1, 1)
            process_of_n2.send_signal(signal.SIGSTOP)
            try:
                a.send(message(2, "x@a.comp.test", "y@b.comp.test"))
                while r1.bus.in_flight != 1:
                    await asyncio.sleep(0.01)
                cut = r1.bus.line
                cut.transport.abort()
                bounce = await asyncio.wait_for(a.receive(), 5)
                assert (bounce.get("id"), bounce.get("type")) == ("m2", "error")
                assert b"the cluster bus lost NATS" in bounce_text(bounce)
                assert r1.metrics.bus_failures.get("unreachable") == 1
                await settled(lambda: r1.bus.connected, SETTLE)
                assert r1.bus.connected and r1.bus.line not in (None, cut)
            finally:
                process_of_n2.send_signal(signal.SIGCONT)
            assert (await asyncio.wait_for(b.receive(), 5)).get("id") == "m2"
            a.send(message(3, "x@a.comp.test", "y@b.comp.test"))
            assert (await asyncio.wait_for(b.receive(), 5)).get("id") == "m3"
            await a.close()

    with relay_process(n2, tmp_path / "n2.toml") as process:
        arun(scenario(process), timeout=60)


def test_a_member_too_slow_for_nats_gets_a_new_data_connection(node, tmp_path):
    """NATS closes the data connection of a member that does not read its messages (n2,
    stopped) once more than the server's max_pending waits for it. Every stanza n1 sent is
    delivered (what n2 held, answered once it runs again) or bounced (at once once n2 is gone
    from NATS, at bus_timeout when no answer came), none twice, and n2, resumed, opens a
    new connection and takes traffic again."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 600000\nmax_pending: 600000\n")  # a batch carries up to 512 KiB
    with nats_server(tmp_path, options=("-c", str(conf))) as url:
        n1 = node("n1", cluster={"nats": [url], "bus_timeout": 3.0})
        n2 = node("n2", cluster={"nats": [url]})
        log = tmp_path / f"nats-{url.rsplit(':', 1)[1]}.log"
        sent = {f"m{i}" for i in range(1, 3001)}

        async def collect(client, into) -> None:
            while True:
                into.append(await client.receive(timeout=120))

        async def scenario(process_of_n2):
            async with running(n1.config()) as r1:
                a, b = await across(r1, n1, n2)
                await answered(r1, 1)  # n2 owes n1 nothing
                process_of_n2.send_signal(signal.SIGSTOP)
                try:
                    body = "z" * 4000
                    for i in range(1, 3001):  # 12 MB: past the sockets' buffers and max_pending
                        a.send(f"<message from='x@a.comp.test' to='y@b.comp.test' id='m{i}'><body>{body}</body></message>")
                    await settled(lambda: "n2.0 data\" - Slow Consumer" in log.read_text(), 20, 0.1)
                    assert "n2.0 data\" - Slow Consumer" in log.read_text()
                finally:
                    process_of_n2.send_signal(signal.SIGCONT)
                bounced, delivered = [], []
                readers = [asyncio.ensure_future(collect(a, bounced)), asyncio.ensure_future(collect(b, delivered))]
                try:
                    await settled(lambda: {m.get("id") for m in bounced + delivered} >= sent, 30, 0.1)
                    assert {m.get("id") for m in bounced + delivered} == sent
                    assert all(m.get("type") == "error" for m in bounced)
                    ids = [m.get("id") for m in delivered]
                    assert len(set(ids)) == len(ids)
                    assert r1.metrics.bus_failures.get("unreachable") > 0  # n2 gone from NATS: at once
                    await settled(lambda: r1.bus.members.component_holders("b.comp.test"), SETTLE)
                    a.send(message(9999, "x@a.comp.test", "y@b.comp.test"))
                    await settled(lambda: any(m.get("id") == "m9999" for m in delivered), 15)
                    assert [m.get("id") for m in delivered].count("m9999") == 1
                finally:
                    for reader in readers:
                        reader.cancel()
                    await asyncio.gather(*readers, return_exceptions=True)
                await a.close()

        with relay_process(n2, tmp_path / "n2.toml") as process:
            arun(scenario(process), timeout=120)


def test_batches_taken_close_together_share_one_answer(node, nats_url):
    """A NATS message costs a Python client far more than its bytes: n2 answers n1 at most
    every ANSWER_INTERVAL (20 ms), so 40 batches sent a millisecond apart get at most half as
    many answers, and every stanza is still counted as taken."""
    n1, n2 = node("n1"), node("n2")

    async def scenario():
        async with running(n1.config()) as r1, running(n2.config()):
            listener = await nats.connect(nats_url)
            answers = []

            async def count(msg):
                answers.append(decode_answers(msg.data))

            await listener.subscribe("xmpp-router.answer.n1.0.>", cb=count)
            await listener.flush()
            a = await component(n1.component_port, "a.comp.test")
            b = await component(n2.component_port, "b.comp.test")
            await holds(r1, "b.comp.test")
            for i in range(40):
                a.send(message(i, "x@a.comp.test", "y@b.comp.test"))
                await asyncio.sleep(0.001)  # one batch per event-loop iteration of n1
            assert [(await b.receive()).get("id") for _ in range(40)] == [f"m{i}" for i in range(40)]
            await answered(r1, 40)
            batches = r1.metrics.bus_batches.get("sent")
            sequences = [sequence for entries in answers for sequence, _ in entries]
            assert sorted(sequences) == sequences and len(sequences) == batches
            assert len(answers) * 2 <= batches, (len(answers), batches)  # one per batch without the interval
            await listener.close()

    arun(scenario())


def test_without_nats_local_delivery_goes_on_and_the_bus_comes_back(node, tmp_path):
    n1, n2 = node("n1"), node("n2")
    port = int(n1.cluster["nats"][0].rsplit(":", 1)[1])

    async def scenario():
        async with running(n1.config()) as r1, running(n2.config()):
            a = await component(n1.component_port, "a.comp.test")
            b = await component(n2.component_port, "b.comp.test")
            c = await component(n1.component_port, "c.comp.test")
            await holds(r1, "b.comp.test")
            await asyncio.to_thread(natsd.stop, port)  # the fixture's server goes away
            await settled(lambda: not r1.bus.connected, SETTLE)
            a.send(message(1, "x@a.comp.test", "y@c.comp.test"))  # local: delivered
            assert (await c.receive()).get("id") == "m1"
            a.send(message(2, "x@a.comp.test", "y@b.comp.test"))  # another node: bounced, with the reason
            bounce = await a.receive(timeout=10)
            assert bounce.get("type") == "error" and b"NATS" in bounce_text(bounce)
            with nats_server(tmp_path, port):
                back = asyncio.get_running_loop().time()
                await settled(lambda: r1.bus.connected and r1.bus.members.component_holders("b.comp.test"), 20)
                await heard_since(r1, "n2.0", back)
                a.send(message(3, "x@a.comp.test", "y@b.comp.test"))
                assert (await b.receive(timeout=10)).get("id") == "m3"
                await a.close()

    arun(scenario(), timeout=60)


def bounce_text(element) -> bytes:
    return (element.findtext(".//{urn:ietf:params:xml:ns:xmpp-stanzas}text") or "").encode()
