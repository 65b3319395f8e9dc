"""This relay process on the cluster bus (NATS): connecting and reconnecting,
announcing what it can deliver, sending the stanzas it cannot deliver itself to
the member that can, and taking the stanzas other members send it.

Subjects, under ``[cluster] subject_prefix``: ``<prefix>.routes`` carries every
member's announcement (at start, on every change of its route table, and each
``ANNOUNCE_INTERVAL`` as a heartbeat; a member silent for ``TTL`` is
forgotten, one that stops says so); ``<prefix>.member.<node>.<worker>`` is one
member's inbox. The stanzas for one member of one event-loop iteration go in
one NATS request (``router.cluster.frames``); the member answers per stanza,
and a stanza not answered within ``bus_timeout``, or refused, bounces to its
sender: nothing sent over the bus vanishes. While NATS is unreachable local
delivery goes on, the stanzas that need another member bounce with that
reason, and the connection is retried for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import nats
import nats.errors

from router.cluster.frames import Carried, FrameError, decode_answer, decode_batch, encode_answer, encode_batch, split
from router.cluster.members import Announcement, Members, pick

log = logging.getLogger("router.cluster.bus")

ANNOUNCE_INTERVAL = 1.0
TTL = 3.5 * ANNOUNCE_INTERVAL  # three heartbeats missed
RETRY_INTERVAL = 1.0  # between attempts to reach NATS at start
CHANGE_DELAY = 0.02  # announcements of route changes are gathered this long
STOP_TIMEOUT = 3.0  # for the goodbye and the NATS connection's close when the relay stops
# Messages waiting in our inbox subscription before NATS calls us a slow consumer and
# drops them (their senders then bounce on timeout): bounded like every queue.
INBOX_PENDING_MESSAGES = 65536
INBOX_PENDING_BYTES = 256 * 1024 * 1024


class Bus:
    """One member of the cluster: ``host`` is the relay (route table, delivery,
    metrics, loop); ``cluster`` its ``[cluster]`` configuration."""

    def __init__(self, host: Any, cluster: Any, worker: int) -> None:
        self.host = host
        self.config = cluster
        self.node = cluster.node
        self.member = f"{cluster.node}.{worker}"
        self.prefix = cluster.subject_prefix
        self.members = Members(self.member, self.node, TTL)
        self.nc: Any = None
        self.connected = False
        self.in_flight = 0
        self._batches: dict[str, list[Carried]] = {}
        self._stopping = False
        self._announce_pending = False
        self._runner: asyncio.Task | None = None

    def subject(self, member: str) -> str:
        return f"{self.prefix}.member.{member}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._runner = self.host.spawn(self._run())

    async def stop(self) -> None:
        """Say goodbye (others forget our routes at once) and close the connection."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
        nc, connected, self.connected = self.nc, self.connected, False
        if nc is None:
            return
        try:  # bounded: a NATS that is away or reconnecting must not hold up the relay's stop
            if connected:
                await nc.publish(f"{self.prefix}.routes", json.dumps({"member": self.member, "bye": True}).encode())
                await asyncio.wait_for(nc.drain(), STOP_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - stopping must not fail on a broken bus
            log.info("cluster bus: closing the NATS connection: %s", exc or type(exc).__name__)
        if not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), STOP_TIMEOUT)
            except Exception as exc:  # noqa: BLE001
                log.info("cluster bus: the NATS connection did not close in time: %s", exc or type(exc).__name__)

    async def _run(self) -> None:
        servers = list(self.config.nats)
        while not self._stopping:
            try:
                self.nc = await nats.connect(
                    servers=servers, name=self.member, connect_timeout=2, allow_reconnect=True, drain_timeout=2,
                    max_reconnect_attempts=-1, reconnect_time_wait=RETRY_INTERVAL,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected, error_cb=self._error)
                break
            except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds; all mean "not now"
                log.warning("cluster bus: cannot reach NATS at %s (%s); retrying every %g s",
                            ", ".join(servers), exc or type(exc).__name__, RETRY_INTERVAL)
                await asyncio.sleep(RETRY_INTERVAL)
        await self.nc.subscribe(self.subject(self.member), cb=self._on_batch,
                                pending_msgs_limit=INBOX_PENDING_MESSAGES, pending_bytes_limit=INBOX_PENDING_BYTES)
        await self.nc.subscribe(f"{self.prefix}.routes", cb=self._on_routes)
        self.connected = True
        log.info("cluster bus: member %s connected to NATS %s", self.member, self.nc.connected_url.netloc)
        while not self._stopping:
            self.announce()
            for member in self.members.expire(self.host.loop.time()):
                log.warning("cluster bus: member %s went silent; its routes are forgotten", member)
            await asyncio.sleep(ANNOUNCE_INTERVAL)

    async def _disconnected(self) -> None:
        if not self._stopping:
            self.connected = False
            log.warning("cluster bus: lost NATS; stanzas for other members bounce until it is back")

    async def _reconnected(self) -> None:
        self.connected = True
        log.info("cluster bus: NATS is back (%s)", self.nc.connected_url.netloc)
        self.announce()

    async def _error(self, exc: Exception) -> None:
        log.warning("cluster bus: NATS error: %s", exc)

    # ------------------------------------------------------------------ announcements
    def routes_changed(self) -> None:
        """The route table changed: announce it soon (changes close together go together)."""
        if not self._announce_pending and self.connected:
            self._announce_pending = True
            self.host.loop.call_later(CHANGE_DELAY, self.announce)

    def announce(self) -> None:
        self._announce_pending = False
        if not self.connected:
            return
        table = self.host.table
        components = tuple(d for d, target in table.local.items() if getattr(target, "kind", None) == "component")
        payload = Announcement(self.member, self.node, components, tuple(table.remote)).to_json()
        self.host.spawn(self._publish(f"{self.prefix}.routes", json.dumps(payload).encode()))

    async def _publish(self, subject: str, payload: bytes) -> None:
        try:
            await self.nc.publish(subject, payload)
        except Exception as exc:  # noqa: BLE001 - the next heartbeat says it again
            log.info("cluster bus: announcement not sent: %s", exc)

    async def _on_routes(self, msg) -> None:
        try:
            data = json.loads(msg.data)
            if data.get("bye"):
                if data.get("member") != self.member:
                    self.members.forget(str(data.get("member")))
                    log.info("cluster bus: member %s left", data.get("member"))
                return
            announcement = Announcement.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cluster bus: ignoring a malformed announcement: %s", exc)
            return
        known = announcement.member in self.members
        if self.members.update(announcement, self.host.loop.time()) and not known:
            log.info("cluster bus: member %s (node %s) joined", announcement.member, announcement.node)
        self.host.metrics.cluster_members.set(len(self.members))

    # ------------------------------------------------------------------ sending
    def to_component(self, item: Carried) -> bool:
        """Send a stanza for a component connected elsewhere; False when none is."""
        member = self.members.component_holder(item.to_domain, item.from_ or "")
        if member is None:
            return False
        self.send(member, item)
        return True

    def to_remote(self, item: Carried) -> bool:
        """Send a stanza for a remote pair to the member holding its stream, else to
        this node's owner of the remote domain; False when this member is that owner
        (it connects itself)."""
        sender = item.from_ or ""
        member = self.members.pair_holder((item.from_domain, item.to_domain), sender)
        if member is None:
            owners = self.members.owners(item.to_domain, self.config.streams_per_domain)
            if self.member in owners:
                return False
            member = pick(owners, sender)
        self.send(member, item)
        return True

    def send(self, member: str, item: Carried) -> None:
        """Queue ``item`` for ``member`` until the end of this event-loop iteration."""
        if not self.connected:
            self._lost([item], "the cluster bus (NATS) is unreachable")
            return
        if self.in_flight >= self.config.max_bus_in_flight:
            self.host.metrics.limits_hit.inc("max_bus_in_flight")
            self.host.delivery.bounce_carried(
                item, "resource-constraint", "too many stanzas are in flight on the cluster bus (cluster.max_bus_in_flight)")
            return
        self.in_flight += 1
        batch = self._batches.get(member)
        if batch is None:
            if not self._batches:
                self.host.loop.call_soon(self._flush)
            self._batches[member] = [item]
        else:
            batch.append(item)

    def _flush(self) -> None:
        batches, self._batches = self._batches, {}
        for member, items in batches.items():
            for chunk in split(items):
                self.host.spawn(self._request(member, chunk))

    async def _request(self, member: str, items: list[Carried]) -> None:
        hop = self._hop(member)
        self.host.metrics.bus_batches.inc("sent")
        try:
            reply = await self.nc.request(self.subject(member), encode_batch(self.member, items),
                                          timeout=self.config.bus_timeout)
            answers = decode_answer(reply.data, len(items))
        except nats.errors.NoRespondersError:
            reason, failure = "unreachable", f"cluster member {member} is gone"
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            reason, failure = "timeout", f"cluster member {member} did not answer within {self.config.bus_timeout:g} s"
        except (nats.errors.Error, FrameError, OSError) as exc:
            reason, failure = "unreachable", f"cluster bus failure sending to {member}: {exc or type(exc).__name__}"
        else:
            self.host.metrics.bus_stanzas.inc("sent", hop, by=len(items))
            for item, answer in zip(items, answers):
                if answer:  # the member refused it: its (condition, text)
                    self.host.delivery.bounce_carried(item, *answer)
            return
        finally:
            self.in_flight -= len(items)
        log.warning("cluster bus: %d stanza(s) bounce: %s", len(items), failure)
        self.host.metrics.bus_failures.inc(reason, by=len(items))
        self._lost(items, failure)

    def _lost(self, items: list[Carried], text: str) -> None:
        """Stanzas no member took bounce as if their destination were unreachable here:
        a component's with service-unavailable, a remote server's with remote-server-timeout."""
        local = self.host.delivery.local_domains
        for item in items:
            condition = "service-unavailable" if item.to_domain in local else "remote-server-timeout"
            self.host.delivery.bounce_carried(item, condition, text)

    def _hop(self, member: str) -> str:
        return "worker" if self.members.node_of(member) in (None, self.node) else "node"

    # ------------------------------------------------------------------ receiving
    async def _on_batch(self, msg) -> None:
        try:
            sender, items = decode_batch(msg.data)
        except FrameError as exc:
            log.warning("cluster bus: refusing a malformed batch: %s", exc)
            return  # the sender times out and bounces
        answers = self.host.router.take_carried(items, self.host.delivery.take_from_bus)
        self.host.metrics.bus_stanzas.inc("received", self._hop(sender), by=len(items))
        self.host.metrics.bus_batches.inc("received")
        try:
            await msg.respond(encode_answer(answers))
        except nats.errors.Error as exc:
            log.warning("cluster bus: could not answer %s: %s (it bounces what it sent)", sender, exc)
