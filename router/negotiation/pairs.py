"""`Pair(local, remote)`, the one domain pair of the relay, and the containers a session keeps pairs in.

A pair is always (our domain, the peer's domain), whichever way stanzas flow:
an inbound pair lets the peer send ``remote -> local``, an outbound pair lets
us send ``local -> remote``. Events, the route table, logs and metrics use the
same order. `Pair` is a NamedTuple, so it has a tuple's size, hash and
equality: a plain ``(local, remote)`` tuple finds it in a set or a dict.

The sets and maps a session changes only while negotiating are replaced on
change (frozensets) or start as a shared empty mapping, so that the thousands
of idle streams of a relay share one empty container instead of each holding
its own. The pairs authorized on a stream are a tuple: nearly every stream
carries one pair each way, and a one-pair tuple is a quarter of a set's size
(10,000 idle streams per process); piggybacking adds a few more, and past
``SET_FROM`` they become a frozenset, so a peer multiplexing many domains (at
most ``limits.max_pairs_per_stream``) costs one hash look-up per stanza."""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple


class Pair(NamedTuple):
    """A domain pair: ``local`` is our domain, ``remote`` the peer's."""

    local: str
    remote: str


NO_PAIRS: frozenset[Pair] = frozenset()
SET_FROM = 8  # the authorized pairs of a stream carrying more are a frozenset
NO_REQUESTS = MappingProxyType({})  # read-only: replace it with a dict before the first entry


def without(pairs: frozenset[Pair], pair: Pair) -> frozenset[Pair]:
    """``pairs`` minus ``pair``; the shared `NO_PAIRS` when nothing is left."""
    if pair not in pairs:
        return pairs
    return pairs - {pair} or NO_PAIRS


def with_pair(pairs: tuple[Pair, ...] | frozenset[Pair], pair: Pair) -> tuple[Pair, ...] | frozenset[Pair]:
    """``pairs`` with ``pair`` added, unless it is already there: at the end of the
    tuple, or in a frozenset past ``SET_FROM`` pairs (every stanza looks its pair up)."""
    if pair in pairs:
        return pairs
    if len(pairs) < SET_FROM:
        return (*pairs, pair)
    return frozenset(pairs) | {pair}
