"""XEP-0198 on S2S against a running relay, with a remote server that counts a stanza as delivered only
once it acknowledged it: the relay's stream to it dies mid-flow (the server crashes, or stops answering
ack requests) and every stanza the component sent is accounted for: delivered exactly once, in order,
or bounced to its sender, never both and never neither."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

from router.negotiation import events as ev
from router.negotiation import sm
from router.negotiation.session import Session

from .conftest import arun, running
from .peer import AuthoritativeServer
from .rawstream import RawComponent

BOT, BOT_SECRET = "bot.relay.test", "bot-secret"
FAR_SECRET = "far-dialback-secret-0123"
RELAY_SECRET = "relay-dialback-secret-0123"
COUNT = 300
ID = re.compile(rb" id='(\d+)'")


class AckingServer(AuthoritativeServer):
    """far.test speaking XEP-0198: stanzas count as delivered when it acknowledges them. Its first
    connection crashes after ``crash_after`` stanzas (the unacknowledged ones are lost with it), or
    never answers an ack request (``silent_first``)."""

    def __init__(self, *, crash_after: int = 0, silent_first: bool = False) -> None:
        super().__init__({"far.test"}, FAR_SECRET, RELAY_SECRET)
        self.config = replace(self.config, stream_management=True)
        self.crash_after, self.silent_first = crash_after, silent_first
        self.delivered: list[int] = []
        # session -> (its connection is the first, [stanzas handled], stanzas not yet acknowledged)
        self._connections: dict[Session, tuple[bool, list[int], list[int]]] = {}

    def take(self, session: Session, event, writer) -> bool:
        first, handled, pending = self._connections.setdefault(session, (not self._connections, [0], []))
        if isinstance(event, ev.Stanza):
            element = event.element
            pending.append(int(ID.search(session.tokenizer.buffer[element.start:element.end])[1]))
            handled[0] += 1
            if first and handled[0] == self.crash_after:
                writer.transport.abort()  # what it did not acknowledge is lost with it
                return False
        elif isinstance(event, ev.AckRequested) and not (first and self.silent_first):
            writer.write(session.data_to_send() + sm.ack(handled[0]))
            self.delivered += pending
            pending.clear()
        return True

    @property
    def connections(self) -> int:
        return len(self._connections)


def relay_to(relay_spec, port: int, **s2s):
    s2s = {"sm_ack_every": 10, "sm_ack_interval": 0.2, "ping_interval": 0, **s2s}
    return relay_spec("relay", domains=("relay.test",), components={BOT: BOT_SECRET}, tls=False,
                      policy={"require_encryption": False}, routes={"far.test": port}, s2s=s2s,
                      secret=RELAY_SECRET)


def message(n: int) -> bytes:
    return f"<message from='u@{BOT}' to='v@far.test' id='{n}'><body>{n:0200d}</body></message>".encode()


async def account(far: AckingServer, bot: RawComponent, relay) -> tuple[list[int], list[int]]:
    """Send COUNT messages in bursts; wait until each is delivered or bounced (at most 30 s)."""
    for start in range(0, COUNT, 20):
        bot.send(b"".join(message(n) for n in range(start, start + 20)))
        await asyncio.sleep(0.01)
    bounced: list[int] = []
    for _ in range(1500):
        if len(far.delivered) + len(bounced) >= COUNT:
            break
        try:
            data = await asyncio.wait_for(bot.read_until(b"</message>"), 0.02)
        except asyncio.TimeoutError:
            continue
        assert b"type='error'" in data and b"remote-server-timeout" in data, data
        bounced.append(int(ID.search(data)[1]))
    return far.delivered, bounced


def test_a_stream_that_dies_mid_flow_has_its_unacknowledged_stanzas_sent_again_in_order(relay_spec):
    """XEP-0198 §4: what the peer did not acknowledge when the stream died is re-sent on a new stream
    for the same pair: every stanza arrives exactly once and in order, none bounces."""

    async def scenario():
        far = AckingServer(crash_after=95)
        spec = relay_to(relay_spec, await far.start())
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                delivered, bounced = await account(far, bot, relay)
                assert (delivered, bounced) == (list(range(COUNT)), [])
                assert far.connections == 2
                assert relay.metrics.stream_management.get("resent") > 0
                assert relay.metrics.stream_management.get("enabled") == 2
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())


def test_with_resending_off_the_unacknowledged_stanzas_bounce_and_nothing_arrives_twice(relay_spec):
    """``sm_resend = false`` (Prosody's default): the stanzas the dead stream's peer never acknowledged
    bounce with <remote-server-timeout/>; the others arrive once; together they are every stanza."""

    async def scenario():
        far = AckingServer(crash_after=95)
        spec = relay_to(relay_spec, await far.start(), sm_resend=False)
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                delivered, bounced = await account(far, bot, relay)
                assert bounced and sorted(delivered + bounced) == list(range(COUNT))
                assert delivered == sorted(delivered)
                assert relay.metrics.stream_management.get("bounced") == len(bounced)
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())


def test_a_peer_that_stops_acknowledging_is_closed_as_dead_and_loses_nothing(relay_spec):
    """A stream whose peer leaves our <r/> unanswered for sm_ack_timeout is dead: closed with
    <connection-timeout/>, its unacknowledged stanzas sent again on a new stream."""

    async def scenario():
        far = AckingServer(silent_first=True)
        spec = relay_to(relay_spec, await far.start(), sm_ack_timeout=1.0)
        try:
            async with running(spec.config()) as relay:
                bot = await RawComponent.connect(spec.component_port, BOT, BOT_SECRET)
                delivered, bounced = await account(far, bot, relay)
                assert (delivered, bounced) == (list(range(COUNT)), [])
                assert relay.metrics.stream_management.get("ack_timeout") == 1
                assert far.connections == 2
                await bot.close()
        finally:
            await far.stop()

    arun(scenario())
