# Declarations of the compiled stanza router that _fastroute.pyx implements (the .pxd
# declares, the .pyx implements). It cimports the tokenizer to read event fields and the
# receive buffer without going through Python.

cimport cython

from router._fastparse cimport Element, Tokenizer

cdef class StreamCore
cdef class Router


cdef class SentKeep:
    # XEP-0198: what one stream sent and its peer has not acknowledged yet
    # (router.net.acks.StreamAcks is the Python class on top)
    cdef public object stream
    cdef public list kept  # the stanzas sent and not acknowledged, oldest first: bytes, one each
    cdef public Py_ssize_t ack_every  # s2s.sm_ack_every: ask after this many
    cdef public Py_ssize_t max_unacked  # s2s.sm_max_unacked: close the stream past this many
    cdef public bint keeping  # what we send is counted and kept from now on
    cdef public bint overflow_noted
    cdef public object requested_at  # loop.time() of our <r/> not answered yet, or None
    cdef public object waiting_since  # loop.time() when the oldest unacknowledged stanza was sent, or None

    cdef int keep(self, list chunks) except -1


@cython.final
cdef class Outbox:
    cdef readonly str member  # the cluster member these stanzas go to
    cdef readonly Py_ssize_t count  # stanzas gathered since the last take()
    cdef object due  # called with the outbox at its first stanza after a take()
    cdef Py_ssize_t max_bytes  # stanza bytes per batch at most (MAX_BATCH_BYTES)
    cdef bytes head  # the sender's name, framed: every batch starts with it
    cdef bytearray frames  # the batch being filled: its first ``used`` bytes
    cdef Py_ssize_t used
    cdef Py_ssize_t current  # its stanzas
    cdef Py_ssize_t current_bytes  # and their bytes
    cdef list sealed  # full batches: (frames, stanzas)

    cdef int _restart(self) except -1
    cdef bytearray _seal(self)
    cdef int add_object(self, str from_dom, str to_dom, object data) except -1
    cdef int add(self, str from_dom, str to_dom, const char* data, Py_ssize_t size) except -1


@cython.final  # direct calls to its cdef methods, no vtable
cdef class Router:
    cdef dict local  # RouteTable.local: domain -> component stream or built-in service
    cdef dict remote  # RouteTable.remote: Pair(local, remote) -> S2S stream
    cdef dict recent  # router.wire.jid's JID -> domain cache
    cdef object domain_of  # router.wire.jid.domain_of, for JIDs the cache does not hold
    cdef object slow_route  # Delivery.route: services, queues, bounces, paused or closing targets
    cdef tuple closed_stages  # session stages in which input goes to the session alone
    cdef public frozenset local_domains
    cdef public object schedule  # loop.call_soon: runs flush_writes at the end of the iteration
    cdef list unflushed  # streams with writes queued in this event-loop iteration
    # ids of stanzas the relay itself waits for an answer to (XEP-0199 pings): a stanza
    # with one of them leaves the compiled path for the session's, which hands it to Delivery
    cdef public set awaited_ids
    # the cluster bus's routes (router.cluster.bus; None without a connected bus): a
    # component's domain, or a pair (from, to) held by other members, -> (the output
    # profile its bytes are fixed up for, the candidate members' Outboxes)
    cdef public dict bus_routes

    # counters, read at scrape time (index 0: S2S links, 1: component links)
    cdef unsigned long long routed[2]  # stanzas forwarded on the compiled path, by destination kind
    cdef unsigned long long received[2]  # bytes read
    cdef unsigned long long sent[2]  # bytes handed to transports

    cdef int s2s_read(self, StreamCore stream, Py_ssize_t nbytes) except -1
    cdef int component_read(self, StreamCore stream, Py_ssize_t nbytes) except -1
    cdef int _read(self, StreamCore stream, Py_ssize_t nbytes, object pairs, object domain) except -1
    cdef int flush_soon(self, StreamCore stream) except -1
    cdef object _domain(self, object jid)
    cdef inline StreamCore _open_target(self, object from_dom, object to_dom, int* kind)
    cdef bint _to_bus(self, StreamCore source, Element el, object from_dom, object to_dom, object view,
                      const char* base, object src_lang) except -1
    cdef int _route(self, StreamCore source, Element el, object from_dom, object to_dom, object view,
                    const char* base, dict batches, object src_lang) except -1
    cdef tuple _take_batch(self, const unsigned char* b, Py_ssize_t end, object slow_take)


cdef class StreamCore:
    # What the compiled per-read path reads and writes of a stream (router.net.stream.XmlStream
    # is the Python class on top): C fields, not attribute look-ups. Set by XmlStream.__init__
    # and its subclasses; Python code reads and writes them as attributes.
    cdef public object relay  # the relay that owns the stream (router.net.stream.StreamHost)
    cdef public Router router  # relay.router
    cdef public object loop
    cdef public object transport
    cdef public Tokenizer tokenizer
    cdef public object session  # an S2S stream's negotiation (router.negotiation.session.Session)
    # ... the pairs it lets through on the compiled path, kept by its `watch` (`session_changed`);
    # None while its input goes to it alone (its stage is one of the router's closed_stages)
    cdef public object inbound_pairs
    cdef public object side_buffer  # where reads go instead of the tokenizer, while set
    cdef public SentKeep acks  # XEP-0198 (router.net.acks.StreamAcks), once enabled
    cdef public object _unsent  # chunks queued in this event-loop iteration (a list), or None
    cdef public Py_ssize_t _unsent_bytes
    cdef public Py_ssize_t handed  # bytes given to the transport so far
    cdef public Py_ssize_t stanzas_in  # stanzas received and written (ctl, XEP-0198), per read and write call
    cdef public Py_ssize_t stanzas_out
    cdef public Py_ssize_t peer_max_bytes  # XEP-0478 max-bytes of the peer (0: none said)
    cdef public double last_rx  # loop.time() of the last read and of the last write
    cdef public double last_tx
    cdef public bint closing
    cdef public bint paused  # the transport's write buffer is above its high-water mark
    cdef public bint raw_xml  # log.raw_xml
    cdef public bint join_writes  # a TLS transport: one write of the joined chunks (one SSL_write, not one per chunk)
    cdef public int link  # 0: S2S, 1: a component (the counters' index)

    cdef int read(self, Py_ssize_t nbytes) except -1
    cdef int forward_batches(self, dict batches) except -1
    cdef int queue_stanzas(self, list chunks) except -1
    cdef int queue(self, list chunks) except -1
    cdef int flush_queue(self) except -1
    cdef inline bint fits(self, Py_ssize_t size)
