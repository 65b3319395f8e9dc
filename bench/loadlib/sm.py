"""XEP-0198 acks as the simulated servers speak them: one stream's counters and the point's totals.

XEP-0198 §4: the side that sends ``<enable/>`` counts what it sends from then
on and the peer what it receives from when it reads it; ``<enabled/>`` starts
the two other counters. Either side asks with ``<r/>`` and is told
``<a h='N'/>``, N the stanzas it handled, modulo 2^32. Counting costs the
generator one integer increment per stanza received and one addition per
write; nothing is kept per stanza (there is no resumption to re-send for).

An ``<a h/>`` acknowledging more than was sent is the target's error (XEP-0198
§6: an "'h' value that is too high"; the local entity SHOULD end the stream
with undefined-condition): the generator counts it (``h_errors``, with a
sample) instead, so the point's other figures stay whole and the report says
what went wrong.
"""

from __future__ import annotations

import asyncio
import re
import time

SM_NS = "urn:xmpp:sm:3"
FEATURE = b"<sm xmlns='urn:xmpp:sm:3'/>"
ENABLE = b"<enable xmlns='urn:xmpp:sm:3'/>"
ENABLED = b"<enabled xmlns='urn:xmpp:sm:3'/>"
REQUEST = b"<r xmlns='urn:xmpp:sm:3'/>"
# XEP-0198 §6 "Error Handling": <enable/> refused with <failed/> and a stanza error condition
REFUSED = (b"<failed xmlns='urn:xmpp:sm:3'>"
           b"<feature-not-implemented xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>")
H_MODULUS = 1 << 32  # XEP-0198 §4: h is an unsigned 32-bit integer that wraps
STANZA_NAMES = frozenset(("message", "presence", "iq"))  # what h counts (RFC 6120 §8)
SETTLE_TIMEOUT_S = 10.0  # the target answers the point's last <r/> within this, or it counts as unanswered
SETTLE_POLL_S = 0.02
MAX_SAMPLES = 5

_H = re.compile(rb"""\sh\s*=\s*(?:'([^']*)'|"([^"]*)")""")


def ack(handled: int) -> bytes:
    return b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % (handled % H_MODULUS)


def with_offer(features: bytes) -> bytes:
    """``<stream:features>...</stream:features>`` with the XEP-0198 feature added."""
    head, close, tail = features.rpartition(b"</stream:features>")
    return head + FEATURE + close + tail


class StreamAcks:
    """One stream's XEP-0198 counters; `received` counts from this object's birth, `base` marks where h starts."""

    __slots__ = ("sent", "acked", "requested", "received", "base", "answers")

    def __init__(self, counting_in: bool):
        self.sent = 0  # stanzas we sent since our counter started
        self.acked = 0  # of those, how many the peer acknowledged (unwrapped)
        self.requested = 0  # `sent` when we last asked with <r/>
        self.received = 0
        self.base: int | None = 0 if counting_in else None  # `received` when the peer's counter started
        self.answers = 0  # <a/> elements received

    def handled(self) -> int:
        return self.received - self.base if self.base is not None else 0

    def acknowledge(self, h: int) -> str | None:
        """The peer's ``<a h/>``; a text when it acknowledges more than was sent."""
        self.answers += 1
        newly = (h - self.acked) % H_MODULUS  # a smaller h than before wraps to a huge count: also an error
        if self.acked + newly > self.sent:
            return f"h={h} acknowledges {self.acked + newly} stanzas but {self.sent} were sent (h was {self.acked})"
        self.acked += newly
        return None


class AckTotals:
    """What XEP-0198 did during one load point, over all streams."""

    def __init__(self):
        self.offered = 0  # our streams whose target offered <sm/>
        self.enabled = 0  # ... and answered our <enable/> with <enabled/>
        self.refused = 0  # ... or with <failed/>
        self.enabled_by_target = 0  # the target's streams to our listener that enabled it
        self.requests_sent = 0
        self.acks_received = 0
        self.requests_answered = 0  # the target's <r/>, answered with our <a h/>
        self.h_errors = 0
        self.samples: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text[:400])

    def report(self, streams) -> dict:
        """Totals, with what the streams that count (and are still open) sent and the target never
        acknowledged; a stream that died is the tracker's (``dead_streams``)."""
        counting = [s.acks for s in streams if s is not None and s.acks is not None and not s.closed]
        sent = sum(a.sent for a in counting)
        acked = sum(a.acked for a in counting)
        out = {"offered": self.offered, "enabled": self.enabled, "refused": self.refused,
               "enabled_by_target": self.enabled_by_target, "ack_requests_sent": self.requests_sent,
               "acks_received": self.acks_received, "ack_requests_answered": self.requests_answered,
               "h_errors": self.h_errors, "stanzas_counted": sent, "acknowledged": acked,
               "unacknowledged_at_end": sent - acked}
        return out | ({"samples": self.samples} if self.samples else {})


def handle(stream, element, raw: bytes) -> None:
    """An element of the XEP-0198 namespace on ``stream`` (our OutboundStream or InboundStream)."""
    acks, totals, name = stream.acks, stream.ctx.acks, element.name
    if name == "r" and acks is not None:
        stream.transport.write(ack(acks.handled()))
        totals.requests_answered += 1
    elif name == "a" and acks is not None:
        totals.acks_received += 1
        match = _H.search(raw)
        text = (match.group(1) or match.group(2) or b"") if match else b""
        if not text.isdigit() or int(text) >= H_MODULUS:
            acks.answers += 1
            problem = f"<a/> without a valid h: {raw[:200].decode('utf-8', 'replace')}"
        else:
            problem = acks.acknowledge(int(text))
        if problem is not None:
            totals.h_errors += 1
            totals.problem(f"{stream.label()}: {problem}")
    elif name == "enabled" and acks is not None and acks.base is None:
        acks.base = acks.received  # §4: the target counts what it sends from its <enabled/> on
        totals.enabled += 1
    elif name == "failed" and acks is not None and acks.base is None:
        stream.acks = None
        totals.refused += 1
        totals.problem(f"{stream.label()}: the target refused XEP-0198: {raw[:200].decode('utf-8', 'replace')}")
    elif name == "enable" and not stream.outbound and acks is None:
        if stream.ctx.cfg.sm:
            stream.acks = StreamAcks(counting_in=True)
            stream.transport.write(ENABLED)
            totals.enabled_by_target += 1
        else:
            stream.transport.write(REFUSED)
    else:
        stream.other(element, raw)


def request_all(streams, totals: AckTotals) -> list:
    """``<r/>`` on every stream that counts what it sends; returns those asked."""
    asked = []
    for stream in streams:
        if stream is not None and stream.acks is not None and not stream.closed and stream.acks.base is not None:
            stream.transport.write(REQUEST)
            stream.acks.requested = stream.acks.sent
            totals.requests_sent += 1
            asked.append(stream)
    return asked


async def settle(streams, totals: AckTotals) -> dict:
    """After the drain: ask every counting stream once more and wait (bounded) for every answer, then report."""
    asked = request_all(streams, totals)
    answers = {stream: stream.acks.answers for stream in asked}
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S
    while time.perf_counter() < deadline and any(
            not s.closed and s.acks is not None and s.acks.answers == n for s, n in answers.items()):
        await asyncio.sleep(SETTLE_POLL_S)
    unanswered = sum(1 for s, n in answers.items() if s.acks is not None and s.acks.answers == n)
    return totals.report(streams) | {"final_requests_unanswered": unanswered}
