"""Delivery accounting: loss, duplication, misrouting, error stanzas, latency.

Each simulated stream numbers its stanzas 0, 1, 2...; one byte per sequence
number records whether the echo arrived, so a second arrival is a duplicate
and a missing one at the end is a loss, whatever the arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SAMPLES = 5  # error and misrouting examples kept for the report


@dataclass
class StreamLedger:
    sent: int = 0
    seen: bytearray = field(default_factory=bytearray)
    received: int = 0
    duplicates: int = 0


class Tracker:
    """Counts for one load point; `latency_window` selects which samples count."""

    def __init__(self, streams: int):
        self.ledgers = [StreamLedger() for _ in range(streams)]
        self.misrouted = 0
        self.errors = 0
        self.unknown = 0
        self.samples: dict[str, list[str]] = {"error": [], "misrouted": [], "unknown": [], "stream": []}
        self.stream_errors = 0
        self.latencies_us: list[int] = []
        self.window: tuple[int, int] | None = None  # send-time window (us) of latency samples
        self.delivered_in_window = 0

    def note(self, kind: str, text: str) -> None:
        bucket = self.samples[kind]
        if len(bucket) < MAX_SAMPLES:
            bucket.append(text[:400])

    def sent(self, index: int, count: int) -> None:
        self.ledgers[index].sent += count

    def arrived(self, stanza_id: str | None, to_index: int | None, now_us: int, raw: bytes) -> int | None:
        """Record one echoed message; returns the sending stream's index when valid."""
        try:
            stream_text, seq_text, sent_text = (stanza_id or "").split(".")
            index, seq, sent_us = int(stream_text), int(seq_text), int(sent_text)
            ledger = self.ledgers[index]
        except (ValueError, IndexError):
            self.unknown += 1
            self.note("unknown", raw.decode("utf-8", "replace"))
            return None
        if to_index != index or seq >= ledger.sent:
            self.misrouted += 1
            self.note("misrouted", raw.decode("utf-8", "replace"))
            return None
        seen = ledger.seen
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
        if seen[seq]:
            ledger.duplicates += 1
            return index
        seen[seq] = 1
        ledger.received += 1
        window = self.window
        if window is not None and window[0] <= sent_us < window[1]:
            self.latencies_us.append(now_us - sent_us)
        if window is not None and window[0] <= now_us < window[1]:
            self.delivered_in_window += 1
        return index

    def error_stanza(self, raw: bytes) -> None:
        self.errors += 1
        self.note("error", raw.decode("utf-8", "replace"))

    def outstanding(self, index: int) -> int:
        ledger = self.ledgers[index]
        return ledger.sent - ledger.received

    def totals(self) -> dict:
        sent = sum(l.sent for l in self.ledgers)
        received = sum(l.received for l in self.ledgers)
        return {
            "sent": sent,
            "received": received,
            "lost": sent - received,
            "duplicated": sum(l.duplicates for l in self.ledgers),
            "misrouted": self.misrouted,
            "unparseable": self.unknown,
            "error_stanzas": self.errors,
            "stream_errors": self.stream_errors,
            "streams_with_losses": sum(1 for l in self.ledgers if l.received < l.sent),
            "samples": {k: v for k, v in self.samples.items() if v} | self.loss_samples(),
        }

    def loss_samples(self) -> dict:
        """Where the first losses are: stream index and the missing sequence numbers."""
        out = []
        for index, ledger in enumerate(self.ledgers):
            if ledger.received < ledger.sent and len(out) < MAX_SAMPLES:
                missing = [seq for seq in range(ledger.sent) if seq >= len(ledger.seen) or not ledger.seen[seq]]
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
