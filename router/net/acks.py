"""XEP-0198 acks of one S2S stream at run time: what was sent and not yet acknowledged, and when to ask.

The compiled router counts the stanzas each stream receives (``stanzas_in``,
once per read); `StreamAcks` keeps the value at which XEP-0198 counting
started, so our ``h`` is a subtraction, and, once ours started, every stanza
written since the last ``<a/>``, as bytes: the very bytes object the router wrote
for a small stanza (it copies those from its read buffer), a copy of a view.
Not the views of the source's buffer that were written: a view would keep the
source's whole read buffer alive, and hundreds of thousands of views held for a
round trip are objects the cyclic garbage collector walks (measured: 20% more
relay CPU and twice the p99); bytes are neither. That keeping is compiled
(`router._fastroute.SentKeep`, the base class, called by ``write_chunks``
without Python); the stanzas are parsed again only if the stream dies.

An ack is requested after ``sm_ack_every`` unacknowledged stanzas or
``sm_ack_interval`` seconds after the first one; a request unanswered for
``sm_ack_timeout`` seconds means the peer is gone (the sweep closes the
stream), and more than ``sm_max_unacked`` waiting stanzas mean a peer that
reads but does not acknowledge: it only hurts itself, its stream is closed.
When the stream is gone, `stanzas` gives the relay what it sent and the peer
never acknowledged: it is re-sent on another stream or bounced, never lost.

Our own ``<a h/>`` says the stanzas are ours to deliver, so with a cluster bus
it waits until the stanzas read before the ``<r/>`` have left this process:
taken by the member they were sent to, or bounced (``Bus.handoff_mark``). A
process that is killed then never leaves stanzas acknowledged and undelivered;
its peer re-sends or bounces what was not acknowledged. At most
``MAX_DEFERRED_ACKS`` answers wait per stream: past that the newest waiting one
answers the newer ``<r/>`` too (one ``<a/>`` may answer several, XEP-0198 §4).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterator

from router._fastparse import Element, Tokenizer
from router._fastroute import SentKeep
from router.negotiation import sm
from router.wire.namespaces import SERVER_NS, STREAM_NS

log = logging.getLogger("router.net.acks")

# The chunks written to a jabber:server stream are stanzas in its default namespace
# (the compiled router fixes up those that are not): read back under this header.
_REPLAY_HEADER = f"<stream:stream xmlns='{SERVER_NS}' xmlns:stream='{STREAM_NS}'>".encode()
MAX_DEFERRED_ACKS = 16  # answers to <r/> waiting for the cluster bus, per stream


class StreamAcks(SentKeep):
    """XEP-0198 counters and the re-send buffer of one stream (``stream.acks`` while enabled);
    what each write keeps, and when it asks, is the compiled `SentKeep`'s."""

    __slots__ = ("acked", "in_base", "deferred", "deferred_noted")

    def __init__(self, stream: Any) -> None:
        s2s = stream.relay.config.s2s  # read once per stream: a reload applies to new streams
        super().__init__(stream, s2s.sm_ack_every, s2s.sm_max_unacked)
        self.acked = 0  # the peer's last h
        self.in_base: int | None = None  # stream.stanzas_in when we started counting what we receive
        # (the bus flush they wait for, our <a/>), oldest first; made when one first waits (an empty
        # deque is 760 bytes, and idle streams are many)
        self.deferred: deque[tuple[int, bytes]] | None = None
        self.deferred_noted = False  # MAX_DEFERRED_ACKS bit on this stream (logged once: a peer sets the pace)

    # ------------------------------------------------------------------ counting starts (SmStarted)
    def start(self, outbound: bool, inbound: bool) -> None:
        self.keeping = self.keeping or outbound
        if inbound and self.in_base is None:
            self.in_base = self.stream.stanzas_in

    # ------------------------------------------------------------------ what we send
    def request(self, now: float) -> None:
        self.requested_at = now
        self.stream.write(sm.REQUEST)

    def acknowledged(self, h: int) -> str | None:
        """The peer's ``<a h/>``: drop what it acknowledged; a text when ``h`` is impossible."""
        count = (h - self.acked) % sm.H_MODULUS
        if count > self.pending:
            return (f"<a h='{h}'/> acknowledges {count} stanzas but only {self.pending} were sent "
                    f"since the last ack (h was {self.acked})")
        self.acked = h
        self.drop(count)
        self.requested_at = None
        self.waiting_since = self.stream.loop.time() if self.pending else None
        return None

    def tick(self, now: float, s2s: Any) -> str | None:
        """The sweep: ask for an ack that is due; a text when the peer stopped answering."""
        if self.requested_at is not None:
            if now - self.requested_at > s2s.sm_ack_timeout:
                return f"no XEP-0198 ack for {s2s.sm_ack_timeout:g} seconds ({self.pending} stanzas unacknowledged)"
        elif self.waiting_since is not None and now - self.waiting_since >= s2s.sm_ack_interval:
            self.request(now)
        return None

    def _overflow(self, count: int, limit: int) -> None:
        stream = self.stream
        log.warning("s2s peer=%s domain=%s left %d stanzas unacknowledged (s2s.sm_max_unacked %d): closing it",
                    stream.peer, stream.domain_label, count, limit)
        stream.relay.metrics.limits_hit.inc("sm_max_unacked")
        stream.fail("resource-constraint", f"{count} stanzas were not acknowledged (XEP-0198); at most {limit} may be")

    # ------------------------------------------------------------------ what we receive
    def handled(self) -> bytes:
        """Our ``<a h/>``: the stanzas received since counting started."""
        return sm.ack(self.stream.stanzas_in - self.in_base if self.in_base is not None else 0)

    def answer(self) -> None:
        """The peer's ``<r/>``: our ``<a h/>`` now, or once the cluster bus has handed off
        what is on its way (the stanzas counted in ``h`` among it)."""
        bus = self.stream.relay.bus
        mark = bus.handoff_mark() if bus is not None else None
        if mark is None and not self.deferred:
            self.stream.write(self.handled())
            return
        entry = (bus.generation if mark is None else mark, self.handled())
        if self.deferred is None:
            self.deferred = deque()
        if len(self.deferred) >= MAX_DEFERRED_ACKS:
            self.deferred[-1] = entry
            stream = self.stream
            stream.relay.metrics.limits_hit.inc("max_deferred_acks")
            if not self.deferred_noted:
                self.deferred_noted = True
                log.info("s2s peer=%s domain=%s: %d answers to <r/> already wait for the cluster bus "
                         "(MAX_DEFERRED_ACKS); the newest answers later ones too (said once per stream)",
                         stream.peer, stream.domain_label, MAX_DEFERRED_ACKS)
        else:
            self.deferred.append(entry)
        bus.wait_for_handoff(self.stream)

    def release(self, settled: int) -> bool:
        """The bus has handed off every batch of its flushes up to ``settled``: the answers
        waiting for them go out. True when none waits any more."""
        deferred = self.deferred
        while deferred and deferred[0][0] <= settled:
            self.stream.write(deferred.popleft()[1])
        return not deferred

    # ------------------------------------------------------------------ the stream is gone
    def stanzas(self) -> Iterator[tuple[bytes, Element]]:
        """What the peer never acknowledged, in order, as (bytes, element) to re-send or bounce."""
        kept = self.take_all()
        if not kept:
            return
        data = _REPLAY_HEADER + b"".join(kept)
        elements = [event for event in Tokenizer(max_stanza_bytes=len(data)).feed(data) if type(event) is Element]
        yield from zip(kept, elements, strict=True)  # one stanza per chunk: write_chunks' contract
