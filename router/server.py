"""The relay: assembles its parts, listens, sweeps, reloads and stops.

``Relay`` owns every stream and the route table and hands the work to its
parts: ``Delivery`` (routing, services, queues, bounces), ``Connector``
(outbound streams), ``DialbackVerifier`` and ``Admission`` (connection limits).
Streams reach it through ``router.net.stream.StreamHost``; the callbacks they make
are the parts' own methods, bound here, so the hot path pays no extra call.
``router.process`` runs one in a process (signals, banner, readiness).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from router._fastroute import Router
from router.admin.control import STREAM_IDS, ControlServer
from router.admin.protocol import socket_path
from router.cluster.bus import Bus
from router.net import resolver

from router.trust import tls
from router.net.admission import Admission
from router.trust.certs import TrustStore
from router.net.components import ComponentStream
from router.config import Config
from router.net.connector import Connector
from router.net.danecheck import DaneChecker
from router.net.liveness import Liveness
from router.routing.delivery import Delivery
from router.metrics import RelayMetrics, start_metrics_server
from router.negotiation.features import StreamLimits
from router.negotiation.session import Session, SessionConfig
from router.negotiation.state import CLOSED, TLS
from router.routing.routes import RouteTable
from router.net.s2s import S2SStream
from router.net.stream import XmlStream
from router.net.verifier import DialbackVerifier
from router.wire import jid

log = logging.getLogger("router.server")

# How often idle/keepalive/negotiation clocks are checked, at most.
SWEEP_INTERVAL = 1.0


class Relay:
    """Every stream, the route table and the listeners of one relay process."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None, *, worker: int = 0) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.worker = worker  # index among the node's worker processes ([cluster] workers)
        self.config = config
        self.metrics = RelayMetrics()
        self.metrics.streams_open.collect = self._count_streams
        self.table = RouteTable()
        self.streams: set[XmlStream] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.listening: dict[str, tuple[str, int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._direct_tls_context = None  # the XEP-0368 listener's context, once listening
        self.delivery = Delivery(self, self.table)
        self.connector = Connector(self)
        self.verifier = DialbackVerifier(self)
        self.dane = DaneChecker(self)
        self.admission = Admission(self)
        # the per-stanza calls of streams go straight to the part (no extra call)
        self.route = self.delivery.route
        self.router = Router(self.table.local, self.table.remote, self.delivery.route, jid.domain_of,
                             jid.recent_domains, (TLS, CLOSED), self.loop.call_soon)
        self.liveness = self.delivery.liveness = Liveness(self)  # XEP-0199 pings; after the router (awaited_ids)
        self.metrics.stanzas_routed.collect = self.router.stanzas_routed
        self.metrics.bytes_received.collect = self.router.bytes_received
        self.metrics.bytes_sent.collect = self.router.bytes_sent
        self.bus: Bus | None = None  # the cluster bus, with [cluster] nats
        if config.cluster.bus:
            self.bus = self.delivery.cluster = Bus(self, config.cluster, worker)
            self.table.on_change = self.bus.routes_changed
            self.metrics.bus_in_flight.collect = lambda: {(): self.bus.in_flight}
            self.metrics.bus_connected.collect = lambda: {(): int(self.bus.connected)}
        self.metrics.pre_auth_streams.collect = lambda: {(): self.admission.pre_auth.total()}
        self.metrics.pending_verifications.collect = lambda: {(): self.verifier.pending.total()}
        self._apply(config)

    # ------------------------------------------------------------------ configuration
    def _apply(self, config: Config) -> None:
        """Precompute what the hot path looks up (at start and on reload). Every
        part that can fail (certificates, keys, trust anchors) is built first and
        swapped in after, so a failed reload changes nothing."""
        server_contexts, client_contexts, default_files = _tls_contexts(config)
        session_config = self._session_config(config)
        if self._direct_tls_context is not None and default_files is not None:
            # the listening socket keeps its context object: give it the new certificates
            self._direct_tls_context.load_cert_chain(*default_files)
            self._direct_tls_context.sni_callback = server_contexts.default.sni_callback
        self.config = config
        self.server_contexts, self.client_contexts = server_contexts, client_contexts
        self.session_config = session_config
        self.admission.configure(config.limits)
        self.verifier.configure(config.limits)
        self.component_secrets = {c.domain: c.secret for c in config.components}
        # with DANE, the validating resolver's AD bit is believed (RFC 6698 §4.1)
        self.resolver = resolver.Resolver(config.routes, resolver.dns_resolver(config.tls.nameservers, config.tls.dane),
                                          limit_hit=self.metrics.limits_hit.inc, blocklist=config.s2s.connect_blocklist)
        self.delivery.configure(config, session_config.default_lang)
        self.router.local_domains = config.local_domains

    def reload(self, config: Config) -> None:
        """SIGHUP: new policy lists, limits and certificates for new streams and new
        negotiations; open streams stay up. Raises (and changes nothing) when a
        certificate, key or trust anchor cannot be loaded. Listeners are bound at
        start: a change to them is reported, and needs a restart."""
        old = self.config
        self._apply(config)
        if config.listen != old.listen:
            log.warning("the [listen] section changed: listeners are bound at start, restart the relay to apply it")
        if config.cluster != old.cluster:
            log.warning("the [cluster] section changed: workers and the bus are set up at start, restart the relay "
                        "to apply it")
        if config.policy.deny != old.policy.deny:  # ctl deny entries last until a reload
            log.info("policy.deny is the file's again: %s", ", ".join(config.policy.deny) or "none")
        if config.log.level != old.log.level:
            logging.getLogger().setLevel(config.log.level)
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
        s2s_proxied, direct_tls_proxied = "s2s" in listen.proxy_protocol, "s2s_direct_tls" in listen.proxy_protocol
        if listen.s2s is not None:
            await self._listen("s2s", listen.s2s, lambda: S2SStream(self, self._inbound_session(False), outbound=False,
                                                                    proxied=s2s_proxied))
        if listen.s2s_direct_tls is not None:
            context = self._direct_tls_listener_context()
            await self._listen(
                "s2s-direct-tls", listen.s2s_direct_tls,
                lambda: S2SStream(self, self._inbound_session(True), outbound=False, direct_tls=True,
                                  proxied=direct_tls_proxied),
                ssl=None if direct_tls_proxied else context,  # behind PROXY, TLS starts after the header
            )
        if listen.proxy_protocol:
            log.info("PROXY protocol header expected on %s from %s", ", ".join(sorted(listen.proxy_protocol)),
                     ", ".join(listen.proxy_trusted))
        if listen.component is not None:
            await self._listen("component", listen.component, lambda: ComponentStream(self))
        if listen.metrics is not None:
            server = await start_metrics_server(self.metrics, listen.metrics.host, listen.metrics.port)
            self.servers.append(server)
            self.listening["metrics"] = server.sockets[0].getsockname()[:2]
            log.info("listening metrics on http://%s:%d/metrics", *self.listening["metrics"])
        control = socket_path(self.config, self.worker)
        if control is not None:  # one of self.servers: stop() closes it, which removes its socket file
            self.servers.append(await ControlServer.start(self, control))
        self._sweeper = self.loop.create_task(self._sweep())
        if self.bus is not None:
            self.bus.start()  # in the background: NATS being away does not stop local delivery

    def _direct_tls_listener_context(self):
        if self.server_contexts is None:
            raise ValueError("listen.s2s_direct_tls needs at least one certificate in [tls.certificates]")
        self._direct_tls_context = self.server_contexts.default
        return self._direct_tls_context

    async def _listen(self, name: str, endpoint, factory, ssl=None) -> None:
        # the workers of a node share each port: the kernel spreads their connections (SO_REUSEPORT)
        server = await self.loop.create_server(factory, endpoint.host, endpoint.port, ssl=ssl, backlog=4096,
                                               reuse_address=True, reuse_port=self.config.cluster.workers > 1)
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
        if self.bus is not None:
            await self.bus.stop()
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
                elif isinstance(stream, S2SStream):
                    self._sweep_s2s(stream, now, s2s)
                elif now - stream.last_tx > s2s.keepalive_interval:
                    stream.keepalive()
            self.delivery.expire_queues(now)
            self.table.prune_backoff(now)

    def _sweep_s2s(self, stream: S2SStream, now: float, s2s) -> None:
        """An authenticated S2S stream: dead (no XEP-0198 ack, nothing received), pinged
        (XEP-0199), kept within the peer's XEP-0478 idle limit, or given a keepalive."""
        dead = stream.acks.tick(now, s2s) if stream.acks is not None else None
        if dead is not None:
            log.warning("s2s peer=%s domain=%s: %s; closing it", stream.peer, stream.domain_label, dead)
            self.metrics.stream_management.inc("ack_timeout")
            stream.fail("connection-timeout", dead)
        elif now - stream.last_rx > s2s.idle_timeout:
            stream.fail("connection-timeout", f"nothing received for {s2s.idle_timeout:g} seconds")
        elif not self.liveness.check(stream, now, s2s) and now - stream.last_tx > s2s.keepalive_interval:
            stream.keepalive()

    def _close_stalled(self, stream: XmlStream) -> None:
        """A stream that reads nothing of what we send only ever hurts itself: close it."""
        timeout = self.config.s2s.write_stall_timeout
        backlog = stream.transport.get_write_buffer_size()
        log.warning("%s %s domain=%s wrote nothing of %d queued bytes for %g seconds "
                    "(s2s.write_stall_timeout): closing it", stream.kind, stream.peer, stream.domain_label, backlog,
                    timeout)
        self.metrics.limits_hit.inc("write_stall_timeout")
        stream.fail("resource-constraint", f"the stream read nothing of {backlog} bytes for {timeout:g} seconds")
        stream.abort_after(self.config.s2s.close_timeout)  # it does not read our close either

    # ------------------------------------------------------------------ writes
    # ------------------------------------------------------------------ stream bookkeeping
    def stream_opened(self, stream: XmlStream) -> None:
        stream.ctl_id = next(STREAM_IDS)
        self.streams.add(stream)
        if isinstance(stream, S2SStream) and not stream.outbound:
            if stream.proxy is None:
                self.admission.opened(stream)
            else:  # from a load balancer: counted once its PROXY header names the peer (S2SStream)
                self.admission.proxied(stream)

    def stream_closed(self, stream: XmlStream, exc: Exception | None) -> None:
        self.streams.discard(stream)
        if isinstance(stream, ComponentStream):
            if stream.domain is not None and self.table.remove_local(stream.domain, stream):
                self.metrics.components_connected.dec()
                log.info("component offline domain=%s peer=%s", stream.domain, stream.peer)
            return
        self.admission.closed(stream)
        self.connector.stream_closed(stream, exc)
        self.verifier.stream_closed(stream)
        self.liveness.forget(stream)
        if stream.acks is not None:  # XEP-0198: what the peer never acknowledged is not lost
            self.delivery.unacknowledged(stream)
        stream.session.connection_lost()
        log.info("s2s %s stream closed peer=%s domain=%s%s", "outbound" if stream.outbound else "inbound",
                 stream.peer, stream.domain_label, f" error={exc}" if exc else "")

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
            dane=config.tls.dane,
            dane_exempt=config.tls.dane_exempt,
            stream_management=config.s2s.stream_management,
            # XEP-0478: the stanza size we accept once authenticated, and how long we let a stream idle
            stream_limits=StreamLimits(config.policy.max_stanza_bytes, int(config.s2s.idle_timeout))
            if config.s2s.advertise_limits else None,
        )

    def _inbound_session(self, direct_tls: bool) -> Session:
        return Session("receiver", self.session_config, direct_tls=direct_tls)

    def outbound_session(self, local: str, remote: str, *, direct_tls: bool = False,
                          verify_only: bool = False) -> Session:
        return Session("initiator", self.session_config, local, remote, verify_only=verify_only,
                       direct_tls=direct_tls)


def _tls_contexts(config: Config) -> tuple[Any, dict, tuple[str, str] | None]:
    """Server contexts per local domain (chosen by the header 'to' or SNI), client
    contexts presenting each local domain's certificate, and the default
    domain's files (for the direct-TLS listener); raises when one cannot be loaded."""
    files = {domain: (str(f.cert), str(f.key)) for domain, f in config.tls.certificates.items()}
    client_contexts: dict[tuple[str | None, bool], Any] = {
        (None, False): tls.client_context(), (None, True): tls.client_context(direct_tls=True)}
    if not files:
        return None, client_contexts, None
    for domain, (cert, key) in files.items():
        try:
            client_contexts[(domain, False)] = tls.client_context(cert, key)
        except (ssl.SSLError, OSError) as exc:  # OpenSSL's own text ("PEM lib") names no file
            raise ValueError(f"cannot load the certificate of {domain} ({cert}) with its key ({key}): {exc}") from None
        client_contexts[(domain, True)] = tls.client_context(cert, key, direct_tls=True)
    default = next((d for d in config.server.domains if d in files), next(iter(files)))
    return tls.server_context(files, default), client_contexts, files[default]
