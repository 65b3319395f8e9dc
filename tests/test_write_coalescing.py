"""Writes gathered per event-loop iteration (router/net/stream.py): what many sources forward
to one destination in one iteration leaves in one call, in order, byte for byte, even
when a source reads again before the write (its buffer must stay untouched).

The relay objects are `relay_objects.make_world`'s."""

from __future__ import annotations

import asyncio

import pytest

from relay_objects import DOMAIN, RecordingTransport, make_world, message, read
from router._fastroute import FLUSH_AT
from router.net.components import ComponentStream


@pytest.fixture
def world():
    yield from make_world()


def test_stanzas_from_many_sources_in_one_iteration_leave_in_one_write(world):
    relay, to_component, (a, b) = world

    async def iteration():
        read(a, message("a.test", 1))
        read(b, message("b.test", 2))
        read(a, message("a.test", 3))
        assert to_component.calls == []  # queued until the iteration's reads are done
        await asyncio.sleep(0)  # the loop runs the flush callback

    relay.loop.run_until_complete(iteration())
    assert to_component.calls == [message("a.test", 1) + message("b.test", 2) + message("a.test", 3)]


def test_a_source_reading_again_before_the_write_does_not_change_what_is_queued(world):
    """The queued range is a view of a's buffer; a's next read arrives mid-stanza and
    would compact that buffer if it were not pinned (DESIGN.md "Buffer lifetime")."""
    relay, to_component, (a, _) = world
    first, second = message("a.test", 1, "x" * 300), message("a.test", 2, "y" * 300)
    read(a, first + second[:150])
    read(a, second[150:])
    relay.router.flush_writes()
    assert b"".join(to_component.calls) == first + second


def test_a_large_queue_is_written_at_once(world):
    relay, to_component, (a, _) = world
    big = message("a.test", 1, "z" * FLUSH_AT)
    read(a, big)
    assert to_component.calls == [big]  # without waiting for the end of the iteration
    relay.router.flush_writes()
    assert to_component.calls == [big]


def test_closing_a_stream_sends_what_was_queued_first(world):
    relay, to_component, (a, _) = world
    component = relay.table.local[DOMAIN]
    read(a, message("a.test", 1))
    component.fail("policy-violation", "closing for the test")
    sent = b"".join(to_component.calls)
    assert sent.startswith(message("a.test", 1)) and b"policy-violation" in sent and to_component.closed


def test_a_stream_aborted_before_the_flush_does_not_hold_up_the_others(world, caplog):
    relay, to_component, (a, b) = world
    a.write_chunks([b"<message/>"])  # queued on a first ...
    read(b, message("b.test", 7))  # ... then b's stanza for the component
    a.transport.close()  # a goes away before the end of the iteration
    relay.router.flush_writes()
    assert to_component.calls == [message("b.test", 7)]
    assert not any(b"<message/>" in call for call in a.transport.calls)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # dropped knowingly, not by an exception


class TlsTransport(RecordingTransport):
    """Says it is TLS as uvloop's SSL transport does (``sslcontext``), and records which call wrote."""

    def __init__(self):
        super().__init__()
        self.methods: list[str] = []

    def write(self, data):
        self.methods.append("write")
        super().write(data)

    def writelines(self, chunks):
        self.methods.append("writelines")
        super().writelines(chunks)

    def get_extra_info(self, name, default=None):
        return object() if name == "sslcontext" else super().get_extra_info(name, default)


def test_a_tls_destination_gets_an_iterations_stanzas_as_one_buffer(world):
    """uvloop encrypts each chunk given to a TLS transport as records of its own (one
    SSL_write per chunk): a TLS destination gets one joined write; a plain one keeps the
    chunks as views (no copy)."""
    relay, to_component, (a, b) = world
    component = next(s for s in relay.streams if isinstance(s, ComponentStream))
    tls = TlsTransport()
    component.use_transport(tls)
    assert component.join_writes and not a.join_writes

    async def iteration():
        read(a, message("a.test", 1))
        read(b, message("b.test", 2))
        await asyncio.sleep(0)

    relay.loop.run_until_complete(iteration())
    assert tls.calls == [message("a.test", 1) + message("b.test", 2)]
    assert tls.methods == ["write"]
    assert to_component.calls == []
