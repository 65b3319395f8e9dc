"""When a remote server ends the relay's TLS outbound stream with
``</stream:stream>`` but never completes the TLS close, the relay hands that
stream's (local, remote) domain pair at once to another authenticated stream for
the same pair (here the remote's inbound XEP-0288 bidi stream)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from lxml import etree

from router.trust import tls
from router.trust.certs import TrustStore
from router.net.component_client import ComponentClient
from router.negotiation import events as ev
from router.negotiation.dialback import key_matches
from router.negotiation.pairs import Pair
from router.negotiation.session import Session, SessionConfig
from router.trust.policy import Policy

from .conftest import arun, running
from .peer import Peer

READ_SIZE = 65536
REMOTE = "p1.peers.test"
BOT = "bot.relay.test"
PAIR = Pair(BOT, REMOTE)


class _TlsConnection:
    """One connection accepted by `HalfClosingTlsServer`: a receiving ``Session``,
    with STARTTLS done over ``ssl.MemoryBIO`` so that no TLS alert (close_notify
    included) is ever sent or answered unless the test says so."""

    def __init__(self, server: "HalfClosingTlsServer", reader, writer) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.session = Session("receiver", server.config)
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.authenticated = asyncio.Event()
        self.close_notify_received = False  # the relay's; deliberately left unanswered

    async def run(self) -> None:
        while True:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            if self.tls is None:
                self.session.receive_data(data)
            else:
                self.incoming.write(data)
                plain = self._decrypt()
                if plain:
                    self.session.receive_data(plain)
            await self._pump()

    def end_stream_keeping_tls_open(self) -> None:
        """``</stream:stream>`` inside TLS, then nothing: no close_notify, TCP stays open."""
        self.session.close()
        self._send(self.session.data_to_send())
        self.session.events()

    def _decrypt(self) -> bytes:
        out = bytearray()
        while not self.close_notify_received:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.close_notify_received = True
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _send(self, data: bytes) -> None:
        if not data or self.writer.is_closing():
            return
        if self.tls is None:
            self.writer.write(data)
        else:
            self.tls.write(data)
            self._flush_tls()

    def _flush_tls(self) -> None:
        data = self.outgoing.read()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _handshake(self) -> None:
        self.tls = self.server.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_tls()
                data = await self.reader.read(READ_SIZE)
                if not data:
                    raise ConnectionError("the relay closed during the TLS handshake")
                self.incoming.write(data)
        self._flush_tls()

    async def _pump(self) -> None:
        while True:
            data, events = self.session.data_to_send(), self.session.events()
            if not data and not events:
                return
            self._send(data)
            for event in events:
                if isinstance(event, ev.StartTLS):
                    await self._handshake()
                    self.session.tls_established(tls.peer_chain(self.tls))
                    plain = self._decrypt()  # the relay's new header may have come with its Finished
                    if plain:
                        self.session.receive_data(plain)
                elif isinstance(event, ev.Authenticated):
                    self.authenticated.set()
                elif isinstance(event, ev.VerifyKey):  # only if the relay falls back to dialback
                    ok = key_matches(self.server.relay_secret, event.receiving, event.originating,
                                     event.stream_id, event.key)
                    self.session.key_verified(event.token, "valid" if ok else "invalid")
                elif isinstance(event, ev.Stanza):
                    element = event.element
                    self.server.stanzas.put_nowait(
                        bytes(self.session.tokenizer.buffer[element.start: element.end]))


class HalfClosingTlsServer:
    """``p1.peers.test``'s receiving side: STARTTLS with the CA-signed ``*.peers.test``
    certificate, SASL EXTERNAL against the test CA, no bidi; it records the stanzas
    it receives and never closes a connection unless `stop` is called."""

    def __init__(self, cert: tuple, ca_path, relay_secret: str) -> None:
        self.config = SessionConfig(local_domains=frozenset({REMOTE}), dialback_secret="p1-dialback-secret-0123",
                                    trust_store=TrustStore.from_files(ca_path), tls_offered=True,
                                    has_certificate=True, bidi="off", policy=Policy(require_encryption=True))
        self.context = tls.server_context({REMOTE: cert}, REMOTE).default
        self.relay_secret = relay_secret
        self.connections: list[_TlsConnection] = []
        self.stanzas: asyncio.Queue[bytes] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        connection = _TlsConnection(self, reader, writer)
        self.connections.append(connection)
        self._tasks.add(asyncio.current_task())
        try:
            await connection.run()
        except (ConnectionError, ssl.SSLError):
            pass  # the connection is aborted in stop()

    async def stop(self) -> None:
        for connection in self.connections:
            connection.writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self._tasks:  # each ends when its aborted connection reports EOF
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            assert not pending, f"{len(pending)} test server connection(s) did not end"


async def until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def parse(data: bytes) -> etree._Element:
    return etree.fromstring(b"<w xmlns='jabber:server'>" + data + b"</w>")[0]


def test_pair_moves_to_bidi_stream_when_tls_outbound_stream_is_closed_without_tls_close(
        relay_spec, pki, peers_cert):
    """RFC 6120 §4.4: once a peer sends ``</stream:stream>`` no more stanzas may go
    over that stream, whatever becomes of TLS and TCP afterwards; a remote that sends
    its closing tag but no close_notify (and keeps TCP open) used to leave the closing
    stream owning the pair until ``connection_lost`` (~30 s: the TLS shutdown
    timeout), so the next stanza waited for a new connection or bounced, although
    the remote's own inbound stream was already authenticated for the pair in our
    direction with XEP-0288 bidi. The pair must move to that stream at once."""
    spec = relay_spec("relay", domains=("relay.test",), components={BOT: "bot-secret"})

    async def scenario():
        remote = HalfClosingTlsServer(peers_cert, pki.ca_path, spec.secret)
        spec.routes[REMOTE] = await remote.start()
        bot = peer = None
        try:
            async with running(spec.config()) as relay:
                try:
                    bot = ComponentClient()
                    await bot.connect("127.0.0.1", spec.component_port, BOT, "bot-secret")

                    # 1. the relay's outbound TLS stream to p1.peers.test carries the first message
                    bot.send(f"<message from='romeo@{BOT}' to='x@{REMOTE}' id='m1'><body>one</body></message>")
                    first = parse(await asyncio.wait_for(remote.stanzas.get(), 10.0))
                    assert first.get("id") == "m1"
                    outbound = relay.table.remote[PAIR]
                    assert outbound.outbound and outbound.session.encrypted
                    assert len(remote.connections) == 1
                    connection = remote.connections[0]
                    assert connection.authenticated.is_set()

                    # 2. p1.peers.test's inbound stream, authenticated and bidi: authorized for PAIR too
                    peer = await Peer.connect(spec.s2s_port, REMOTE, BOT, cert=peers_cert, ca_path=pki.ca_path)
                    await peer.authenticated()
                    assert peer.session.bidi

                    def bidi_streams():
                        return [s for s in relay.streams if getattr(s, "outbound", True) is False
                                and PAIR in s.session.outbound_pairs]

                    await until(lambda: len(bidi_streams()) == 1, 5.0, "the inbound bidi stream to be authorized")
                    bidi = bidi_streams()[0]
                    assert bidi.bidi
                    assert relay.table.remote[PAIR] is outbound  # the first authenticated stream keeps the pair

                    # 3. the remote ends the outbound stream: </stream:stream>, no close_notify, TCP open
                    connection.end_stream_keeping_tls_open()
                    await until(lambda: outbound.closing, 5.0, "the relay to see the outbound stream's close")

                    # 4. the next message for the pair goes over the bidi stream, without delay
                    bot.send(f"<message from='romeo@{BOT}' to='x@{REMOTE}' id='m2'><body>two</body></message>")
                    try:
                        second = parse(await asyncio.wait_for(peer.receive(), 2.0))
                    except asyncio.TimeoutError:
                        owner = relay.table.remote.get(PAIR)
                        pytest.fail(
                            "m2 did not reach the inbound bidi stream within 2 s; the pair is owned by "
                            + ("the closing outbound stream" if owner is outbound else
                               "the bidi stream" if owner is bidi else repr(owner))
                            + f"; outbound stream closed (connection_lost): {outbound.closed}; "
                            f"connections opened to {REMOTE}: {len(remote.connections)}")
                    assert (second.get("id"), second.get("to")) == ("m2", f"x@{REMOTE}")
                    assert relay.table.remote[PAIR] is bidi
                    # the scenario held: the relay has not seen the outbound TCP connection end
                    assert not outbound.closed
                    assert remote.stanzas.empty()
                finally:
                    await remote.stop()  # the half-closed connection first: the relay need not wait for it
                    if peer is not None:
                        await peer.close()
                    if bot is not None:
                        await bot.close()
        finally:
            await remote.stop()

    arun(scenario(), timeout=30.0)
