"""One connection's I/O: a ``BufferedProtocol`` that feeds a tokenizer in place and
forwards stanzas as byte ranges of that tokenizer's buffer.

``XmlStream`` is the part every stream shares (S2S in both directions and
XEP-0114 components): zero-copy read and forward, gathered writes, buffer
pinning, flow control, activity clocks and closing. ``S2SStream`` drives a
sans-IO ``Session`` and turns its events into I/O (STARTTLS, routes, dialback
verification, close).

Writes are gathered per event-loop iteration: ``write_chunks`` queues on the
stream and the relay hands every stream's queue to its transport once, after
the iteration's reads (``Relay.flush_writes``). Stanzas that many sources
forward to one destination in one iteration (every S2S stream to a busy
component) then leave in one system call instead of one per source read.

Buffer lifetime: a forwarded range is a ``memoryview`` of the source
tokenizer's buffer. It is queued until the end of the iteration, and uvloop
keeps it when it cannot send everything at once, so a source that forwarded
a range calls ``tokenizer.pin()``: the tokenizer then swaps in a fresh buffer
instead of overwriting the old one (DESIGN.md "Buffer lifetime").

Flow control (DESIGN.md "Flow control"): a slow or hostile peer only ever
hurts itself. A destination whose write buffer passed its high-water mark is
``paused``. A source that forwarded into it stops reading until it drains below
the low-water mark (``resume_writing``) only when that hurts nobody else: a
remote server's stream waits for its destinations, a component (a source
shared by many remote domains) never waits for a remote server's stream.
Whatever a paused destination is sent beyond ``write_queue_max`` bytes bounces
with ``<resource-constraint/>`` (``queue_full``), and one that writes nothing
to its socket for ``write_stall_timeout`` is closed by the relay's sweep.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from router import tls
from router._fastparse import Element
from router.negotiation import events as ev
from router.xml import SERVER_NS

if TYPE_CHECKING:
    from router.server import Relay

log = logging.getLogger("router.stream")
raw_log = logging.getLogger("router.raw")

WHITESPACE_KEEPALIVE = b" "
# Flow-control sets are empty on nearly every stream: they share this one and are
# replaced (not mutated) when a stream waits or is waited for.
NO_STREAMS: frozenset[XmlStream] = frozenset()
# Read buffer used only while a STARTTLS handshake finishes (see S2SStream._received).
EARLY_BUFFER_SIZE = 16384
# A write queue this large gains nothing from waiting for the end of the loop
# iteration: it goes out at once, so flow control sees it as before.
FLUSH_AT = 65536


def _escape_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;").replace('"', "&quot;")


def _start_tag_attributes(data: bytes | memoryview, name_end: int) -> list[tuple[str, int, int]]:
    """The attributes of an already validated start tag as (name, value_start, value_end)."""
    out = []
    i, n = name_end, len(data)
    while i < n:
        c = data[i]
        if c in b" \t\r\n":
            i += 1
            continue
        if c in b"/>":
            return out
        j = i
        while data[j] not in b"= \t\r\n":
            j += 1
        name = bytes(data[i:j]).decode()
        while data[j] in b" \t\r\n=":
            j += 1
        quote = data[j]
        k = j + 1
        while data[k] != quote:
            k += 1
        out.append((name, j + 1, k))
        i = k + 1
    return out


def rescope(
    data: bytes | memoryview,
    element: Element,
    header_namespaces: dict[str | None, str],
    source_lang: str | None,
    dest_ns: str,
    dest_lang: str | None,
) -> bytes | None:
    """A copy of ``data`` (the element's bytes) fixed up for another stream, or
    None when the bytes can be forwarded as they are.

    Fix-ups (RFC 6120 §4.7.4, §4.8.3, §4.8.5): declare on the element the
    prefixes it borrows from the input stream header; give it the input
    stream's ``xml:lang`` when it has none and the output stream's default
    differs; move an element that declares its own content namespace into the
    output stream's one (``jabber:server`` <-> ``jabber:component:accept``).
    Children that inherit the default namespace follow the element.
    """
    add_lang = element.lang is None and source_lang is not None and source_lang != dest_lang
    fix_ns = element.own_xmlns and element.ns != dest_ns
    if not (element.header_prefix or add_lang or fix_ns):
        return None
    qname = f"{element.prefix}:{element.name}" if element.prefix else element.name
    name_end = 1 + len(qname.encode())
    attributes = _start_tag_attributes(data, name_end)
    declared = {name for name, _, _ in attributes}
    extra = []
    if element.header_prefix:
        for prefix, uri in header_namespaces.items():
            if prefix is not None and f"xmlns:{prefix}" not in declared:
                extra.append(f" xmlns:{prefix}='{_escape_attr(uri)}'")
    if add_lang:
        extra.append(f" xml:lang='{_escape_attr(source_lang)}'")
    raw = bytes(data)
    if fix_ns:
        for name, vstart, vend in attributes:
            if name == "xmlns":
                raw = raw[:vstart] + _escape_attr(dest_ns).encode() + raw[vend:]
                break
    return raw[:name_end] + "".join(extra).encode() + raw[name_end:]


class XmlStream(asyncio.BufferedProtocol):
    """What every relay stream shares: reading into a tokenizer, forwarding byte
    ranges to other streams, writing, flow control and closing.

    Subclasses provide ``tokenizer``, ``content_ns`` (the default namespace of
    the stream we write), ``out_lang`` (the ``xml:lang`` of our header) and
    ``_received()`` (handle what the last read produced).
    """

    content_ns = SERVER_NS
    out_lang: str | None = "en"
    kind = "stream"
    # flow control: a shared source (it speaks for many remote domains' correspondents)
    # never waits for a remote destination (a stream to one remote server)
    shared = False
    remote = False
    # one per connection: no instance dict; timers are the relay's shared sweep
    __slots__ = ("relay", "loop", "transport", "peer", "paused", "_waiting_sources", "_blockers", "closing",
                 "closed", "_closed_waiter", "opened_at", "last_rx", "last_tx", "_close_timer", "raw_xml", "_rx_at",
                 "_unsent", "_unsent_bytes", "handed", "full_since", "stall")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.paused = False  # our transport's write buffer is above the high-water mark
        self._waiting_sources: frozenset[XmlStream] = NO_STREAMS  # sources paused because of us
        self._blockers: frozenset[XmlStream] = NO_STREAMS  # destinations we wait for
        self.closing = False
        self.closed = False  # connection_lost ran
        self._closed_waiter: asyncio.Future[None] | None = None  # made by wait_closed only
        self.opened_at = self.last_rx = self.last_tx = self.loop.time()
        self._close_timer: asyncio.TimerHandle | None = None  # only after we sent </stream:stream>
        self.raw_xml = relay.config.log.raw_xml
        # raw_xml: where the last get_buffer() view starts (the bytearray, not a view of
        # it: an exported view would stop the tokenizer resizing or dropping its buffer
        # when uvloop asks for a buffer and then reads nothing)
        self._rx_at: tuple[bytearray, int] | None = None
        self._unsent: list[Any] | None = None  # chunks queued in this event-loop iteration
        self._unsent_bytes = 0
        self.handed = 0  # bytes given to the transport so far; minus its buffer, bytes written
        self.full_since: float | None = None  # when queue_full last refused a stanza while paused
        self.stall: tuple[int, float] | None = None  # while paused: (bytes written, since when)

    # ------------------------------------------------------------------ transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        s2s = self.relay.config.s2s
        transport.set_write_buffer_limits(high=s2s.write_high_water, low=s2s.write_low_water)  # type: ignore[attr-defined]
        self.relay.stream_opened(self)

    @property
    def ip(self) -> str:
        """The remote address, as connection limits count it (not kept: idle memory)."""
        return self.peer.rpartition(":")[0] or self.peer

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._buffer_for(sizehint)
        if self.raw_xml:
            self._rx_at = (view.obj, len(view.obj) - len(view))  # views end where their buffer ends
        return view

    def _buffer_for(self, sizehint: int) -> memoryview:
        return self.tokenizer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = self.loop.time()
        if self.raw_xml and self._rx_at is not None:
            buffer, start = self._rx_at
            self._rx_at = None
            raw_log.info("%s %s RECV %r", self.kind, self.peer, bytes(buffer[start : start + nbytes]))
        self.relay.metrics.bytes_received.inc(self.kind, by=nbytes)
        try:
            self._received(nbytes)
        except Exception:  # a bug must not leave the stream half-alive
            log.exception("%s %s: internal error", self.kind, self.peer)
            self.fail("internal-server-error", "internal error while processing the stream")

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.full_since = self.stall = None
        waiting, self._waiting_sources = self._waiting_sources, NO_STREAMS
        for source in waiting:
            source._unblock(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._unsent, self._unsent_bytes = None, 0
        if self._close_timer is not None:
            self._close_timer.cancel()
        # sources paused on us may read again (their stanzas will bounce or queue)
        self.resume_writing()
        for dest in self._blockers:
            dest._waiting_sources -= {self}
        self._blockers = NO_STREAMS
        self.closed = True
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self.relay.stream_closed(self, exc)

    # ------------------------------------------------------------------ forwarding
    def forward(self, batches: dict[XmlStream, list[Any]]) -> None:
        """Queue each destination's gathered ranges; pin our buffer, whose views they
        are, and stop reading from a paused destination."""
        for dest, chunks in batches.items():
            if dest.closing:  # closed by an event of this very read; routing checked before
                log.info("%s %s closed while %d stanza(s) were on their way to it", dest.kind, dest.peer, len(chunks))
                continue
            dest.write_chunks(chunks)
            if dest.paused and self.may_wait_for(dest):
                self.block_on(dest)
        if batches:
            self.tokenizer.pin()

    def may_wait_for(self, dest: XmlStream) -> bool:
        """Whether pausing our reads until ``dest`` drains hurts only the peers
        involved: not when we are shared and ``dest`` is one remote server."""
        return dest is self or not (self.shared and dest.remote)

    def queue_full(self, size: int) -> bool:
        """Whether ``size`` more bytes would take a paused stream's queue past its
        limit (then the caller bounces instead of queueing). Only called while
        ``paused``, so the hot path pays one attribute check."""
        transport = self.transport
        backlog = self._unsent_bytes + (transport.get_write_buffer_size() if transport is not None else 0)
        limit = self.relay.config.s2s.write_queue_max
        if backlog + size <= limit:
            return False
        if self.full_since is None:
            self.full_since = self.loop.time()
            log.warning("%s %s write queue full (%d bytes waiting, write_queue_max %d): stanzas to it bounce",
                        self.kind, self.peer, backlog, limit)
        self.relay.metrics.limits_hit.inc("write_queue_max")
        return True

    def stalled_for(self, now: float) -> float:
        """Seconds this paused stream has written nothing to its socket (0 when not paused)."""
        if not self.paused or self.transport is None:
            self.stall = None
            return 0.0
        written = self.handed - self.transport.get_write_buffer_size()
        if self.stall is None or written > self.stall[0]:
            self.stall = (written, now)
        return now - self.stall[1]

    def chunk_for(self, dest: XmlStream, element: Element, view: memoryview) -> Any:
        """The bytes of ``element`` as ``dest`` needs them: a slice of our buffer,
        or a fixed-up copy."""
        header = self.tokenizer.header
        data = view[element.start : element.end]
        fixed = rescope(
            data,
            element,
            header.namespaces if header is not None else {},
            header.lang if header is not None else None,
            dest.content_ns,
            dest.out_lang,
        )
        return data if fixed is None else fixed

    def block_on(self, dest: XmlStream) -> None:
        """Stop reading until ``dest`` drains below its low-water mark (itself included)."""
        if not self._blockers and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        if dest not in self._blockers:
            self._blockers |= {dest}
            dest._waiting_sources |= {self}

    def _unblock(self, dest: XmlStream) -> None:
        self._blockers -= {dest}
        if not self._blockers and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ writing
    def write_chunks(self, chunks: list[Any]) -> None:
        """Queue ``chunks`` (bytes or views of a source's buffer) for the end of this
        event-loop iteration, in order after everything queued before."""
        if self.transport is None or self.closing:
            return
        size = sum(map(len, chunks))
        if self._unsent is None:
            self._unsent = list(chunks)
            self._unsent_bytes = size
            self.relay.flush_soon(self)
        else:
            self._unsent.extend(chunks)
            self._unsent_bytes += size
        if self._unsent_bytes >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand the queued chunks to the transport in one call."""
        chunks, size = self._unsent, self._unsent_bytes
        self._unsent, self._unsent_bytes = None, 0
        if not chunks or self.transport is None:
            return
        if self.transport.is_closing():  # aborted after the chunks were queued: uvloop would raise
            log.info("%s %s closed while %d chunk(s) were queued for it", self.kind, self.peer, len(chunks))
            return
        self.transport.writelines(chunks)
        self.handed += size
        self.last_tx = self.loop.time()
        self.relay.metrics.bytes_sent.inc(self.kind, by=size)
        if self.raw_xml:
            for chunk in chunks:
                raw_log.info("%s %s SEND %r", self.kind, self.peer, bytes(chunk))

    def write(self, data: bytes) -> None:
        if data:
            self.write_chunks([data])

    def keepalive(self) -> None:
        """RFC 6120 §4.6.1 whitespace keepalive (only called between stanzas)."""
        self.write(WHITESPACE_KEEPALIVE)

    # ------------------------------------------------------------------ closing
    def fail(self, condition: str, text: str) -> None:
        """Close the stream with a stream error (subclasses know how to frame it)."""
        raise NotImplementedError

    def abort_after(self, delay: float) -> None:
        """Drop the TCP connection if the peer has not closed within ``delay``
        (RFC 6120 §4.4: wait for its closing tag, but not forever)."""
        if self._close_timer is None and self.transport is not None:
            self._close_timer = self.loop.call_later(delay, self.transport.abort)

    def close_transport(self) -> None:
        """Send what is queued, then close (the transport drains its buffer first)."""
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        if self.closed:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self.loop.create_future()
        await asyncio.shield(self._closed_waiter)


class S2SStream(XmlStream):
    """A server-to-server connection driven by a sans-IO ``Session``.

    ``outbound`` streams are the ones we opened (initiating role); ``pairs``
    asked of an outbound stream are tracked by the relay, which wakes the
    connection attempt waiting for them.
    """

    kind = "s2s"
    remote = True
    __slots__ = ("session", "outbound", "direct_tls", "authenticated", "admitted", "bidi", "mechanism",
                 "local_domain", "remote_domain", "verify_only", "target", "failure", "_tls_starting", "_early",
                 "_early_buffer")

    def __init__(self, relay: Relay, session: Any, *, outbound: bool, direct_tls: bool = False,
                 local: str | None = None, remote: str | None = None) -> None:
        super().__init__(relay)
        self.session = session
        self.outbound = outbound
        self.direct_tls = direct_tls
        self.authenticated = False
        self.admitted = False  # inbound: counted by the relay's connection limits
        self.bidi = False
        self.mechanism: str | None = None  # metrics label of the first authentication
        self.local_domain = local  # outbound: the domain we connect for
        self.remote_domain = remote
        self.verify_only = False
        self.target: tuple[str, int] | None = None  # outbound: the address and port we connected to
        self.failure: str | None = None  # why the stream ended, for the bounces of pairs waiting on it
        self._tls_starting = False  # between StartTLS and the end of the handshake
        self._early: list[bytes] | None = None  # decrypted bytes that arrived in that window
        self._early_buffer: bytearray | None = None

    @property
    def tokenizer(self):
        return self.session.tokenizer

    @property
    def out_lang(self) -> str | None:
        """The xml:lang our header declared: the peer's own on inbound streams."""
        return self.session.stream_lang if not self.outbound else self.session.config.default_lang

    @property
    def direction(self) -> str:
        return "out" if self.outbound else "in"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.closing:  # refused by a connection limit
            return
        direction = "outbound" if self.outbound else "inbound"
        log.info("s2s %s stream opened peer=%s domain=%s%s", direction, self.peer, self.remote_domain or "-",
                 " tls=direct" if self.direct_tls else "")
        if self.direct_tls:
            self._tls_done()
        self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_starting and self.failure is None:
            self.failure = f"TLS handshake failed: {exc or 'the connection closed'}"
        super().connection_lost(exc)

    def _buffer_for(self, sizehint: int) -> memoryview:
        if self._tls_starting:
            return memoryview(self._early_buffer)
        return self.session.get_buffer(sizehint)

    def _received(self, nbytes: int) -> None:
        if self._tls_starting:
            # uvloop delivers the first decrypted bytes before start_tls() returns
            if self._early is None:
                self._early = []
            self._early.append(bytes(self._early_buffer[:nbytes]))
            return
        self.session.buffer_updated(nbytes)
        self.pump()
        self.tokenizer.release()  # the read's ranges are forwarded or copied: an idle stream keeps no buffer

    # ------------------------------------------------------------------ session -> I/O
    def pump(self) -> None:
        """Write what the session wants sent and act on its events, in order."""
        if self.transport is None:
            return
        view = memoryview(self.tokenizer.buffer)
        batches: dict[XmlStream, list[Any]] = {}
        for event in self.session.events():
            if isinstance(event, ev.Stanza):
                self.relay.route_stanza(self, event.element, view, batches)
                continue
            if batches:
                self.forward(batches)
                batches = {}
            self._flush_session()
            self._handle(event)
        if batches:
            self.forward(batches)
        self._flush_session()

    def _flush_session(self) -> None:
        data = self.session.data_to_send()
        if data:
            self.write(data)

    def _handle(self, event: Any) -> None:
        if isinstance(event, ev.StartTLS):
            self.flush()  # <proceed/> (or <starttls/>) leaves before the handshake starts
            self.transport.pause_reading()  # the ClientHello must reach TLS, not us; start_tls resumes
            self._tls_starting = True
            self._early_buffer = bytearray(EARLY_BUFFER_SIZE)
            self.relay.spawn(self._start_tls(event))
        elif isinstance(event, ev.Authenticated):
            if not self.authenticated:
                self.authenticated = True
                self.relay.stream_authenticated(self)
            self.mechanism = self.mechanism or ("sasl-external" if event.mechanism == "EXTERNAL" else "dialback")
            self.remote_domain = self.remote_domain or event.remote
            log.info("s2s %s authenticated remote=%s local=%s mechanism=%s direction=%s peer=%s",
                     "outbound" if self.outbound else "inbound", event.remote, event.local,
                     event.mechanism, event.direction, self.peer)
            self.relay.authenticated(self, event)
        elif isinstance(event, ev.AuthFailed):
            log.info("s2s authentication failed remote=%s local=%s condition=%s peer=%s",
                     event.remote, event.local, event.condition, self.peer)
            self.relay.auth_failed(self, event)
        elif isinstance(event, ev.BidiEnabled):
            self.bidi = True
            log.info("s2s bidi enabled peer=%s domain=%s", self.peer, self.remote_domain or "-")
            self.relay.routes_changed(self)
        elif isinstance(event, ev.VerifyKey):
            self.relay.verify_key(self, event)
        elif isinstance(event, ev.VerifyResult):
            self.relay.verify_result(self, event)
        elif isinstance(event, ev.Closed):
            metrics = self.relay.metrics
            if event.cause == "parse":
                metrics.parse_errors.inc(event.condition)
            elif event.cause == "stanza":
                metrics.stanzas_rejected.inc(event.condition)
            if event.condition and not self.authenticated:
                metrics.negotiations_failed.inc(self.direction, event.condition)
            if event.condition:
                self.failure = f"we closed the stream with <{event.condition}/>: {event.text}"
            log.info("s2s stream closed by us peer=%s domain=%s condition=%s cause=%s text=%s",
                     self.peer, self.remote_domain or "-", event.condition, event.cause, event.text)
            self.relay.unroute(self)  # its pairs go to another stream at once (RFC 6120 §4.4)
            self._flush_session()
            if event.condition:
                self.close_transport()
            else:
                self.closing = True  # nothing more may follow our </stream:stream>; we still read the peer's
                self.abort_after(self.relay.config.s2s.close_timeout)
        elif isinstance(event, ev.PeerClosed):
            self.failure = "the peer closed the stream" + (f" with <{event.condition}/>" if event.condition else "") \
                + (f": {event.text}" if event.text else "")
            log.info("s2s stream closed by peer peer=%s domain=%s condition=%s text=%s",
                     self.peer, self.remote_domain or "-", event.condition, event.text)
            self.relay.unroute(self)  # its pairs go to another stream at once, TLS close or not
            self._flush_session()
            self.close_transport()

    async def _start_tls(self, event: Any) -> None:
        server_side = not self.outbound
        try:
            if server_side:
                context = self.relay.tls_server_context(event.domain)
                server_hostname = None
            else:
                context = self.relay.tls_client_context(self.local_domain)
                server_hostname = self.remote_domain
            transport = await asyncio.wait_for(
                self.loop.start_tls(self.transport, self, context, server_side=server_side,
                                    server_hostname=server_hostname),
                self.relay.config.s2s.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            # RFC 6120 §5.4.3.2: a failed handshake ends TCP without </stream>
            log.info("s2s TLS handshake failed peer=%s domain=%s: %s", self.peer, self.remote_domain or "-", exc)
            self.failure = self.failure or f"TLS handshake failed: {exc or type(exc).__name__}"
            self.relay.metrics.negotiations_failed.inc(self.direction, "tls-handshake")
            if self.transport is not None:
                self.transport.abort()
            return
        if transport is None:
            return
        self.transport = transport
        s2s = self.relay.config.s2s
        transport.set_write_buffer_limits(high=s2s.write_high_water, low=s2s.write_low_water)
        self._tls_starting = False
        self._early_buffer = None
        self._tls_done()
        early, self._early = self._early or [], None
        for data in early:
            self.session.receive_data(data)
        self.pump()
        self.tokenizer.release()

    def _tls_done(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object")
        chain = tls.peer_chain(ssl_object) if ssl_object is not None else []
        log.info("s2s stream secured peer=%s domain=%s version=%s", self.peer, self.remote_domain or "-",
                 ssl_object.version() if ssl_object is not None else "-")
        self.session.tls_established(chain)

    # ------------------------------------------------------------------ relay -> stream
    def fail(self, condition: str, text: str) -> None:
        if self.closing:
            return
        self.session.close(condition, text, cause="local")
        self.pump()
        self.close_transport()

    def close_gracefully(self, condition: str | None = None, text: str | None = None) -> None:
        """``</stream:stream>`` (after a stream error when ``condition``), then wait
        a bounded time for the peer's close."""
        if self.closing or self.transport is None:
            return
        self.session.close(condition, text, cause="local")
        self.pump()
        self.abort_after(self.relay.config.s2s.close_timeout)
