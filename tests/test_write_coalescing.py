"""Writes gathered per event-loop iteration (router/net/stream.py): what many sources forward
to one destination in one iteration leaves in one call, in order, byte for byte, even
when a source reads again before the write (its buffer must stay untouched).

A real relay object graph on transports that record each call, no sockets: two
inbound S2S streams authenticated by dialback (their authoritative server's answer
computed in-process) and the component that serves their target domain."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from router.wire.handshake import handshake_digest
from router.net.components import ComponentStream
from router.config import parse_config
from router.negotiation.dialback import dialback_key
from router.net.verifier import DialbackVerifier
from router.server import Relay
from router.net.s2s import S2SStream
from router.net.stream import FLUSH_AT

DOMAIN, SECRET, REMOTE_SECRET = "svc.test", "component-secret", "remote-dialback-secret"
CONFIG = f"""
[server]
domains = ["relay.test"]
dialback_secret = "relay-dialback-secret-0123456789"
[s2s]
bidi = "off"
[policy]
require_encryption = false
[listen]
metrics = false
[[component]]
domain = "{DOMAIN}"
secret = "{SECRET}"
[log]
level = "WARNING"
"""


class RecordingTransport(asyncio.Transport):
    """Takes everything at once and records each call's bytes, copied when it is made."""

    def __init__(self):
        super().__init__()
        self.calls: list[bytes] = []
        self.closed = False

    def write(self, data):
        self.calls.append(bytes(data))

    def writelines(self, chunks):
        if self.closed:
            raise RuntimeError("unable to perform operation: the handler is closed")  # as uvloop does
        self.calls.append(b"".join(bytes(chunk) for chunk in chunks))

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5269) if name == "peername" else default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


class InProcessVerifier(DialbackVerifier):
    """Answers `db:verify` for the remote domains in-process."""

    def verify_key(self, origin, event):
        good = event.key == dialback_key(REMOTE_SECRET, event.receiving, event.originating, event.stream_id)
        origin.session.key_verified(event.token, "valid" if good else "invalid")
        origin.pump()


class InProcessRelay(Relay):
    """The relay with the in-process verifier."""

    def __init__(self, config, loop):
        super().__init__(config, loop)
        self.verifier = InProcessVerifier(self)


def read(stream, data: bytes) -> None:
    """One read of ``data``, as uvloop hands it to a BufferedProtocol."""
    view = stream.get_buffer(len(data))
    view[: len(data)] = data
    stream.buffer_updated(len(data))


def message(remote: str, n: int, body: str = "hi") -> bytes:
    return f"<message from='u@{remote}' to='bot@{DOMAIN}' id='{n}'><body>{body}</body></message>".encode()


@pytest.fixture
def world():
    """(relay, component transport, [s2s streams from a.test and b.test]) inside a running loop."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    relay = InProcessRelay(parse_config(CONFIG), loop)
    component, to_component = ComponentStream(relay), RecordingTransport()
    component.connection_made(to_component)
    read(component, f"<stream:stream xmlns='jabber:component:accept' "
                    f"xmlns:stream='http://etherx.jabber.org/streams' to='{DOMAIN}'>".encode())
    read(component, f"<handshake>{handshake_digest(component.stream_id, SECRET)}</handshake>".encode())
    sources = []
    for remote in ("a.test", "b.test"):
        s2s = S2SStream(relay, relay._inbound_session(False), outbound=False)
        s2s.connection_made(RecordingTransport())
        read(s2s, f"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                  f"xmlns:stream='http://etherx.jabber.org/streams' from='{remote}' to='{DOMAIN}' "
                  f"version='1.0'>".encode())
        key = dialback_key(REMOTE_SECRET, DOMAIN, remote, s2s.session.stream_id)
        read(s2s, f"<db:result from='{remote}' to='{DOMAIN}'>{key}</db:result>".encode())
        assert s2s.authenticated
        sources.append(s2s)
    relay.flush_writes()
    to_component.calls.clear()
    yield relay, to_component, sources
    asyncio.set_event_loop(None)
    loop.close()


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
    relay.flush_writes()
    assert b"".join(to_component.calls) == first + second


def test_a_large_queue_is_written_at_once(world):
    relay, to_component, (a, _) = world
    big = message("a.test", 1, "z" * FLUSH_AT)
    read(a, big)
    assert to_component.calls == [big]  # without waiting for the end of the iteration
    relay.flush_writes()
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
    relay.flush_writes()
    assert to_component.calls == [message("b.test", 7)]
    assert not any(b"<message/>" in call for call in a.transport.calls)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # dropped knowingly, not by an exception
