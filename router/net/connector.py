"""Outbound streams: give a `Pair(local, remote)` an authenticated stream.

``Connector.establish`` runs once per pair that has stanzas waiting: it
piggybacks on a stream that already reaches the peer (XEP-0220 §2.6 multiplexing,
XEP-0288 §2.2 bidi) or opens one to the peer's SRV targets, one attempt at a time
per address and with backoff between failures (RFC 6120 §3.3), the targets'
addresses raced as RFC 8305 (Happy Eyeballs) says (``router.net.eyeballs``). When
a stream may carry a pair (``routes_changed``) the pair's queued stanzas leave first, in
order; when setting the pair up fails they bounce to their senders.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Hashable

from router.net import eyeballs, resolver
from router.negotiation.pairs import Pair
from router.net.s2s import S2SStream
from router.net.stream import StreamHost

log = logging.getLogger("router.net.connector")


class ConnectFailed(Exception):
    """No address of any target of a remote domain accepted a connection."""


class KeyedSemaphores:
    """An ``asyncio.Semaphore`` per key, forgotten when nobody holds or waits for
    it, so the table is never larger than the work in flight."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, list] = {}  # key -> [semaphore, holders and waiters]

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key: Hashable, size: int, on_wait: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Hold one of ``size`` slots for ``key``; ``on_wait()`` is called first when
        every slot is taken."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [asyncio.Semaphore(size), 0]
        entry[1] += 1
        try:
            if on_wait is not None and entry[0].locked():
                on_wait()
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._entries[key]


def address_key(target: resolver.Target) -> tuple:
    """One peer address and port, as connection attempts are serialized by."""
    return target.addresses or (target.host,), target.port


def endpoint(address: str, port: int) -> str:
    """``address:port``, an IPv6 address in brackets (RFC 3986 §3.2.2)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def attempt_error(exc: BaseException, timeout: float) -> str:
    """Why one connection attempt failed, for logs and bounces."""
    if isinstance(exc, TimeoutError):
        return f"no connection within {timeout:g} seconds (s2s.connect_timeout)"
    return str(exc) or type(exc).__name__


def lost_reason(stream: S2SStream, exc: Exception | None) -> str:
    """Why pairs still waiting on a closed stream failed, for their bounces."""
    if stream.failure:
        return stream.failure
    return f"connection lost: {exc}" if exc else "the connection closed before the pair was authorized"


class Connector:
    """Outbound stream set-up for the relay ``host``."""

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self._locks = KeyedSemaphores()  # one connection attempt at a time per peer address
        self._pair_waiters: dict[tuple[S2SStream, Pair], asyncio.Future] = {}
        # pairs that failed before anyone waited for them (a peer may refuse before connect() returns)
        self._early_failures: dict[tuple[S2SStream, Pair], tuple[str, str]] = {}
        # pair -> the open streams authorized to send it, oldest first: who takes a pair
        # over when its stream closes, without a scan of every stream per close
        self._senders: dict[Pair, tuple[S2SStream, ...]] = {}

    async def establish(self, pair: Pair) -> None:
        """Give ``pair`` an authenticated stream, or bounce its queued stanzas."""
        host = self.host
        local, remote = pair
        s2s = host.config.s2s
        backoff = host.table.backoff_for(remote, s2s.backoff_base, s2s.backoff_max)
        outcome: str | None = "remote-server-timeout"
        reason = "the attempt was interrupted"
        try:
            await asyncio.sleep(backoff.wait(host.loop.time()))
            targets = await host.resolver.resolve(remote)
            # one attempt at a time per peer address, so pairs that start together share a stream
            async with self._locks.hold(address_key(targets[0]), 1):
                link = next((candidate for candidate in self._carriers(remote, targets)
                             if candidate.session.request_pair(pair)), None)
                if link is None:
                    link = await self.connect(pair, targets)
                else:
                    link.pump()
                    self.routes_changed(link)  # the pair may be authorized on it already
            failure = await self._wait_pair(link, pair)
            outcome, reason = failure if failure is not None else (None, "")
        except resolver.ResolutionError as exc:
            log.warning("cannot resolve %s: %s", remote, exc)
            # RFC 6120 §10.4.3: no address for the domain vs. a stream that could not be set up
            outcome, reason = "remote-server-not-found", f"cannot resolve: {exc}"
        except ConnectFailed as exc:
            log.warning("cannot connect to %s: %s", remote, exc)
            outcome, reason = "remote-server-timeout", f"cannot connect: {exc}"
        finally:
            if outcome is None:
                host.table.backoff_succeeded(remote)
            else:
                backoff.failed(host.loop.time())
                log.warning("pair failed remote=%s local=%s condition=%s: %s", remote, local, outcome, reason)
                waited = host.metrics.queue_wait_seconds.labels("bounced")
                for item in host.table.take_queue(pair):
                    waited.observe(host.loop.time() - item.since)
                    host.delivery.bounce(item, outcome, f"cannot reach {remote}: {reason}")
                host.metrics.negotiations_failed.inc("out", outcome)
            host.delivery.update_queue_gauges()

    def _carriers(self, remote: str, targets) -> list[S2SStream]:
        """Streams that can take a new pair towards ``remote``: those already
        carrying a pair to it (an inbound bidi stream included), then our
        outbound streams to the same address and port (target multiplexing)."""
        addresses = {(address, t.port) for t in targets for address in (t.addresses or (t.host,))}
        carrying = [link for link in self.host.table.links_to(remote) if isinstance(link, S2SStream)]
        same_target = [s for s in self.host.streams if isinstance(s, S2SStream) and s.outbound
                       and s.target in addresses and s not in carrying]
        return [s for s in carrying + same_target if not s.closing and not s.verify_only]

    async def _wait_pair(self, stream: S2SStream, pair: Pair) -> tuple[str, str] | None:
        """None once ``pair`` is routed over ``stream``, else the bounce condition and why."""
        if self.host.table.remote.get(pair) is stream:
            return None
        early = self._early_failures.pop((stream, pair), None)
        if early is not None:
            return early
        if stream.closed:
            return "remote-server-timeout", lost_reason(stream, None)
        future = self.host.loop.create_future()
        self._pair_waiters[(stream, pair)] = future
        timeout = self.host.config.s2s.negotiation_timeout
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            if not stream.authenticated:
                stream.fail("connection-timeout", "stream negotiation did not complete in time")
            return "remote-server-timeout", f"the stream was not authorized within {timeout:g} seconds"
        finally:
            self._pair_waiters.pop((stream, pair), None)

    async def connect(self, pair: Pair, targets, *, verify_only: bool = False) -> S2SStream:
        """Open an outbound stream from ``pair.local`` to ``pair.remote``: its targets'
        addresses raced as RFC 8305 says (``router.net.eyeballs``), targets in SRV
        order; only the winning connection becomes a stream."""
        host = self.host
        local, remote = pair
        s2s = host.config.s2s
        order = eyeballs.attempt_order((t, t.addresses or (t.host,)) for t in targets)

        async def attempt(target: resolver.Target, address: str):
            ssl = host.tls_client_context(local, direct_tls=True) if target.direct_tls else None
            held = await eyeballs.open_held(address, target.port, ssl=ssl, server_hostname=remote if ssl else None)
            return target, address, held

        def take(won) -> S2SStream:
            target, address, held = won
            session = host.outbound_session(local, remote, direct_tls=target.direct_tls, verify_only=verify_only)
            stream = S2SStream(host, session, outbound=True, direct_tls=target.direct_tls, local=local, remote=remote)
            stream.verify_only = verify_only
            stream.target = (address, target.port)
            stream.target_host = target.host
            held.hand_over(stream)  # connection_made: the relay registers this stream, the session starts
            host.metrics.outbound_connections.inc("verify" if verify_only else "stream")
            return stream

        def failed(index: int, exc: BaseException) -> None:
            target, address = order[index]
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                host.metrics.limits_hit.inc("open_files")
                log.warning("cannot connect to %s for %s: out of file descriptors (%s)", address, remote, exc)
            log.info("s2s connect attempt failed remote=%s address=%s: %s", remote,
                     endpoint(address, target.port), attempt_error(exc, s2s.connect_timeout))

        try:
            return await eyeballs.staggered_race(
                [functools.partial(attempt, target, address) for target, address in order],
                delay=s2s.happy_eyeballs_delay, timeout=s2s.connect_timeout,
                take=take, discard=lambda won: won[2].close(), failed=failed)
        except eyeballs.RaceLost as lost:
            raise ConnectFailed("; ".join(
                f"{endpoint(address, target.port)}: {attempt_error(exc, s2s.connect_timeout)}"
                for (target, address), exc in zip(order, lost.errors)) or "no targets") from None

    # ------------------------------------------------------------------ stream events
    def authenticated(self, stream: S2SStream, event) -> None:
        direction = "in" if event.direction == "inbound" else "out"
        self.host.metrics.negotiations_completed.inc(direction, stream.mechanism)
        self.routes_changed(stream)

    def routes_changed(self, stream: S2SStream) -> None:
        """Route every pair the stream may now send, flushing the queue of each
        newly routed pair first (so queued stanzas keep their order)."""
        if stream.verify_only or stream.closing:
            return
        table = self.host.table
        for pair in stream.session.outbound_pairs:
            senders = self._senders.get(pair, ())
            if stream not in senders:
                self._senders[pair] = (*senders, stream)
            if table.remote.get(pair) is stream:
                continue
            if not table.add_remote(pair, stream):
                continue
            # XEP-0478 §3: what the peer announced it would refuse bounces instead
            items = self.host.delivery.fitting(table.take_queue(pair), pair.remote, stream)
            if items:
                stream.write_chunks([item.data for item in items])
                waited, now = self.host.metrics.queue_wait_seconds.labels("sent"), self.host.loop.time()
                for item in items:
                    waited.observe(now - item.since)
            future = self._pair_waiters.get((stream, pair))
            if future is not None and not future.done():
                future.set_result(None)

    def auth_failed(self, stream: S2SStream, event) -> None:
        pair = event.pair
        result = (event.bounce, event.text or event.condition)
        future = self._pair_waiters.get((stream, pair))
        if future is None:
            if not stream.closed:
                self._early_failures[(stream, pair)] = result
        elif not future.done():
            future.set_result(result)

    def unroute(self, stream: S2SStream) -> None:
        """``stream`` carries no more stanzas (it closed, or is closing): another
        open stream authorized for one of its pairs takes the pair over at once."""
        orphaned = self.host.table.remove_link(stream)
        for pair in stream.session.outbound_pairs:
            senders = tuple(other for other in self._senders.get(pair, ()) if other is not stream)
            if senders:
                self._senders[pair] = senders
            else:
                self._senders.pop(pair, None)
        heirs = {other: None for pair in orphaned for other in self._senders.get(pair, ())}
        for other in heirs:
            self.routes_changed(other)

    def stream_closed(self, stream: S2SStream, exc: Exception | None) -> None:
        """Pairs still waiting on ``stream`` fail with the reason it ended."""
        self.unroute(stream)
        lost = lost_reason(stream, exc)
        for (waiting_stream, pair), future in list(self._pair_waiters.items()):
            if waiting_stream is stream and not future.done():
                future.set_result(("remote-server-timeout", lost))
        for key in [key for key in self._early_failures if key[0] is stream]:
            del self._early_failures[key]
