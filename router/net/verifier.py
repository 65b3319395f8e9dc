"""Dialback verification (XEP-0220 §2.1.2): ask the authoritative server whether
a key a peer presented is valid, within the limits on pending verifications.

A ``VerifyKey`` from one stream is answered over a connection that is never
that stream (XEP-0288 §2.2: never verify over the connection that carried the
request): another authenticated stream to the originating domain if there is
one, else a verify-only connection closed right after the answer. Each
verification costs a DNS look-up and maybe a connection, so they are counted
overall, per remote IP and per stream (router.routing.limits), and verify-only
connections to one authoritative server address are capped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from router.net import resolver
from router.net.connector import ConnectFailed, KeyedSemaphores, address_key
from router.negotiation.pairs import Pair
from router.routing.limits import OVERALL, Limit, admit, release
from router.net.s2s import S2SStream
from router.net.stream import StreamHost

log = logging.getLogger("router.net.verifier")


class DialbackVerifier:
    """Pending verifications of the relay ``host`` and their limits."""

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self.pending = Limit("max_pending_verifications", 0)  # maxima: configure()
        self.pending_per_ip = Limit("max_pending_verifications_per_ip", 0)
        self.pending_per_stream = Limit("max_pending_verifications_per_stream", 0)
        self.pairs_per_stream = Limit("max_pairs_per_stream", 0)  # its maximum and refusals: pairs are the session's
        self._connections = KeyedSemaphores()  # verify-only connections per peer address
        self._waiters: dict[tuple[S2SStream, Any], asyncio.Future] = {}

    def configure(self, limits) -> None:
        self.pending.maximum = limits.max_pending_verifications
        self.pending_per_ip.maximum = limits.max_pending_verifications_per_ip
        self.pending_per_stream.maximum = limits.max_pending_verifications_per_stream
        self.pairs_per_stream.maximum = limits.max_pairs_per_stream

    def verify_key(self, origin: S2SStream, event) -> None:
        """Start verifying a dialback key, or refuse it at once past a limit."""
        slots = ((self.pending, OVERALL), (self.pending_per_ip, origin.ip), (self.pending_per_stream, origin))
        refused = self._pairs_full(origin, event) or admit(*slots)
        if refused is None:
            self.host.spawn(self._verify(origin, event, slots))
            return
        self.host.metrics.limits_hit.inc(refused.name)
        count = refused.refusals.note(self.host.loop.time())
        if count:
            log.warning("refused %d dialback verification(s) by limits.%s = %d (last: %s for %s from %s)",
                        count, refused.name, refused.maximum, event.originating, event.receiving, origin.peer)
        what = "domain pairs on this stream" if refused is self.pairs_per_stream else \
            "dialback verifications pending"
        origin.session.key_verified(event.token, "resource-constraint",
                                    f"too many {what} (limits.{refused.name} = {refused.maximum}); try again later")

    def _pairs_full(self, origin: S2SStream, event) -> Limit | None:
        """The per-stream pair limit, when a new pair would take the stream past it
        (counting the verifications already pending on it)."""
        pairs = origin.session.inbound_pairs
        carried = len(pairs) + self.pending_per_stream.counts.get(origin, 0)
        if carried < self.pairs_per_stream.maximum or Pair(event.receiving, event.originating) in pairs:
            return None
        return self.pairs_per_stream

    async def _verify(self, origin: S2SStream, event, slots) -> None:
        host = self.host
        link = None
        started = host.loop.time()
        try:
            link = next((candidate for candidate in host.table.links_to(event.originating)
                         if candidate is not origin and isinstance(candidate, S2SStream)
                         and not candidate.closing), None)
            if link is not None:
                result = await self._ask(link, event)
            else:
                targets = await host.resolver.resolve(event.originating)
                async with self._connections.hold(
                        address_key(targets[0]), host.config.limits.max_verify_connections_per_target,
                        lambda: host.metrics.limits_hit.inc("max_verify_connections_per_target")):
                    link = await host.connector.connect(Pair(event.receiving, event.originating), targets,
                                                        verify_only=True)
                    try:
                        result = await self._ask(link, event)
                    finally:
                        link.close_gracefully()
        except resolver.ResolutionError:
            result = "remote-server-not-found"
        except ConnectFailed:
            result = "remote-connection-failed"
        except asyncio.TimeoutError:
            result = "remote-server-timeout"
        finally:
            release(*slots)
        log.info("dialback key of %s for %s: %s (asked %s)", event.originating, event.receiving, result,
                 link.peer if link is not None else "nobody")
        host.metrics.verification_seconds.labels(result if result in ("valid", "invalid") else "error").observe(
            host.loop.time() - started)
        if not origin.closing:
            origin.session.key_verified(event.token, result)
            origin.pump()

    async def _ask(self, link: S2SStream, event) -> str:
        """Send ``<db:verify/>`` over ``link``; the authoritative server's answer."""
        future = self.host.loop.create_future()
        self._waiters[(link, event.token)] = future
        try:
            link.session.request_verify(event.token, event.receiving, event.originating, event.stream_id, event.key)
            link.pump()
            return await asyncio.wait_for(future, self.host.config.s2s.negotiation_timeout)
        finally:
            self._waiters.pop((link, event.token), None)

    def verify_result(self, stream: S2SStream, event) -> None:
        future = self._waiters.get((stream, event.token))
        if future is not None and not future.done():
            future.set_result(event.result)

    def stream_closed(self, stream: S2SStream) -> None:
        """Verifications asked over ``stream`` will get no answer."""
        for (waiting_stream, _), future in list(self._waiters.items()):
            if waiting_stream is stream and not future.done():
                future.set_result("remote-server-timeout")
