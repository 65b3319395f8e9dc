"""Stream limits advertisement (XEP-0478 0.2.0): the ``<limits/>`` feature we announce.

Receiver: every features element carries ``<limits
xmlns='urn:xmpp:stream-limits:0'>`` with `SessionConfig.stream_limits` (the
runtime's ``policy.max_stanza_bytes`` and ``s2s.idle_timeout``), except the
one that offers only a mandatory STARTTLS (RFC 6120 §5.3.1: nothing else is
offered before it). XEP-0478 §2.1: "The responding entity advertises its
limits in the <stream:features/> element that it sends at the start of the
stream", and §3 lets them change with each new features element. We announce
the post-authentication stanza limit on every one: stanzas only flow after
authentication, and a dialback-only peer sees no features after it.

Initiator: `features.parse` reads the peer's ``<limits/>`` into
`Advertised.limits`; the runtime obeys them once the stream is authenticated
(XEP-0478 §3: a stanza larger than ``max-bytes`` "SHOULD NOT be sent on that
stream", its sender gets ``<policy-violation/>``; whitespace keeps the stream
within ``idle-seconds``). Nothing here needs the peer's answer: there is none.

Same shape as the other feature modules: `offer`; the parse side is
`features.parse_limits` (this module imports `features`, not the reverse).
"""

from __future__ import annotations

from functools import lru_cache

from router.negotiation.features import Offer, StreamLimits
from router.negotiation.state import Negotiator
from router.wire.namespaces import STREAM_LIMITS_NS


def offer(s: Negotiator) -> Offer | None:
    """Our ``<limits/>`` for this features element, or None when we announce none."""
    limits = s.config.stream_limits
    if limits is None or not (limits.max_bytes or limits.idle_seconds):
        return None
    return _offer_of(limits)


def element(limits: StreamLimits | None) -> str:
    """``<limits/>`` for our XEP-0288 request (XEP-0478 §2.2: "the <limits/> element can be
    included in the <bidi/> element"), or "" when we announce none."""
    if limits is None or not (limits.max_bytes or limits.idle_seconds):
        return ""
    return f"<limits xmlns='{STREAM_LIMITS_NS}'>{_offer_of(limits).children}</limits>"


@lru_cache(maxsize=8)  # one per configuration in use (a reload makes a new one)
def _offer_of(limits: StreamLimits) -> Offer:
    children = ""
    if limits.max_bytes:
        children += f"<max-bytes>{limits.max_bytes:d}</max-bytes>"
    if limits.idle_seconds:
        children += f"<idle-seconds>{limits.idle_seconds:d}</idle-seconds>"
    return Offer("limits", STREAM_LIMITS_NS, children)
