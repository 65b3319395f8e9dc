# cython: language_level=3
"""The load tools' per-stanza work, compiled, so that one core of generator
and echo component can keep the relay's core busy.

Three parts, each the per-stanza half of a Python class that keeps the rest:

* ``StanzaTemplate.render_run``: a run of the generator's stanzas in one
  allocation (``wire.stanza_template`` builds the template);
* ``Intake.take``, the base of ``runner.LoadContext``: one read of a simulated
  server's stream, from the tokenizer's events to the ledgers
  (``StreamLedger``, ``TrackerCore``, the base of ``tracker.Tracker``). Echoes
  and bounces are accounted here; every other event goes, in stream order, to
  the stream's own ``handle``; a JID seen for the first time goes to
  ``LoadContext.jid_index`` and ``from_target``;
* ``EchoCore.answer``, the base of ``echo.EchoComponent``: the echoes of one
  read in one buffer; a start tag seen for the first time is built by
  ``EchoComponent.head_for``.

Before, this was Python per stanza, and the generator and the echo component
together filled their core before the relay filled its own (docs/benchmarks.md).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memchr, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from router._fastparse cimport Element, Tokenizer

cdef enum:
    MAX_DIGITS = 18  # an id's numbers fit a signed 64-bit integer

cdef enum:  # a stanza's fates: bits of its byte in the ledger
    ECHOED = 1
    BOUNCED = 2
    ECHO_BOUNCED = 4
FATES = {"echoed": ECHOED, "bounced": BOUNCED, "echo_bounced": ECHO_BOUNCED}


cdef inline long long monotonic_ns() noexcept:
    """time.perf_counter_ns()'s clock on Linux."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int put(bytearray out, const char* data, Py_ssize_t size) except -1:
    cdef Py_ssize_t at = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, at + size)  # grows with over-allocation: amortized
    memcpy(PyByteArray_AS_STRING(out) + at, data, size)
    return 0


cdef inline int put_bytes(bytearray out, bytes data) except -1:
    return put(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef inline Py_ssize_t digits(long long value) noexcept:
    cdef Py_ssize_t n = 1
    while value >= 10:
        value //= 10
        n += 1
    return n


cdef inline char* write_number(char* p, long long value, Py_ssize_t width) noexcept:
    cdef Py_ssize_t i
    for i in range(width - 1, -1, -1):
        p[i] = <char>(48 + value % 10)
        value //= 10
    return p + width


cdef class StanzaTemplate:
    """The message stanzas of one simulated stream: ``head``, ``<seq>.<sent µs>``, then a tail of the size cycle."""

    cdef bytes head
    cdef list tails
    cdef Py_ssize_t cycle

    def __init__(self, bytes head, list tails):
        if not tails or not all(isinstance(tail, bytes) for tail in tails):
            raise ValueError("a template needs at least one tail, as bytes")
        self.head, self.tails, self.cycle = head, tails, len(tails)

    def render_run(self, long long seq, Py_ssize_t count, long long sent_us):
        """Stanzas ``seq`` .. ``seq + count - 1``, all stamped ``sent_us``, as one bytes object."""
        if seq < 0 or count < 0 or sent_us < 0:
            raise ValueError("sequence numbers, counts and times are not negative")
        cdef Py_ssize_t head = PyBytes_GET_SIZE(self.head), stamp = digits(sent_us), total = 0, i
        cdef bytes tail
        for i in range(count):
            tail = <bytes>self.tails[(seq + i) % self.cycle]
            total += head + digits(seq + i) + 1 + stamp + PyBytes_GET_SIZE(tail)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef char* p = PyBytes_AS_STRING(out)
        for i in range(count):
            tail = <bytes>self.tails[(seq + i) % self.cycle]
            memcpy(p, PyBytes_AS_STRING(self.head), head)
            p = write_number(p + head, seq + i, digits(seq + i))
            p[0] = 46  # '.'
            p = write_number(p + 1, sent_us, stamp)
            memcpy(p, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail))
            p += PyBytes_GET_SIZE(tail)
        return out


cdef bint parse_id(object stanza_id, long long* parts) except -1:
    """``<stream>.<seq>.<sent µs>``, decimal digits only, into ``parts``; False for anything else."""
    if type(stanza_id) is not str:
        return False
    cdef Py_ssize_t size, i, k = 0, run = 0
    cdef const char* p = PyUnicode_AsUTF8AndSize(stanza_id, &size)
    parts[0] = parts[1] = parts[2] = 0
    for i in range(size):
        if p[i] == 46:  # '.'
            if run == 0 or k == 2:
                return False
            k += 1
            run = 0
        elif 48 <= p[i] <= 57 and run < MAX_DIGITS:
            parts[k] = parts[k] * 10 + (p[i] - 48)
            run += 1
        else:
            return False
    return k == 2 and run > 0


cdef class StreamLedger:
    """What became of one simulated stream's stanzas: one byte of fate bits per sequence number."""

    cdef public Py_ssize_t sent, received, settled, duplicates, last_echoed, out_of_order
    cdef public bytearray seen
    cdef public object died_acked  # the stream died; its peer had acknowledged the stanzas below this

    def __init__(self):
        self.seen = bytearray()
        self.last_echoed = -1
        self.died_acked = None

    cdef bint mark(self, Py_ssize_t seq, int fate) except -1:
        """Record one fate of stanza ``seq``; False when the same fate came before (a duplicate)."""
        cdef Py_ssize_t size = PyByteArray_GET_SIZE(self.seen), grown
        if seq >= size:
            grown = max(seq + 1, 2 * size)
            PyByteArray_Resize(self.seen, grown)
            memset(PyByteArray_AS_STRING(self.seen) + size, 0, grown - size)
        cdef unsigned char* seen = <unsigned char*>PyByteArray_AS_STRING(self.seen)
        cdef int before = seen[seq]
        if before & fate:
            self.duplicates += 1
            return False
        seen[seq] = before | fate
        self.settled += before == 0
        return True

    def unsettled(self, Py_ssize_t stop):
        """Stanzas below sequence number ``stop`` without any fate yet."""
        known = min(stop, len(self.seen))
        return self.seen.count(0, 0, known) + stop - known

    def awaited(self):
        """Stanzas a fate may still come for: all the unsettled ones, or a dead stream's acknowledged ones."""
        return self.sent - self.settled if self.died_acked is None else self.unsettled(self.died_acked)

    def fates(self):
        """How many stanzas met each fate; the values add up to ``sent``."""
        seen = bytes(self.seen[:self.sent])
        out = {name: seen.count(bit) for name, bit in FATES.items()}
        acked = self.sent if self.died_acked is None else min(self.died_acked, self.sent)
        out["not_taken"] = self.unsettled(self.sent) - self.unsettled(acked)
        out["lost"] = self.unsettled(acked)
        out["more_than_one"] = self.sent - sum(out.values())
        return out


cdef inline str text_of(object raw, Py_ssize_t start, Py_ssize_t end):
    return bytes(raw[start:end]).decode("utf-8", "replace")


cdef class TrackerCore:
    """The per-echo half of ``tracker.Tracker``: each echo and bounce into its stream's ledger, and latency."""

    cdef public list ledgers
    cdef public Py_ssize_t misrouted, unknown, delivered_in_window
    cdef public list latencies_us
    cdef bint windowed
    cdef long long window_start, window_end  # send-time window (µs) of latency samples

    def __init__(self, Py_ssize_t streams):
        self.ledgers = [StreamLedger() for _ in range(streams)]
        self.latencies_us = []

    @property
    def window(self):
        return (self.window_start, self.window_end) if self.windowed else None

    @window.setter
    def window(self, value):
        self.windowed = value is not None
        if value is not None:
            self.window_start, self.window_end = value

    cdef StreamLedger find(self, object stanza_id, long long* parts):
        """The ledger of one of our ids (its numbers in ``parts``), else None."""
        if not parse_id(stanza_id, parts) or parts[0] >= len(self.ledgers):
            return None
        return <StreamLedger>self.ledgers[parts[0]]

    cdef Py_ssize_t take_echo(self, object stanza_id, Py_ssize_t to_index, long long now_us,
                              object raw, Py_ssize_t start, Py_ssize_t end) except -2:
        """Record one echoed message (``raw[start:end]``); the sending stream's index when valid, else -1."""
        cdef long long parts[3]
        cdef StreamLedger ledger = self.find(stanza_id, parts)
        if ledger is None:
            self.unknown += 1
            self.note("unknown", text_of(raw, start, end))
            return -1
        cdef Py_ssize_t index = parts[0], seq = parts[1]
        if to_index != index or seq >= ledger.sent:
            self.misrouted += 1
            self.note("misrouted", text_of(raw, start, end))
            return -1
        if not ledger.mark(seq, ECHOED):
            return index
        ledger.received += 1
        if seq < ledger.last_echoed:
            ledger.out_of_order += 1
        else:
            ledger.last_echoed = seq
        if self.windowed:
            if self.window_start <= parts[2] < self.window_end:
                self.latencies_us.append(now_us - parts[2])
            if self.window_start <= now_us < self.window_end:
                self.delivered_in_window += 1
        return index

    cdef Py_ssize_t take_bounce(self, object stanza_id, object raw, Py_ssize_t start, Py_ssize_t end) except -2:
        """An error stanza came back: the bounce of the stanza with its id, else an error of the run."""
        cdef long long parts[3]
        cdef StreamLedger ledger = self.find(stanza_id, parts)
        if ledger is None or parts[1] >= ledger.sent:
            self.error_stanza(raw[start:end])
            return -1
        ledger.mark(parts[1], BOUNCED)
        return parts[0]

    def arrived(self, stanza_id, to_index, long long now_us, raw):
        """Record one echoed message; returns the sending stream's index when valid."""
        index = self.take_echo(stanza_id, -1 if to_index is None else to_index, now_us, raw, 0, len(raw))
        return None if index < 0 else index

    def bounced(self, stanza_id, raw):
        index = self.take_bounce(stanza_id, raw, 0, len(raw))
        return None if index < 0 else index

    def echo_bounced(self, stanza_ids):
        """The echo component was told these echoes could not be delivered (their ids are the stanzas')."""
        cdef long long parts[3]
        cdef StreamLedger ledger
        for stanza_id in stanza_ids:
            ledger = self.find(stanza_id, parts)
            if ledger is None:
                self.error_stanza(f"an echo bounced to the component, id {stanza_id!r}: not one of ours".encode())
            else:
                ledger.mark(parts[1], ECHO_BOUNCED)


cdef class Intake:
    """The per-read half of ``runner.LoadContext``: the events of one read of a simulated server's stream."""

    cdef public TrackerCore tracker
    cdef public dict index_of_jid  # the JIDs echoes carry, known good: to -> the simulated server's index
    cdef public set target_jids  # ... and from (the target's)
    cdef public set dirty  # streams with room in their window, for the next refill
    cdef public bint saturate, sending, flush_scheduled
    cdef public long long read_us  # when the read being handled arrived (µs since base_ns)
    cdef long long base_ns
    cdef object loop

    def __init__(self, TrackerCore tracker, bint saturate, loop):
        self.tracker, self.saturate, self.loop = tracker, saturate, loop
        self.index_of_jid, self.target_jids, self.dirty = {}, set(), set()
        self.base_ns = monotonic_ns()

    cpdef long long now_us(self):
        return (monotonic_ns() - self.base_ns) // 1000

    def take(self, stream, list events):
        """The events of one read of ``stream`` (a ``streams._Stream``, its tokenizer's buffer): echoes and bounces
        are accounted here, everything else goes to ``stream.handle``, in order."""
        cdef Tokenizer tok = stream.tokenizer
        cdef bint outbound = stream.outbound
        cdef bint fast = not outbound or stream.ready
        cdef Py_ssize_t via = stream.index if outbound and stream.bidi else -1, counted = 0
        cdef Element el
        acks = stream.acks
        for event in events:
            if fast and type(event) is Element and (<Element>event).name == "message":
                el = <Element>event
                counted += 1
                if el.type is not None and el.type == "error":
                    self.refill_soon(self.tracker.take_bounce(el.id, tok.buf, el.start, el.end))
                else:
                    self.refill_soon(self.tracker.take_echo(el.id, self.echo_index(el, via), self.read_us,
                                                        tok.buf, el.start, el.end))
                continue
            if counted and acks is not None:
                acks.received += counted  # XEP-0198: counted before the stream handles what follows
            counted = 0
            stream.handle(event)
            if stream.closed:
                return
            acks = stream.acks
            fast = not outbound or stream.ready
        if counted and acks is not None:
            acks.received += counted

    cdef Py_ssize_t echo_index(self, Element el, Py_ssize_t via) except -2:
        """The simulated server an echo is for, -1 when it came from elsewhere or on another server's stream."""
        cdef PyObject* hit = PyDict_GetItem(self.index_of_jid, el.to) if el.to is not None else NULL
        cdef Py_ssize_t index
        if hit != NULL:
            index = <object>hit
        else:
            index = self.jid_index(el.to)
        if el.from_ not in self.target_jids and not self.from_target(el.from_):
            return -1
        if via >= 0 and via != index:
            return -1
        return index

    cpdef int refill_soon(self, Py_ssize_t index) except -1:
        """Stream ``index`` may send more (a stanza of it settled, or its transport resumed):
        saturation mode tops it up at the next refill. -1 is no stream."""
        if index >= 0 and self.saturate and self.sending:
            self.dirty.add(index)
            self.schedule_flush()
        return 0

    cpdef int schedule_flush(self) except -1:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.refill)
        return 0


cdef class EchoCore:
    """The per-read half of ``echo.EchoComponent``: the echoes of one read's stanzas in one buffer."""

    cdef public bint sink
    cdef public dict heads  # (to, from, type) -> the echo's start tag up to its id
    cdef public list bounced_ids  # of the error messages received: the echoes the target bounced
    cdef public Py_ssize_t messages, errors, iq, other

    def __init__(self, bint sink):
        self.sink, self.heads, self.bounced_ids = sink, {}, []

    @property
    def counts(self):
        return {"messages": self.messages, "errors": self.errors, "iq": self.iq, "other": self.other}

    def answer(self, Tokenizer tok, list events):
        """What to write back for ``events`` (all stanzas but a stream end, which ``ended`` handles); None once ended."""
        cdef bytearray out = bytearray()
        for event in events:
            if type(event) is Element:
                self.answer_one(<Element>event, tok.buf, out)
            else:
                self.ended(event)
                return None
        return out

    cpdef answer_one(self, Element el, bytearray buf, bytearray out):
        """Append the answer to one stanza to ``out``: an echo of a message (from and to swapped, same id and
        payload), a result for an iq get or set; an error message is counted and its id kept."""
        if el.type is not None and el.type == "error":
            self.errors += 1
            if el.name == "message" and el.id is not None:
                self.bounced_ids.append(el.id)
            if self.errors <= 3:
                self.report(f"error stanza {bytes(buf[el.start:el.end])[:300]!r}")
            return
        if el.name == "message":
            self.messages += 1
            if not self.sink:
                self.echo(el, buf, out)
        elif el.name == "iq" and el.type in ("get", "set"):
            self.iq += 1
            put_bytes(out, self.iq_result(el))
        else:
            self.other += 1

    cdef int echo(self, Element el, bytearray buf, bytearray out) except -1:
        cdef const char* b = PyByteArray_AS_STRING(buf)
        cdef const char* gt = <const char*>memchr(b + el.start, 62, el.end - el.start)  # '>'
        key = (el.to, el.from_, el.type)
        cdef PyObject* head = PyDict_GetItem(self.heads, key)
        put_bytes(out, <bytes>head if head != NULL else self.head_for(key))
        cdef Py_ssize_t size
        cdef const char* value
        if el.id is None:
            put(out, b">", 1)
        else:
            value = PyUnicode_AsUTF8AndSize(el.id, &size)
            if memchr(value, 38, size) or memchr(value, 60, size) or memchr(value, 39, size):  # & < '
                put_bytes(out, self.id_attribute(el.id))
            else:
                put(out, b" id='", 5)
                put(out, value, size)
                put(out, b"'>", 2)
        if (gt - 1)[0] == 47:  # '/': self-closing, nothing inside
            put(out, b"</message>", 10)
        else:
            put(out, gt + 1, b + el.end - gt - 1)
        return 0
