"""Which stream feature comes next: the receiver's offers for a stage, the initiator's step after the peer's features.

The order is XEP-0170's: TLS, then SASL EXTERNAL, then Server Dialback, with
the bidi request pipelined before authentication (XEP-0288 §2.2). Both
functions only decide, over a read-only `Negotiator`; the session sends what
they return and moves its stage (`router.negotiation.state`).
"""

from __future__ import annotations

from typing import NamedTuple

from router.negotiation import bidi, dialback, limits, sasl, sm, tls
from router.negotiation.features import Advertised, Offer
from router.negotiation.state import CLOSED, DIALBACK, SASL, STARTTLS, Negotiator, Stage


def offers(s: Negotiator) -> list[Offer]:
    """Receiver: our features for this stage, in XEP-0170 order; only STARTTLS while it is required
    (RFC 6120 §5.3.1: with mandatory TLS, nothing else is offered before it)."""
    tls_offer = tls.offer(s)
    if tls_offer is not None and tls_offer.required:
        return [tls_offer]
    sasl_offer = sasl.offer(s)
    candidates = [tls_offer, sasl_offer, dialback.offer(s, sasl_offer is not None), bidi.offer(s), sm.offer(s), limits.offer(s)]
    return [offer for offer in candidates if offer is not None]


class Step(NamedTuple):
    """The initiator's next move after the peer's features.

    `stage`: `Stage.STARTTLS` or `Stage.SASL` (send `request`, wait for the
    answer); `Stage.DIALBACK` (negotiation is done: authorize what SASL proved
    and run dialback if the peer has it); `Stage.CLOSED` (give up with
    `condition` and `text`). `bidi`: the bidi request to send first, if any.
    """

    stage: Stage
    request: bytes = b""
    bidi: bytes | None = None
    condition: str | None = None
    text: str | None = None


def next_step(s: Negotiator, adv: Advertised) -> Step:
    """Initiator: what the peer's features (or their absence) allow next."""
    if s.sasl_done:
        if adv.required:
            return _unsupported_required(adv)
        return Step(DIALBACK)
    request = tls.choose(s, adv)
    if request is not None:
        return Step(STARTTLS, request)
    if not s.encrypted and adv.starttls_required:
        return _unsupported_required(adv)  # we cannot start TLS (config.tls_client is off)
    if not s.encrypted and not s.verify_only and s.tls_required():
        return Step(CLOSED, condition="policy-violation",
                    text=f"our policy requires TLS but {s.remote_domain} does not offer it")
    bidi_request = None
    if not s.verify_only:
        bidi_request = bidi.choose(s, adv)
        request = sasl.choose(s, adv)
        if request is not None:
            return Step(SASL, request, bidi_request)
    if s.config.dialback and dialback.available(s):
        return Step(DIALBACK, bidi=bidi_request)
    if s.sasl_condition is not None:
        return Step(CLOSED, bidi=bidi_request, condition="policy-violation",
                    text=f"SASL EXTERNAL failed ({s.sasl_condition}) and dialback is not available")
    if adv.required:
        return _unsupported_required(adv, bidi_request)
    return Step(CLOSED, bidi=bidi_request, condition="unsupported-feature",
                text=f"{s.remote_domain} offers no authentication method we support")


def _unsupported_required(adv: Advertised, bidi_request: bytes | None = None) -> Step:
    """The peer requires a feature we do not support (RFC 6120 §4.9.3.23)."""
    return Step(CLOSED, bidi=bidi_request, condition="unsupported-feature",
                text=f"the peer requires features we do not support: {', '.join(sorted(adv.required))}")
