"""Bidirectional S2S streams (XEP-0288 1.0.1).

Receiver: offers ``<bidi xmlns='urn:xmpp:features:bidi'/>`` (after TLS by
default, `SessionConfig.bidi` = "always" also on plaintext), accepts the
``<bidi xmlns='urn:xmpp:bidi'/>`` request before authentication (pipelined
with ``<auth/>`` or ``<db:result/>``), and from then on every pair the peer
authenticates adds its inverse to `Session.outbound_pairs`. A request that
was not offered, or arrives after authentication, is ignored (XEP-0288 §2.2
has it sent before SASL or dialback; Prosody does the same); so is a stray
``urn:xmpp:features:bidi`` element sent as a request (the feature and the
request namespaces differ, XEP-0288 §2.1-2.2, and peers have swapped them).

Initiator: requests bidi whenever it is offered and allowed, and then treats
its outgoing stream as the inbound stream of the inverse pairs, applying the
same from/to checks (RFC 6120 §8.1.2.2, XEP-0288 §2.2).

Reverse dialback: Prosody closes a bidi stream on which the receiving side
starts dialback for another domain. We do not: an un-typed ``<db:result>``
on our outgoing bidi stream is handled like on any inbound stream (verified
over another connection, keyed with the only stream ID on the connection,
the receiver's: XEP-0288 §2.2 does not say which). We do not *initiate* it
by default (`SessionConfig.bidi_reverse_dialback`) because the verifying side
did not choose that stream ID, so it lacks classic dialback's replay protection.

Same shape as the other feature modules: `offer`, `choose` (the request to
send, or None; the session sends it and calls `enable_bidi`) and `HANDLERS`.

XEP-0478 §2.2: the initiator never sees features of ours on a bidi stream, so
our request carries our ``<limits/>`` and the peer's request carries its own,
which the receiver obeys on what it sends back (`BidiEnabled.limits`).
"""

from __future__ import annotations

import logging

from router.wire.namespaces import BIDI_FEATURE_NS, BIDI_NS, STREAM_LIMITS_NS
from router.wire.xml import child
from router.negotiation import limits
from router.negotiation.features import Advertised, Offer, parse_limits
from router.negotiation.state import Negotiator


log = logging.getLogger("router.negotiation")


def allowed(s: Negotiator) -> bool:
    mode = s.config.bidi
    return mode == "always" or (mode == "encrypted" and s.encrypted)


def offer(s: Negotiator) -> Offer | None:
    if s.authenticated or s.bidi or not allowed(s):
        return None
    return Offer("bidi", BIDI_FEATURE_NS)


def choose(s: Negotiator, adv: Advertised) -> bytes | None:
    """Initiator: request bidi before authenticating, pipelined (XEP-0288 §2.2)."""
    if adv.bidi and not s.bidi and not s.authenticated and not s.verify_only and allowed(s):
        announced = limits.element(s.config.stream_limits)
        return f"<bidi xmlns='{BIDI_NS}'>{announced}</bidi>".encode() if announced else f"<bidi xmlns='{BIDI_NS}'/>".encode()
    return None


def handle_request(s: Negotiator, element) -> None:
    """Receiver: ``<bidi xmlns='urn:xmpp:bidi'/>``; there is no reply (XEP-0288 §2.2)."""
    if s.role != "receiver":
        s.close("unsupported-stanza-type", "a bidi request was sent to the initiating server")
        return
    if "bidi" not in s.offered or s.authenticated or s.bidi:
        log.info("ignoring a bidi request that was not offered at this stage (stream %s)", s.stream_id)
        return
    if s.tokenizer.buffer[element.end - 2:element.end] == b"/>":  # empty, as nearly every request: no tree
        s.enable_bidi()
    else:  # XEP-0478 §2.2: the initiator's limits may be inside
        s.enable_bidi(parse_limits(child(s.tree(element), STREAM_LIMITS_NS, "limits")))


def handle_feature_as_request(s: Negotiator, element) -> None:
    """The feature namespace used as a request (XEP-0288 §2.1 vs §2.2) enables nothing and closes nothing."""
    log.info("ignoring <bidi xmlns='%s'/> sent as a request (stream %s)", BIDI_FEATURE_NS, s.stream_id)


HANDLERS = {(BIDI_NS, "bidi"): handle_request, (BIDI_FEATURE_NS, "bidi"): handle_feature_as_request}
