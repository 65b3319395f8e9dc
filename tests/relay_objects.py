"""A real relay object graph on transports that record each call, no sockets: two
inbound S2S streams authenticated by dialback (their authoritative server's answer
computed in-process) and the component that serves their target domain. Shared by
the tests of the compiled router and of gathered writes."""

from __future__ import annotations

import asyncio

import uvloop

from router.wire.handshake import handshake_digest
from router.net.components import ComponentStream
from router.config import parse_config
from router.negotiation.dialback import dialback_key
from router.net.verifier import DialbackVerifier
from router.server import Relay
from router.net.s2s import S2SStream

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


def make_world():
    """Yields (relay, component transport, [s2s streams from a.test and b.test]) with
    ``relay.loop`` the current event loop; closes the loop after."""
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
    relay.router.flush_writes()
    to_component.calls.clear()
    yield relay, to_component, sources
    asyncio.set_event_loop(None)
    loop.close()
