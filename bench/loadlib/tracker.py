"""Delivery accounting: what became of every stanza sent, and latency.

Each simulated stream numbers its stanzas 0, 1, 2...; one byte per sequence
number records the fates that came back for it, one bit each: its echo
arrived, it bounced back to the generator, or its echo bounced to the echo
component. At the end every stanza sent is exactly one of those, or *not
taken* (sent on a stream that died after the last XEP-0198 ``h`` its peer
gave, so the sender knows it was not acknowledged), or *lost*; one with two
fates, a fate twice (a duplicate), an echo for another simulated server
(misrouted) and an echo older than one already received on its stream (out
of order) are counted apart.
"""

from __future__ import annotations

from ._fastload import FATES, TrackerCore

MAX_SAMPLES = 5  # error and misrouting examples kept for the report


class Tracker(TrackerCore):
    """Counts for one load point; `window` selects which latency samples count (the per-echo half is compiled)."""

    def __init__(self, streams: int):
        super().__init__(streams)
        self.errors = 0
        self.samples: dict[str, list[str]] = {"error": [], "misrouted": [], "unknown": [], "stream": []}
        self.stream_errors = 0

    def note(self, kind: str, text: str) -> None:
        bucket = self.samples[kind]
        if len(bucket) < MAX_SAMPLES:
            bucket.append(text[:400])

    def sent(self, index: int, count: int) -> None:
        self.ledgers[index].sent += count

    def died(self, index: int, acknowledged: int) -> None:
        """Stream ``index`` died mid-run; its peer had acknowledged its first ``acknowledged`` stanzas."""
        self.ledgers[index].died_acked = acknowledged

    def error_stanza(self, raw: bytes) -> None:
        self.errors += 1
        self.note("error", raw.decode("utf-8", "replace"))

    def outstanding(self, index: int) -> int:
        ledger = self.ledgers[index]
        return ledger.sent - ledger.settled

    def awaited(self) -> int:
        return sum(ledger.awaited() for ledger in self.ledgers)

    def totals(self) -> dict:
        fates = {name: 0 for name in (*FATES, "not_taken", "lost", "more_than_one")}
        dead = []
        for index, ledger in enumerate(self.ledgers):
            mine = ledger.fates()
            for name, count in mine.items():
                fates[name] += count
            if ledger.died_acked is not None:
                dead.append({"stream": index, "sent": ledger.sent, "acknowledged": ledger.died_acked} | mine)
        sent = sum(l.sent for l in self.ledgers)
        came_back = sum(len(l.seen) - l.seen.count(0) - l.seen.count(FATES["bounced"]) for l in self.ledgers)
        return {
            "sent": sent,
            "received": sum(l.received for l in self.ledgers),
            "lost": fates["lost"],
            "fates": fates,
            "echo_returned": came_back,  # the echo arrived or bounced back to the component (or both)
            "duplicated": sum(l.duplicates for l in self.ledgers),
            "misrouted": self.misrouted,
            "out_of_order": sum(l.out_of_order for l in self.ledgers),
            "unparseable": self.unknown,
            "error_stanzas": self.errors,
            "stream_errors": self.stream_errors,
            "streams_with_losses": sum(1 for l in self.ledgers if l.fates()["lost"]),
            "dead_streams": dead,
            "samples": {k: v for k, v in self.samples.items() if v} | self.loss_samples(),
        }

    def loss_samples(self) -> dict:
        """Where the first losses are: stream index and the missing sequence numbers."""
        out = []
        for index, ledger in enumerate(self.ledgers):
            acked = ledger.sent if ledger.died_acked is None else min(ledger.died_acked, ledger.sent)
            if ledger.unsettled(acked) and len(out) < MAX_SAMPLES:
                missing = [seq for seq in range(acked) if seq >= len(ledger.seen) or not ledger.seen[seq]]
                out.append(f"stream {index}: {len(missing)} of {ledger.sent} missing, seq {missing[:10]}")
        return {"lost": out} if out else {}


def percentiles(values: list[int], points=(50, 90, 99, 99.9)) -> dict[str, float | None]:
    """Nearest-rank percentiles in milliseconds (values in microseconds)."""
    if not values:
        return {f"p{p:g}": None for p in points} | {"max": None, "count": 0}
    ordered = sorted(values)
    out = {}
    for p in points:
        rank = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
        out[f"p{p:g}"] = round(ordered[int(rank)] / 1000, 3)
    out["max"] = round(ordered[-1] / 1000, 3)
    out["count"] = len(ordered)
    return out


def handshake_stats(durations_s: list[float]) -> dict:
    if not durations_s:
        return {"count": 0}
    ordered = sorted(durations_s)
    n = len(ordered)
    return {
        "count": n,
        "p50_ms": round(ordered[min(n - 1, n * 50 // 100)] * 1000, 2),
        "p99_ms": round(ordered[min(n - 1, n * 99 // 100)] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }
