"""This relay process on the cluster bus (NATS): connecting and reconnecting,
announcing what it can deliver, sending the stanzas it cannot deliver itself to
the member that can, and taking the stanzas other members send it.

Subjects, under ``[cluster] subject_prefix``: ``<prefix>.routes`` carries every
member's announcement (at start, on each change, and every
``ANNOUNCE_INTERVAL`` as a heartbeat; a member silent for ``TTL`` is forgotten,
one that stops says so); ``<prefix>.member.<node>.<worker>`` is one member's
inbox. The stanzas for one member of one event-loop iteration go in one NATS
message, framed by the compiled router once this member chose where a
destination's stanzas go (``Router.bus_routes``). A batch waits in a table with
a timer for its answer, to a reply subject of ours:
``<prefix>.answer.<node>.<worker>.<incarnation>.<sequence>``. The member
answers per stanza (``router.cluster.taking``); a stanza not answered
within ``bus_timeout``, or refused, bounces to its sender: nothing sent over
the bus vanishes. Announcements go over nats-py, which knows the server list
and reconnects; batches and answers over a data connection of our own to the
same server (``router.cluster.dataline``). While either is away local delivery
goes on, the stanzas that need another member bounce with that reason, and
NATS is tried again for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any
from urllib.parse import urlparse

import nats

from router.cluster import control
from router.cluster.dataline import LineError, open_line
from router.cluster.frames import Carried, FrameError, answers_for, decode_answers, decode_batch, outbox
from router.cluster.members import MAX_CHOICES, Announcement, Members, pick
from router.cluster.taking import Taker

log = logging.getLogger("router.cluster.bus")

ANNOUNCE_INTERVAL = 1.0
TTL = 3.5 * ANNOUNCE_INTERVAL  # three heartbeats missed
RETRY_INTERVAL = 1.0  # between attempts to reach NATS at start
CHANGE_DELAY = 0.02  # announcements of route changes are gathered this long
STOP_TIMEOUT = 3.0  # for the goodbye and the NATS connection's close when the relay stops
LINE_TIMEOUT = 2.0  # to open the data connection, its handshake included
NO_RESPONDERS = 503  # NATS's status for a request to a subject no one subscribes to


class Bus:
    """One member of the cluster: ``host`` is the relay (route table, delivery,
    metrics, loop); ``cluster`` its ``[cluster]`` configuration."""

    def __init__(self, host: Any, cluster: Any, worker: int) -> None:
        self.host = host
        self.config = cluster
        self.node = cluster.node
        self.member = f"{cluster.node}.{worker}"
        self.prefix = cluster.subject_prefix
        self.members = Members(self.member, self.node, TTL, self.forget_routes)
        self.nc: Any = None
        self.line: Any = None  # the data connection (dataline.DataLine) while it is open
        self._opening: asyncio.Task | None = None
        self.connected = False
        self.in_flight = 0
        self._outboxes: dict[str, Any] = {}  # member -> its frames.outbox
        self._due: list[Any] = []  # the outboxes with stanzas to send at the end of this iteration
        self._answers = f"{self.prefix}.answer.{self.member}.{secrets.token_hex(4)}"  # + "." sequence
        self._sequence = 0
        self.generation = 0  # _flush calls so far: a batch belongs to the flush that sent it
        # unanswered batches: sequence -> (member, payload, stanzas, their bus_timeout timer, generation)
        self._waiting: dict[int, tuple[str, bytearray, int, asyncio.TimerHandle, int]] = {}
        self._handoff_waiters: set[Any] = set()  # S2S streams whose XEP-0198 <a/>s wait (StreamAcks.deferred)
        self.taker = Taker(host, self._send_answer, self._hop)
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
        for task in (self._runner, self._opening):
            if task is not None:
                task.cancel()
        self.taker.answer_all()
        nc, connected, line = self.nc, self.connected, self.line
        self.line = None
        self._set_connected(False)
        if line is not None:
            line.close()
        if nc is not None:
            bye = json.dumps({"member": self.member, "bye": True}).encode()
            await control.close(nc, (f"{self.prefix}.routes", bye) if connected else None, STOP_TIMEOUT)

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
        await self.nc.subscribe(f"{self.prefix}.routes", cb=self._on_routes)
        self._reopen()
        while not self._stopping:
            self.announce()
            for member in self.members.expire(self.host.loop.time()):
                log.warning("cluster bus: member %s went silent; its routes are forgotten", member)
            await asyncio.sleep(ANNOUNCE_INTERVAL)

    async def _open_line(self) -> None:
        """The data connection, to the server nats-py is connected to: tried while that one is up."""
        credentials = next((url for url in map(urlparse, self.config.nats) if url.username), None)
        subscriptions = {self.subject(self.member): self.taker.take, f"{self._answers}.*": self._on_answer}
        while self.line is None and not self._stopping and self.nc.is_connected:
            try:
                line = await open_line(self.nc.connected_url, credentials, self.member, subscriptions,
                                       self._line_lost, LINE_TIMEOUT)
            except LineError as exc:
                log.warning("cluster bus: %s; trying again in %g s", exc, RETRY_INTERVAL)
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            if self._stopping or not self.nc.is_connected:
                line.close()
                return
            if not line.open:  # lost already
                continue
            self.line = line
            self._set_connected(True)
            log.info("cluster bus: member %s connected to NATS %s", self.member, self.nc.connected_url.netloc)
            self.announce()

    def _reopen(self) -> None:
        if self._opening is None or self._opening.done():
            self._opening = self.host.spawn(self._open_line())

    def _line_lost(self, reason: str) -> None:
        self._drop_line(reason)
        if not self._stopping and self.nc.is_connected:
            self._reopen()

    def _drop_line(self, reason: str) -> None:
        """Stanzas for other members bounce until the bus is back, and so do the batches that
        wait for answers now: their answers would come to a connection that is gone."""
        line, self.line = self.line, None
        if line is not None:
            line.close()
        if self.connected:
            log.warning("cluster bus: %s; stanzas for other members bounce until it is back", reason)
        self._set_connected(False)
        if self._waiting:
            self._failed(list(self._waiting), "unreachable", f"the cluster bus lost NATS: {reason}")

    async def _disconnected(self) -> None:
        if not self._stopping:
            self._drop_line("lost the NATS connection")

    async def _reconnected(self) -> None:
        log.info("cluster bus: NATS is back (%s)", self.nc.connected_url.netloc)
        self._reopen()

    async def _error(self, exc: Exception) -> None:
        log.warning("cluster bus: NATS error: %s", exc)

    def _set_connected(self, connected: bool) -> None:
        """While NATS is away the compiled router knows no bus routes: the slow path bounces."""
        self.connected = connected
        self.host.router.bus_routes = {} if connected else None

    def forget_routes(self) -> None:
        """The members, or the output profiles (a reload), changed: choices are made anew."""
        if self.host.router.bus_routes:
            self.host.router.bus_routes = {}
        for member in [m for m, box in self._outboxes.items() if m not in self.members and not box.count]:
            del self._outboxes[member]

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
        self.host.spawn(self._announce(json.dumps(payload).encode()))

    async def _announce(self, payload: bytes) -> None:
        try:
            await self.nc.publish(f"{self.prefix}.routes", payload)
        except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds; each means "not sent"
            log.warning("cluster bus: an announcement was not sent (%r); the next heartbeat will", exc)

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
        holders = self.members.component_holders(item.to_domain)
        return self._send_by(item.to_domain, holders, self.host.delivery.component_output, item)

    def to_remote(self, item: Carried) -> bool:
        """Send a stanza for a remote pair to the member holding its stream, else to
        this node's owner of the remote domain; False when this member is that owner
        (it connects itself)."""
        pair = (item.from_domain, item.to_domain)
        candidates = self.members.pair_holders(pair)
        if not candidates:
            candidates = self.members.owners(item.to_domain, self.config.streams_per_domain)
            if self.member in candidates:
                return False
        return self._send_by(pair, candidates, self.host.delivery.s2s_output, item)

    def _send_by(self, key: object, candidates: tuple[str, ...], profile: Any, item: Carried) -> bool:
        """Send ``item`` to its sender's member among ``candidates``, and let the
        compiled router send the next stanzas for ``key`` (a domain or a pair) the same way."""
        if not candidates:
            return False
        routes = self.host.router.bus_routes
        if routes is not None:
            if len(routes) >= MAX_CHOICES:
                routes.clear()
            routes[key] = (profile, tuple(self._outbox(m) for m in candidates))
        self.send(pick(candidates, item.from_ or ""), item)
        return True

    def send(self, member: str, item: Carried) -> None:
        """Queue ``item`` for ``member`` until the end of this event-loop iteration."""
        if not self.connected:
            self._lost([item], "the cluster bus (NATS) is unreachable")
            return
        self._outbox(member).put(item)

    def _outbox(self, member: str) -> Any:
        box = self._outboxes.get(member)
        if box is None:
            box = self._outboxes[member] = outbox(self.member, member, self._became_due)
        return box

    def _became_due(self, box: Any) -> None:
        if not self._due:
            self.host.loop.call_soon(self._flush)
        self._due.append(box)

    def _flush(self) -> None:
        """One message per batch of each outbox: unless NATS is away, or the bus has
        ``max_bus_in_flight`` stanzas waiting for answers (then the batch bounces)."""
        due, self._due = self._due, []
        self.generation += 1
        for box in due:
            for payload, count in box.take():
                if not self.connected:
                    self._lost(decode_batch(payload)[1], "the cluster bus (NATS) is unreachable")
                elif self.in_flight + count > self.config.max_bus_in_flight:
                    self._refuse(payload, count, "max_bus_in_flight", "too many stanzas are in flight on the "
                                 "cluster bus (cluster.max_bus_in_flight)")
                elif len(payload) > self.line.max_payload:
                    self._refuse(payload, count, "nats_max_payload", f"a cluster bus batch of {len(payload)} bytes "
                                 f"is over the NATS server's max_payload ({self.line.max_payload})")
                else:
                    self.in_flight += count
                    self._sequence += 1
                    timer = self.host.loop.call_later(self.config.bus_timeout, self._timed_out, self._sequence)
                    self._waiting[self._sequence] = (box.member, payload, count, timer, self.generation)
                    self.line.publish(self.subject(box.member), payload, f"{self._answers}.{self._sequence}")
                    self.host.metrics.bus_batches.inc("sent")
        self._handed_off()

    def _refuse(self, payload: bytearray, count: int, limit: str, text: str) -> None:
        self.host.metrics.limits_hit.inc(limit, by=count)
        for item in decode_batch(payload)[1]:
            self.host.delivery.bounce_carried(item, "resource-constraint", text)

    def handoff_mark(self) -> int | None:
        """The flush whose batches carry every stanza given to the bus so far, or None when
        none is on its way (XEP-0198: an ``<a/>`` waits for it, ``StreamAcks.answer``)."""
        if self._due:
            return self.generation + 1
        return self.generation if self._waiting else None

    def wait_for_handoff(self, stream: Any) -> None:
        self._handoff_waiters.add(stream)

    def _handed_off(self) -> None:
        """Batches were answered or given up: the ``<a/>``s that waited for them go out."""
        if not self._handoff_waiters:
            return
        # sequences, and so generations, grow in the table's order: the first waits longest
        settled = next(iter(self._waiting.values()))[4] - 1 if self._waiting else self.generation
        for stream in list(self._handoff_waiters):
            if stream.acks is None or stream.closing or stream.acks.release(settled):
                self._handoff_waiters.discard(stream)

    def _on_answer(self, msg) -> None:
        if msg.status is not None:
            sequence = msg.subject.rpartition(".")[2]
            if msg.status == NO_RESPONDERS and sequence.isdigit() and int(sequence) in self._waiting:
                self._failed([int(sequence)], "unreachable", f"cluster member {self._waiting[int(sequence)][0]} is gone")
            return
        try:
            entries = decode_answers(msg.payload)
        except FrameError as exc:
            log.warning("cluster bus: ignoring an answer: %s (its batches bounce at bus_timeout)", exc)
            return
        for sequence, entry in entries:
            waiting = self._waiting.get(sequence)
            if waiting is None:
                continue  # it timed out: its stanzas bounced already
            member, payload, count, *_ = waiting
            try:
                answers = answers_for(entry, count)
            except FrameError as exc:
                self._failed([sequence], "unreachable", f"cluster member {member} answered: {exc}")
                continue
            self._done(sequence)
            self.host.metrics.bus_stanzas.inc("sent", self._hop(member), by=count)
            if any(answers):
                for item, answer in zip(decode_batch(payload)[1], answers):
                    if answer:  # the member refused it: its (condition, text)
                        self.host.delivery.bounce_carried(item, *answer)
        self._handed_off()

    def _timed_out(self, sequence: int) -> None:
        self._failed([sequence], "timeout", f"cluster member {self._waiting[sequence][0]} did not answer within "
                                            f"{self.config.bus_timeout:g} s")

    def _failed(self, sequences: list[int], reason: str, failure: str) -> None:
        batches = [self._done(sequence) for sequence in sequences]
        count = sum(count for _, count in batches)
        log.warning("cluster bus: %d stanza(s) bounce: %s", count, failure)
        self.host.metrics.bus_failures.inc(reason, by=count)
        for payload, _ in batches:
            self._lost(decode_batch(payload)[1], failure)
        self._handed_off()

    def _done(self, sequence: int) -> tuple[bytearray, int]:
        """The batch is answered or failed: out of the table; its payload and stanzas. The
        caller bounces what must bounce, then calls ``_handed_off``: an ``<a/>`` that counts
        a stanza follows its bounce on the wire."""
        _, payload, count, timer, _ = self._waiting.pop(sequence)
        timer.cancel()
        self.in_flight -= count
        return payload, count

    def _lost(self, items: list[Carried], text: str) -> None:
        """Stanzas no member took bounce as if their destination were unreachable here:
        a component's with service-unavailable, a remote server's with remote-server-timeout."""
        local = self.host.delivery.local_domains
        for item in items:
            condition = "service-unavailable" if item.to_domain in local else "remote-server-timeout"
            self.host.delivery.bounce_carried(item, condition, text)

    def _hop(self, member: str) -> str:
        return "worker" if self.members.node_of(member) in (None, self.node) else "node"

    def _send_answer(self, reply: str, payload: bytes) -> None:
        if self.line is not None:  # else the sender bounces what it sent at bus_timeout
            self.line.publish(reply, payload)
