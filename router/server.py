"""The relay process: listeners, routing, outbound connections, dialback
verification and lifecycle.

``Relay`` owns the route table and every stream. Streams call back into it for
routing (``route``), authentication changes (``authenticated``,
``auth_failed``, ``routes_changed``), dialback verification (``verify_key``)
and open/close bookkeeping. ``run(config)`` is the process entry point used by
the CLI: it serves until SIGTERM/SIGINT, reloads policy and certificates on
SIGHUP, and on shutdown closes every stream with ``<system-shutdown/>``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Hashable

from router import errors, resolver, tls
from router.certs import TrustStore
from router.components import ComponentStream
from router.config import Config, load_config
from router.jid import domain_of
from router.limits import OVERALL, Limit, admit, release
from router.metrics import RelayMetrics, start_metrics_server
from router.negotiation.session import Session, SessionConfig
from router.routes import Pair, Queued, RouteTable, bounce_condition
from router.services import Services
from router.stream import S2SStream, XmlStream
from router.xml import SERVER_NS, parse_element

log = logging.getLogger("router.server")

# How often idle/keepalive/negotiation clocks are checked, at most.
SWEEP_INTERVAL = 1.0
# File descriptors kept for what is not an inbound S2S stream (listeners, logs,
# components, DNS, outbound and verification connections): when the open-files
# limit is the bound, inbound streams are refused with a stream error before
# accept() would fail (libuv then closes the new connection without a word).
FD_RESERVE = 256


@dataclass(frozen=True)
class _OutputProfile:
    """What ``rescope`` needs to know about a destination that has no stream yet."""

    content_ns: str
    out_lang: str | None


class Service:
    """A built-in service domain in the route table (ping, disco, echo, sink)."""

    __slots__ = ("domain",)

    def __init__(self, domain: str) -> None:
        self.domain = domain


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
    async def hold(self, key: Hashable, size: int, on_wait=None) -> AsyncIterator[None]:
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


class Relay:
    """Every stream, the route table and the listeners of one relay process."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.config = config
        self.metrics = RelayMetrics()
        self.metrics.streams_open.collect = self._count_streams
        self.table = RouteTable()
        self.streams: set[XmlStream] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.listening: dict[str, tuple[str, int]] = {}
        self._pair_waiters: dict[tuple[S2SStream, Pair], asyncio.Future] = {}
        # pairs that failed before anyone waited for them (a peer may refuse before connect() returns)
        self._early_failures: dict[tuple[S2SStream, Pair], tuple[str, str]] = {}
        self._verify_waiters: dict[tuple[S2SStream, Any], asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self.connections_opened = 0  # outbound TCP connections made (tests assert reuse)
        self._direct_tls_context = None  # the XEP-0368 listener's context, once listening
        self._connect_locks = KeyedSemaphores()  # one connection attempt at a time per peer address
        self._verify_connections = KeyedSemaphores()  # verify-only connections per peer address
        # admission limits (router.limits); maxima are set by _apply
        self.connections = Limit("max_connections", 0)
        self.connections_per_ip = Limit("max_connections_per_ip", 0)
        self.pre_auth = Limit("max_pre_auth_connections", 0)
        self.verifications = Limit("max_pending_verifications", 0)
        self.verifications_per_ip = Limit("max_pending_verifications_per_ip", 0)
        self.verifications_per_stream = Limit("max_pending_verifications_per_stream", 0)
        self._outbound_queues_full = Limit("max_outbound_queues", 0)  # only its refusal log is used
        self.metrics.pre_auth_streams.collect = lambda: {(): self.pre_auth.total()}
        self.metrics.pending_verifications.collect = lambda: {(): self.verifications.total()}
        self._unflushed: list[XmlStream] = []  # streams with writes queued in this loop iteration
        self._apply(config)

    # ------------------------------------------------------------------ configuration
    def _apply(self, config: Config) -> None:
        """Precompute what the hot path looks up (called at start and on reload)."""
        self.config = config
        self.local_domains = config.local_domains
        limits = config.limits
        self.connections.maximum = min(limits.max_connections, _inbound_fd_budget())
        if self.connections.maximum < limits.max_connections:
            log.warning("limits.max_connections lowered from %d to %d: the process may open only %d files "
                        "(RLIMIT_NOFILE)", limits.max_connections, self.connections.maximum,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.connections_per_ip.maximum = limits.max_connections_per_ip
        self.pre_auth.maximum = limits.max_pre_auth_connections
        self.verifications.maximum = limits.max_pending_verifications
        self.verifications_per_ip.maximum = limits.max_pending_verifications_per_ip
        self.verifications_per_stream.maximum = limits.max_pending_verifications_per_stream
        self.component_secrets = {c.domain: c.secret for c in config.components}
        for domain in config.service_domains:
            if not isinstance(self.table.local.get(domain), Service):
                self.table.set_local(domain, Service(domain))
        for domain, target in list(self.table.local.items()):
            if isinstance(target, Service) and domain not in config.service_domains:
                del self.table.local[domain]
        self.services = Services.from_config(config, self.metrics)
        self.resolver = resolver.Resolver(config.routes)
        self._load_tls(config)
        self.session_config = self._session_config(config)
        # queued stanzas are fixed up for the outbound stream they will most likely take
        self.s2s_output = _OutputProfile(SERVER_NS, self.session_config.default_lang)

    def _load_tls(self, config: Config) -> None:
        """Server contexts per local domain (chosen by the header 'to' or SNI)
        and client contexts presenting each local domain's certificate."""
        files = {domain: (str(f.cert), str(f.key)) for domain, f in config.tls.certificates.items()}
        self.server_contexts = None
        self.client_contexts: dict[tuple[str | None, bool], Any] = {
            (None, False): tls.client_context(), (None, True): tls.client_context(direct_tls=True)}
        if not files:
            return
        default = next((d for d in config.server.domains if d in files), next(iter(files)))
        self.server_contexts = tls.server_context(files, default)
        for domain, (cert, key) in files.items():
            self.client_contexts[(domain, False)] = tls.client_context(cert, key)
            self.client_contexts[(domain, True)] = tls.client_context(cert, key, direct_tls=True)
        if self._direct_tls_context is not None:
            # the listening socket keeps its context object: give it the new certificates
            self._direct_tls_context.load_cert_chain(*files[default])
            self._direct_tls_context.sni_callback = self.server_contexts.default.sni_callback

    def reload(self, config: Config) -> None:
        """SIGHUP: new policy lists and certificates for new streams and new
        negotiations; open streams stay up."""
        self._apply(config)
        log.info("configuration reloaded from %s", config.source)

    def component_secret(self, domain: str) -> str | None:
        return self.component_secrets.get(domain)

    def tls_server_context(self, domain: str | None):
        """The context with ``domain``'s certificate (STARTTLS has no SNI from some peers)."""
        if self.server_contexts is None:
            raise ValueError("no certificate configured: STARTTLS is not possible")
        return self.server_contexts.context_for(domain)

    def tls_client_context(self, local: str | None, direct_tls: bool = False):
        """Outbound context presenting ``local``'s certificate when we have one."""
        return self.client_contexts.get((local, direct_tls)) or self.client_contexts[(None, direct_tls)]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        listen = self.config.listen
        if listen.s2s is not None:
            await self._listen("s2s", listen.s2s, lambda: S2SStream(self, self._inbound_session(False), outbound=False))
        if listen.s2s_direct_tls is not None:
            await self._listen(
                "s2s-direct-tls", listen.s2s_direct_tls,
                lambda: S2SStream(self, self._inbound_session(True), outbound=False, direct_tls=True),
                ssl=self._direct_tls_listener_context(),
            )
        if listen.component is not None:
            await self._listen("component", listen.component, lambda: ComponentStream(self))
        if listen.metrics is not None:
            server = await start_metrics_server(self.metrics, listen.metrics.host, listen.metrics.port)
            self.servers.append(server)
            self.listening["metrics"] = server.sockets[0].getsockname()[:2]
        self._sweeper = self.loop.create_task(self._sweep())

    def _direct_tls_listener_context(self):
        if self.server_contexts is None:
            raise ValueError("listen.s2s_direct_tls needs at least one certificate in [tls.certificates]")
        self._direct_tls_context = self.server_contexts.default
        return self._direct_tls_context

    async def _listen(self, name: str, endpoint, factory, ssl=None) -> None:
        server = await self.loop.create_server(factory, endpoint.host, endpoint.port, ssl=ssl,
                                               reuse_address=True, backlog=4096)
        self.servers.append(server)
        self.listening[name] = server.sockets[0].getsockname()[:2]
        log.info("listening %s on %s:%d", name, *self.listening[name])

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close every stream with ``<system-shutdown/>`` and wait a
        bounded time for the peers to close."""
        timeout = self.config.s2s.close_timeout if timeout is None else timeout
        for server in self.servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        streams = list(self.streams)
        for stream in streams:
            stream.close_gracefully("system-shutdown", "the relay is shutting down")
        if streams:
            done, pending = await asyncio.wait([asyncio.ensure_future(s.wait_closed()) for s in streams],
                                               timeout=timeout)
            for stream in streams:
                if stream.transport is not None and not stream.closed:
                    stream.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for server in self.servers:
            await server.wait_closed()

    def spawn(self, coro) -> asyncio.Task:
        """A background task the relay cancels on shutdown and whose failure is logged."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _sweep(self) -> None:
        """Keepalives, idle and negotiation timeouts, and queue ageing, for all streams."""
        while True:
            s2s = self.config.s2s  # re-read: a reload may change the timeouts
            await asyncio.sleep(min(SWEEP_INTERVAL, s2s.keepalive_interval / 2, s2s.idle_timeout / 4,
                                    s2s.negotiation_timeout / 4))
            now = self.loop.time()
            for stream in list(self.streams):
                if stream.closing or stream.transport is None:
                    continue
                if not stream.authenticated:
                    if now - stream.opened_at > s2s.negotiation_timeout:
                        stream.fail("policy-violation",
                                    f"not authenticated within {s2s.negotiation_timeout:g} seconds")
                    continue
                if stream.paused and stream.stalled_for(now) > s2s.write_stall_timeout:
                    self._close_stalled(stream)
                elif isinstance(stream, S2SStream) and now - stream.last_rx > s2s.idle_timeout:
                    stream.fail("connection-timeout", f"nothing received for {s2s.idle_timeout:g} seconds")
                elif now - stream.last_tx > s2s.keepalive_interval:
                    stream.keepalive()
            for queue in list(self.table.pending.values()):
                for item in queue.expired(now):
                    self._bounce(item, "remote-server-timeout", "no stream to the remote server in time")
            self.table.prune_backoff(now)
            self._update_queue_gauges()

    def _close_stalled(self, stream: XmlStream) -> None:
        """A stream that reads nothing of what we send only ever hurts itself: close it."""
        timeout = self.config.s2s.write_stall_timeout
        backlog = stream.transport.get_write_buffer_size()
        log.warning("%s %s domain=%s wrote nothing of %d queued bytes for %g seconds "
                    "(s2s.write_stall_timeout): closing it", stream.kind, stream.peer,
                    getattr(stream, "remote_domain", None) or getattr(stream, "domain", None) or "-", backlog, timeout)
        self.metrics.limits_hit.inc("write_stall_timeout")
        stream.fail("resource-constraint", f"the stream read nothing of {backlog} bytes for {timeout:g} seconds")
        stream.abort_after(self.config.s2s.close_timeout)  # it does not read our close either

    # ------------------------------------------------------------------ writes
    def flush_soon(self, stream: XmlStream) -> None:
        """Write ``stream``'s queue after this event-loop iteration's reads (one
        callback per iteration for every stream that has something to send)."""
        if not self._unflushed:
            self.loop.call_soon(self.flush_writes)
        self._unflushed.append(stream)

    def flush_writes(self) -> None:
        streams, self._unflushed = self._unflushed, []
        for stream in streams:
            try:
                stream.flush()
            except Exception:  # one broken stream must not keep the others' writes queued
                log.exception("%s %s: writing failed", stream.kind, stream.peer)
                stream.close_transport()

    # ------------------------------------------------------------------ stream bookkeeping
    def stream_opened(self, stream: XmlStream) -> None:
        self.streams.add(stream)
        if not isinstance(stream, S2SStream) or stream.outbound:
            return
        refused = admit((self.connections, OVERALL), (self.connections_per_ip, stream.ip), (self.pre_auth, OVERALL))
        if refused is None:
            stream.admitted = True
            return
        self.metrics.limits_hit.inc(refused.name)
        count = refused.refused(self.loop.time())
        if count:
            log.warning("refused %d inbound connection(s) by limits.%s = %d (last from %s)",
                        count, refused.name, refused.maximum, stream.ip)
        if refused is self.connections_per_ip:
            stream.fail("policy-violation", f"too many connections from {stream.ip} "
                        f"(limits.{refused.name} = {refused.maximum})")
        else:
            stream.fail("resource-constraint", f"the relay has too many connections "
                        f"(limits.{refused.name} = {refused.maximum})")

    def stream_authenticated(self, stream: S2SStream) -> None:
        """The first pair is authenticated: the stream no longer counts as pre-auth."""
        if stream.admitted:
            self.pre_auth.give(OVERALL)

    def stream_closed(self, stream: XmlStream, exc: Exception | None) -> None:
        self.streams.discard(stream)
        if getattr(stream, "admitted", False):
            release((self.connections, OVERALL), (self.connections_per_ip, stream.ip))
            if not stream.authenticated:
                self.pre_auth.give(OVERALL)
        if isinstance(stream, ComponentStream):
            if stream.domain is not None and self.table.remove_local(stream.domain, stream):
                self.metrics.components_connected.dec()
                log.info("component offline domain=%s peer=%s", stream.domain, stream.peer)
            return
        self.unroute(stream)
        lost = _lost_reason(stream, exc)
        for (waiting_stream, pair), future in list(self._pair_waiters.items()):
            if waiting_stream is stream and not future.done():
                future.set_result(("remote-server-timeout", lost))
        for key in [key for key in self._early_failures if key[0] is stream]:
            del self._early_failures[key]
        for (waiting_stream, token), future in list(self._verify_waiters.items()):
            if waiting_stream is stream and not future.done():
                future.set_result("remote-server-timeout")
        stream.session.connection_lost()
        log.info("s2s %s stream closed peer=%s domain=%s%s", "outbound" if stream.outbound else "inbound",
                 stream.peer, stream.remote_domain or "-", f" error={exc}" if exc else "")

    def unroute(self, stream: S2SStream) -> None:
        """``stream`` carries no more stanzas (it closed, or is closing): another
        open stream authorized for one of its pairs takes the pair over at once."""
        orphaned = self.table.remove_link(stream)
        if orphaned:
            for other in list(self.streams):
                if other is not stream and isinstance(other, S2SStream) \
                        and not orphaned.isdisjoint(other.session.outbound_pairs):
                    self.routes_changed(other)

    def component_online(self, stream: ComponentStream) -> bool:
        """Register an authenticated component; False if its domain is taken."""
        if stream.domain in self.table.local:
            return False
        self.table.set_local(stream.domain, stream)
        self.metrics.components_connected.inc()
        return True

    # ------------------------------------------------------------------ metrics
    def _count_streams(self) -> dict[tuple[str, str, str], int]:
        """``streams_open`` computed when scraped: direction, mechanism, bidi."""
        counts: dict[tuple[str, str, str], int] = {}
        for stream in self.streams:
            if isinstance(stream, S2SStream):
                key = (stream.direction, stream.mechanism or "none", "yes" if stream.bidi else "no")
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _update_queue_gauges(self) -> None:
        self.metrics.queued_stanzas.set(sum(len(q.items) for q in self.table.pending.values()))
        self.metrics.outbound_queues.set(len(self.table.pending))

    # ------------------------------------------------------------------ routing (hot path)
    def route_stanza(self, source: S2SStream, element, view: memoryview, batches: dict) -> None:
        """A stanza the session authorized on an S2S stream."""
        self.route(source, element, domain_of(element.from_), domain_of(element.to), view, batches)

    def route(self, source: XmlStream, element, from_domain: str, to_domain: str,
              view: memoryview, batches: dict) -> None:
        """Send ``element`` towards ``to_domain``: into ``batches`` for a stream,
        to a built-in service, into a pending queue, or back as a bounce."""
        target = self.table.local.get(to_domain)
        if target is None:
            link = self.table.remote.get((from_domain, to_domain))
            if link is not None and not link.closing:
                if link.paused and link.queue_full(element.end - element.start):
                    self._bounce_element(source, element, "resource-constraint",
                                         f"{to_domain} is not reading what is sent to it")
                    return
                batches.setdefault(link, []).append(source.chunk_for(link, element, view))
                self.metrics.stanzas_routed.inc("remote")
                return
            if to_domain in self.local_domains:
                self._bounce_element(source, element, "service-unavailable", f"{to_domain} is not connected")
                return
            self._enqueue(source, element, from_domain, to_domain, view)
            return
        if isinstance(target, Service):
            self._serve(source, element, view, target)
            return
        if target.closing:
            self._bounce_element(source, element, "service-unavailable", f"{to_domain} is disconnecting")
            return
        if target.paused and target.queue_full(element.end - element.start):
            self._bounce_element(source, element, "resource-constraint", f"{to_domain} is not keeping up")
            return
        batches.setdefault(target, []).append(source.chunk_for(target, element, view))
        self.metrics.stanzas_routed.inc("component")

    def deliver(self, data: bytes, name: str, type_: str | None, from_: str | None, to: str | None,
                id_: str | None, from_domain: str, to_domain: str) -> XmlStream | None:
        """Route a stanza the relay made itself (a service reply or a bounce); its
        bytes inherit the destination stream's namespace. Returns the stream
        written to, if any, so the caller can apply flow control. A stream whose
        queue is full gets nothing more: the stanza is counted and logged, since
        its sender is the relay itself."""
        target = self.table.local.get(to_domain)
        if target is None:
            link = self.table.remote.get((from_domain, to_domain))
            target = link if link is not None and not link.closing else None
        elif not isinstance(target, XmlStream) or target.closing:
            return None  # a service does not answer a service; a closing component gets nothing
        if target is not None:
            if target.paused and target.queue_full(len(data)):
                log.debug("dropping relay-made %s to %s: its stream's write queue is full", name, to_domain)
                return None
            target.write(data)
            return target
        if to_domain in self.local_domains:
            log.info("dropping %s for offline %s (nobody to tell)", name, to_domain)
            return None
        self._push(Queued(data, name, type_, from_, to, id_, self.loop.time()), (from_domain, to_domain))
        return None

    # ------------------------------------------------------------------ services
    def _serve(self, source: XmlStream, element, view: memoryview, service: Service) -> None:
        """The slow path: parse the stanza with lxml and let the service answer."""
        header = source.tokenizer.header
        stanza = parse_element(bytes(view[element.start : element.end]),
                               header.namespaces if header is not None else {})
        self.metrics.stanzas_routed.inc("service")
        reply = self.services.handle(stanza)
        if reply is None:
            return
        dest = self.deliver(reply, element.name, None, element.to, element.from_, element.id,
                            service.domain, domain_of(element.from_))
        self._hold(source, dest)

    def _hold(self, source: XmlStream, dest: XmlStream | None) -> None:
        """A sender that does not read what the relay answers it stops being read
        (when that hurts nobody else: ``may_wait_for``)."""
        if dest is not None and dest.paused and source.may_wait_for(dest):
            source.block_on(dest)

    # ------------------------------------------------------------------ queues and bounces
    def _enqueue(self, source: XmlStream, element, from_domain: str, to_domain: str, view: memoryview) -> None:
        data = source.chunk_for(self.s2s_output, element, view)
        item = Queued(bytes(data), element.name, element.type, element.from_, element.to, element.id,
                      self.loop.time())
        self._push(item, (from_domain, to_domain), source)

    def _push(self, item: Queued, pair: Pair, source: XmlStream | None = None) -> None:
        s2s = self.config.s2s
        if pair not in self.table.pending and len(self.table.pending) >= s2s.max_outbound_queues:
            self.metrics.limits_hit.inc("max_outbound_queues")
            count = self._outbound_queues_full.refused(self.loop.time())
            if count:
                log.warning("bounced %d stanza(s) for new remote domains: %d are already waiting for a stream "
                            "(s2s.max_outbound_queues)", count, s2s.max_outbound_queues)
            self._bounce(item, "resource-constraint", "too many remote domains are being connected; try later",
                         source)
            return
        queue, created = self.table.queue_for(pair, s2s.queue_max_stanzas, s2s.queue_max_age)
        if not queue.push(item):
            self._bounce(item, "resource-constraint", "too many stanzas waiting for the remote server", source)
            return
        if created:
            self.spawn(self._establish(pair))

    def _bounce_element(self, source: XmlStream, element, condition: str, text: str) -> None:
        self._bounce(Queued(b"", element.name, element.type, element.from_, element.to, element.id, 0.0),
                     condition, text, source)

    def _bounce(self, item: Queued, condition: str, text: str | None = None,
                source: XmlStream | None = None) -> None:
        """Tell the sender its stanza was not delivered (never for an error). The
        bounce takes the bounded path of every relay-made stanza; ``source``, the
        stream being read when the bounce was made, waits if it is not read."""
        data = errors.bounce(item.name, item.from_, item.to, item.id, item.type, condition, text)
        if data is None or not item.from_ or not item.to:
            return
        self.metrics.stanzas_bounced.inc(condition)
        try:
            from_domain, to_domain = domain_of(item.to), domain_of(item.from_)
        except ValueError:
            return
        dest = self.deliver(data, item.name, "error", item.to, item.from_, item.id, from_domain, to_domain)
        if source is not None:
            self._hold(source, dest)

    # ------------------------------------------------------------------ outbound streams
    async def _establish(self, pair: Pair) -> None:
        """Give ``pair`` an authenticated stream: piggyback on a stream that reaches
        the same peer (XEP-0220 §2.6, XEP-0288 §2.2), else connect. Queued stanzas
        are flushed by ``routes_changed`` the moment the pair is routed; on
        failure they bounce."""
        local, remote = pair
        s2s = self.config.s2s
        backoff = self.table.backoff_for(remote, s2s.backoff_base, s2s.backoff_max)
        outcome: str | None = "remote-server-timeout"
        reason = "the attempt was interrupted"
        try:
            await asyncio.sleep(backoff.wait(self.loop.time()))
            targets = await self.resolver.resolve(remote)
            # one attempt at a time per peer address, so pairs that start together share a stream
            first = targets[0]
            async with self._connect_locks.hold((first.addresses or (first.host,), first.port), 1):
                link = next((candidate for candidate in self._carriers(remote, targets)
                             if candidate.session.request_pair(local, remote)), None)
                if link is None:
                    link = await self._connect(local, remote, targets)
                else:
                    link.pump()
                    self.routes_changed(link)  # the pair may be authorized on it already
            failure = await self._wait_pair(link, pair)
            outcome, reason = failure if failure is not None else (None, "")
        except resolver.ResolutionError as exc:
            log.info("cannot resolve %s: %s", remote, exc)
            outcome, reason = bounce_condition(resolution_failed=True), f"cannot resolve: {exc}"
        except ConnectFailed as exc:
            log.info("cannot connect to %s: %s", remote, exc)
            outcome, reason = bounce_condition(resolution_failed=False), f"cannot connect: {exc}"
        finally:
            if outcome is None:
                self.table.backoff_succeeded(remote)
            else:
                backoff.failed(self.loop.time())
                log.info("pair %s -> %s failed (%s): %s", local, remote, outcome, reason)
                for item in self.table.take_queue(pair):
                    self._bounce(item, outcome, f"cannot reach {remote}: {reason}")
                self.metrics.negotiations_failed.inc("out", outcome)
            self._update_queue_gauges()

    def _carriers(self, remote: str, targets) -> list[S2SStream]:
        """Streams that can take a new pair towards ``remote``: those already
        carrying a pair to it (an inbound bidi stream included), then our
        outbound streams to the same address and port (target multiplexing)."""
        addresses = {(address, t.port) for t in targets for address in (t.addresses or (t.host,))}
        carrying = [link for link in self.table.links_to(remote) if isinstance(link, S2SStream)]
        same_target = [s for s in self.streams if isinstance(s, S2SStream) and s.outbound
                       and s.target in addresses and s not in carrying]
        return [s for s in carrying + same_target if not s.closing and not s.verify_only]

    async def _wait_pair(self, stream: S2SStream, pair: Pair) -> tuple[str, str] | None:
        """None once ``pair`` is routed over ``stream``, else the bounce condition and why."""
        if self.table.remote.get(pair) is stream:
            return None
        early = self._early_failures.pop((stream, pair), None)
        if early is not None:
            return early
        if stream.closed:
            return "remote-server-timeout", _lost_reason(stream, None)
        future = self.loop.create_future()
        self._pair_waiters[(stream, pair)] = future
        try:
            return await asyncio.wait_for(future, self.config.s2s.negotiation_timeout)
        except asyncio.TimeoutError:
            timeout = self.config.s2s.negotiation_timeout
            if not stream.authenticated:
                stream.fail("connection-timeout", "stream negotiation did not complete in time")
            return "remote-server-timeout", f"the stream was not authorized within {timeout:g} seconds"
        finally:
            self._pair_waiters.pop((stream, pair), None)

    async def _connect(self, local: str, remote: str, targets, *, verify_only: bool = False) -> S2SStream:
        """Open an outbound stream to ``remote``, trying its targets in order."""
        errors = []
        for target, address in ((t, a) for t in targets for a in (t.addresses or (t.host,))):
            session = self._outbound_session(local, remote, direct_tls=target.direct_tls, verify_only=verify_only)
            ssl = self.tls_client_context(local, direct_tls=True) if target.direct_tls else None
            try:
                _, stream = await asyncio.wait_for(
                    self.loop.create_connection(
                        lambda: S2SStream(self, session, outbound=True, direct_tls=target.direct_tls,
                                          local=local, remote=remote),
                        address, target.port, ssl=ssl, server_hostname=remote if ssl else None,
                    ),
                    self.config.s2s.connect_timeout,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                errors.append(f"{address}:{target.port}: {exc or 'timeout'}")
                if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.metrics.limits_hit.inc("open_files")
                    log.warning("cannot connect to %s for %s: out of file descriptors (%s)", address, remote, exc)
                continue
            self.connections_opened += 1
            stream.verify_only = verify_only
            stream.target = (address, target.port)
            return stream
        raise ConnectFailed("; ".join(errors) or "no targets")

    # ------------------------------------------------------------------ session events
    def authenticated(self, stream: S2SStream, event) -> None:
        direction = "in" if event.direction == "inbound" else "out"
        self.metrics.negotiations_completed.inc(direction, stream.mechanism)
        self.routes_changed(stream)

    def routes_changed(self, stream: S2SStream) -> None:
        """Route every pair the stream may now send, flushing the queue of each
        newly routed pair first (so queued stanzas keep their order)."""
        if stream.verify_only or stream.closing:
            return
        for pair in stream.session.outbound_pairs:
            if self.table.remote.get(pair) is stream:
                continue
            if not self.table.add_remote(pair, stream):
                continue
            items = self.table.take_queue(pair)
            if items:
                stream.write_chunks([item.data for item in items])
            future = self._pair_waiters.get((stream, pair))
            if future is not None and not future.done():
                future.set_result(None)

    def auth_failed(self, stream: S2SStream, event) -> None:
        pair = (event.local, event.remote)
        result = (event.bounce, event.text or event.condition)
        future = self._pair_waiters.get((stream, pair))
        if future is None:
            if not stream.closed:
                self._early_failures[(stream, pair)] = result
        elif not future.done():
            future.set_result(result)

    # ------------------------------------------------------------------ dialback verification
    def verify_key(self, origin: S2SStream, event) -> None:
        """Start verifying a dialback key, within the limits on pending verifications
        (each costs a DNS look-up and maybe a connection: a peer must not make the
        relay do thousands at once)."""
        slots = ((self.verifications, OVERALL), (self.verifications_per_ip, origin.ip),
                 (self.verifications_per_stream, origin))
        refused = admit(*slots)
        if refused is None:
            self.spawn(self._verify(origin, event, slots))
            return
        self.metrics.limits_hit.inc(refused.name)
        count = refused.refused(self.loop.time())
        if count:
            log.warning("refused %d dialback verification(s) by limits.%s = %d (last: %s for %s from %s)",
                        count, refused.name, refused.maximum, event.originating, event.receiving, origin.peer)
        origin.session.key_verified(event.token, "resource-constraint",
                                    f"too many dialback verifications pending (limits.{refused.name} = "
                                    f"{refused.maximum}); try again later")

    async def _verify(self, origin: S2SStream, event, slots) -> None:
        """Ask the authoritative server of the originating domain whether the key
        is valid, over a connection that is never ``origin`` (T-05, XEP-0288 §2.2):
        another authenticated stream to that domain if there is one, else a
        verify-only connection closed right after the answer (XEP-0220 §2.1.2)."""
        link = None
        try:
            link = next((candidate for candidate in self.table.links_to(event.originating)
                         if candidate is not origin and isinstance(candidate, S2SStream)
                         and not candidate.closing), None)
            if link is not None:
                result = await self._ask(link, event)
            else:
                targets = await self.resolver.resolve(event.originating)
                first = targets[0]
                async with self._verify_connections.hold(
                        (first.addresses or (first.host,), first.port), self.config.limits.max_verify_connections_per_target,
                        lambda: self.metrics.limits_hit.inc("max_verify_connections_per_target")):
                    link = await self._connect(event.receiving, event.originating, targets, verify_only=True)
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
        if not origin.closing:
            origin.session.key_verified(event.token, result)
            origin.pump()

    async def _ask(self, link: S2SStream, event) -> str:
        """Send ``<db:verify/>`` over ``link``; the authoritative server's answer."""
        future = self.loop.create_future()
        self._verify_waiters[(link, event.token)] = future
        try:
            link.session.request_verify(event.token, event.receiving, event.originating, event.stream_id, event.key)
            link.pump()
            return await asyncio.wait_for(future, self.config.s2s.negotiation_timeout)
        finally:
            self._verify_waiters.pop((link, event.token), None)

    def verify_result(self, stream: S2SStream, event) -> None:
        future = self._verify_waiters.get((stream, event.token))
        if future is not None and not future.done():
            future.set_result(event.result)

    # ------------------------------------------------------------------ sessions
    def _session_config(self, config: Config) -> SessionConfig:
        anchors = TrustStore.from_files(*config.tls.trust_anchors).anchors if config.tls.trust_anchors else ()
        if config.tls.system_trust:
            anchors += TrustStore.system().anchors
        have_certificates = bool(config.tls.certificates)
        return SessionConfig(
            local_domains=config.local_domains,
            dialback_secret=config.server.dialback_secret,
            trust_store=TrustStore(anchors),
            peer_trust={domain: TrustStore.from_files(*files)
                        for domain, files in config.tls.peer_trust_anchors.items()},
            policy=config.policy,
            tls_offered=have_certificates,
            tls_client=True,
            has_certificate=have_certificates,
            bidi=config.s2s.bidi,
            required_flags=config.s2s.required_flags,
        )

    def _inbound_session(self, direct_tls: bool) -> Session:
        return Session("receiver", self.session_config, direct_tls=direct_tls)

    def _outbound_session(self, local: str, remote: str, *, direct_tls: bool = False,
                          verify_only: bool = False) -> Session:
        return Session("initiator", self.session_config, local, remote, verify_only=verify_only,
                       direct_tls=direct_tls)


def _inbound_fd_budget() -> int:
    """Inbound streams the file-descriptor limit leaves room for (``FD_RESERVE``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - FD_RESERVE)


def _raise_fd_limit() -> None:
    """Let the process use every file descriptor the system allows it (the soft
    limit is often 1024, the hard one much higher), as ejabberd and Prosody
    packages do; limits.max_connections then bounds the relay's own use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return
        log.info("open-files limit raised from %d to %d", soft, hard)


def _lost_reason(stream: S2SStream, exc: Exception | None) -> str:
    """Why pairs still waiting on a closed stream failed, for their bounces."""
    if stream.failure:
        return stream.failure
    return f"connection lost: {exc}" if exc else "the connection closed before the pair was authorized"


def _install_signals(loop: asyncio.AbstractEventLoop, relay: Relay, stop: asyncio.Event) -> None:
    def reload() -> None:
        if relay.config.source.startswith("<"):
            relay.reload(relay.config)  # the embedded default: re-read certificates only
            return
        try:
            relay.reload(load_config(relay.config.source))
        except Exception as exc:  # a bad file keeps the running configuration
            log.error("reload failed, keeping the running configuration: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)


async def serve(config: Config) -> int:
    _raise_fd_limit()
    relay = Relay(config)
    try:
        await relay.start()
    except OSError as exc:  # e.g. a port already in use
        log.error("cannot start listening: %s", exc)
        await relay.stop(timeout=0)
        return 1
    stop = asyncio.Event()
    _install_signals(asyncio.get_running_loop(), relay, stop)
    for name, (host, port) in relay.listening.items():
        print(f"{name}: listening on {host}:{port}", flush=True)
    if config.components and "component" in relay.listening:
        host, port = relay.listening["component"]
        for component in config.components:
            print(f"component {component.domain}: connect a XEP-0114 component to {host}:{port} "
                  f"with its configured secret", flush=True)
    elif "component" in relay.listening:
        host, port = relay.listening["component"]
        print("no component configured; to connect a XEP-0114 component, put\n"
              "  [[component]]\n  domain = \"bot.localhost\"\n  secret = \"choose-a-secret\"\n"
              f"in a config file, run `python -m router serve --config FILE`, and point the component "
              f"at {host}:{port} with that domain and secret", flush=True)
    domains = ", ".join(sorted(config.local_domains))
    print(f"serving domains: {domains}", flush=True)
    await stop.wait()
    log.info("shutting down")
    await relay.stop()
    return 0


def run(config: Config) -> int:
    """Serve ``config`` until SIGTERM/SIGINT (exit status 0)."""
    import uvloop

    return uvloop.run(serve(config))
