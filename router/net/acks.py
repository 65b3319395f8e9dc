"""XEP-0198 acks of one S2S stream at run time: what was sent and not yet acknowledged, and when to ask.

The compiled router counts stanzas per stream (``stanzas_in`` per read,
``stanzas_out`` per ``write_chunks`` call); `StreamAcks` keeps the counter
values at which XEP-0198 counting started, so ``h`` is a subtraction, and
the chunks written since the last ``<a/>`` (views of their source's buffer,
which stays alive as long as they do: DESIGN.md "Buffer lifetime"). It is
called once per ``write_chunks`` call, never per stanza.

An ack is requested after ``sm_ack_every`` unacknowledged stanzas or
``sm_ack_interval`` seconds after the first one; a request unanswered for
``sm_ack_timeout`` seconds means the peer is gone (the sweep closes the
stream), and more than ``sm_max_unacked`` waiting stanzas mean a peer that
reads but does not acknowledge: it only hurts itself, its stream is closed.
When the stream is gone, `stanzas` gives the relay what it sent and the peer
never acknowledged: it is re-sent on another stream or bounced, never lost.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterator

from router._fastparse import Element, Tokenizer
from router.negotiation import sm
from router.wire.namespaces import SERVER_NS, STREAM_NS

log = logging.getLogger("router.net.acks")

# The chunks written to a jabber:server stream are stanzas in its default namespace
# (the compiled router fixes up those that are not): read back under this header.
_REPLAY_HEADER = f"<stream:stream xmlns='{SERVER_NS}' xmlns:stream='{STREAM_NS}'>".encode()


class StreamAcks:
    """XEP-0198 counters and the re-send buffer of one stream (``stream.acks`` while enabled)."""

    __slots__ = ("stream", "unacked", "acked", "out_base", "in_base", "requested_at", "waiting_since",
                 "overflow_noted")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.unacked: deque = deque()  # chunks sent and not acknowledged, oldest first
        self.acked = 0  # the peer's last h
        self.out_base: int | None = None  # stream.stanzas_out when we started counting what we send
        self.in_base: int | None = None  # stream.stanzas_in when we started counting what we receive
        self.requested_at: float | None = None  # our <r/> not answered yet, sent then
        self.waiting_since: float | None = None  # when the oldest unacknowledged stanza was sent
        self.overflow_noted = False

    # ------------------------------------------------------------------ counting starts (SmStarted)
    def start(self, outbound: bool, inbound: bool) -> None:
        if outbound and self.out_base is None:
            self.out_base = self.stream.stanzas_out
        if inbound and self.in_base is None:
            self.in_base = self.stream.stanzas_in

    # ------------------------------------------------------------------ what we send
    def sent(self, chunks: list) -> None:
        """``chunks`` (one stanza each) were queued after the counter started: keep them until acknowledged."""
        if self.out_base is None:
            return
        unacked = self.unacked
        if not unacked:
            self.waiting_since = self.stream.loop.time()
        unacked.extend(chunks)
        s2s = self.stream.relay.config.s2s
        if self.requested_at is None and len(unacked) >= s2s.sm_ack_every:
            self.request(self.stream.loop.time())
        if len(unacked) > s2s.sm_max_unacked and not self.overflow_noted:
            self.overflow_noted = True  # closed after this read: not from inside another stream's write
            self.stream.loop.call_soon(self._overflow, len(unacked), s2s.sm_max_unacked)

    def request(self, now: float) -> None:
        self.requested_at = now
        self.stream.write(sm.REQUEST)

    def acknowledged(self, h: int) -> str | None:
        """The peer's ``<a h/>``: drop what it acknowledged; a text when ``h`` is impossible."""
        count = (h - self.acked) % sm.H_MODULUS
        if count > len(self.unacked):
            return (f"<a h='{h}'/> acknowledges {count} stanzas but only {len(self.unacked)} were sent "
                    f"since the last ack (h was {self.acked})")
        self.acked = h
        unacked = self.unacked
        for _ in range(count):
            unacked.popleft()
        self.requested_at = None
        self.waiting_since = self.stream.loop.time() if unacked else None
        return None

    def tick(self, now: float, s2s: Any) -> str | None:
        """The sweep: ask for an ack that is due; a text when the peer stopped answering."""
        if self.requested_at is not None:
            if now - self.requested_at > s2s.sm_ack_timeout:
                return f"no XEP-0198 ack for {s2s.sm_ack_timeout:g} seconds ({len(self.unacked)} stanzas unacknowledged)"
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

    # ------------------------------------------------------------------ the stream is gone
    def stanzas(self) -> Iterator[tuple[bytes, Element]]:
        """What the peer never acknowledged, in order, as (bytes, element) to re-send or bounce."""
        chunks, self.unacked = [bytes(chunk) for chunk in self.unacked], deque()
        if not chunks:
            return
        data = b"".join(chunks)
        tokenizer = Tokenizer(max_stanza_bytes=len(_REPLAY_HEADER) + max(len(chunk) for chunk in chunks))
        events = tokenizer.feed(_REPLAY_HEADER + data)
        buffer = tokenizer.buffer
        for event in events:
            if type(event) is Element:
                yield bytes(buffer[event.start:event.end]), event
