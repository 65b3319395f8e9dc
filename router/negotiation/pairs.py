"""Domain pairs ``(from_domain, to_domain)`` in the sets and maps a session changes
only while negotiating: those are replaced on change (frozensets) or start as a
shared empty mapping, so that the thousands of idle streams of a relay share one
empty container instead of each holding its own."""

from __future__ import annotations

from types import MappingProxyType

Pair = tuple[str, str]
NO_PAIRS: frozenset[Pair] = frozenset()
NO_REQUESTS = MappingProxyType({})  # read-only: replace it with a dict before the first entry


def without(pairs: frozenset[Pair], pair: Pair) -> frozenset[Pair]:
    """``pairs`` minus ``pair``; the shared `NO_PAIRS` when nothing is left."""
    if pair not in pairs:
        return pairs
    return pairs - {pair} or NO_PAIRS
