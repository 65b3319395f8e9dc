"""STARTTLS (RFC 6120 §5) in both roles: offer, ``<starttls/>``/``<proceed/>``, restart.

The TLS handshake itself is the runtime's: the session emits `StartTLS` and
waits for `Session.tls_established(peer_chain_der)`. Nothing may follow
``<starttls/>`` or ``<proceed/>`` in the same read (§5.3.3, §5.4.2.3): bytes
there would be plaintext injected into what becomes the TLS stream, so a
non-empty tokenizer tail closes the stream.

Same shape as the other feature modules: `offer` (receiver), `choose`
(initiator: the request to send, or None; the session sends it and moves to
`Stage.STARTTLS`) and `HANDLERS` for the elements received.
"""

from __future__ import annotations

from router.wire.namespaces import TLS_NS
from router.negotiation.features import Advertised, Offer
from router.negotiation.state import STARTTLS, Negotiator

FAILURE = f"<failure xmlns='{TLS_NS}'/>".encode()
PROCEED = f"<proceed xmlns='{TLS_NS}'/>".encode()
REQUEST = f"<starttls xmlns='{TLS_NS}'/>".encode()


def offer(s: Negotiator) -> Offer | None:
    """``<starttls/>`` while the stream is plaintext and we have a certificate to present."""
    if s.encrypted or not s.config.tls_offered or s.peer_version is None:
        return None
    return Offer("starttls", TLS_NS, required=s.tls_required())


def choose(s: Negotiator, adv: Advertised) -> bytes | None:
    """Initiator: request TLS whenever offered (RFC 7590 §3.1), unless a verify-only stream may skip it."""
    if s.encrypted or not adv.starttls or not s.config.tls_client:
        return None
    if s.verify_only and not adv.starttls_required:
        return None  # XEP-0220 §2.1.2: a verify-only connection may save the round trips
    return REQUEST


def handle_starttls(s: Negotiator, element) -> None:
    """Receiver: answer ``<proceed/>`` or ``<failure/>`` (§5.4.2)."""
    if s.role != "receiver" or "starttls" not in s.offered:
        s.send(FAILURE)
        s.close("policy-violation", "<starttls/> was not offered on this stream")
        return
    if s.tokenizer.restart(element.end):
        s.send(FAILURE)
        s.close("policy-violation", "data followed <starttls/> before the TLS handshake")
        return
    s.send(PROCEED)
    s.await_tls()


def handle_proceed(s: Negotiator, element) -> None:
    """Initiator: the peer agreed; hand over to the TLS handshake."""
    if s.role != "initiator" or s.stage is not STARTTLS:
        s.close("unsupported-stanza-type", "<proceed/> without a <starttls/> request")
        return
    if s.tokenizer.restart(element.end):
        s.close("policy-violation", "data followed <proceed/> before the TLS handshake")
        return
    s.await_tls()


def handle_failure(s: Negotiator, element) -> None:
    """Initiator: the peer refused TLS; it closes the stream next (§5.4.2.2)."""
    if s.role != "initiator" or s.stage is not STARTTLS:
        s.close("unsupported-stanza-type", "TLS <failure/> without a <starttls/> request")
        return
    s.fail_outbound("remote-server-timeout", "the peer refused STARTTLS")
    s.close(None, "the peer refused STARTTLS")


HANDLERS = {(TLS_NS, "starttls"): handle_starttls, (TLS_NS, "proceed"): handle_proceed, (TLS_NS, "failure"): handle_failure}
