"""Events a `Session` reports to the runtime (drained with `Session.events()`).

Pairs are `pairs.Pair` (local, remote): our domain, then the peer's, in either
direction. Directions: ``"inbound"`` = the peer may now send stanzas
``remote -> local`` on this stream; ``"outbound"`` = we may now send
``local -> remote`` on it (our own outgoing stream, or an inbound one with bidi).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.negotiation.features import StreamLimits
from router.negotiation.pairs import Pair


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Flush `data_to_send()`, run the TLS handshake, then call `tls_established(peer_chain_der)`."""

    domain: str | None  # receiver: our domain (pick its certificate); initiator: the peer's (SNI, reference id)


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A domain pair became usable on this stream, in `direction`."""

    pair: Pair  # (local, remote)
    mechanism: str  # "EXTERNAL", "dialback", or "dialback+pkix" (XEP-0344: the certificate sufficed)
    direction: str  # "inbound" | "outbound"


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """Our request to send ``pair.local -> pair.remote`` failed; bounce the stanzas queued for it with `bounce`."""

    pair: Pair  # (local, remote)
    condition: str  # "invalid", or the dialback / SASL / stream condition that ended it
    bounce: str  # stanza error condition for queued stanzas (XEP-0220 §2.1.1)
    text: str | None = field(default=None, compare=False)  # why, for the bounces' <text/>; not part of equality


@dataclass(frozen=True, slots=True)
class CheckDane:
    """Receiver: may DANE (RFC 7673) prove the peer's certificate for `domain`, which our trust
    store does not? Answer with `session.dane_verdict(domain, matched)`; the features wait."""

    domain: str


@dataclass(frozen=True, slots=True)
class BidiEnabled:
    """XEP-0288 is on: this one stream carries both directions. Receiver: ``limits`` are the
    XEP-0478 limits the initiator put in its request (it sees no features of ours to obey)."""

    limits: StreamLimits = StreamLimits()


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """Ask the authoritative server of `originating` whether `key` is right, over another connection.

    Send it with `other_session.request_verify(token, receiving, originating,
    stream_id, key)` on any stream except this one (XEP-0288 §2.2), and answer
    with `session.key_verified(token, result)`.
    """

    token: Any
    receiving: str
    originating: str
    stream_id: str
    key: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The authoritative server answered (or could not answer) a `request_verify`."""

    token: Any
    result: str  # "valid" | "invalid" | a stanza error condition


@dataclass(frozen=True, slots=True)
class SmStarted:
    """XEP-0198 counting starts now, for what we send (`outbound`) and/or what we receive (`inbound`)."""

    outbound: bool
    inbound: bool


@dataclass(frozen=True, slots=True)
class SmStopped:
    """The peer refused XEP-0198 (``<failed/>``): nothing will be acknowledged on this stream."""


@dataclass(frozen=True, slots=True)
class AckRequested:
    """The peer sent ``<r/>``: answer with ``<a h/>``, the stanzas received since counting started."""


@dataclass(frozen=True, slots=True)
class Acked:
    """The peer sent ``<a h/>``: it handled ``h`` (mod 2^32) of the stanzas we sent since counting started."""

    h: int


@dataclass(frozen=True, slots=True)
class Stanza:
    """An authorized stanza; its bytes are ``session.tokenizer.buffer[element.start:element.end]``
    until the next `receive_data` / `buffer_updated` call."""

    element: Any
    from_domain: str  # normalized, checked against the stream's authenticated pairs
    to_domain: str


@dataclass(frozen=True, slots=True)
class Closed:
    """We closed the stream (`condition` None: a graceful ``</stream:stream>``). Flush, then close TCP.

    `cause` says what the peer did, for metrics: "parse" (the bytes were not
    acceptable XML), "stanza" (a stanza broke addressing or authorization
    rules), "negotiation" (a negotiation element or header was wrong or
    negotiation failed) or "local" (the runtime asked, or an internal error)."""

    condition: str | None
    text: str | None
    cause: str = "negotiation"


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer ended its stream (``</stream:stream>`` or a stream error); we answered with ours."""

    condition: str | None
    text: str | None
