"""Proof that an authenticated S2S stream still reaches a live peer: XEP-0199 pings and the peer's XEP-0478 idle limit.

Whitespace keepalives (RFC 6120 §4.6.1) only show that our side can write;
a peer gone behind a NAT says nothing, and a stream that stopped being
processed is "broken" (§4.6.2). So the relay's sweep gives every
authenticated S2S stream to `Liveness.check`:

* a stream we may send on (outbound, or inbound with XEP-0288 bidi) that
  received nothing for ``s2s.ping_interval`` (nor an answer to a ping) gets
  ``<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>`` from one of its
  authorized pairs (XEP-0199 §4.3), one at a time;
* its id waits in the compiled router's ``awaited_ids``: the answer leaves the
  compiled path and reaches `Delivery.route`, which hands it to `answered`.
  A result or an error both prove the peer alive (XEP-0199 §4.3: a server
  without ping answers ``<service-unavailable/>``); it is not routed further.
  Without bidi it comes back on the peer's own stream to us, which still
  proves the peer processes ours (behind a cluster bus that stream may be
  another worker's or node's, so there only bidi streams are pinged);
* no answer within ``s2s.ping_timeout`` closes the stream with
  ``<connection-timeout/>`` (RFC 6120 §4.9.3.4 "has permanently lost the
  ability to communicate"), and its pairs move or bounce as on any close;
* an outbound stream whose peer announced XEP-0478 ``idle-seconds`` gets a
  whitespace keepalive after half of it without output, however long our own
  ``s2s.keepalive_interval``.

Every table is keyed by a stream or by its one ping: never larger than the
relay's streams; `forget` drops a closed stream's entries.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, NamedTuple

from router.negotiation.pairs import Pair
from router.wire.namespaces import PING_NS
from router.wire.xml import attr

log = logging.getLogger("router.net.liveness")

# XEP-0478 idle-seconds: whitespace goes out after this share of it without output.
IDLE_KEEPALIVE_SHARE = 0.5


class Ping(NamedTuple):
    """One ping in flight: on which stream, for which pair, since when."""

    stream: Any  # router.net.s2s.S2SStream
    pair: Pair
    sent_at: float


class Liveness:
    """The pings in flight of the relay ``host`` and when each stream last answered one."""

    def __init__(self, host) -> None:
        self.host = host
        self.awaited: set[str] = host.router.awaited_ids  # shared with the compiled router
        self._pings: dict[str, Ping] = {}  # ping id -> the ping
        self._in_flight: dict[Any, str] = {}  # stream -> the id of its ping
        self._answered_at: dict[Any, float] = {}  # stream -> when its peer last answered a ping

    def check(self, stream, now: float, s2s) -> bool:
        """The sweep's step for an authenticated S2S stream: True when it wrote to the
        stream or closed it (then no other keepalive is due)."""
        ping_id = self._in_flight.get(stream)
        if ping_id is not None:
            ping = self._pings[ping_id]
            if now - ping.sent_at > s2s.ping_timeout:
                self._timed_out(stream, ping, s2s.ping_timeout)
                return True
        elif s2s.ping_interval > 0 and stream.session.outbound_pairs and self._answer_comes_here(stream) \
                and now - max(stream.last_rx, self._answered_at.get(stream, 0.0)) > s2s.ping_interval:
            self._send(stream, next(iter(stream.session.outbound_pairs)), now)
            return True
        idle = stream.peer_idle_seconds
        if idle and now - stream.last_tx > idle * IDLE_KEEPALIVE_SHARE:
            stream.keepalive()
            return True
        return False

    def answered(self, element, from_domain: str, to_domain: str) -> bool:
        """Whether ``element`` (whose id is awaited) answers one of our pings: an IQ
        result or error from the pinged domain to the pinging one. It is then taken."""
        ping = self._pings.get(element.id)
        if ping is None or element.name != "iq" or element.type not in ("result", "error") \
                or ping.pair != (to_domain, from_domain):
            return False
        self._drop(ping.stream)
        self._answered_at[ping.stream] = now = self.host.loop.time()
        self.host.metrics.pings.inc("answered")
        log.debug("s2s ping answered remote=%s local=%s type=%s after=%.3fs peer=%s", ping.pair.remote,
                  ping.pair.local, element.type, now - ping.sent_at, ping.stream.peer)
        return True

    def forget(self, stream) -> None:
        """``stream`` closed: nothing of it is kept."""
        self._drop(stream)
        self._answered_at.pop(stream, None)

    def _answer_comes_here(self, stream) -> bool:
        """Whether the answer to a ping on ``stream`` reaches this process: on the stream
        itself (bidi), or on the peer's own stream to us, which behind a cluster bus may
        land on another worker or node, that knows nothing of the ping."""
        return stream.bidi or self.host.bus is None

    def _send(self, stream, pair: Pair, now: float) -> None:
        ping_id = "ping-" + secrets.token_hex(8)
        stream.write_chunks([f"<iq type='get' from={attr(pair.local)} to={attr(pair.remote)} id={attr(ping_id)}>"
                             f"<ping xmlns='{PING_NS}'/></iq>".encode()])  # a stanza: XEP-0198 counts it
        self._pings[ping_id] = Ping(stream, pair, now)
        self._in_flight[stream] = ping_id
        self.awaited.add(ping_id)
        self.host.metrics.pings.inc("sent")
        log.debug("s2s ping sent remote=%s local=%s id=%s peer=%s", pair.remote, pair.local, ping_id, stream.peer)

    def _timed_out(self, stream, ping: Ping, timeout: float) -> None:
        self._drop(stream)
        self.host.metrics.pings.inc("timeout")
        log.warning("s2s ping unanswered for %g seconds (s2s.ping_timeout): closing the stream remote=%s local=%s "
                    "peer=%s", timeout, ping.pair.remote, ping.pair.local, stream.peer)
        stream.fail("connection-timeout", f"no answer to an XEP-0199 ping from {ping.pair.local} "
                                          f"to {ping.pair.remote} within {timeout:g} seconds")

    def _drop(self, stream) -> None:
        ping_id = self._in_flight.pop(stream, None)
        if ping_id is not None:
            del self._pings[ping_id]
            self.awaited.discard(ping_id)
