"""Who in the cluster can deliver what: every member's last announcement, forgotten
after a silence, and the choices made from it (no I/O).

A member is one relay process, named ``<node>.<worker>``. It announces the
component domains connected to it and the ``Pair(local, remote)``s it holds an
authenticated stream for; ``Members`` indexes those by domain and by pair.
Choices are deterministic so that every member makes the same one: a sender's
stanzas for one destination always take the same member (hash of the sender's
JID), which keeps them in order, and the members of a node that may open
streams to a remote domain are chosen by rendezvous hashing, so a node opens at
most ``streams_per_domain`` of them however many workers it has.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from router._fastroute import pick_index

# An announcement names at most this many pairs (a member with more announces the first
# ones; the others are still reached through the node's owner of their domain).
MAX_ANNOUNCED_PAIRS = 20000
# Members remembered at most: a cluster is tens of processes; a stranger flooding the
# subject must not grow the table without bound.
MAX_MEMBERS = 1024
# Destinations whose candidates are remembered between changes (a cache: emptied when full).
MAX_CHOICES = 65536


@dataclass(frozen=True)
class Announcement:
    """What one member can deliver, as it said last."""

    member: str
    node: str
    components: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]

    def to_json(self) -> dict:
        return {"member": self.member, "node": self.node, "components": list(self.components),
                "pairs": [list(p) for p in self.pairs[:MAX_ANNOUNCED_PAIRS]]}

    @classmethod
    def from_json(cls, data: dict) -> Announcement:
        """Raises ValueError (or KeyError, TypeError) on anything malformed."""
        member, node = data["member"], data["node"]
        if not isinstance(member, str) or not isinstance(node, str) or not member.startswith(node + "."):
            raise ValueError(f"bad member name {member!r} for node {node!r}")
        components = tuple(str(d) for d in data["components"])
        pairs = tuple((str(local), str(remote)) for local, remote in data["pairs"][:MAX_ANNOUNCED_PAIRS])
        return cls(member, node, components, pairs)


def _score(key: str, member: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{member}".encode(), digest_size=8).digest()


def pick(members: tuple[str, ...], sender: str) -> str:
    """One of ``members`` (sorted) for ``sender``'s stanzas, the same one while the
    list is: the compiled router's choice for the stanzas it frames itself."""
    return members[pick_index(sender, len(members))]


class Members:
    """The other members' announcements, indexed; ``me`` is this process."""

    def __init__(self, me: str, node: str, ttl: float, on_change: Callable[[], None] = lambda: None) -> None:
        self.me = me
        self.on_change = on_change  # who caches choices made from this table (the bus's routes)
        self.node = node
        self.ttl = ttl
        self._seen: dict[str, tuple[Announcement, float]] = {}
        self._components: dict[str, set[str]] = {}
        self._pairs: dict[tuple[str, str], set[str]] = {}
        # the sorted candidates per destination, made when first asked after a change
        self._choices: dict[object, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, member: str) -> bool:
        return member in self._seen

    def update(self, announcement: Announcement, now: float) -> bool:
        """Record ``announcement``; False when it was refused (ours, or the table is full)."""
        member = announcement.member
        if member == self.me or (member not in self._seen and len(self._seen) >= MAX_MEMBERS):
            return False
        previous = self._seen.get(member)
        if previous is not None and previous[0] == announcement:  # a heartbeat: nothing changed
            self._seen[member] = (announcement, now)
            return True
        self._unindex(member)
        self._seen[member] = (announcement, now)
        for domain in announcement.components:
            self._components.setdefault(domain, set()).add(member)
        for pair in announcement.pairs:
            self._pairs.setdefault(pair, set()).add(member)
        return True

    def forget(self, member: str) -> None:
        self._unindex(member)
        self._seen.pop(member, None)

    def expire(self, now: float) -> list[str]:
        """Forget the members silent for longer than ``ttl``; return them."""
        gone = [m for m, (_, seen) in self._seen.items() if now - seen > self.ttl]
        for member in gone:
            self.forget(member)
        return gone

    def _unindex(self, member: str) -> None:
        self._choices.clear()
        self.on_change()
        previous = self._seen.get(member)
        if previous is None:
            return
        for domain in previous[0].components:
            holders = self._components.get(domain)
            if holders is not None:
                holders.discard(member)
                if not holders:
                    del self._components[domain]
        for pair in previous[0].pairs:
            holders = self._pairs.get(pair)
            if holders is not None:
                holders.discard(member)
                if not holders:
                    del self._pairs[pair]

    # ------------------------------------------------------------------ choices
    def component_holders(self, domain: str) -> tuple[str, ...]:
        """The members holding component ``domain`` (sorted; ``pick`` one per sender)."""
        choices = self._choices.get(domain)
        if choices is None:
            choices = self._remember(domain, tuple(sorted(self._components.get(domain, ()))))
        return choices

    def pair_holders(self, pair: tuple[str, str]) -> tuple[str, ...]:
        """The members holding a stream for ``pair``: those of this node if any, else all (sorted)."""
        choices = self._choices.get(pair)
        if choices is None:
            holders = self._pairs.get(pair, ())
            near = [m for m in holders if self._seen[m][0].node == self.node]
            choices = self._remember(pair, tuple(sorted(near or holders)))
        return choices

    def owners(self, domain: str, count: int) -> tuple[str, ...]:
        """The members of this node (us included) that open streams to remote ``domain``."""
        choices = self._choices.get(("owners", domain))
        if choices is None:
            workers = [self.me] + [m for m, (a, _) in self._seen.items() if a.node == self.node]
            ranked = sorted(workers, key=lambda m: _score(domain, m), reverse=True)
            choices = self._remember(("owners", domain), tuple(sorted(ranked[:count])))
        return choices

    def _remember(self, key: object, choices: tuple[str, ...]) -> tuple[str, ...]:
        if len(self._choices) >= MAX_CHOICES:
            self._choices.clear()
        self._choices[key] = choices
        return choices

    def nodes(self) -> set[str]:
        return {a.node for a, _ in self._seen.values()} | {self.node}

    def node_of(self, member: str) -> str | None:
        seen = self._seen.get(member)
        return seen[0].node if seen is not None else None
