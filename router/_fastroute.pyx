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
Counters are C integers that the metrics collector reads when scraped. The
cluster bus's batches (``router.cluster.frames``) are framed and parsed here
too: a stanza that crosses the bus is framed once and parsed once.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy

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
cdef tuple LINKS = ("s2s", "component")  # counter index -> metrics label
cdef bytes ABSENT = b"\x01"  # a bus frame's absent attribute (XML text never holds \x00 or \x01)
cdef int CARRIED_FIELDS = 7  # a bus frame's header fields before the stanza's bytes
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


cdef inline int link_of(object stream) except -1:
    """Counter index of a stream: 0 for S2S, 1 for a component."""
    return 0 if stream.remote else 1


cdef class Router:
    """The compiled half of one relay's routing (``router.routing.delivery`` is the other)."""

    def __init__(self, dict local, dict remote, slow_route, domain_of, dict recent, service_type,
                 tuple closed_stages, schedule):
        self.schedule = schedule
        self.unflushed = []
        self.awaited_ids = set()
        self.local = local
        self.remote = remote
        self.slow_route = slow_route
        self.domain_of = domain_of
        self.recent = recent
        self.service_type = service_type
        self.closed_stages = closed_stages
        self.local_domains = frozenset()

    # ------------------------------------------------------------------ reads

    cdef int s2s_read(self, object stream, Py_ssize_t nbytes) except -1:
        """Scan ``nbytes`` new bytes of an S2S stream and route its stanzas."""
        session = stream.session
        if session.stage in self.closed_stages:  # the session refuses or ignores input
            session.buffer_updated(nbytes)
            stream.pump()
            return 0
        return self._read(stream, nbytes, session.inbound_pairs, None)

    cdef int component_read(self, object stream, Py_ssize_t nbytes) except -1:
        """Scan ``nbytes`` new bytes of a component stream and route its stanzas."""
        authenticated = stream.authenticated and not stream.closing
        return self._read(stream, nbytes, None, stream.domain if authenticated else None)

    cdef int _read(self, object stream, Py_ssize_t nbytes, object pairs, object domain) except -1:
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
                view = memoryview(tok.buf)
                header = tok.header_ev
                src_lang = header.lang if header is not None else None
            self._route(stream, el, from_dom, to_dom, view, batches, src_lang)
            routed += 1
            i += 1
        if routed:
            stream.stanzas_in += routed  # once per read: ctl's count and XEP-0198's h
        if batches:
            stream.forward(batches)
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

    cdef inline object _open_target(self, object from_dom, object to_dom, int* kind):
        """The open, unpaused stream a stanza from ``from_dom`` to ``to_dom`` goes to
        (``kind``: 1 a component, 0 a remote server's stream), or None when it is the
        slow path's: a built-in service, no route yet, a closing or paused stream."""
        kind[0] = 1
        cdef PyObject* found = PyDict_GetItem(self.local, to_dom)
        if found is NULL:
            found = PyDict_GetItem(self.remote, (from_dom, to_dom))  # Pair(local, remote): a tuple finds it
            kind[0] = 0
            if found is NULL:
                return None
        target = <object>found
        if type(target) is self.service_type or target.closing or target.paused:
            return None
        return target

    cdef inline bint _fits(self, object target, Py_ssize_t size):
        """Whether a stanza of ``size`` bytes is within the ``max-bytes`` the
        destination's peer announced (XEP-0478; 0: none announced). RFC 6120 §13.12
        lets no server accept less than 10,000 bytes: smaller stanzas, nearly all,
        fit without a look at the destination."""
        if size <= MIN_STANZA_LIMIT:
            return True
        cdef Py_ssize_t limit = target.peer_max_bytes
        return limit == 0 or size <= limit

    cdef int _route(self, object source, Element el, object from_dom, object to_dom, object view,
                    dict batches, object src_lang) except -1:
        cdef int kind
        target = self._open_target(from_dom, to_dom, &kind)
        if target is None or not self._fits(target, el.end - el.start):
            self.slow_route(source, el, from_dom, to_dom, view, batches)
            return 0
        # RFC 6120 §4.7.4, §4.8.3, §4.8.5: a borrowed prefix, a missing xml:lang or its own
        # content namespace needs a fixed-up copy; everything else is forwarded as a view
        if el.header_prefix or (el.own_xmlns and el.ns != target.content_ns) \
                or (el.lang is None and src_lang is not None and src_lang != target.out_lang):
            chunk = source.chunk_for(target, el, view)
        else:
            chunk = view[el.start:el.end]
        add_to_batch(batches, target, chunk)
        self.routed[kind] += 1
        return 0

    # ------------------------------------------------------------------ writes

    cdef int flush_soon(self, object stream) except -1:
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
                flush(stream)
            except Exception:  # one broken stream must not keep the others' writes queued
                log.exception("%s %s: writing failed", stream.kind, stream.peer)
                stream.close_transport()

    # ------------------------------------------------------------------ the cluster bus

    def take_carried(self, list items, slow_take):
        """Stanzas another member sent (``router.cluster.frames.Carried``): each one
        whose route is an open, unpaused stream here joins that stream's writes;
        ``slow_take(item)`` (``Delivery.take_from_bus``) answers the others. Returns
        one answer per item: None (taken) or (condition, text)."""
        cdef list answers = []
        cdef dict batches = {}
        cdef int kind
        cdef tuple item
        for obj in items:
            item = <tuple>obj
            target = self._open_target(item[5], item[6], &kind)
            if target is None or not self._fits(target, len(item[7])):
                answers.append(slow_take(item))
                continue
            add_to_batch(batches, target, item[7])
            self.routed[kind] += 1
            answers.append(None)
        for target, chunks in batches.items():
            write_chunks(target, chunks)
        return answers

    # ------------------------------------------------------------------ counters

    def stanzas_routed(self):
        """Stanzas forwarded on the compiled path, by destination kind (metrics labels)."""
        return {(DESTINATIONS[k],): self.routed[k] for k in range(2)}

    def bytes_received(self):
        return {(LINKS[k],): self.received[k] for k in range(2)}

    def bytes_sent(self):
        return {(LINKS[k],): self.sent[k] for k in range(2)}


# ---------------------------------------------------------------------- XmlStream methods

def get_buffer(self, Py_ssize_t sizehint):
    """Where the next read goes (asyncio.BufferedProtocol): the tokenizer's free
    space, or the stream's ``side_buffer`` while it has one."""
    side = self.side_buffer
    if side is not None:
        return memoryview(side)
    view = (<Tokenizer>self.tokenizer).get_buffer(sizehint)
    if self.raw_xml:
        self._rx_at = (view.obj, len(view.obj) - len(view))  # views end where their buffer ends
    return view


def buffer_updated(self, Py_ssize_t nbytes):
    """``nbytes`` arrived in the last ``get_buffer()`` view (asyncio.BufferedProtocol)."""
    self.last_rx = self.loop.time()
    if self.raw_xml:
        self.log_received(nbytes)
    (<Router>self.relay.router).received[link_of(self)] += nbytes
    try:
        if self.side_buffer is not None:
            self.side_received(nbytes)
        else:
            self._received(nbytes)
    except Exception:  # a bug must not leave the stream half-alive
        log.exception("%s %s: internal error", self.kind, self.peer)
        self.fail("internal-server-error", "internal error while processing the stream")


def s2s_received(self, Py_ssize_t nbytes):
    """An S2S stream's read: stanzas routed here, the rest to its ``take_events``."""
    (<Router>self.relay.router).s2s_read(self, nbytes)
    (<Tokenizer>self.tokenizer).release()  # the read's ranges are forwarded or copied: an idle stream keeps no buffer


def component_received(self, Py_ssize_t nbytes):
    """A component stream's read: stanzas routed here, the rest to its ``take_events``."""
    (<Router>self.relay.router).component_read(self, nbytes)
    (<Tokenizer>self.tokenizer).release()


def forward(self, dict batches):
    """Queue each destination's gathered ranges; pin our buffer, whose views they
    are, and stop reading from a paused destination."""
    for dest, chunks in batches.items():
        if dest.closing:  # closed by an event of this very read; routing checked before
            log.info("%s %s closed while %d stanza(s) were on their way to it", dest.kind, dest.peer, len(chunks))
            continue
        write_chunks(dest, chunks)
        if dest.paused and self.may_wait_for(dest):
            self.block_on(dest)
    if batches:
        self.tokenizer.pin()


def write_chunks(self, list chunks):
    """Queue stanzas: ``chunks``, one stanza each (bytes or views of a source's buffer;
    the list is taken, not copied), counted in ``stanzas_out`` (once per call) and kept
    by XEP-0198 until the peer acknowledges them (``acks``, while enabled)."""
    if self.transport is None or self.closing:
        return
    queue(self, chunks)
    self.stanzas_out += len(chunks)
    acks = self.acks
    if acks is not None:
        acks.sent(chunks)


def write(self, data):
    """Queue bytes that are not stanzas (negotiation, keepalives, XEP-0198 acks): not counted."""
    if data and self.transport is not None and not self.closing:
        queue(self, [data])


cdef int queue(object self, list chunks) except -1:
    """Write ``chunks`` at the end of this event-loop iteration, after everything queued before."""
    cdef Py_ssize_t size = 0
    for chunk in chunks:
        size += len(chunk)
    unsent = self._unsent
    if unsent is None:
        self._unsent = chunks
        self._unsent_bytes = size
        (<Router>self.relay.router).flush_soon(self)
    else:
        (<list>unsent).extend(chunks)
        size += <Py_ssize_t>self._unsent_bytes
        self._unsent_bytes = size
    if size >= C_FLUSH_AT:
        flush(self)
    return 0


def flush(self):
    """Hand the queued chunks to the transport in one call."""
    chunks, size = self._unsent, self._unsent_bytes
    self._unsent, self._unsent_bytes = None, 0
    transport = self.transport
    if not chunks or transport is None:
        return
    if transport.is_closing():  # aborted after the chunks were queued: uvloop would raise
        log.info("%s %s closed while %d chunk(s) were queued for it", self.kind, self.peer, len(chunks))
        return
    transport.writelines(chunks)
    self.handed += size
    self.last_tx = self.loop.time()
    (<Router>self.relay.router).sent[link_of(self)] += <Py_ssize_t>size
    if self.raw_xml:
        for chunk in chunks:
            raw_log.info("%s %s SEND %r", self.kind, self.peer, bytes(chunk))


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
    """
    void fr_put_u32(char* p, unsigned int v) noexcept
    Py_ssize_t fr_get_u32(const unsigned char* p) noexcept


cdef inline bytes utf8_of(object value):
    return ABSENT if value is None else (<str>value).encode("utf-8")


def encode_batch(str sender, list items):
    """``router.cluster.frames.encode_batch``: the sender's name, then for each
    item its seven header fields joined by NUL and its bytes, every part after
    its 4-byte big-endian length."""
    cdef list parts = [sender.encode("utf-8")]
    cdef Py_ssize_t total = 0, size, k
    cdef tuple item
    for obj in items:
        item = <tuple>obj
        parts.append(b"\0".join([utf8_of(item[k]) for k in range(CARRIED_FIELDS)]))
        parts.append(<bytes>item[CARRIED_FIELDS])
    for part in parts:
        total += 4 + PyBytes_GET_SIZE(part)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* o = PyBytes_AS_STRING(out)
    for part in parts:
        size = PyBytes_GET_SIZE(part)
        fr_put_u32(o, <unsigned int>size)
        memcpy(o + 4, PyBytes_AS_STRING(part), size)
        o += 4 + size
    return out


def decode_batch(bytes payload, make):
    """``router.cluster.frames.decode_batch``: (sender, [make(fields..., data), ...])
    with ``make`` a tuple subclass (``Carried``); ValueError when the frames do not
    add up."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(payload), pos = 0, size, start, stop
    cdef const unsigned char* hit
    cdef list parts = []
    while pos < end:
        if end - pos < 4:
            raise ValueError("truncated length")
        size = fr_get_u32(b + pos)
        if size > end - pos - 4:
            raise ValueError("truncated part")
        parts.append((pos + 4, pos + 4 + size))
        pos += 4 + size
    if not parts or len(parts) % 2 != 1:
        raise ValueError("a batch is its sender, then a header and the bytes of each stanza")
    start, stop = parts[0]
    sender = PyUnicode_DecodeUTF8(<const char*>b + start, stop - start, NULL)
    cdef list items = []
    cdef list fields
    cdef Py_ssize_t i
    for i in range(1, len(parts), 2):
        start, stop = parts[i]
        fields = []
        while True:
            hit = <const unsigned char*>memchr(b + start, 0, stop - start)
            size = (hit - (b + start)) if hit != NULL else stop - start
            if size == 1 and b[start] == 1:
                fields.append(None)
            else:
                fields.append(PyUnicode_DecodeUTF8(<const char*>b + start, size, NULL))
            if hit == NULL:
                break
            start += size + 1
        if len(fields) != CARRIED_FIELDS or fields[5] is None or fields[6] is None:
            raise ValueError("a stanza header has seven fields, two domains among them")
        start, stop = parts[i + 1]
        fields.append(payload[start:stop])
        items.append(tuple.__new__(make, fields))  # a NamedTuple without its Python-level __new__
    return sender, items
