"""Stream management on S2S (XEP-0198 1.6, acks without resumption): enabling it and reading acks.

Receiver: offers ``<sm xmlns='urn:xmpp:sm:3'/>`` (as Prosody 13 does on S2S) and
answers the initiator's ``<enable/>`` with ``<enabled/>``; resumption is not
offered (XEP-0198 §5 ties it to a client's session; Prosody has none on S2S
either), so ``resume`` is ignored. Initiator: sends ``<enable/>`` when the
peer offered the feature and the stream carries its first pair of ours.

The counting itself is the runtime's (the compiled router counts stanzas per
read): this module reports when each direction's counter starts and what the
peer asks or acknowledges, as `SmStarted`, `AckRequested` and `Acked` events.
XEP-0198 §4: the side that sends ``<enable/>`` counts what it sends from then
on, the other side what it receives from when it reads it; ``<enabled/>``
starts the two other counters. ``h`` wraps at 2^32 (§4 "h ... MUST wrap").

Same shape as the other feature modules: `offer`, `request` (the initiator's
``<enable/>``, or None) and `HANDLERS`.
"""

from __future__ import annotations

import logging

from router.negotiation.events import Acked, AckRequested, SmStarted, SmStopped
from router.negotiation.features import Advertised, Offer
from router.negotiation.state import Negotiator
from router.wire.namespaces import SM_NS, STANZAS_NS

log = logging.getLogger("router.negotiation")

ENABLE = f"<enable xmlns='{SM_NS}'/>".encode()
ENABLED = f"<enabled xmlns='{SM_NS}'/>".encode()
REQUEST = f"<r xmlns='{SM_NS}'/>".encode()
H_MODULUS = 1 << 32  # XEP-0198 §4: h is an unsigned 32-bit integer that wraps


def ack(handled: int) -> bytes:
    """``<a h='...'/>`` for ``handled`` stanzas received since the counter started."""
    return f"<a xmlns='{SM_NS}' h='{handled % H_MODULUS:d}'/>".encode()


def offer(s: Negotiator) -> Offer | None:
    if not s.config.stream_management or s.sm_enabled or s.verify_only:
        return None
    return Offer("sm", SM_NS)


def request(s: Negotiator, adv: Advertised | None) -> bytes | None:
    """Initiator: ``<enable/>`` once, when the peer offered XEP-0198 and our first pair is accepted."""
    if (s.role == "initiator" and adv is not None and adv.sm and s.config.stream_management
            and not s.sm_enabled and not s.verify_only):
        return ENABLE
    return None


def _failed(s: Negotiator, condition: str) -> None:
    s.send(f"<failed xmlns='{SM_NS}'><{condition} xmlns='{STANZAS_NS}'/></failed>".encode())


def handle_enable(s: Negotiator, element) -> None:
    """Receiver: the initiator asks to count (XEP-0198 §3: ``<enabled/>`` or ``<failed/>``)."""
    if s.role != "receiver":
        s.close("unsupported-stanza-type", "<enable/> is the initiating server's to send")
    elif not s.config.stream_management:
        _failed(s, "feature-not-implemented")
    elif s.sm_enabled:
        _failed(s, "unexpected-request")
    else:
        s.send(ENABLED)
        s.start_stream_management()
        s.emit(SmStarted(outbound=True, inbound=True))


def handle_enabled(s: Negotiator, element) -> None:
    """Initiator: the peer counts from our ``<enable/>`` on; we count what it sends from here."""
    if s.role != "initiator" or not s.sm_enabled:
        s.close("unsupported-stanza-type", "<enabled/> answers an <enable/> we did not send")
        return
    s.emit(SmStarted(outbound=False, inbound=True))


def handle_failed(s: Negotiator, element) -> None:
    """Initiator: the peer will not count; what we kept for re-sending is let go."""
    if s.role == "initiator" and s.sm_enabled:
        log.info("the peer refused XEP-0198 on stream %s", s.stream_id)
        s.stop_stream_management()
        s.emit(SmStopped())


def handle_request(s: Negotiator, element) -> None:
    """``<r/>``: the runtime answers with its count (it counts; we do not)."""
    if s.sm_enabled:
        s.emit(AckRequested())


def handle_ack(s: Negotiator, element) -> None:
    """``<a h='N'/>``: the peer handled N of the stanzas we sent since enabling (mod 2^32)."""
    if not s.sm_enabled:
        return
    h = s.tree(element).get("h", "")
    if not h.isascii() or not h.isdigit() or int(h) >= H_MODULUS:
        s.close("invalid-xml", f"<a/> needs h, an unsigned 32-bit integer (XEP-0198 §4), got {h!r}")
        return
    s.emit(Acked(int(h)))


HANDLERS = {
    (SM_NS, "enable"): handle_enable,
    (SM_NS, "enabled"): handle_enabled,
    (SM_NS, "failed"): handle_failed,
    (SM_NS, "r"): handle_request,
    (SM_NS, "a"): handle_ack,
}
