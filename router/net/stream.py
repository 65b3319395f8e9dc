"""One connection's I/O: a ``BufferedProtocol`` that feeds a tokenizer in place and
forwards stanzas as byte ranges of that tokenizer's buffer.

``XmlStream`` is the part every stream shares (S2S in both directions,
``router.net.s2s``, and XEP-0114 components, ``router.net.components``): zero-copy read
and forward, gathered writes, buffer lifetime, flow control, activity clocks and
closing. ``StreamHost`` is what streams need of the relay that owns them.
Its per-read methods (``buffer_updated``, ``forward``, ``write_chunks``,
``flush``) and the fields they use are compiled, in ``router._fastroute``'s
``StreamCore``, the base class of ``XmlStream``, with the stanza router.

Writes are gathered per event-loop iteration: ``write_chunks`` queues on the
stream and the relay hands every stream's queue to its transport once, after
the iteration's reads (``Router.flush_writes``). Stanzas that many sources
forward to one destination in one iteration (every S2S stream to a busy
component) then leave in one system call instead of one per source read.

Buffer lifetime: a stanza up to ``COPY_AT_MOST`` bytes is forwarded as a bytes
copy, a larger one as a ``memoryview`` of the source tokenizer's buffer. A view
is queued until the end of the iteration, and uvloop keeps it when it cannot
send everything at once; while any view refers to the buffer, the tokenizer
swaps in a fresh one instead of overwriting it (it reads the buffer's reference
count; DESIGN.md "Buffer lifetime").

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
from typing import Any, Protocol

from router import _fastroute
from router._fastparse import Element
from router.config import Config
from router.metrics import RelayMetrics
from router.wire.rescope import rescope
from router.routing.routes import RouteTable
from router.wire.namespaces import SERVER_NS

log = logging.getLogger("router.net.stream")
raw_log = logging.getLogger("router.raw")

WHITESPACE_KEEPALIVE = b" "
# Flow-control sets are empty on nearly every stream: they share this one and are
# replaced (not mutated) when a stream waits or is waited for.
NO_STREAMS: frozenset[XmlStream] = frozenset()


class StreamHost(Protocol):
    """What streams, and the parts that act on them, need of the relay that owns
    them (``router.server.Relay``): streams never import the relay itself."""

    loop: asyncio.AbstractEventLoop
    config: Config
    metrics: RelayMetrics
    table: RouteTable
    streams: set[XmlStream]
    resolver: Any  # router.net.resolver.Resolver
    delivery: Any  # router.routing.delivery.Delivery
    router: Any  # router._fastroute.Router: the compiled per-read path and its counters
    connector: Any  # router.net.connector.Connector: pairs, outbound streams
    verifier: Any  # router.net.verifier.DialbackVerifier
    admission: Any  # router.net.admission.Admission
    dane: Any  # router.net.danecheck.DaneChecker: RFC 7673 checks of peer certificates
    liveness: Any  # router.net.liveness.Liveness: XEP-0199 pings of quiet streams
    bus: Any  # router.cluster.bus.Bus, or None without [cluster] nats

    def spawn(self, coro) -> asyncio.Task: ...
    def stream_opened(self, stream: XmlStream) -> None: ...
    def stream_closed(self, stream: XmlStream, exc: Exception | None) -> None: ...
    def route(self, source: XmlStream, element: Element, from_domain: str, to_domain: str,
              view: memoryview, batches: dict) -> None: ...
    def tls_server_context(self, domain: str | None) -> Any: ...
    def tls_client_context(self, local: str | None, direct_tls: bool = False) -> Any: ...
    def outbound_session(self, local: str, remote: str, *, direct_tls: bool = False,
                         verify_only: bool = False) -> Any: ...
    def component_secret(self, domain: str) -> str | None: ...
    def component_online(self, stream: Any) -> bool: ...


class XmlStream(_fastroute.StreamCore, asyncio.BufferedProtocol):
    """What every relay stream shares: reading into a tokenizer, forwarding byte
    ranges to other streams, writing, flow control and closing. The per-read
    path and the fields it uses are the compiled base's (``StreamCore``).

    Subclasses provide ``tokenizer``, ``content_ns`` (the default namespace of
    the stream we write), ``out_lang`` (the ``xml:lang`` of our header) and
    ``take_events()`` (what the compiled router leaves to the stream).
    """

    content_ns = SERVER_NS
    out_lang: str | None = "en"
    kind = "stream"
    # flow control: a shared source (it speaks for many remote domains' correspondents)
    # never waits for a remote destination (a stream to one remote server)
    shared = False
    remote = False
    # one per connection: no instance dict; timers are the relay's shared sweep
    __slots__ = ("peer", "_waiting_sources", "_blockers", "closed", "_closed_waiter", "opened_at", "_close_timer",
                 "_rx_at", "full_since", "stall", "ctl_id")

    def __init__(self, relay: StreamHost) -> None:
        self.relay = relay
        self.router = relay.router
        self.link = 0 if self.remote else 1  # the compiled router's counters: S2S, component
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
        self.side_buffer: bytearray | None = None  # where reads go instead of the tokenizer, while set
        # stanzas received on and written to this stream (ctl, XEP-0198), counted per read and write call
        self.stanzas_in = self.stanzas_out = 0
        self.ctl_id = 0  # numbered by the relay when it opens: how `python -m router ctl` names it
        # XEP-0478: the largest stanza the peer accepts (its features' max-bytes; 0: it said
        # nothing): larger ones take the slow path and bounce with <policy-violation/>
        self.peer_max_bytes = 0
        self.acks: Any = None  # XEP-0198 on an S2S stream, once enabled (router.net.acks.StreamAcks)

    # ------------------------------------------------------------------ transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.use_transport(transport)  # type: ignore[arg-type]
        self.relay.stream_opened(self)

    def use_transport(self, transport: asyncio.Transport) -> None:
        """Write to ``transport`` from now on (a new one after STARTTLS), with the
        configured write-buffer marks that drive flow control. uvloop encrypts each chunk
        given to a TLS transport as TLS records of its own: there the chunks are joined."""
        self.transport = transport
        self.join_writes = transport.get_extra_info("sslcontext") is not None
        s2s = self.relay.config.s2s
        transport.set_write_buffer_limits(high=s2s.write_high_water, low=s2s.write_low_water)

    @property
    def domain_label(self) -> str:
        """The domain this stream serves, for log lines ("-" while unknown)."""
        return "-"

    @property
    def ip(self) -> str:
        """The remote address, as connection limits count it (not kept: idle memory)."""
        return self.peer.rpartition(":")[0] or self.peer

    def side_received(self, nbytes: int) -> None:
        """``nbytes`` arrived in ``side_buffer`` (subclasses that set one handle them)."""
        raise NotImplementedError

    def log_received(self, nbytes: int) -> None:
        """``log.raw_xml``: the bytes of the last read."""
        if self._rx_at is not None:
            buffer, start = self._rx_at
            self._rx_at = None
            raw_log.info("%s %s RECV %r", self.kind, self.peer, bytes(buffer[start : start + nbytes]))

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
    def too_large(self, size: int) -> bool:
        """Whether a stanza of ``size`` bytes is above the ``max-bytes`` our peer announced
        (XEP-0478 §3: it "SHOULD NOT be sent on that stream")."""
        return 0 < self.peer_max_bytes < size

    def may_wait_for(self, dest: XmlStream) -> bool:
        """Whether pausing our reads until ``dest`` drains hurts only the peers
        involved: not when we are shared and ``dest`` is one remote server."""
        return dest is self or not (self.shared and dest.remote)

    def backlog(self) -> int:
        """Bytes waiting to be written: this iteration's queue and the transport's buffer."""
        transport = self.transport
        return self._unsent_bytes + (transport.get_write_buffer_size() if transport is not None else 0)

    def queue_full(self, size: int) -> bool:
        """Whether ``size`` more bytes would take a paused stream's queue past its
        limit (then the caller bounces instead of queueing). Only called while
        ``paused``, so the hot path pays one attribute check."""
        backlog = self.backlog()
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
