"""XEP-0198 counting at run time (router/net/acks.py with the compiled router's per-read counts): the
h a relay stream answers is exact however a read mixes stanzas, ``<r/>`` and ``<enable/>``; what it
sends is kept until acknowledged (h wraps at 2^32) and read back whole when the stream dies.

The relay objects are `relay_objects.make_world`'s: S2S streams from a.test and b.test authenticated
by dialback, and the component serving svc.test, on transports that record every write."""

from __future__ import annotations

import asyncio

import pytest

from relay_objects import DOMAIN, make_world, message, read
from router.net.acks import StreamAcks

SM = "urn:xmpp:sm:3"
ENABLE = f"<enable xmlns='{SM}'/>".encode()
R = f"<r xmlns='{SM}'/>".encode()


@pytest.fixture
def world():
    yield from make_world()


def answers(relay, stream) -> list[bytes]:
    """The <a/> the relay wrote on ``stream`` since the last call."""
    relay.router.flush_writes()
    data = b"".join(stream.transport.calls)
    stream.transport.calls.clear()
    return [b"<a " + part.split(b"/>")[0] + b"/>" for part in data.split(b"<a ")[1:]]


def h(value: int) -> bytes:
    return f"<a xmlns='{SM}' h='{value}'/>".encode()


def test_h_counts_the_stanzas_after_enable_however_the_reads_cut_them(world):
    relay, _, (a, _) = world
    before = message("a.test", 0) + message("a.test", 1)
    after = b"".join(message("a.test", n) for n in range(2, 7))
    # stanzas before <enable/> in the same read are not counted; those after are, on either path
    read(a, before + ENABLE + after[:200])
    read(a, after[200:] + R + message("a.test", 7) + R)
    assert a.acks is not None
    assert answers(relay, a) == [h(5), h(6)]


def test_h_is_the_same_when_the_bytes_arrive_one_at_a_time(world):
    relay, _, (a, _) = world
    data = ENABLE + message("a.test", 1) + R + message("a.test", 2) + message("a.test", 3) + R
    for byte in data:
        read(a, bytes([byte]))
    assert answers(relay, a) == [h(1), h(3)]


def test_what_is_sent_is_kept_until_acknowledged_and_h_wraps(world):
    relay, _, (a, b) = world
    acks = a.acks = StreamAcks(a)
    acks.start(outbound=True, inbound=False)
    stanzas = [f"<message from='bot@{DOMAIN}' to='u@a.test' id='{n}'/>".encode() for n in range(4)]
    a.write_chunks(stanzas[:3])
    a.write(b" ")  # not a stanza: not kept
    a.write_chunks(stanzas[3:])
    acks.acked = (1 << 32) - 2  # the peer's h was about to wrap
    assert acks.acknowledged(0) is None  # 2^32 - 2 -> 0: two acknowledged, inside the first write's three
    assert acks.pending == 2
    assert "acknowledges 3 stanzas but only 2" in acks.acknowledged(3)
    assert [(data, element.id) for data, element in acks.stanzas()] == [(s, str(n)) for n, s in
                                                                        enumerate(stanzas) if n >= 2]
    assert not acks.pending and not acks.kept


def test_an_ack_is_requested_after_sm_ack_every_stanzas_and_once_until_answered(world):
    relay, _, (a, _) = world
    acks = a.acks = StreamAcks(a)
    acks.start(outbound=True, inbound=False)
    every = relay.config.s2s.sm_ack_every
    chunk = f"<message from='bot@{DOMAIN}' to='u@a.test'/>".encode()
    a.write_chunks([chunk] * (every - 1))
    relay.router.flush_writes()
    assert R not in b"".join(a.transport.calls)
    a.write_chunks([chunk])
    a.write_chunks([chunk] * every)
    relay.router.flush_writes()
    assert b"".join(a.transport.calls).count(R) == 1
    assert acks.acknowledged(every) is None
    a.write_chunks([chunk] * every)
    relay.router.flush_writes()
    assert b"".join(a.transport.calls).count(R) == 2


def test_a_view_written_is_kept_as_a_copy_and_bytes_as_they_are(world):
    """A large stanza goes out as a view of its source's read buffer; what XEP-0198 keeps for
    re-sending must not be that view (it would pin the buffer, and the buffer may be reused)."""
    relay, _, (a, _) = world
    acks = a.acks = StreamAcks(a)
    acks.start(outbound=True, inbound=False)
    source = bytearray(f"<message from='bot@{DOMAIN}' to='u@a.test' id='big'><body>{'x' * 5000}</body></message>".encode())
    small = f"<message from='bot@{DOMAIN}' to='u@a.test' id='small'/>".encode()
    a.write_chunks([memoryview(source)])
    a.write_chunks([small])
    source[:9] = b"<presence"  # the read buffer written again
    assert [type(stanza) for stanza in acks.kept] == [bytes, bytes]
    assert acks.kept[1] is small  # bytes are kept as they are: no second copy
    assert [element.id for _, element in acks.stanzas()] == ["big", "small"]


def test_a_peer_that_never_acknowledges_more_than_sm_max_unacked_is_closed_once(world):
    relay, _, (a, b) = world
    acks = a.acks = StreamAcks(a)
    acks.start(outbound=True, inbound=False)
    acks.max_unacked = 3
    chunk = f"<message from='bot@{DOMAIN}' to='u@a.test'/>".encode()
    a.write_chunks([chunk] * 3)
    relay.loop.run_until_complete(asyncio.sleep(0))
    assert not a.closing
    a.write_chunks([chunk])
    a.write_chunks([chunk])
    relay.loop.run_until_complete(asyncio.sleep(0))
    sent = b"".join(a.transport.calls)
    assert a.closing and sent.count(b"<resource-constraint") == 1
    assert b"4 stanzas were not acknowledged" in sent  # counted when the limit bit
    assert relay.metrics.limits_hit.get("sm_max_unacked") == 1
    assert not b.closing
