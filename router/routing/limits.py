"""Admission limits: how much work peers may have in flight, counted per key.

A federation edge is reachable by every server on the internet, so work a
peer can start before it has proven anything (connections, unauthenticated
streams, dialback verifications with their DNS look-ups and outbound
connections) is counted overall, per remote IP and per stream, each count
with a named limit. ``admit`` takes one slot in every count or none and
names the limit that refused; ``release`` gives the slots back. A key whose
count drops to zero is forgotten, so the tables are never larger than the
work in flight. No I/O: the runtime logs, counts and answers refusals.
"""

from __future__ import annotations

from typing import Hashable

OVERALL = None  # the key of a limit that counts everything
# A flood hits a limit thousands of times a second: say so at most this often.
LOG_INTERVAL = 10.0


class Refusals:
    """Refusals by one limit, to be said in a log line at most every ``LOG_INTERVAL``."""

    __slots__ = ("_count", "_logged_at")

    def __init__(self) -> None:
        self._count = 0  # since the last log line
        self._logged_at: float | None = None

    def note(self, now: float) -> int:
        """Count a refusal; return how many to report in a log line now, or 0
        while the last line is less than ``LOG_INTERVAL`` old."""
        self._count += 1
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            return 0
        count, self._count, self._logged_at = self._count, 0, now
        return count


class Limit:
    """In-flight work per key, at most ``maximum`` for each key."""

    __slots__ = ("name", "maximum", "counts", "refusals")

    def __init__(self, name: str, maximum: int) -> None:
        self.name = name  # the config option that sets it, as logs and metrics say it
        self.maximum = maximum
        self.counts: dict[Hashable, int] = {}
        self.refusals = Refusals()

    def full(self, key: Hashable) -> bool:
        return self.counts.get(key, 0) >= self.maximum

    def take(self, key: Hashable) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def give(self, key: Hashable) -> None:
        left = self.counts.get(key, 0) - 1
        if left > 0:
            self.counts[key] = left
        else:
            self.counts.pop(key, None)

    def total(self) -> int:
        return sum(self.counts.values())


def admit(*slots: tuple[Limit, Hashable]) -> Limit | None:
    """Take a slot of every ``(limit, key)``, or none: then return the first full limit."""
    for limit, key in slots:
        if limit.full(key):
            return limit
    for limit, key in slots:
        limit.take(key)
    return None


def release(*slots: tuple[Limit, Hashable]) -> None:
    for limit, key in slots:
        limit.give(key)
