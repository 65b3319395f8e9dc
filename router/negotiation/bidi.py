"""Bidirectional S2S streams (XEP-0288 1.0.1).

Receiver: offers ``<bidi xmlns='urn:xmpp:features:bidi'/>`` (after TLS by
default, `SessionConfig.bidi` = "always" also on plaintext), accepts the
``<bidi xmlns='urn:xmpp:bidi'/>`` request before authentication (pipelined
with ``<auth/>`` or ``<db:result/>``), and from then on every pair the peer
authenticates adds its inverse to `Session.outbound_pairs`. A request that
was not offered, or arrives after authentication, is ignored (checklist 82;
Prosody does the same); so is a stray ``urn:xmpp:features:bidi`` element sent
as a request (tricky.md T-01).

Initiator: requests bidi whenever it is offered and allowed, and then treats
its outgoing stream as the inbound stream of the inverse pairs, applying the
same from/to checks (checklist 88).

Reverse dialback: Prosody closes a bidi stream on which the receiving side
starts dialback for another domain. We do not: an un-typed ``<db:result>``
on our outgoing bidi stream is handled like on any inbound stream (verified
over another connection, keyed with the only stream ID on the connection,
the receiver's; flows.md (b)). We do not *initiate* it by default
(`SessionConfig.bidi_reverse_dialback`, tricky.md T-09) because the
verifying side did not choose that stream ID.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from router.negotiation.events import BidiEnabled
from router.negotiation.features import BIDI_FEATURE_NS, Offer

if TYPE_CHECKING:
    from router.negotiation.session import Session

BIDI_NS = "urn:xmpp:bidi"

log = logging.getLogger("router.negotiation")


def allowed(s: Session) -> bool:
    mode = s.config.bidi
    return mode == "always" or (mode == "encrypted" and s.encrypted)


def offer(s: Session) -> Offer | None:
    if s.authenticated or s.bidi or not allowed(s):
        return None
    return Offer("bidi", BIDI_FEATURE_NS)


def handle_request(s: Session, element) -> None:
    """Receiver: ``<bidi xmlns='urn:xmpp:bidi'/>``; there is no reply (XEP-0288 §2.2)."""
    if s.role != "receiver":
        s.close("unsupported-stanza-type", "a bidi request was sent to the initiating server")
        return
    if "bidi" not in s.offered or s.authenticated or s.bidi:
        log.info("ignoring a bidi request that was not offered at this stage (stream %s)", s.stream_id)
        return
    s.bidi = True
    s.emit(BidiEnabled())


def handle_feature_as_request(s: Session, element) -> None:
    """T-01: the feature namespace used as a request enables nothing and closes nothing."""
    log.info("ignoring <bidi xmlns='%s'/> sent as a request (stream %s)", BIDI_FEATURE_NS, s.stream_id)


def choose(s: Session, adv) -> None:
    """Initiator: request bidi before authenticating, pipelined (XEP-0288 §2.2)."""
    if adv.bidi and not s.bidi and not s.authenticated and not s.verify_only and allowed(s):
        s.send(f"<bidi xmlns='{BIDI_NS}'/>".encode())
        s.bidi = True
        s.emit(BidiEnabled())


HANDLERS = {(BIDI_NS, "bidi"): handle_request, (BIDI_FEATURE_NS, "bidi"): handle_feature_as_request}
