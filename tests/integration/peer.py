"""A test-side remote S2S server endpoint built from the project's own sans-IO
``Session`` over plain asyncio streams (no relay runtime code), so tests can
negotiate a real stream with the relay and then send exactly the bytes they want.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque

from router.trust import tls
from router.trust.certs import TrustStore
from router.negotiation import events as ev
from router.negotiation.pairs import Pair
from router.negotiation.session import Session, SessionConfig
from router.trust.policy import Policy

READ_SIZE = 65536


class PeerClosed(Exception):
    def __init__(self, condition: str | None, text: str | None):
        self.condition, self.text = condition, text
        super().__init__(f"stream closed: {condition} {text or ''}")


class Peer:
    """The initiating side of one S2S connection to the relay."""

    def __init__(self, session: Session, reader, writer, client_context) -> None:
        self.session = session
        self.reader = reader
        self.writer = writer
        self.client_context = client_context
        self.stanzas: deque[bytes] = deque()
        self.closed: PeerClosed | None = None
        self.events: list = []
        self.reads: list[bytes] = []  # every chunk read, as received

    @classmethod
    async def connect(cls, port: int, local: str, remote: str, *, cert: tuple | None, ca_path,
                      secret: str = "peer-dialback-secret-0123", bidi: str = "encrypted",
                      require_encryption: bool = True, other_domains: tuple[str, ...] = (),
                      lang: str = "en", source_ip: str | None = None, rcvbuf: int | None = None,
                      stream_limits=None, stream_management: bool = False) -> "Peer":
        """``source_ip``: connect from this loopback address (connection limits count
        per IP); ``rcvbuf``: a small receive buffer, so a peer that stops reading
        makes the relay's write buffer fill at once; ``stream_management``: enable
        XEP-0198 when the relay offers it."""
        config = SessionConfig(
            default_lang=lang,
            local_domains=frozenset({local, *other_domains}), dialback_secret=secret,
            trust_store=TrustStore.from_files(ca_path), has_certificate=cert is not None, bidi=bidi,
            policy=Policy(require_encryption=require_encryption), stream_limits=stream_limits,
            stream_management=stream_management,
        )
        session = Session("initiator", config, local, remote)
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        sock.bind((source_ip or "127.0.0.1", 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 21)
        context = tls.client_context(*(cert or (None, None)))
        peer = cls(session, reader, writer, context)
        await peer._flush()
        return peer

    async def _flush(self) -> None:
        data = self.session.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
        for event in self.session.events():
            self.events.append(event)
            if isinstance(event, ev.StartTLS):
                await self.writer.start_tls(self.client_context, server_hostname=event.domain)
                chain = tls.peer_chain(self.writer.get_extra_info("ssl_object"))
                self.session.tls_established(chain)
                await self._flush()
            elif isinstance(event, ev.Stanza):
                element = event.element
                self.stanzas.append(bytes(self.session.tokenizer.buffer[element.start: element.end]))
            elif isinstance(event, (ev.Closed, ev.PeerClosed)):
                self.closed = PeerClosed(event.condition, event.text)
                data = self.session.data_to_send()
                if data and not self.writer.is_closing():
                    self.writer.write(data)

    async def _read(self) -> None:
        data = await self.reader.read(READ_SIZE)
        if not data:
            self.closed = self.closed or PeerClosed(None, "connection closed")
            raise self.closed
        self.reads.append(data)
        self.session.receive_data(data)
        await self._flush()

    async def authenticated(self) -> None:
        """Until we may send ``local -> remote`` (raises PeerClosed if refused)."""
        pair = Pair(self.session.local_domain, self.session.remote_domain)
        while pair not in self.session.outbound_pairs:
            if self.closed:
                raise self.closed
            if any(isinstance(e, ev.AuthFailed) for e in self.events):
                raise PeerClosed("auth-failed", repr(self.events) + repr(self.reads))
            await self._read()

    def send(self, data: bytes | str) -> None:
        """Raw bytes on the (possibly encrypted) stream, bypassing the session."""
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def receive(self) -> bytes:
        """The next stanza the relay sent us (bytes as received)."""
        while not self.stanzas:
            if self.closed:
                raise self.closed
            await self._read()
        return self.stanzas.popleft()

    async def stream_error(self) -> PeerClosed:
        """Read until the relay ends the stream; its condition and text."""
        try:
            while True:
                if self.closed:
                    return self.closed
                await self._read()
        except PeerClosed as closed:
            return closed
        except ConnectionError as exc:
            return PeerClosed(None, str(exc))

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.session.close()
            data = self.session.data_to_send()
            if data:
                self.writer.write(data)
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass


class AuthoritativeServer:
    """A test-side remote server that accepts connections with receiving
    ``Session``s: it answers ``<db:verify/>`` for its domains from its secret
    (the Session does that), verifies the relay's own dialback keys with the
    relay's secret (standing in for asking the relay's authoritative server),
    and records every connection's input and the stanzas it received."""

    def __init__(self, domains: set[str], secret: str, relay_secret: str) -> None:
        from router.negotiation.dialback import key_matches

        self._key_matches = key_matches
        self.config = SessionConfig(local_domains=frozenset(domains), dialback_secret=secret,
                                    tls_offered=False, has_certificate=False,
                                    policy=Policy(require_encryption=False))
        self.relay_secret = relay_secret
        self.inputs: list[bytearray] = []  # raw bytes received, per connection
        self.stanzas: asyncio.Queue[bytes] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        session = Session("receiver", self.config)
        received = bytearray()
        self.inputs.append(received)
        try:
            while not session.closed:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                received += data
                session.receive_data(data)
                for event in session.events():
                    if isinstance(event, ev.VerifyKey):
                        self.verify(session, event)
                    elif not self.take(session, event, writer):
                        return  # the connection was dropped
                session.events()  # drop what key_verified reported; its answer is in data_to_send
                writer.write(session.data_to_send())
        finally:
            writer.close()

    def take(self, session: Session, event, writer) -> bool:
        """A session event other than a key to verify: a stanza is recorded. False when the
        connection is gone (a subclass may drop it)."""
        if isinstance(event, ev.Stanza):
            element = event.element
            self.stanzas.put_nowait(bytes(session.tokenizer.buffer[element.start: element.end]))
        return True

    def verify(self, session: Session, event: ev.VerifyKey) -> None:
        """Answer the relay's dialback key with the relay's own secret."""
        ok = self._key_matches(self.relay_secret, event.receiving, event.originating, event.stream_id, event.key)
        session.key_verified(event.token, "valid" if ok else "invalid")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
