"""Where a stanza goes, and what happens when it cannot get there.

``route`` is the hot path: at most two dict lookups (the ``to`` domain among
local targets, else the pair ``(from, to)``, a `Pair(local, remote)`, among
remote streams) and the stanza's byte range joins its destination's batch. The
rest is the slow path:
a built-in service answers (parsed with lxml), a pair without a stream queues
while the connector sets one up, and what cannot be delivered bounces to its
sender (RFC 6120 §8.3). Stanzas the relay makes itself (bounces, service
replies) take the same bounded path as forwarded ones: a destination whose
write queue is full gets nothing more, and a sender that does not read what
the relay answers it stops being read when that hurts nobody else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from router.wire import errors
from router.wire.jid import domain_of
from router.routing.limits import Refusals
from router.negotiation.pairs import Pair
from router.routing.routes import Queued, RouteTable
from router.cluster.frames import Carried, FrameError, carried
from router.routing.services import Services
from router.net.stream import StreamHost, XmlStream
from router.wire.namespaces import COMPONENT_NS, SERVER_NS
from router.wire.xml import parse_element

log = logging.getLogger("router.routing.delivery")


@dataclass(frozen=True)
class OutputProfile:
    """What ``rescope`` needs to know about a destination that has no stream yet."""

    content_ns: str
    out_lang: str | None


class Service:
    """A built-in service domain in the route table (ping, disco, echo, sink)."""

    __slots__ = ("domain",)

    def __init__(self, domain: str) -> None:
        self.domain = domain


class Delivery:
    """Routing, built-in services, queues and bounces of the relay ``host``."""

    def __init__(self, host: StreamHost, table: RouteTable) -> None:
        self.host = host
        self.table = table
        self.metrics = host.metrics
        self.local_domains: frozenset[str] = frozenset()
        self.services: Services | None = None
        self.s2s_output = OutputProfile(SERVER_NS, None)
        self.component_output = OutputProfile(COMPONENT_NS, "en")  # as router.net.components declares
        self.cluster = None  # router.cluster.bus.Bus when [cluster] nats: routes held by other members
        self.liveness = None  # router.net.liveness.Liveness: takes the answers to the relay's own pings
        self._outbound_queues_refusals = Refusals()
        self._peer_max_bytes_refusals = Refusals()

    def configure(self, config, default_lang: str | None) -> None:
        """Local domains and services of ``config`` (at start and on reload)."""
        self.local_domains = config.local_domains
        for domain in config.service_domains:
            if not isinstance(self.table.local.get(domain), Service):
                self.table.set_local(domain, Service(domain))
        for domain, target in list(self.table.local.items()):
            if isinstance(target, Service) and domain not in config.service_domains:
                del self.table.local[domain]
        self.services = Services.from_config(config, self.metrics)
        # queued stanzas are fixed up for the outbound stream they will most likely take
        self.s2s_output = OutputProfile(SERVER_NS, default_lang)
        if self.cluster is not None:  # its routes hold the output profiles
            self.cluster.forget_routes()

    # ------------------------------------------------------------------ hot path
    def route(self, source: XmlStream, element, from_domain: str, to_domain: str,
              view: memoryview, batches: dict) -> None:
        """Send ``element`` towards ``to_domain``: into ``batches`` for a stream,
        to a built-in service, into a pending queue, or back as a bounce."""
        liveness = self.liveness
        if liveness is not None and element.id in liveness.awaited and liveness.answered(element, from_domain,
                                                                                           to_domain):
            return  # the answer to the relay's own ping goes no further
        target = self.table.local.get(to_domain)
        if target is None:
            target = self.table.remote.get((from_domain, to_domain))  # Pair(local, remote): a tuple finds it
            if target is None or target.closing:
                self._elsewhere(source, element, from_domain, to_domain, view)
                return
            kind = "remote"
        elif isinstance(target, Service):
            self._serve(source, element, view, target)
            return
        elif target.closing:
            self._bounce_element(source, element, "service-unavailable", f"{to_domain} is disconnecting")
            return
        else:
            kind = "component"
        size = element.end - element.start
        if target.too_large(size):
            self._bounce_element(source, element, "policy-violation",
                                 self._over_peer_limit(to_domain, size, target.peer_max_bytes))
            return
        if target.paused and target.queue_full(size):
            self._bounce_element(source, element, "resource-constraint", f"{to_domain} is not reading what is sent to it")
            return
        batches.setdefault(target, []).append(source.chunk_for(target, element, view))
        self.metrics.stanzas_routed.inc(kind)

    # ------------------------------------------------------------------ relay-made stanzas
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
            if target.too_large(len(data)):
                self.metrics.limits_hit.inc("peer_max_bytes")
                log.info("dropping relay-made %s to %s: %d bytes, its server announced max-bytes %d (XEP-0478)",
                         name, to_domain, len(data), target.peer_max_bytes)
                return None
            if target.paused and target.queue_full(len(data)):
                log.debug("dropping relay-made %s to %s: its stream's write queue is full", name, to_domain)
                return None
            target.write_chunks([data])
            return target
        local = to_domain in self.local_domains
        if self.cluster is not None:  # another member's stream, if one holds it
            item = Carried(name, type_, from_, to, id_, from_domain, to_domain, data)
            if self.cluster.to_component(item) if local else self.cluster.to_remote(item):
                return None
        if local:
            log.info("dropping %s for offline %s (nobody to tell)", name, to_domain)
        else:
            self._push(Queued(data, name, type_, from_, to, id_, self.host.loop.time()), Pair(from_domain, to_domain))
        return None

    def _serve(self, source: XmlStream, element, view: memoryview, service: Service) -> None:
        """The slow path: parse the stanza with lxml and let the service answer."""
        header = source.tokenizer.header
        stanza = parse_element(bytes(view[element.start : element.end]),
                               header.namespaces if header is not None else {})
        self.metrics.stanzas_routed.inc("service")
        reply = self.services.handle(stanza)
        if reply is None:
            return
        to_domain = domain_of(element.from_)
        link = self.table.remote.get((service.domain, to_domain))
        if link is not None and link.too_large(len(reply)):
            # XEP-0478 §3: an answer (an echo) too large for the asker's server: the asker learns why instead
            text = self._over_peer_limit(to_domain, len(reply), link.peer_max_bytes)
            reply = errors.bounce(element.name, element.from_, element.to, element.id, element.type,
                                  "policy-violation", text)
            if reply is None:
                return
        dest = self.deliver(reply, element.name, None, element.to, element.from_, element.id,
                            service.domain, to_domain)
        self._hold(source, dest)

    @staticmethod
    def _hold(source: XmlStream, dest: XmlStream | None) -> None:
        """A sender that does not read what the relay answers it stops being read
        (when that hurts nobody else: ``may_wait_for``)."""
        if dest is not None and dest.paused and source.may_wait_for(dest):
            source.block_on(dest)

    # ------------------------------------------------------------------ other members (router.cluster)
    def _elsewhere(self, source: XmlStream, element, from_domain: str, to_domain: str, view: memoryview) -> None:
        """No stream here for the stanza: another member's (over the cluster bus), a
        new outbound stream (queued while it connects), or a bounce."""
        local = to_domain in self.local_domains
        if local and self.cluster is None:
            self._bounce_element(source, element, "service-unavailable", f"{to_domain} is not connected")
            return
        data = bytes(source.chunk_for(self.component_output if local else self.s2s_output, element, view))
        item = Carried(element.name, element.type, element.from_, element.to, element.id, from_domain, to_domain,
                       data)
        if local:
            if not self.cluster.to_component(item):
                self._bounce_element(source, element, "service-unavailable", f"{to_domain} is not connected")
        elif self.cluster is None or not self.cluster.to_remote(item):
            queued = Queued(data, element.name, element.type, element.from_, element.to, element.id,
                            self.host.loop.time())
            self._push(queued, Pair(from_domain, to_domain), source)

    def take_from_bus(self, from_domain: str, to_domain: str, data: bytes) -> tuple[str, str] | None:
        """A stanza another member sent: delivered here, queued while this member
        connects, or refused with the (condition, text) its sender bounces it with.
        It never goes back on the bus (one hop)."""
        target = self.table.local.get(to_domain)
        if target is None:
            target = self.table.remote.get((from_domain, to_domain))
        if target is None or not isinstance(target, XmlStream) or target.closing:
            if to_domain in self.local_domains:
                return "service-unavailable", f"{to_domain} is not connected to {self.cluster.member}"
            try:
                item = carried(from_domain, to_domain, data)
            except FrameError as exc:
                return "bad-request", str(exc)
            self._push(Queued(data, item.name, item.type, item.from_, item.to, item.id, self.host.loop.time()),
                       Pair(from_domain, to_domain))
            return None
        if target.too_large(len(data)):
            return "policy-violation", self._over_peer_limit(to_domain, len(data), target.peer_max_bytes)
        if target.paused and target.queue_full(len(data)):
            return "resource-constraint", f"{to_domain} is not reading what is sent to it"
        target.write_chunks([data])
        self.metrics.stanzas_routed.inc(target.kind if target.kind == "component" else "remote")
        return None

    def unacknowledged(self, stream: XmlStream) -> None:
        """XEP-0198: ``stream`` is gone, and its peer never acknowledged these stanzas:
        re-sent towards their destination (another stream, or the pair's queue and a new
        one), or bounced with ``s2s.sm_resend`` off. Never dropped without a word."""
        resend = self.host.config.s2s.sm_resend
        count = 0
        for data, element in stream.acks.stanzas():
            count += 1
            item = Queued(data, element.name, element.type, element.from_, element.to, element.id, 0.0)
            if not resend:
                self.bounce(item, "remote-server-timeout", f"the stream to {stream.domain_label} ended before "
                            "its server acknowledged this stanza (XEP-0198)")
                continue
            from_domain, to_domain = domain_of(element.from_), domain_of(element.to)  # valid: it was routed
            heir = self.table.remote.get(Pair(from_domain, to_domain))
            if heir is not None and heir.paused and heir.queue_full(len(data)):
                self.bounce(item, "resource-constraint", f"{to_domain} is not reading what is sent to it")
                continue
            self.deliver(data, element.name, element.type, element.from_, element.to, element.id,
                         from_domain, to_domain)
        if count:
            self.metrics.stream_management.inc("resent" if resend else "bounced", by=count)
            log.warning("s2s peer=%s domain=%s closed with %d stanza(s) unacknowledged (XEP-0198): %s",
                        stream.peer, stream.domain_label, count, "re-sent" if resend else "bounced")

    def bounce_carried(self, item: Carried, condition: str, text: str) -> None:
        """A stanza the bus could not deliver goes back to its sender."""
        self.bounce(Queued(b"", item.name, item.type, item.from_, item.to, item.id, 0.0), condition, text)

    # ------------------------------------------------------------------ queues and bounces

    def _push(self, item: Queued, pair: Pair, source: XmlStream | None = None) -> None:
        s2s = self.host.config.s2s
        if pair not in self.table.pending and len(self.table.pending) >= s2s.max_outbound_queues:
            self.metrics.limits_hit.inc("max_outbound_queues")
            count = self._outbound_queues_refusals.note(self.host.loop.time())
            if count:
                log.warning("bounced %d stanza(s) for new remote domains: %d are already waiting for a stream "
                            "(s2s.max_outbound_queues)", count, s2s.max_outbound_queues)
            self.bounce(item, "resource-constraint", "too many remote domains are being connected; try later",
                        source)
            return
        queue, created = self.table.queue_for(pair, s2s.queue_max_stanzas, s2s.queue_max_age)
        if not queue.push(item):
            self.bounce(item, "resource-constraint", "too many stanzas waiting for the remote server", source)
            return
        if created:
            self.host.spawn(self.host.connector.establish(pair))

    def expire_queues(self, now: float) -> None:
        """Bounce queued stanzas that waited longer than ``s2s.queue_max_age``."""
        waited = self.metrics.queue_wait_seconds.labels("bounced")
        for queue in list(self.table.pending.values()):
            for item in queue.expired(now):
                waited.observe(now - item.since)
                self.bounce(item, "remote-server-timeout", "no stream to the remote server in time")
        self.update_queue_gauges()

    def update_queue_gauges(self) -> None:
        self.metrics.queued_stanzas.set(sum(len(q.items) for q in self.table.pending.values()))
        self.metrics.outbound_queues.set(len(self.table.pending))

    def fitting(self, items: list[Queued], remote: str, stream: XmlStream) -> list[Queued]:
        """The queued ``items`` within the ``max-bytes`` ``remote`` announced on ``stream``;
        the others bounce with ``<policy-violation/>`` (XEP-0478 §3)."""
        kept = []
        for item in items:
            if stream.too_large(len(item.data)):
                self.bounce(item, "policy-violation",
                            self._over_peer_limit(remote, len(item.data), stream.peer_max_bytes))
            else:
                kept.append(item)
        return kept

    def _over_peer_limit(self, remote: str, size: int, limit: int) -> str:
        """Count (and log, at most every ``LOG_INTERVAL``) a stanza larger than the
        ``max-bytes`` its destination announced; the text of its bounce (XEP-0478 §3:
        "a <text/> may also be included, explaining the limit")."""
        self.metrics.limits_hit.inc("peer_max_bytes")
        count = self._peer_max_bytes_refusals.note(self.host.loop.time())
        if count:
            log.warning("bounced %d stanza(s) larger than the max-bytes their remote server announced "
                        "(XEP-0478); the last: remote=%s size=%d max_bytes=%d", count, remote, size, limit)
        return f"{remote} accepts stanzas of at most {limit} bytes (XEP-0478 max-bytes); this one has {size}"

    def _bounce_element(self, source: XmlStream, element, condition: str, text: str) -> None:
        self.bounce(Queued(b"", element.name, element.type, element.from_, element.to, element.id, 0.0),
                    condition, text, source)

    def bounce(self, item: Queued, condition: str, text: str | None = None,
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
