"""The batches other members send this member: their stanzas delivered in place by
the compiled router, and each sender answered at most every ``ANSWER_INTERVAL``.

A NATS message costs a Python process far more than its bytes, so the batches
taken from one sender within the interval share one answer (the first answer
after a quiet spell goes at once). An answer only settles the sender's table
(stanzas in flight, XEP-0198 ``<a/>``s): the stanzas are on their way already.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from router.cluster.frames import encode_answers
from router.cluster.members import MAX_MEMBERS

log = logging.getLogger("router.cluster.taking")

# 20 ms rather than 5: about 10% less CPU per stanza across a hop at 10 streams (docs/benchmarks.md);
# an XEP-0198 <a/> that waits for the hand-off may wait this much
ANSWER_INTERVAL = 0.02


class Taker:
    """``host`` is the relay; ``send(reply, payload)`` publishes an answer, ``hop(member)``
    labels a sender "worker" or "node" for the metrics."""

    def __init__(self, host: Any, send: Callable[[str, bytes], None], hop: Callable[[str], str]) -> None:
        self.host, self.send, self.hop = host, send, hop
        # batches taken and not answered yet: sender -> (a reply subject of its, [(sequence, answers)])
        self._answering: dict[str, tuple[str, list]] = {}
        self._answered_at: dict[str, float] = {}  # sender -> when we last answered it

    def take(self, msg: Any) -> None:
        """A batch (a ``natsproto.Msg``): its stanzas delivered, its answer on its way."""
        host, reply = self.host, msg.reply
        try:
            sender, answers = host.router.take_batch(msg.payload, host.delivery.take_from_bus)
        except ValueError as exc:
            log.warning("cluster bus: refusing a malformed batch: %s", exc)
            return  # the sender times out and bounces
        # "taken" is said once the writes are the transports': a process killed after saying it
        # must not still hold them in its queues (they would vanish, neither delivered nor bounced)
        host.router.flush_writes()
        host.metrics.bus_stanzas.inc("received", self.hop(sender), by=len(answers))
        host.metrics.bus_batches.inc("received")
        sequence = reply.rpartition(".")[2]
        if not sequence.isdigit():
            log.warning("cluster bus: a batch from %s without a reply subject to answer on", sender)
            return
        pending = self._answering.get(sender)
        if pending is None:
            pending = self._answering[sender] = (reply, [])
            loop = host.loop
            wait = self._answered_at.get(sender, 0.0) + ANSWER_INTERVAL - loop.time()
            if wait > 0:
                loop.call_later(wait, self._answer, sender)
            else:
                loop.call_soon(self._answer, sender)
        pending[1].append((int(sequence), answers))

    def answer_all(self) -> None:
        """Now, before this member goes: what it took is said."""
        for sender in list(self._answering):
            self._answer(sender)

    def _answer(self, sender: str) -> None:
        if sender not in self._answering:  # answer_all was first
            return
        reply, entries = self._answering.pop(sender)
        if len(self._answered_at) >= MAX_MEMBERS:  # senders are members: only departed ones go
            self._answered_at.clear()
        self._answered_at[sender] = self.host.loop.time()
        self.send(reply, encode_answers(entries))
