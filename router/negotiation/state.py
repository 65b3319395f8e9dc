"""Negotiation stages of one S2S stream, the transitions allowed between them, and the session as feature modules see it.

Everything that moves a stream from one stage to the next is listed in
`TRANSITIONS`, one table per role, in the manner of h11's ``_state.py``: the
session changes its stage only through `advance`, which raises `StageError`
for a move the table does not list (a bug in the session, never the peer's
doing: bad input closes the stream before any illegal move is tried).

The stage says what the stream waits for. Facts that outlive a stream restart
(TLS is on, SASL succeeded, bidi is on, the pairs authorized so far) and our
own ``</stream:stream>`` (a graceful close keeps reading, RFC 6120 §4.4) are
not stages: the session keeps them beside the stage.

`Negotiator` is the part of `router.negotiation.session.Session` that the
feature modules (`tls`, `sasl`, `dialback`, `bidi`, `sm`) use: they import this
module, never the session, so the session can import them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol

from router._fastparse import Tokenizer
from router.negotiation.config import SessionConfig
from router.negotiation.features import Advertised
from router.negotiation.pairs import Pair


class Stage(enum.Enum):
    """Where one stream is in its negotiation: what it waits for next."""

    TLS = "tls"  # parsing stopped until the runtime's TLS handshake is done (after <proceed/>, or direct TLS)
    HEADER = "header"  # waiting for the peer's stream header (an initiator has sent its own)
    OPEN = "open"  # receiver: header and features answered; the peer negotiates and sends stanzas
    FEATURES = "features"  # initiator: waiting for the peer's <stream:features/>, then choosing from them
    STARTTLS = "starttls"  # initiator: <starttls/> sent, waiting for <proceed/> or <failure/>
    SASL = "sasl"  # initiator: <auth mechanism='EXTERNAL'/> sent, waiting for <success/> or <failure/>
    DIALBACK = "dialback"  # initiator: negotiated; db:result / db:verify requests go out at once
    SASL_ONLY = "sasl-only"  # initiator: negotiated by SASL EXTERNAL, the peer has no dialback: no further pair
    CLOSED = "closed"  # no more input: we sent a stream error, the peer closed, or the connection is gone

    # Members are singletons compared by identity; Enum's own __hash__ (of the name) is Python code,
    # slow in the transition table lookups.
    __hash__ = object.__hash__


# The members as module names, as h11 has its states: `Stage.CLOSED` is a slow class attribute lookup on
# Python 3.11 (dearer than a function call), and the session tests its stage at nearly every step.
TLS, HEADER, OPEN, FEATURES, CLOSED = Stage.TLS, Stage.HEADER, Stage.OPEN, Stage.FEATURES, Stage.CLOSED
STARTTLS, SASL, DIALBACK, SASL_ONLY = Stage.STARTTLS, Stage.SASL, Stage.DIALBACK, Stage.SASL_ONLY


class StageError(RuntimeError):
    """A stage change that `TRANSITIONS` does not allow."""


_ENDS = "no more input: we sent a stream error, the peer closed its stream, or the connection was lost"

# role -> stage -> {next stage: what causes the move}. Nothing leaves CLOSED.
TRANSITIONS: Mapping[str, Mapping[Stage, Mapping[Stage, str]]] = {
    "receiver": {
        TLS: {
            HEADER: "the TLS handshake finished; everything learned before it is forgotten (RFC 6120 §5.4.3.3)",
            CLOSED: _ENDS,
        },
        HEADER: {
            OPEN: "the initiator's stream header was read (RFC 6120 §4.7)",
            CLOSED: _ENDS,
        },
        OPEN: {
            TLS: "we sent <proceed/>; TLS starts right after it (RFC 6120 §5.4.2.3)",
            HEADER: "we sent SASL <success/>: the stream restarts (RFC 6120 §6.4.6)",
            CLOSED: _ENDS,
        },
        CLOSED: {},
    },
    "initiator": {
        TLS: {
            HEADER: "the TLS handshake finished; we sent a new stream header (RFC 6120 §5.4.3.3)",
            CLOSED: _ENDS,
        },
        HEADER: {
            FEATURES: "the response stream header was read (RFC 6120 §4.7)",
            CLOSED: _ENDS,
        },
        FEATURES: {
            STARTTLS: "we sent <starttls/> (RFC 6120 §5.4.2, RFC 7590 §3.1)",
            SASL: "we sent <auth mechanism='EXTERNAL'/> (RFC 6120 §6.4.2, XEP-0178)",
            DIALBACK: "nothing left to negotiate and the peer speaks dialback (XEP-0220 §2.1)",
            SASL_ONLY: "SASL EXTERNAL succeeded and the peer offers no dialback for further pairs",
            CLOSED: _ENDS,
        },
        STARTTLS: {
            TLS: "the peer answered <proceed/> (RFC 6120 §5.4.2.3)",
            CLOSED: _ENDS,
        },
        SASL: {
            HEADER: "the peer answered <success/>: the stream restarts with our new header (RFC 6120 §6.4.6)",
            FEATURES: "the peer answered <failure/>: choose again from the same features (XEP-0178 §3 step 11b)",
            CLOSED: _ENDS,
        },
        DIALBACK: {CLOSED: _ENDS},
        SASL_ONLY: {CLOSED: _ENDS},
        CLOSED: {},
    },
}


def first_stage(direct_tls: bool) -> Stage:
    """A new stream waits for the peer's header, or, with direct TLS (XEP-0368), for the handshake."""
    return TLS if direct_tls else HEADER


def advance(role: str, current: Stage, new: Stage) -> Stage:
    """`new`, if `TRANSITIONS` lets a `role` stream move there from `current`; else `StageError`."""
    if new not in TRANSITIONS[role].get(current, ()):
        raise StageError(f"{role} stream: no transition from {current.name} to {new.name}")
    return new


NO_MATCH = object()  # `Negotiator.verify_answered`: the answer matches no request of ours


class Negotiator(Protocol):
    """What a feature module reads of a session, and the session methods through which it acts.

    Feature modules never assign a session attribute: they read these
    properties, send bytes and events, and report what happened through the
    methods below, each named for what it means.
    """

    # ---------------------------------------------------------------- read

    @property
    def role(self) -> str: ...  # "initiator" | "receiver"
    @property
    def config(self) -> SessionConfig: ...
    @property
    def stage(self) -> Stage: ...
    @property
    def verify_only(self) -> bool: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def local_domain(self) -> str | None: ...
    @property
    def remote_domain(self) -> str | None: ...
    @property
    def stream_id(self) -> str | None: ...
    @property
    def peer_version(self) -> tuple[int, int] | None: ...
    @property
    def peer_declares_dialback(self) -> bool: ...
    @property
    def offered(self) -> frozenset[str]: ...  # receiver: names of the features we offered on this stream
    @property
    def advertised(self) -> Advertised | None: ...  # initiator: the peer's features on this stream
    @property
    def encrypted(self) -> bool: ...
    @property
    def authenticated(self) -> bool: ...
    @property
    def sasl_done(self) -> bool: ...
    @property
    def sasl_tried(self) -> bool: ...  # initiator: we sent <auth/> on this connection
    @property
    def sasl_condition(self) -> str | None: ...  # initiator: why the peer refused our <auth/>
    @property
    def bidi(self) -> bool: ...
    @property
    def sm_enabled(self) -> bool: ...  # XEP-0198 is on: we sent <enable/>, or answered one with <enabled/>
    @property
    def inbound_pairs(self) -> tuple[Pair, ...] | frozenset[Pair]: ...  # (local, remote): the peer may send remote -> local
    @property
    def results_in(self) -> Mapping[Pair, Any]: ...  # the peer's dialback requests we are verifying -> token

    def tree(self, element: Any) -> Any: ...  # the lxml tree of a negotiation element
    def peer_certificate_ok(self, domain: str) -> bool: ...
    def tls_required(self) -> bool: ...

    # ---------------------------------------------------------------- act

    def send(self, data: bytes) -> None: ...
    def emit(self, event: Any) -> None: ...
    def close(self, condition: str | None = None, text: str | None = None, *, cause: str = "negotiation") -> None: ...
    def await_tls(self) -> None: ...
    def sasl_succeeded(self, end: int) -> None: ...
    def sasl_refused(self, condition: str) -> None: ...
    def record_sasl_failure(self) -> int: ...
    def enable_bidi(self, limits: Any = ...) -> None: ...  # limits: the initiator's XEP-0478 limits in its request
    def start_stream_management(self) -> None: ...
    def stop_stream_management(self) -> None: ...
    def accept_inbound(self, pair: Pair, mechanism: str) -> None: ...
    def accept_outbound(self, pair: Pair, mechanism: str) -> None: ...
    def outbound_failed(self, pair: Pair, condition: str, bounce: str, text: str | None = None) -> None: ...
    def fail_outbound(self, condition: str, text: str) -> None: ...
    def await_verification(self, pair: Pair, token: Any) -> None: ...
    def verification_answered(self, token: Any) -> Pair | None: ...
    def result_answered(self, pair: Pair) -> bool: ...
    def verify_answered(self, receiving: str, originating: str, stream_id: str | None) -> Any: ...  # token or NO_MATCH
