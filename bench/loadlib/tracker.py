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

from dataclasses import dataclass, field

MAX_SAMPLES = 5  # error and misrouting examples kept for the report
ECHOED, BOUNCED, ECHO_BOUNCED = 1, 2, 4  # a stanza's fates: bits of its byte in the ledger
FATES = {"echoed": ECHOED, "bounced": BOUNCED, "echo_bounced": ECHO_BOUNCED}


@dataclass(slots=True)
class StreamLedger:
    sent: int = 0
    seen: bytearray = field(default_factory=bytearray)  # the fates of each sequence number (bits)
    received: int = 0  # echoed
    settled: int = 0  # with at least one fate
    duplicates: int = 0
    last_echoed: int = -1
    out_of_order: int = 0
    died_acked: int | None = None  # the stream died; its peer had acknowledged the stanzas below this

    def unsettled(self, stop: int) -> int:
        """Stanzas below sequence number ``stop`` without any fate yet."""
        known = min(stop, len(self.seen))
        return self.seen.count(0, 0, known) + stop - known

    def awaited(self) -> int:
        """Stanzas a fate may still come for: all the unsettled ones, or a dead stream's acknowledged ones."""
        return self.sent - self.settled if self.died_acked is None else self.unsettled(self.died_acked)

    def fates(self) -> dict[str, int]:
        """How many stanzas met each fate; the values add up to ``sent``."""
        seen = bytes(self.seen[:self.sent])
        out = {name: seen.count(bit) for name, bit in FATES.items()}
        acked = self.sent if self.died_acked is None else min(self.died_acked, self.sent)
        out["not_taken"] = self.unsettled(self.sent) - self.unsettled(acked)
        out["lost"] = self.unsettled(acked)
        out["more_than_one"] = self.sent - sum(out.values())
        return out


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

    def died(self, index: int, acknowledged: int) -> None:
        """Stream ``index`` died mid-run; its peer had acknowledged its first ``acknowledged`` stanzas."""
        self.ledgers[index].died_acked = acknowledged

    def _find(self, stanza_id: str | None) -> tuple[int, int, int, StreamLedger]:
        """(stream, seq, sent µs, ledger) of one of our ids; ValueError or IndexError otherwise."""
        stream_text, seq_text, sent_text = (stanza_id or "").split(".")
        index, seq, sent_us = int(stream_text), int(seq_text), int(sent_text)
        return index, seq, sent_us, self.ledgers[index]

    @staticmethod
    def _mark(ledger: StreamLedger, seq: int, fate: int) -> bool:
        """Record one fate of stanza ``seq``; False when the same fate came before (a duplicate)."""
        seen = ledger.seen
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
        before = seen[seq]
        if before & fate:
            ledger.duplicates += 1
            return False
        seen[seq] = before | fate
        ledger.settled += not before
        return True

    def arrived(self, stanza_id: str | None, to_index: int | None, now_us: int, raw: bytes) -> int | None:
        """Record one echoed message; returns the sending stream's index when valid."""
        try:
            index, seq, sent_us, ledger = self._find(stanza_id)
        except (ValueError, IndexError):
            self.unknown += 1
            self.note("unknown", raw.decode("utf-8", "replace"))
            return None
        if to_index != index or seq >= ledger.sent:
            self.misrouted += 1
            self.note("misrouted", raw.decode("utf-8", "replace"))
            return None
        if not self._mark(ledger, seq, ECHOED):
            return index
        ledger.received += 1
        if seq < ledger.last_echoed:
            ledger.out_of_order += 1
        else:
            ledger.last_echoed = seq
        window = self.window
        if window is not None and window[0] <= sent_us < window[1]:
            self.latencies_us.append(now_us - sent_us)
        if window is not None and window[0] <= now_us < window[1]:
            self.delivered_in_window += 1
        return index

    def bounced(self, stanza_id: str | None, raw: bytes) -> int | None:
        """An error stanza came back: the bounce of the stanza with its id, else an error of the run."""
        try:
            index, seq, _, ledger = self._find(stanza_id)
        except (ValueError, IndexError):
            index = ledger = None
        if ledger is None or seq >= ledger.sent:
            self.error_stanza(raw)
            return None
        self._mark(ledger, seq, BOUNCED)
        return index

    def echo_bounced(self, stanza_ids: list[str]) -> None:
        """The echo component was told these echoes could not be delivered (their ids are the stanzas')."""
        for stanza_id in stanza_ids:
            try:
                _, seq, _, ledger = self._find(stanza_id)
            except (ValueError, IndexError):
                self.error_stanza(f"an echo bounced to the component, id {stanza_id!r}: not one of ours".encode())
                continue
            self._mark(ledger, seq, ECHO_BOUNCED)

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
        came_back = sum(len(l.seen) - l.seen.count(0) - l.seen.count(BOUNCED) for l in self.ledgers)
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
