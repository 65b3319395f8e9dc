"""XEP-0114 components against a running relay: handshake, routing between
components and to built-in services, bounces, and hostile input."""

from __future__ import annotations

import asyncio

import pytest

from router._fastroute import COPY_AT_MOST
from router.net.component_client import ComponentClient, ComponentClosed, ComponentStreamError

from .conftest import arun, running
from .rawstream import RawComponent

SECRET_A = "secret-of-a"
SECRET_B = "secret-of-b"


@pytest.fixture
def spec(relay_spec):
    return relay_spec(
        "relay",
        domains=("relay.test",),
        components={"a.relay.test": SECRET_A, "b.relay.test": SECRET_B, "c.relay.test": "secret-of-c"},
        echo=("echo.relay.test",),
        sink=("sink.relay.test",),
    )


async def component(port: int, domain: str, secret: str) -> ComponentClient:
    client = ComponentClient()
    await client.connect("127.0.0.1", port, domain, secret)
    return client


def test_component_to_component_in_order(spec):
    async def scenario():
        async with running(spec.config()) as relay:
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            b = await component(spec.component_port, "b.relay.test", SECRET_B)
            for i in range(50):
                a.send(f"<message from='x@a.relay.test' to='y@b.relay.test/r' id='m{i}'><body>n{i}</body></message>")
            got = [await b.receive() for _ in range(50)]
            assert [m.get("id") for m in got] == [f"m{i}" for i in range(50)]
            assert got[7].tag == "{jabber:component:accept}message"
            assert got[7].findtext("{jabber:component:accept}body") == "n7"
            assert relay.metrics.stanzas_routed.get("component") == 50
            await a.close()
            await b.close()

    arun(scenario())


def test_echo_service_answers_the_component(spec):
    async def scenario():
        async with running(spec.config()):
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            a.send("<message from='x@a.relay.test/r' to='echo.relay.test' id='e1' type='chat'><body>ping?</body></message>")
            a.send("<iq from='x@a.relay.test/r' to='relay.test' id='p1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
            echo = await a.receive()
            assert (echo.get("from"), echo.get("to"), echo.get("id")) == ("echo.relay.test", "x@a.relay.test/r", "e1")
            assert echo.findtext("{jabber:component:accept}body") == "ping?"
            pong = await a.receive()
            assert (pong.tag, pong.get("type"), pong.get("id")) == ("{jabber:component:accept}iq", "result", "p1")
            await a.close()

    arun(scenario())


def test_offline_component_domain_bounces_service_unavailable(spec):
    async def scenario():
        async with running(spec.config()):
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            a.send("<message from='x@a.relay.test' to='z@c.relay.test' id='lost' type='chat'><body>hello?</body></message>")
            error = await a.receive()
            assert (error.get("type"), error.get("id"), error.get("from"), error.get("to")) == (
                "error", "lost", "z@c.relay.test", "x@a.relay.test")
            condition = error.find("{jabber:component:accept}error")[0]
            assert condition.tag == "{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable"
            # an error stanza is never answered with an error
            a.send("<message from='x@a.relay.test' to='z@c.relay.test' type='error' id='e'/>")
            a.send("<message from='x@a.relay.test' to='echo.relay.test' id='after'/>")
            assert (await a.receive()).get("id") == "after"
            await a.close()

    arun(scenario())


def test_wrong_secret_unknown_domain_and_duplicate_component(spec):
    async def scenario():
        async with running(spec.config()):
            with pytest.raises(ComponentStreamError) as wrong:
                await component(spec.component_port, "a.relay.test", "not-the-secret")
            assert wrong.value.condition == "not-authorized"
            with pytest.raises(ComponentStreamError) as unknown:
                await component(spec.component_port, "nobody.relay.test", SECRET_A)
            assert unknown.value.condition == "host-unknown"
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            with pytest.raises(ComponentStreamError) as twice:
                await component(spec.component_port, "a.relay.test", SECRET_A)
            assert twice.value.condition == "conflict"
            # the first connection is unaffected
            a.send("<message from='a.relay.test' to='echo.relay.test' id='still'/>")
            assert (await a.receive()).get("id") == "still"
            await a.close()

    arun(scenario())


@pytest.mark.parametrize(
    "bad, condition",
    [
        ("<message from='x@a.relay.test' to='y@a.relay.test'><body>spoof</body></message>", "invalid-from"),
        ("<message to='y@a.relay.test'><body>no from</body></message>", "improper-addressing"),
        ("<message from='x@b.relay.test' to='y@a.relay.test'><!--c--></message>", "restricted-xml"),
        ("<message from='x@b.relay.test' to='y@a.relay.test'><body>x</bo></message>", "not-well-formed"),
        ("<message from='x@b.relay.test' to='y@a.relay.test'><body>" + "x" * 600_000 + "</body></message>",
         "policy-violation"),
        ("<foo xmlns='urn:example'/>", "unsupported-stanza-type"),
    ],
    ids=["spoofed-from", "missing-from", "comment", "mismatched-tag", "oversize", "non-stanza"],
)
def test_bad_input_closes_only_that_stream(spec, bad, condition):
    async def scenario():
        async with running(spec.config()) as relay:
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            b = await component(spec.component_port, "b.relay.test", SECRET_B)
            b.send(bad)
            with pytest.raises(ComponentStreamError) as error:
                await b.receive()
            assert error.value.condition == condition
            assert error.value.text  # says what was wrong
            with pytest.raises(ComponentClosed):
                await b.receive()
            counted = relay.metrics.stanzas_rejected.get(condition) + relay.metrics.parse_errors.get(condition)
            assert counted == 1
            # a concurrent good stream keeps delivering (to itself via echo)
            for i in range(3):
                a.send(f"<message from='a.relay.test' to='echo.relay.test' id='ok{i}'/>")
                assert (await a.receive()).get("id") == f"ok{i}"
            await a.close()

    arun(scenario())


def test_stanza_before_handshake_is_not_authorized(spec):
    async def scenario():
        async with running(spec.config()):
            reader, writer = await asyncio.open_connection("127.0.0.1", spec.component_port)
            writer.write(b"<stream:stream xmlns='jabber:component:accept' "
                         b"xmlns:stream='http://etherx.jabber.org/streams' to='a.relay.test'>"
                         b"<message from='a.relay.test' to='echo.relay.test'/>")
            data = await reader.read()  # until the relay closes
            assert b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in data
            assert data.endswith(b"</stream:stream>")
            writer.close()

    arun(scenario())


@pytest.mark.parametrize("sizes", [(100_000,), (200, COPY_AT_MOST + 900, 100_000, COPY_AT_MOST - 1100, 300)],
                         ids=["large", "mixed"])
def test_slow_reader_gets_every_byte_of_large_stanzas(spec, sizes):
    """Buffer lifetime: forwarded ranges stay intact while a slow reader drains (large
    stanzas go as views of the read buffer, small ones as copies: mixed, both at once)."""
    count = 60

    def stanza(i: int) -> bytes:
        size = sizes[i % len(sizes)]
        filler = (f"{i:05d}" * (size // 5))[:size]
        return (f"<message from='x@a.relay.test' to='y@b.relay.test' id='big{i}'>"
                f"<body>{filler}</body></message>").encode()

    expected = b"".join(stanza(i) for i in range(count))

    async def scenario():
        async with running(spec.config()):
            a = await RawComponent.connect(spec.component_port, "a.relay.test", SECRET_A)
            b = await RawComponent.connect(spec.component_port, "b.relay.test", SECRET_B, rcvbuf=16384)
            # odd-sized writes so stanza boundaries straddle reads
            for offset in range(0, len(expected), 77_777):
                a.send(expected[offset: offset + 77_777])
                await a.writer.drain()
            got = await b.read_exactly(len(expected), chunk=16384, delay=0.001)
            assert got == expected
            await a.close()
            await b.close()

    arun(scenario(), timeout=60)


def test_flow_control_bounds_buffering_and_resumes(spec):
    """A destination that stops reading pauses its source; nothing piles up in the relay."""
    spec.s2s.update(write_high_water=256 * 1024, write_low_water=64 * 1024)
    stanza_size = 32_000
    total = 1200  # ~38 MB: far more than the kernel buffers on both sides
    payload = [(f"<message from='x@a.relay.test' to='y@b.relay.test' id='f{i}'><body>"
                + "y" * stanza_size + "</body></message>").encode() for i in range(total)]

    async def scenario():
        async with running(spec.config()) as relay:
            a = await RawComponent.connect(spec.component_port, "a.relay.test", SECRET_A)
            b = await RawComponent.connect(spec.component_port, "b.relay.test", SECRET_B)
            sent = 0

            async def push():
                nonlocal sent
                for data in payload:
                    a.send(data)
                    await a.writer.drain()
                    sent += 1

            pusher = asyncio.ensure_future(push())
            to_b = relay.table.local["b.relay.test"]
            from_a = relay.table.local["a.relay.test"]
            peak = 0
            for _ in range(40):  # 2 s of b not reading
                await asyncio.sleep(0.05)
                peak = max(peak, to_b.transport.get_write_buffer_size())
            assert not pusher.done(), "the sender was never slowed down"
            assert sent < total
            assert from_a._blockers == {to_b}  # a's reading is paused because of b
            # bounded by the high-water mark plus at most one read's worth of stanzas
            assert peak <= 256 * 1024 + 2 * 512 * 1024
            expected = b"".join(payload)
            got = await b.read_exactly(len(expected))
            await pusher
            assert got == expected
            assert not from_a._blockers
            await a.close()
            await b.close()

    arun(scenario(), timeout=90)


def test_raw_xml_logging_switch(relay_spec, caplog):
    spec = relay_spec("raw", domains=("relay.test",), components={"a.relay.test": SECRET_A},
                      echo=("echo.relay.test",), raw_xml=True)

    async def scenario():
        async with running(spec.config()):
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            a.send("<message from='a.relay.test' to='echo.relay.test' id='logged'><body>visible</body></message>")
            await a.receive()
            await a.close()

    arun(scenario())
    raw = [r.getMessage() for r in caplog.records if r.name == "router.raw"]
    assert any("RECV" in line and "<body>visible</body>" in line for line in raw)
    assert any("SEND" in line and "id=\"logged\"" in line.replace("'", '"') for line in raw)


def test_raw_xml_logging_survives_a_read_that_returns_nothing(relay_spec, caplog):
    """uvloop asks for a buffer before every read, and a read may find nothing (EAGAIN):
    with raw_xml on, that must not leave a view exported on the tokenizer's buffer,
    which would make the next get_buffer fail with BufferError when the buffer grows."""
    spec = relay_spec("raw", domains=("relay.test",), components={"a.relay.test": SECRET_A},
                      echo=("echo.relay.test",), raw_xml=True)
    head = b"<message from='a.relay.test' to='echo.relay.test' id='big'><body>"
    body = b"y" * 150_000

    async def scenario():
        async with running(spec.config()) as relay:
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            stream = relay.table.local["a.relay.test"]
            start = stream.tokenizer.offset
            a.send(head + body[:50_000])
            for _ in range(200):  # bounded: until the relay has read the first part
                if stream.tokenizer.offset - start >= len(head) + 50_000:
                    break
                await asyncio.sleep(0.01)
            stream.get_buffer(-1)  # what uvloop does before a read that then returns nothing
            buffer = stream.tokenizer.buffer
            buffer.extend(b"?")  # BufferError if the stream kept a view of the buffer exported
            del buffer[-1]
            a.send(body[50_000:] + b"</body></message>")
            echo = await a.receive()
            assert echo.get("id") == "big" and len(echo.findtext("{jabber:component:accept}body")) == len(body)
            await a.close()

    arun(scenario())
    raw = [r.getMessage() for r in caplog.records if r.name == "router.raw"]
    assert any("RECV" in line and "id='big'" in line for line in raw)
    assert not [r for r in caplog.records if r.exc_info and r.exc_info[0] is BufferError]


def test_raw_xml_is_not_logged_by_default(spec, caplog):
    async def scenario():
        async with running(spec.config()):
            a = await component(spec.component_port, "a.relay.test", SECRET_A)
            a.send("<message from='a.relay.test' to='echo.relay.test' id='quiet'/>")
            await a.receive()
            await a.close()

    arun(scenario())
    assert not [r for r in caplog.records if r.name == "router.raw"]


def test_sender_that_does_not_read_its_echo_replies_is_paused(spec):
    """Service replies count for flow control too: a component flooding the echo
    service without reading stops being read; memory stays bounded."""
    spec.s2s.update(write_high_water=256 * 1024, write_low_water=64 * 1024)
    total = 1500
    payload = [(f"<message from='x@a.relay.test' to='echo.relay.test' id='e{i}'><body>"
                + "w" * 20_000 + "</body></message>").encode() for i in range(total)]

    async def scenario():
        async with running(spec.config()) as relay:
            a = await RawComponent.connect(spec.component_port, "a.relay.test", SECRET_A)
            sent = 0

            async def push():
                nonlocal sent
                for data in payload:
                    a.send(data)
                    await a.writer.drain()
                    sent += 1

            pusher = asyncio.ensure_future(push())
            stream = relay.table.local["a.relay.test"]
            peak = 0
            for _ in range(40):  # 2 s without reading the replies
                await asyncio.sleep(0.05)
                peak = max(peak, stream.transport.get_write_buffer_size())
            assert not pusher.done() and sent < total
            assert stream._blockers == {stream}
            assert peak <= 256 * 1024 + 2 * 512 * 1024
            replies = await a.read_until(b"id=\"e%d\"" % (total - 1), limit=1 << 26)
            await pusher
            assert replies.count(b"<message") == total
            await a.close()

    arun(scenario(), timeout=90)
