"""The relay's fast path in stanzas/s, without sockets or a running loop.

A real `Relay` with one inbound `S2SStream` (a.example, authenticated by
dialback) and the `ComponentStream` serving bench.test, each on a transport
that only counts what it is given. A round pushes N authorized stanzas through
the S2S stream as uvloop would (`get_buffer` / `buffer_updated`): tokenizer,
session authorization (`check_stanza`), route lookup, the write queued on the
component and flushed with one `writelines` after each read, as the end of an
event-loop iteration would (the worst case: no other read shares the write). Two read shapes: 64 KiB reads (a busy stream) and one
stanza per read (a stream carrying one stanza at a time, as in an open-loop
load), whose difference is the relay's per-read cost.
"""

from __future__ import annotations

import asyncio

import pytest

from router.wire.handshake import handshake_digest
from router.net.components import ComponentStream
from router.config import parse_config
from router.negotiation.dialback import dialback_key
from router.net.verifier import DialbackVerifier
from router.server import Relay
from router.net.s2s import S2SStream

REMOTE, DOMAIN = "a.example", "bench.test"
REMOTE_SECRET = "remote-network-dialback-secret-0123"  # the authoritative server's, not the relay's
COMPONENT_SECRET = "bench-component-secret"
STANZAS = 10_000
READ = 65536
CONFIG = f"""
[server]
domains = ["relay.example"]
dialback_secret = "relay-dialback-secret-0123456789"
[s2s]
bidi = "off"
[policy]
require_encryption = false
[listen]
metrics = false
[[component]]
domain = "{DOMAIN}"
secret = "{COMPONENT_SECRET}"
[log]
level = "WARNING"
"""


class CountingTransport(asyncio.Transport):
    """Takes everything at once (a socket that never pushes back) and counts the bytes."""

    def __init__(self):
        super().__init__()
        self.written = 0

    def write(self, data):
        self.written += len(data)

    def writelines(self, chunks):
        self.written += sum(map(len, chunks))

    def get_write_buffer_size(self):
        return 0

    def is_closing(self):
        return False

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5269) if name == "peername" else default

    def pause_reading(self):
        raise AssertionError("the fast path paused reading: a destination pushed back")

    def resume_reading(self):
        pass


class BenchRelay(Relay):
    """The relay, with a.example's authoritative server answering `db:verify` in-process,
    and writes flushed by `receive` instead of a loop callback (no loop runs here)."""

    def __init__(self, config, loop):
        super().__init__(config, loop)
        self.verifier = InProcessVerifier(self)
        self.router.schedule = lambda flush_writes: None  # `receive` ends each iteration itself


class InProcessVerifier(DialbackVerifier):
    """a.example's authoritative server, answering `db:verify` in-process."""

    def verify_key(self, origin, event):
        good = event.key == dialback_key(REMOTE_SECRET, event.receiving, event.originating, event.stream_id)
        origin.session.key_verified(event.token, "valid" if good else "invalid")
        origin.pump()


def receive(stream, data: bytes, read: int) -> None:
    """Hand `data` to the stream the way uvloop does, at most `read` bytes per call."""
    done = 0
    while done < len(data):
        view = stream.get_buffer(read)
        n = min(len(view), read, len(data) - done)
        view[:n] = data[done:done + n]
        stream.buffer_updated(n)
        stream.relay.router.flush_writes()  # the end of the event-loop iteration that made this read
        done += n


def stanza(seq: int, size: int) -> bytes:
    head = f"<message from='u@{REMOTE}/r' to='echo@{DOMAIN}' type='normal' id='{seq}'><body>".encode()
    tail = b"</body></message>"
    return head + b"x" * max(1, size - len(head) - len(tail)) + tail


@pytest.fixture(scope="module")
def fast_path():
    """(s2s stream, component transport): negotiated once, reused by every round."""
    loop = asyncio.new_event_loop()
    relay = BenchRelay(parse_config(CONFIG), loop)
    component, to_component = ComponentStream(relay), CountingTransport()
    component.connection_made(to_component)
    receive(component, f"<stream:stream xmlns='jabber:component:accept' xmlns:stream="
                       f"'http://etherx.jabber.org/streams' to='{DOMAIN}'>".encode(), READ)
    receive(component, f"<handshake>{handshake_digest(component.stream_id, COMPONENT_SECRET)}</handshake>".encode(), READ)
    assert relay.table.local.get(DOMAIN) is component
    s2s = S2SStream(relay, relay._inbound_session(False), outbound=False)
    s2s.connection_made(CountingTransport())
    receive(s2s, f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                 f"xmlns:stream='http://etherx.jabber.org/streams' from='{REMOTE}' to='{DOMAIN}' "
                 f"version='1.0'>".encode(), READ)
    key = dialback_key(REMOTE_SECRET, DOMAIN, REMOTE, s2s.session.stream_id)
    receive(s2s, f"<db:result from='{REMOTE}' to='{DOMAIN}'>{key}</db:result>".encode(), READ)
    assert s2s.authenticated and not s2s.closing
    yield s2s, to_component
    loop.close()


SHAPES = {"64 KiB reads": READ, "one stanza per read": None}


@pytest.mark.parametrize("shape", SHAPES)
def test_route_authorized_stanzas_to_a_component(benchmark, fast_path, shape):
    s2s, to_component = fast_path
    stanzas = [stanza(i, 2000 if i % 10 == 9 else 200) for i in range(STANZAS)]  # the load generator's mix
    data = b"".join(stanzas)
    longest, read, rounds = max(map(len, stanzas)), SHAPES[shape], []

    def run():
        rounds.append(1)
        if read is None:
            for one in stanzas:
                receive(s2s, one, longest)
        else:
            receive(s2s, data, read)

    benchmark.group = "relay fast path: S2S in -> authorize -> route -> component out"
    before = to_component.written
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert to_component.written - before == len(rounds) * len(data)  # every stanza forwarded, byte for byte
    assert not s2s.closing
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["stanzas/s"] = round(STANZAS / mean)
    benchmark.extra_info["MB/s"] = round(len(data) / mean / 1e6, 1)
    benchmark.extra_info["stanzas"] = STANZAS
