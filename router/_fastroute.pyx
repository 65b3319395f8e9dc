# cython: language_level=3
"""The stanza router's hot path, compiled: one read of an authenticated stream,
from the tokenizer's events to per-destination batches of byte ranges, and the
gathered writes those batches become.

Per stanza the compiled path calls no Python: the pair check (the ``from`` and
``to`` domains, from ``router.wire.jid``'s JID cache, against the pairs the
session authorized), the route lookup (``RouteTable.local`` by ``to`` domain,
else ``RouteTable.remote`` by ``(from, to)``), and a view of the tokenizer's
buffer appended to the destination's batch. Python is called for the rest, in
stream order: the first event of a read that is not such a stanza, and every
event after it in that read, goes to the stream's own handlers (negotiation,
refusals with their stream errors, closes); a stanza whose route is not an open,
unpaused stream goes to ``Delivery.route`` (built-in services, queues while
connecting, bounces, full write queues). Authorization policy stays in Python:
it decides once per pair, at authentication, and the session's tuple of
authorized pairs is what the compiled check reads.

The stream objects stay Python (``router.net.stream.XmlStream``): the
functions after ``Router`` are its per-read methods (``get_buffer``,
``buffer_updated``, the S2S and component ``_received``, ``forward``,
``write_chunks``, ``flush``), so each has one implementation.
Counters are C integers that the metrics collector reads when scraped.

The cluster bus (``router.cluster``) is half compiled too. A stanza whose
destination another member holds, once ``Router.bus_routes`` knows that
destination, is framed straight from the read buffer into that member's
``Outbox`` (``router.cluster.frames``); Python sees only the batches. A batch
that arrives is read in place (``Router.take_batch``): per stanza two domains
are decoded and the bytes join their stream's writes, and only the stanzas for
the slow path become ``Carried`` tuples.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE,
                                PyByteArray_Resize)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp, memcpy

from router._fastparse cimport Element, Tokenizer

import logging

from router._fastparse import ParseError

log = logging.getLogger("router.net.stream")
raw_log = logging.getLogger("router.raw")

cdef str SERVER_NS = "jabber:server"
cdef str COMPONENT_NS = "jabber:component:accept"
cdef str SM_NS = "urn:xmpp:sm:3"  # XEP-0198
cdef Py_ssize_t MIN_STANZA_LIMIT = 10000  # RFC 6120 §13.12: no stanza size limit below this
# A write queue this large gains nothing from waiting for the end of the loop
# iteration: it goes out at once, so flow control sees it as before.
FLUSH_AT = 65536
cdef Py_ssize_t C_FLUSH_AT = FLUSH_AT
# A stanza up to this size is forwarded as a bytes copy, a larger one as a view of the
# read buffer: a memoryview is an object the cyclic GC tracks and that pins its 64 KiB
# buffer, which costs more than copying a small stanza (docs/benchmarks.md).
COPY_AT_MOST = 4096
cdef Py_ssize_t C_COPY_AT_MOST = COPY_AT_MOST
cdef tuple LINKS = ("s2s", "component")  # counter index -> metrics label
cdef tuple DESTINATIONS = ("remote", "component")


cdef inline bint is_stanza(str name) noexcept:
    return name == "message" or name == "presence" or name == "iq"


cdef inline int add_to_batch(dict batches, object target, object chunk) except -1:
    """Append ``chunk`` to ``target``'s list in ``batches`` (one list per destination)."""
    cdef PyObject* found = PyDict_GetItem(batches, target)
    if found is NULL:
        batches[target] = [chunk]
    else:
        (<list>found).append(chunk)
    return 0


cdef inline bint needs_copy(Element el, object dest, object src_lang) except -1:
    """RFC 6120 §4.7.4, §4.8.3, §4.8.5: a borrowed prefix, a missing xml:lang or its own
    content namespace needs a fixed-up copy for ``dest`` (a stream, or an output
    profile: its ``content_ns`` and ``out_lang``, looked up only when they matter);
    everything else is forwarded as a view."""
    return el.header_prefix or (el.own_xmlns and el.ns != dest.content_ns) \
        or (el.lang is None and src_lang is not None and src_lang != dest.out_lang)


cdef class Router:
    """The compiled half of one relay's routing (``router.routing.delivery`` is the other)."""

    def __init__(self, dict local, dict remote, slow_route, domain_of, dict recent, tuple closed_stages, schedule):
        self.schedule = schedule
        self.unflushed = []
        self.awaited_ids = set()
        self.local = local
        self.remote = remote
        self.slow_route = slow_route
        self.domain_of = domain_of
        self.recent = recent
        self.closed_stages = closed_stages
        self.local_domains = frozenset()
        self.bus_routes = None

    # ------------------------------------------------------------------ reads

    cdef int s2s_read(self, StreamCore stream, Py_ssize_t nbytes) except -1:
        """Scan ``nbytes`` new bytes of an S2S stream and route its stanzas."""
        pairs = stream.inbound_pairs
        if pairs is None:  # the session refuses or ignores input
            stream.session.buffer_updated(nbytes)
            stream.pump()
            return 0
        return self._read(stream, nbytes, pairs, None)

    cdef int component_read(self, StreamCore stream, Py_ssize_t nbytes) except -1:
        """Scan ``nbytes`` new bytes of a component stream and route its stanzas."""
        authenticated = stream.authenticated and not stream.closing
        return self._read(stream, nbytes, None, stream.domain if authenticated else None)

    cdef int _read(self, StreamCore stream, Py_ssize_t nbytes, object pairs, object domain) except -1:
        """The loop of one read: an S2S stream's stanzas may carry the ``pairs`` its
        session authorized; a component's (``pairs`` None) come from its ``domain``,
        which is None until its handshake succeeded (XEP-0114)."""
        cdef Tokenizer tok = stream.tokenizer
        error = None
        try:
            events = tok.buffer_updated(nbytes)
        except ParseError as exc:
            events, error = exc.events, exc
        cdef Py_ssize_t i = 0, n = len(events), routed = 0
        cdef Element el
        cdef dict batches = None
        cdef str content_ns = SERVER_NS if pairs is not None else COMPONENT_NS
        view = src_lang = None
        cdef const char* base = NULL
        while i < n:
            event = events[i]
            if type(event) is not Element:
                break
            el = <Element>event
            if el.ns != content_ns or el.prefix is not None or not is_stanza(el.name) \
                    or el.to is None or el.from_ is None:
                if el.ns == SM_NS and pairs is not None and (el.name == "r" or el.name == "a"):
                    # XEP-0198 <r/> or <a/> between stanzas: the session answers it, with the
                    # stanzas counted so far, and the rest of the read stays on this path
                    stream.stanzas_in += routed
                    routed = 0
                    stream.take_events([el], 0, None)
                    i += 1
                    if stream.closing:
                        break
                    continue
                break
            if self.awaited_ids and el.id in self.awaited_ids:
                break  # an answer the relay waits for (Delivery takes it)
            to_dom = self._domain(el.to)
            from_dom = self._domain(el.from_)
            if to_dom is None or from_dom is None:
                break  # the stream refuses it with the error it calls for
            if pairs is not None:
                # RFC 6120 §8.1.1.2, §8.1.2.2: 'to' ours, 'from' authenticated for that very pair
                if to_dom not in self.local_domains or (to_dom, from_dom) not in pairs:
                    break
            elif from_dom != domain:  # XEP-0114: a component sends from its own domain
                break
            if batches is None:
                batches = {}
                view = memoryview(tok.buf)  # also keeps tok.buf, and so ``base``, where it is
                base = PyByteArray_AS_STRING(tok.buf)
                header = tok.header_ev
                src_lang = header.lang if header is not None else None
            self._route(stream, el, from_dom, to_dom, view, base, batches, src_lang)
            routed += 1
            i += 1
        if routed:
            stream.stanzas_in += routed  # once per read: ctl's count and XEP-0198's h
        if batches:
            stream.forward_batches(batches)
        if i < n or error is not None:
            stream.take_events(events, i, error)
        return 0

    cdef object _domain(self, object jid):
        """The domain of ``jid``, or None when it is not a valid JID."""
        cdef PyObject* hit = PyDict_GetItem(self.recent, jid)
        if hit is not NULL:
            return <object>hit
        try:
            return self.domain_of(jid)
        except ValueError:
            return None

    cdef inline StreamCore _open_target(self, object from_dom, object to_dom, int* kind):
        """The open, unpaused stream a stanza from ``from_dom`` to ``to_dom`` goes to
        (``kind``: 1 a component, 0 a remote server's stream), or None when it is the
        slow path's: a built-in service, a closing or paused stream, or no route here
        (``kind`` 2)."""
        kind[0] = 1
        cdef PyObject* found = PyDict_GetItem(self.local, to_dom)
        if found is NULL:
            found = PyDict_GetItem(self.remote, (from_dom, to_dom))  # Pair(local, remote): a tuple finds it
            kind[0] = 0
            if found is NULL:
                kind[0] = 2
                return None
        if not isinstance(<object>found, StreamCore):  # a built-in service
            return None
        cdef StreamCore target = <StreamCore>found
        if target.closing or target.paused:
            return None
        return target

    cdef int _route(self, StreamCore source, Element el, object from_dom, object to_dom, object view,
                    const char* base, dict batches, object src_lang) except -1:
        cdef int kind
        cdef StreamCore target = self._open_target(from_dom, to_dom, &kind)
        if target is None:
            if kind == 2 and self.bus_routes is not None \
                    and self._to_bus(source, el, from_dom, to_dom, view, base, src_lang):
                return 0
            self.slow_route(source, el, from_dom, to_dom, view, batches)
            return 0
        if not target.fits(el.end - el.start):
            self.slow_route(source, el, from_dom, to_dom, view, batches)
            return 0
        if needs_copy(el, target, src_lang):
            chunk = source.chunk_for(target, el, view)
        elif el.end - el.start <= C_COPY_AT_MOST:
            chunk = PyBytes_FromStringAndSize(base + el.start, el.end - el.start)
        else:
            chunk = view[el.start:el.end]
        add_to_batch(batches, target, chunk)
        self.routed[kind] += 1
        return 0

    cdef bint _to_bus(self, StreamCore source, Element el, object from_dom, object to_dom, object view,
                      const char* base, object src_lang) except -1:
        """Frame the stanza into the Outbox of the member that holds its destination,
        when ``bus_routes`` knows one (the bus's Python side fills it at the first
        stanza for a destination); False leaves it to the slow path."""
        key = to_dom if to_dom in self.local_domains else (from_dom, to_dom)
        cdef PyObject* found = PyDict_GetItem(self.bus_routes, key)
        if found is NULL:
            return False
        profile, outboxes = <tuple>found
        cdef Py_ssize_t n = len(outboxes)
        cdef Outbox outbox = <Outbox>outboxes[pick_of(el.from_, n) if n > 1 else 0]
        if needs_copy(el, profile, src_lang):
            outbox.add_object(from_dom, to_dom, source.chunk_for(profile, el, view))
        else:
            outbox.add(from_dom, to_dom, base + el.start, el.end - el.start)
        return True

    # ------------------------------------------------------------------ writes

    cdef int flush_soon(self, StreamCore stream) except -1:
        """Write ``stream``'s queue after this event-loop iteration's reads (one
        callback per iteration for every stream that has something to send)."""
        if not self.unflushed:
            self.schedule(self.flush_writes)
        self.unflushed.append(stream)
        return 0

    def flush_writes(self):
        """The end of an event-loop iteration: every queued stream's one ``writelines``."""
        streams, self.unflushed = self.unflushed, []
        for stream in streams:
            try:
                (<StreamCore>stream).flush_queue()
            except Exception:  # one broken stream must not keep the others' writes queued
                log.exception("%s %s: writing failed", stream.kind, stream.peer)
                stream.close_transport()

    # ------------------------------------------------------------------ the cluster bus

    def take_batch(self, payload, slow_take):
        """A batch another member sent (``router.cluster.frames``), read in place:
        each stanza whose route is an open, unpaused stream here joins that stream's
        writes; for the others ``slow_take(from_domain, to_domain, data)``
        (``Delivery.take_from_bus``) answers. Returns (the sender, one answer per
        stanza: None when taken, else (condition, text)); ValueError when the frames
        do not add up. ``payload``: any buffer (the NATS reader's bytearray)."""
        cdef Py_buffer buf
        PyObject_GetBuffer(payload, &buf, PyBUF_SIMPLE)
        try:
            return self._take_batch(<const unsigned char*>buf.buf, buf.len, slow_take)
        finally:
            PyBuffer_Release(&buf)

    cdef tuple _take_batch(self, const unsigned char* b, Py_ssize_t end, slow_take):
        cdef Py_ssize_t pos, start, stop, data_start, data_stop
        cdef Py_ssize_t from_at, from_size, to_at, to_size
        cdef Py_ssize_t last_from_at = 0, last_from_size = -1, last_to_at = 0, last_to_size = -1
        cdef int kind
        cdef StreamCore target
        check_batch(b, end)
        pos = next_part(b, 0, end, &start, &stop)
        sender = PyUnicode_DecodeUTF8(<const char*>b + start, stop - start, NULL)
        cdef list answers = []
        cdef dict batches = {}
        while pos < end:
            pos = next_part(b, pos, end, &start, &stop)
            domains(b, start, stop, &from_at, &from_size, &to_at, &to_size)
            pos = next_part(b, pos, end, &data_start, &data_stop)
            data = PyBytes_FromStringAndSize(<const char*>b + data_start, data_stop - data_start)
            try:
                # a batch holds runs of stanzas between the same domains: decoded once a run
                if not same(b, from_at, from_size, last_from_at, last_from_size):
                    from_dom = PyUnicode_DecodeUTF8(<const char*>b + from_at, from_size, NULL)
                    last_from_at, last_from_size = from_at, from_size
                if not same(b, to_at, to_size, last_to_at, last_to_size):
                    to_dom = PyUnicode_DecodeUTF8(<const char*>b + to_at, to_size, NULL)
                    last_to_at, last_to_size = to_at, to_size
            except UnicodeDecodeError:
                last_from_size = last_to_size = -1
                answers.append(("bad-request", "a cluster bus frame whose domains are not UTF-8"))
                continue
            target = self._open_target(from_dom, to_dom, &kind)
            if target is None or not target.fits(data_stop - data_start):
                answers.append(slow_take(from_dom, to_dom, data))
                continue
            add_to_batch(batches, target, data)
            self.routed[kind] += 1
            answers.append(None)
        for dest, chunks in batches.items():
            (<StreamCore>dest).queue_stanzas(chunks)
        return sender, answers

    # ------------------------------------------------------------------ counters

    def stanzas_routed(self):
        """Stanzas forwarded on the compiled path, by destination kind (metrics labels)."""
        return {(DESTINATIONS[k],): self.routed[k] for k in range(2)}

    def bytes_received(self):
        return {(LINKS[k],): self.received[k] for k in range(2)}

    def bytes_sent(self):
        return {(LINKS[k],): self.sent[k] for k in range(2)}


# ---------------------------------------------------------------------- streams

cdef class StreamCore:
    """The compiled base of every relay stream (``router.net.stream.XmlStream``): the
    fields its per-read path uses, and that path: ``get_buffer`` and ``buffer_updated``
    (asyncio.BufferedProtocol), ``forward``, ``write_chunks``, ``write`` and ``flush``."""

    def get_buffer(self, Py_ssize_t sizehint):
        """Where the next read goes (asyncio.BufferedProtocol): the tokenizer's free
        space, or the stream's ``side_buffer`` while it has one."""
        side = self.side_buffer
        if side is not None:
            return memoryview(side)
        view = self.tokenizer.get_buffer(sizehint)
        if self.raw_xml:
            self._rx_at = (view.obj, len(view.obj) - len(view))  # views end where their buffer ends
        return view

    def session_changed(self):
        """An S2S session's ``watch``: its stage or inbound pairs changed. The per-read
        path reads them here, not from the session (a cold object at every read)."""
        session = self.session
        self.inbound_pairs = None if session.stage in self.router.closed_stages else session.inbound_pairs

    def buffer_updated(self, Py_ssize_t nbytes):
        """``nbytes`` arrived in the last ``get_buffer()`` view (asyncio.BufferedProtocol)."""
        self.last_rx = self.loop.time()
        if self.raw_xml:
            self.log_received(nbytes)
        self.router.received[self.link] += nbytes
        try:
            if self.side_buffer is not None:
                self.side_received(nbytes)
            else:
                self.read(nbytes)
        except Exception:  # a bug must not leave the stream half-alive
            log.exception("%s %s: internal error", self.kind, self.peer)
            self.fail("internal-server-error", "internal error while processing the stream")

    cdef int read(self, Py_ssize_t nbytes) except -1:
        """A read: stanzas routed here, the rest to the stream's ``take_events``; then
        the buffer goes back (the read's ranges are forwarded or copied: an idle stream
        keeps no buffer)."""
        if self.link == 0:
            self.router.s2s_read(self, nbytes)
        else:
            self.router.component_read(self, nbytes)
        self.tokenizer.release()
        return 0

    def forward(self, dict batches):
        """Queue each destination's gathered stanzas, and stop reading from a paused
        destination. (The views among them keep our buffer from being written again.)"""
        self.forward_batches(batches)

    cdef int forward_batches(self, dict batches) except -1:
        cdef StreamCore dest
        for obj, chunks in batches.items():
            dest = <StreamCore?>obj
            if dest.closing:  # closed by an event of this very read; routing checked before
                log.info("%s %s closed while %d stanza(s) were on their way to it", dest.kind, dest.peer,
                         len(chunks))
                continue
            dest.queue_stanzas(chunks)
            if dest.paused and self.may_wait_for(dest):
                self.block_on(dest)
        return 0

    cdef inline bint fits(self, Py_ssize_t size):
        """Whether a stanza of ``size`` bytes is within the ``max-bytes`` our peer
        announced (XEP-0478; 0: none announced). RFC 6120 §13.12 lets no server accept
        less than 10,000 bytes: smaller stanzas, nearly all, fit without a look."""
        return size <= MIN_STANZA_LIMIT or self.peer_max_bytes == 0 or size <= self.peer_max_bytes

    def write_chunks(self, list chunks):
        """Queue stanzas: ``chunks``, one stanza each (bytes or views of a source's buffer;
        the list is taken, not copied), counted in ``stanzas_out`` (once per call) and kept
        by XEP-0198 until the peer acknowledges them (``acks``, while enabled)."""
        self.queue_stanzas(chunks)

    cdef int queue_stanzas(self, list chunks) except -1:
        if self.transport is None or self.closing:
            return 0
        self.queue(chunks)
        self.stanzas_out += len(chunks)
        if self.acks is not None:
            self.acks.keep(chunks)
        return 0

    def write(self, data):
        """Queue bytes that are not stanzas (negotiation, keepalives, XEP-0198 acks): not counted."""
        if data and self.transport is not None and not self.closing:
            self.queue([data])

    cdef int queue(self, list chunks) except -1:
        """Write ``chunks`` at the end of this event-loop iteration, after everything queued before."""
        cdef Py_ssize_t size = 0
        for chunk in chunks:
            size += len(chunk)
        if self._unsent is None:
            self._unsent = chunks
            self._unsent_bytes = size
            self.router.flush_soon(self)
        else:
            (<list>self._unsent).extend(chunks)
            self._unsent_bytes += size
        if self._unsent_bytes >= C_FLUSH_AT:
            self.flush_queue()
        return 0

    def flush(self):
        """Hand the queued chunks to the transport in one call."""
        self.flush_queue()

    cdef int flush_queue(self) except -1:
        chunks, size = self._unsent, self._unsent_bytes
        self._unsent, self._unsent_bytes = None, 0
        transport = self.transport
        if not chunks or transport is None:
            return 0
        if transport.is_closing():  # aborted after the chunks were queued: uvloop would raise
            log.info("%s %s closed while %d chunk(s) were queued for it", self.kind, self.peer, len(chunks))
            return 0
        if self.join_writes and len(chunks) > 1:
            transport.write(b"".join(chunks))
        else:
            transport.writelines(chunks)
        self.handed += size
        self.last_tx = self.loop.time()
        self.router.sent[self.link] += size
        if self.raw_xml:
            for chunk in chunks:
                raw_log.info("%s %s SEND %r", self.kind, self.peer, bytes(chunk))
        return 0


cdef class SentKeep:
    """The per-write half of XEP-0198 on a stream, compiled: every stanza written kept
    until the peer acknowledges it, and an ``<r/>`` asked for when enough wait. The
    rest (acks received, re-sending, the sweep's timers) is
    ``router.net.acks.StreamAcks``, which also provides the two rare calls made from
    here: ``request(now)`` and ``_overflow(count, limit)``."""

    def __init__(self, stream, Py_ssize_t ack_every, Py_ssize_t max_unacked):
        self.stream = stream
        self.kept = []
        self.ack_every = ack_every
        self.max_unacked = max_unacked

    cdef int keep(self, list chunks) except -1:
        """``chunks`` (one stanza each) were queued: keep them, once counting started.
        A bytes chunk is kept as it is (the router's copy of a small stanza: no copy
        more); a view is copied, as it would pin its source's whole read buffer."""
        if not self.keeping:
            return 0
        cdef list kept = self.kept
        if not kept:
            self.waiting_since = self.stream.loop.time()
        for chunk in chunks:
            kept.append(chunk if type(chunk) is bytes else bytes(chunk))
        cdef Py_ssize_t pending = len(kept)
        if pending >= self.ack_every and self.requested_at is None:
            self.request(self.stream.loop.time())
        if pending > self.max_unacked and not self.overflow_noted:
            self.overflow_noted = True  # closed after this read: not from inside another stream's write
            self.stream.loop.call_soon(self._overflow, pending, self.max_unacked)
        return 0

    @property
    def pending(self):
        """Stanzas sent and not acknowledged."""
        return len(self.kept)

    def drop(self, Py_ssize_t count):
        """The peer acknowledged the oldest ``count`` stanzas kept (at most ``pending``): let them go."""
        del self.kept[:count]

    def take_all(self):
        """What was never acknowledged, oldest first, and nothing kept any more."""
        kept, self.kept = self.kept, []
        return kept


# ---------------------------------------------------------------------- cluster bus frames

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    static inline void fr_put_u32(char* p, uint32_t v) {
        p[0] = (char)(v >> 24); p[1] = (char)(v >> 16); p[2] = (char)(v >> 8); p[3] = (char)v;
    }
    static inline Py_ssize_t fr_get_u32(const unsigned char* p) {
        return ((Py_ssize_t)p[0] << 24) | ((Py_ssize_t)p[1] << 16) | ((Py_ssize_t)p[2] << 8) | (Py_ssize_t)p[3];
    }
    static inline uint32_t fr_fnv1a(const char* p, Py_ssize_t n) {
        uint32_t h = 2166136261u;
        while (n-- > 0) { h ^= (unsigned char)*p++; h *= 16777619u; }
        return h;
    }
    """
    void fr_put_u32(char* p, unsigned int v) noexcept
    unsigned int fr_fnv1a(const char* p, Py_ssize_t n) noexcept
    Py_ssize_t fr_get_u32(const unsigned char* p) noexcept


cdef inline Py_ssize_t pick_of(str sender, Py_ssize_t n) except -1:
    cdef Py_ssize_t size
    cdef const char* p = PyUnicode_AsUTF8AndSize(sender, &size)
    return <Py_ssize_t>(fr_fnv1a(p, size) % <unsigned int>n)


def pick_index(str sender, Py_ssize_t n):
    """Which of ``n`` sorted candidates carries ``sender``'s stanzas: the same one
    while ``n`` is, which keeps one sender's stanzas in order (FNV-1a of its JID)."""
    return pick_of(sender, n) if n > 1 else 0


cdef class Outbox:
    """One cluster member's stanzas of this event-loop iteration, framed as they
    come (``router.cluster.frames``) into batches of at most ``max_bytes`` of stanza
    bytes, ready for NATS as they are. ``due(outbox)`` is called at its first
    stanza after a ``take()``, so the bus sends it at the end of the iteration."""

    def __init__(self, str sender, str member, due, Py_ssize_t max_bytes):
        self.member = member
        self.due = due
        self.max_bytes = max_bytes
        name = sender.encode("utf-8")
        self.head = PyBytes_FromStringAndSize(NULL, 4 + len(name))
        fr_put_u32(PyBytes_AS_STRING(self.head), <unsigned int>len(name))
        memcpy(PyBytes_AS_STRING(self.head) + 4, PyBytes_AS_STRING(name), len(name))
        self.sealed = []
        self.count = 0
        self.used = 0
        self._restart()

    cdef int _restart(self) except -1:
        """A new batch, with room for as many bytes as the last one had: a batch
        grows without being copied again and again."""
        cdef Py_ssize_t head = PyBytes_GET_SIZE(self.head)
        self.frames = PyByteArray_FromStringAndSize(NULL, max(self.used, head))
        memcpy(PyByteArray_AS_STRING(self.frames), PyBytes_AS_STRING(self.head), head)
        self.used = head
        self.current = 0
        self.current_bytes = 0
        return 0

    cdef bytearray _seal(self):
        """The batch being filled, cut to its bytes, and a new one started."""
        frames = self.frames
        PyByteArray_Resize(frames, self.used)
        self._restart()
        return frames

    cdef int add_object(self, str from_dom, str to_dom, object data) except -1:
        """``add`` with ``data`` any buffer (bytes, a view)."""
        cdef Py_buffer buf
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            self.add(from_dom, to_dom, <const char*>buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)
        return 0

    cdef int add(self, str from_dom, str to_dom, const char* data, Py_ssize_t size) except -1:
        """Frame one stanza: its domains, joined by NUL, and its ``size`` bytes at ``data``."""
        cdef Py_ssize_t from_size, to_size, at
        cdef const char* from_ = PyUnicode_AsUTF8AndSize(from_dom, &from_size)
        cdef const char* to = PyUnicode_AsUTF8AndSize(to_dom, &to_size)
        cdef Py_ssize_t header = from_size + 1 + to_size
        if self.current and self.current_bytes + size > self.max_bytes:
            count = self.current
            self.sealed.append((self._seal(), count))
        at = self.used
        self.used += 8 + header + size
        if self.used > PyByteArray_GET_SIZE(self.frames):
            PyByteArray_Resize(self.frames, max(self.used, 2 * PyByteArray_GET_SIZE(self.frames)))
        cdef char* o = PyByteArray_AS_STRING(self.frames) + at
        fr_put_u32(o, <unsigned int>header)
        memcpy(o + 4, from_, from_size)
        o[4 + from_size] = 0
        memcpy(o + 5 + from_size, to, to_size)
        o += 4 + header
        fr_put_u32(o, <unsigned int>size)
        memcpy(o + 4, data, size)
        self.current_bytes += size
        self.current += 1
        self.count += 1
        if self.count == 1:
            self.due(self)
        return 0

    def put(self, item):
        """Frame a ``Carried`` (a stanza the slow path or the relay itself sends)."""
        self.add_object(item.from_domain, item.to_domain, item.data)

    def take(self):
        """The batches gathered since the last call, in order: [(payload, stanzas)]."""
        batches, self.sealed = self.sealed, []
        if self.current:
            count = self.current
            batches.append((self._seal(), count))
        self.count = 0
        return batches


cdef Py_ssize_t next_part(const unsigned char* b, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* start,
                          Py_ssize_t* stop) except -1:
    """The part at ``pos`` (its 4-byte length, then its bytes): its range, and where the next one starts."""
    if end - pos < 4:
        raise ValueError("truncated length")
    cdef Py_ssize_t size = fr_get_u32(b + pos)
    if size > end - pos - 4:
        raise ValueError("truncated part")
    start[0], stop[0] = pos + 4, pos + 4 + size
    return stop[0]


cdef int domains(const unsigned char* b, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t* from_at,
                 Py_ssize_t* from_size, Py_ssize_t* to_at, Py_ssize_t* to_size) except -1:
    """The ranges of a stanza header's two domains (from, NUL, to); both must be there."""
    cdef const unsigned char* hit = <const unsigned char*>memchr(b + start, 0, stop - start)
    if hit == NULL or hit == b + start or hit == b + stop - 1 \
            or memchr(hit + 1, 0, (b + stop) - (hit + 1)) != NULL:
        raise ValueError("a stanza header is its from and to domains, joined by NUL")
    from_at[0], from_size[0] = start, hit - (b + start)
    to_at[0], to_size[0] = start + from_size[0] + 1, stop - start - from_size[0] - 1
    return 0


cdef inline bint same(const unsigned char* b, Py_ssize_t start, Py_ssize_t size, Py_ssize_t other,
                      Py_ssize_t other_size) noexcept:
    """Whether two fields of one batch hold the same bytes."""
    return size == other_size and memcmp(b + start, b + other, size) == 0


cdef int check_batch(const unsigned char* b, Py_ssize_t end) except -1:
    """Every part of a batch in bounds, a header and bytes per stanza, every header whole:
    checked before any stanza of it is delivered."""
    cdef Py_ssize_t pos, start, stop, parts = 1, from_at, from_size, to_at, to_size
    pos = next_part(b, 0, end, &start, &stop)
    while pos < end:
        pos = next_part(b, pos, end, &start, &stop)
        if parts % 2:
            domains(b, start, stop, &from_at, &from_size, &to_at, &to_size)
        parts += 1
    if parts % 2 != 1:
        raise ValueError("a batch is its sender, then a header and the bytes of each stanza")
    return 0


def decode_batch(payload):
    """``router.cluster.frames.decode_batch``'s frames: (sender, [(from domain, to
    domain, bytes), ...]); ValueError when they do not add up."""
    payload = bytes(payload)
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(payload), pos, start, stop, from_at, from_size, to_at, to_size
    check_batch(b, end)
    pos = next_part(b, 0, end, &start, &stop)
    sender = PyUnicode_DecodeUTF8(<const char*>b + start, stop - start, NULL)
    cdef list records = []
    while pos < end:
        pos = next_part(b, pos, end, &start, &stop)
        domains(b, start, stop, &from_at, &from_size, &to_at, &to_size)
        pos = next_part(b, pos, end, &start, &stop)
        records.append((PyUnicode_DecodeUTF8(<const char*>b + from_at, from_size, NULL),
                        PyUnicode_DecodeUTF8(<const char*>b + to_at, to_size, NULL),
                        PyBytes_FromStringAndSize(<const char*>b + start, stop - start)))
    return sender, records
