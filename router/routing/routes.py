"""Route table, per-pair queues while connecting, reconnect backoff (no I/O).

The routing decision for a stanza is at most two dict lookups on structures
kept up to date by the runtime: its ``to`` domain in ``local`` (XEP-0114
components, built-in services), else its ``Pair(local, remote)`` = ``(from, to)``
in ``remote`` (the one stream authenticated to carry that pair, RFC 6120 §10.1:
one output stream per remote pair, so delivery stays in order). A remote pair
without a stream gets a bounded ``PendingQueue`` while the runtime connects;
when that fails every queued stanza bounces to its sender.

Nothing here imports asyncio: times are passed in, links are opaque objects.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

from router.negotiation.pairs import Pair  # (local domain, remote domain); a plain tuple finds it


@dataclass(frozen=True, slots=True)
class Queued:
    """A stanza waiting for its outbound stream: a private copy of its bytes plus
    what a bounce needs."""

    data: bytes
    name: str
    type: str | None
    from_: str | None
    to: str | None
    id: str | None
    since: float


@dataclass(slots=True)
class PendingQueue:
    """Stanzas for one pair while its stream is being set up, bounded by count and age."""

    max_stanzas: int
    max_age: float
    items: deque[Queued] = field(default_factory=deque)

    def push(self, item: Queued) -> bool:
        """Queue ``item``; False when the queue is full (the caller bounces it)."""
        if len(self.items) >= self.max_stanzas:
            return False
        self.items.append(item)
        return True

    def expired(self, now: float) -> list[Queued]:
        """Remove and return the stanzas that waited longer than ``max_age``."""
        out = []
        while self.items and now - self.items[0].since > self.max_age:
            out.append(self.items.popleft())
        return out

    def drain(self) -> list[Queued]:
        out = list(self.items)
        self.items.clear()
        return out


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter between connection attempts to one domain
    (RFC 6120 §3.3: wait a random time, back off exponentially)."""

    base: float
    cap: float
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, rng: Callable[[], float] = random.random) -> float:
        """Record a failure; return the delay until the next attempt is allowed."""
        self.failures += 1
        delay = min(self.cap, self.base * (2 ** (self.failures - 1))) * (0.5 + rng() / 2)
        self.not_before = now + delay
        return delay

    def forgotten(self, now: float) -> bool:
        """Whether the domain has been left alone long enough (a full ``cap`` after
        its last wait ended) that its failures no longer count."""
        return now - self.not_before > self.cap

    def wait(self, now: float) -> float:
        return max(0.0, self.not_before - now)


class RouteTable:
    """Where stanzas go: local targets by domain, remote links by (local, remote) pair.

    A link is any object (the runtime's stream); the table only keeps, per link,
    the pairs it carries so that a closed stream is removed in one call.
    """

    def __init__(self) -> None:
        self.local: dict[str, Any] = {}
        self.remote: dict[Pair, Any] = {}
        self.pending: dict[Pair, PendingQueue] = {}
        self.backoff: dict[str, Backoff] = {}
        self._pairs_of: dict[Hashable, tuple[Pair, ...]] = {}  # tuples: a link carries one or two pairs
        self.on_change: Callable[[], None] | None = None  # told when a target or link comes or goes (the bus)
        # remote domain -> links carrying a pair towards it, in the order they got it:
        # a dialback verification looks one up per handshake, so no scan of every
        # link; tuples, since nearly every remote domain has one link (idle memory)
        self._links_to: dict[str, tuple[Hashable, ...]] = {}

    # local targets -------------------------------------------------------
    def set_local(self, domain: str, target: Any) -> None:
        self.local[domain] = target
        self._changed()

    def remove_local(self, domain: str, target: Any) -> bool:
        """Remove ``domain`` only if it still points at ``target``."""
        if self.local.get(domain) is target:
            del self.local[domain]
            self._changed()
            return True
        return False

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # remote links --------------------------------------------------------
    def add_remote(self, pair: Pair, link: Any) -> bool:
        """Make ``link`` the output stream for ``pair`` unless one already exists
        (the first authenticated stream keeps the pair, so order is preserved).
        Returns True when ``link`` is now the route."""
        current = self.remote.get(pair)
        if current is not None and current is not link:
            return False
        self.remote[pair] = link
        pairs = self._pairs_of.get(link, ())
        if pair not in pairs:
            self._pairs_of[link] = (*pairs, pair)
            links = self._links_to.get(pair.remote, ())
            if link not in links:
                self._links_to[pair.remote] = (*links, link)
            self._changed()
        return True

    def remove_link(self, link: Any) -> set[Pair]:
        """Forget every pair routed over ``link``; return them."""
        pairs = self._pairs_of.pop(link, ())
        for pair in pairs:
            if self.remote.get(pair) is link:
                del self.remote[pair]
            links = tuple(other for other in self._links_to.get(pair.remote, ()) if other is not link)
            if links:
                self._links_to[pair.remote] = links
            else:
                self._links_to.pop(pair.remote, None)
        if pairs:
            self._changed()
        return set(pairs)

    def links_to(self, remote: str) -> Iterator[Any]:
        """Links carrying any pair towards ``remote`` (candidates for piggybacking)."""
        yield from self._links_to.get(remote, ())

    # queues --------------------------------------------------------------
    def queue_for(self, pair: Pair, max_stanzas: int, max_age: float) -> tuple[PendingQueue, bool]:
        """The pending queue for ``pair`` and whether it was just created (the
        caller then starts a connection attempt)."""
        queue = self.pending.get(pair)
        if queue is not None:
            return queue, False
        queue = self.pending[pair] = PendingQueue(max_stanzas, max_age)
        return queue, True

    def take_queue(self, pair: Pair) -> list[Queued]:
        queue = self.pending.pop(pair, None)
        return queue.drain() if queue is not None else []

    def backoff_for(self, remote: str, base: float, cap: float) -> Backoff:
        state = self.backoff.get(remote)
        if state is None:
            state = self.backoff[remote] = Backoff(base, cap)
        return state

    def backoff_succeeded(self, remote: str) -> None:
        """A stream to ``remote`` authenticated: its failures are forgotten."""
        self.backoff.pop(remote, None)

    def prune_backoff(self, now: float) -> None:
        """Forget domains whose failures no longer count, so the table holds only
        domains that failed within the last couple of ``cap`` periods."""
        for remote in [remote for remote, state in self.backoff.items() if state.forgotten(now)]:
            del self.backoff[remote]

