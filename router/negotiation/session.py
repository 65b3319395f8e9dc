"""One S2S connection's protocol as a sans-IO object (the h11 / websockets pattern).

`Session` owns the connection's `Tokenizer`, its negotiation stage (moved
only through the table in `router.negotiation.state`) and two outboxes:
bytes (`data_to_send`) and events (`events`). It runs the input loop,
dispatches negotiation elements to the feature modules (`tls`, `sasl`,
`dialback`, `bidi`, `sm`), applies what they report, and closes. Two mixins hold
the rest of its state: `opening.Opening` (per-stream state, headers and
features) and `authorization.Authorizations` (the pairs authorized and
pending). Nothing here does I/O, and nothing raises on bad input: every
protocol error becomes a stream error and a `Closed` event.

Stanzas take a short path: one `router.trust.policy.check_stanza` call over the
tokenizer's decoded ``from``/``to`` and a `Stanza` event; lxml is used only
for negotiation elements.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Callable

from router.trust import certs
from router.trust import policy as pol
from router._fastparse import ParseError, StreamEnd, StreamHeader, Tokenizer
from router.wire.errors import STANZA_KINDS, STREAM_CONDITIONS, stream_condition, stream_error
from router.wire.jid import normalize_domain
from router.wire.namespaces import CLIENT_NS, SERVER_NS, STREAMS_NS, STREAM_NS
from router.negotiation import bidi, dialback, sasl, sm, tls
from router.negotiation.authorization import Authorizations
from router.negotiation.config import SessionConfig
from router.negotiation.features import StreamLimits
from router.negotiation.events import BidiEnabled, Closed, PeerClosed, Stanza, StartTLS
from router.negotiation.headers import OUR_VERSION, new_stream_id, parse_version
from router.negotiation.opening import Opening
from router.negotiation.pairs import Pair
from router.negotiation.state import CLOSED, FEATURES, HEADER, TLS, Stage, advance, first_stage
from router.wire.xml import STREAM_CLOSE, first_condition, parse_element, text_in

__all__ = ["OUR_VERSION", "Session", "SessionConfig", "new_stream_id", "parse_version"]

log = logging.getLogger("router.negotiation")

# Content namespaces we do not serve: a first-level element in one is <invalid-namespace/> (RFC 6120 §4.8.3).
_FOREIGN_CONTENT_NS = frozenset({"", CLIENT_NS, "jabber:component:accept"})


class Session(Opening, Authorizations):
    """Negotiation and authorization of one S2S stream, in either role.

    One exists per connection, so it has ``__slots__`` and keeps negotiation-only
    state (pending requests, the parsed negotiation element, certificate checks)
    small or shared once the stream is idle. Its base classes keep the rest:
    `opening.Opening` the per-stream state and the header and features
    exchange, `authorization.Authorizations` the pairs authorized and pending.

    ``Session("initiator", config, local, remote)`` writes its stream header at
    once and asks to send ``local -> remote``; ``Session("receiver", config)``
    waits for the peer's header. ``verify_only`` initiators only carry
    ``<db:verify/>`` requests (`request_verify`) and skip optional TLS.
    ``direct_tls``: the connection is TLS from the first byte (XEP-0368); the
    runtime calls `tls_established` before any data.
    """

    __slots__ = (
        "role", "config", "verify_only", "tokenizer", "local_domain", "remote_domain", "_new_id", "stage",
        "encrypted", "peer_chain", "sasl_done", "sasl_failures", "sasl_tried", "sasl_condition",
        "_out", "_events", "_cert_status", "_tree_cache", "_restarted", "_close_sent", "bidi", "sm_enabled",
        "watch", *Opening.FIELDS, *Authorizations.FIELDS,
    )

    def __init__(
        self,
        role: str,
        config: SessionConfig,
        local_domain: str | None = None,
        remote_domain: str | None = None,
        *,
        verify_only: bool = False,
        direct_tls: bool = False,
        new_id=new_stream_id,
    ) -> None:
        if role not in ("initiator", "receiver"):
            raise ValueError(f"role {role!r} is not 'initiator' or 'receiver'")
        if role == "initiator" and (local_domain is None or remote_domain is None):
            raise ValueError("an initiating session needs its local and remote domain")
        self.role = role
        self.config = config
        self.verify_only = verify_only
        self.tokenizer = Tokenizer(max_stanza_bytes=config.policy.pre_auth_max_stanza_bytes)
        self.local_domain = normalize_domain(local_domain) if local_domain else None
        self.remote_domain = normalize_domain(remote_domain) if remote_domain else None
        self._new_id = new_id
        self.stage = first_stage(direct_tls)
        # told when the stage or the inbound pairs change: the runtime keeps what its compiled
        # path may route from them (router._fastroute.StreamCore.inbound_pairs)
        self.watch: Callable[[], None] | None = None
        wanted = Pair(self.local_domain, self.remote_domain) if role == "initiator" and not verify_only else None
        self._init_authorizations(wanted)
        self.encrypted = False
        self.peer_chain: tuple[bytes, ...] = ()
        self.sasl_done = False
        self.sasl_failures = 0  # receiver: failed <auth/> attempts
        self.sasl_tried = False  # initiator: we sent <auth/> (once per connection)
        self.sasl_condition: str | None = None  # initiator: the peer's SASL <failure/> condition
        self._out = b""  # bytes, not a bytearray: an idle stream holds the shared empty one
        self._events: list | tuple = ()  # a list while events wait to be drained
        self._cert_status: dict[str, bool] | None = None  # domain -> proven by the TLS chain; made when asked
        self._tree_cache: tuple[object, object] | None = None
        self._restarted: bytes | None = None
        self._close_sent = False  # we wrote </stream:stream>; a graceful close keeps reading (RFC 6120 §4.4)
        self.bidi = False
        self.sm_enabled = False  # XEP-0198 (router.negotiation.sm)
        self._reset_stream_state()
        if role == "initiator" and not direct_tls:
            self._send_header()

    # ------------------------------------------------------------------ public API: input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer (after TLS: decrypted)."""
        if self._input_refused():
            return
        self._run(self.tokenizer.feed, data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self.tokenizer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._input_refused():
            return
        self._run(self.tokenizer.buffer_updated, nbytes)

    def tls_established(self, peer_chain_der) -> None:
        """The TLS handshake after `StartTLS` (or a direct-TLS connection's) finished."""
        if self.stage is not TLS:
            self.close("internal-server-error", "TLS was established when the stream did not expect it", cause="local")
            return
        self.encrypted = True
        self.peer_chain = tuple(peer_chain_der or ())
        self._cert_status = None
        # RFC 6120 §5.4.3.3: everything learned before TLS is forgotten
        if self.role == "receiver":
            self.local_domain = self.remote_domain = None
        self.bidi = self.sm_enabled = False
        self._reset_stream_state()
        self._advance(HEADER)
        if self.role == "initiator":
            self._send_header()

    def key_verified(self, token, result: str, text: str | None = None) -> None:
        """Answer to a `VerifyKey`: "valid", "invalid" or a dialback error condition
        (with ``text`` saying why, for the peer)."""
        if self.stage is not CLOSED:
            self._guarded(dialback.key_verified, self, token, result, text)

    def close(self, condition: str | None = None, text: str | None = None, *, cause: str = "negotiation") -> None:
        """End the stream: an optional stream error, then ``</stream:stream>``.

        ``cause`` goes on the `Closed` event: the runtime passes "local"."""
        if self._close_sent:
            return
        if condition is not None and condition not in STREAM_CONDITIONS:
            condition = "undefined-condition"
        if not self._header_sent:
            self._send_header()  # RFC 6120 §4.9.1.2: header, then error, then close
        if condition is not None:
            self._out += stream_error(condition, text)
            self._end_input()
        self._out += STREAM_CLOSE
        self._close_sent = True
        self.emit(Closed(condition, text, cause))
        self._fail_pending(condition or "remote-server-timeout", text or "stream closed")

    def connection_lost(self) -> None:
        """TCP is gone: whatever was pending failed."""
        if self.stage is not CLOSED:
            self._end_input()
            self._fail_pending("remote-server-timeout", "connection lost")

    # ------------------------------------------------------------------ public API: output

    def data_to_send(self) -> bytes:
        data, self._out = self._out, b""
        return data

    def events(self) -> list:
        events, self._events = self._events, ()
        return events if events else []

    @property
    def authenticated(self) -> bool:
        """The peer proved an identity on this stream (SASL, or a pair in either direction)."""
        return self.sasl_done or bool(self.inbound_pairs) or bool(self.outbound_pairs)

    @property
    def closed(self) -> bool:
        return self._close_sent or self.stage is CLOSED

    # ------------------------------------------------------------------ for feature modules (state.Negotiator)

    def send(self, data: bytes) -> None:
        if not self._close_sent:
            self._out += data

    def emit(self, event) -> None:
        if self._events:
            self._events.append(event)
        else:
            self._events = [event]

    def tree(self, element):
        """The lxml tree of a negotiation element, in its header's namespace context."""
        if self._tree_cache is None or self._tree_cache[0] is not element:
            raw = self.tokenizer.buffer[element.start : element.end]
            self._tree_cache = (element, parse_element(raw, self.tokenizer.header.namespaces))
        return self._tree_cache[1]

    def peer_certificate_ok(self, domain: str) -> bool:
        """Does the TLS peer's chain reach our trust store and name `domain` (RFC 6125), or
        did DANE prove it (`dane_verdict`)?"""
        if not self.encrypted:
            return False
        if self._cert_status is None:
            self._cert_status = {}
        if domain not in self._cert_status:
            store = self.config.peer_trust.get(domain, self.config.trust_store)
            status = certs.peer_status(list(self.peer_chain), store, domain)
            if not status.authenticated:
                log.info("certificate does not prove %s: %s", domain, status.reason)
            self._cert_status[domain] = status.authenticated
        return self._cert_status[domain]

    def tls_required(self) -> bool:
        """Must the peer start TLS before anything else (policy, or a domain that needs certificates)?"""
        policy = self.config.policy
        return policy.require_encryption or (
            self.remote_domain is not None and policy.auth_mode(self.remote_domain) == pol.AUTH_SECURE
        )

    def await_tls(self) -> None:
        """``<proceed/>`` was sent or received: stop parsing, let the runtime run the handshake."""
        self._advance(TLS)
        self._restarted = b""
        self.emit(StartTLS(self.local_domain if self.role == "receiver" else self.remote_domain))

    def sasl_succeeded(self, end: int) -> None:
        """``<success/>`` was sent or received: restart the stream after byte `end` (§6.4.6)."""
        self._restarted = self.tokenizer.restart(end)
        self.sasl_done = True
        self._raise_stanza_limit()
        if self.role == "receiver":
            self._sasl_inbound(Pair(self.local_domain, self.remote_domain))
            self._reset_stream_state()
            self._advance(HEADER)
        else:
            self._reset_stream_state()
            self._advance(HEADER)
            self._send_header()

    def sasl_refused(self, condition: str) -> None:
        """Initiator: the peer answered our ``<auth/>`` with ``<failure/>``; choose again."""
        self.sasl_condition = condition
        self._advance(FEATURES)
        self.continue_negotiation()

    def record_sasl_failure(self) -> int:
        """Receiver: we answered ``<auth/>`` with ``<failure/>``; how many times so far."""
        self.sasl_failures += 1
        return self.sasl_failures

    def start_stream_management(self) -> None:
        self.sm_enabled = True

    def stop_stream_management(self) -> None:
        self.sm_enabled = False

    def enable_bidi(self, limits: StreamLimits = StreamLimits()) -> None:
        """XEP-0288 is on for this stream: we sent the request, or accepted the peer's."""
        self.bidi = True
        self.emit(BidiEnabled(limits))

    # ------------------------------------------------------------------ internals

    def _advance(self, stage: Stage) -> None:
        """Move to `stage`, if the transition table allows it (else `state.StageError`)."""
        self.stage = advance(self.role, self.stage, stage)
        if self.watch is not None:
            self.watch()

    def _end_input(self) -> None:
        """No more input will be processed (a stream error, the peer's close, a lost connection)."""
        if self.stage is not CLOSED:
            self._advance(CLOSED)

    def _input_refused(self) -> bool:
        stage = self.stage
        if stage is CLOSED:
            return True
        if stage is TLS:
            self.close("policy-violation", "data arrived before the TLS handshake completed")
            return True
        return False

    def _run(self, call, arg) -> None:
        try:
            events, error = call(arg), None
        except ParseError as exc:
            events, error = exc.events, exc
        self.take(events, 0, error)

    def take(self, events: list, start: int, error: ParseError | None) -> None:
        """Act on tokenizer events from ``events[start]`` on, then on the read's parse
        error. The compiled router (``router._fastroute``) reads authenticated streams
        itself: it routes the stanzas authorized here and gives the rest of a read to
        this method, in order."""
        for event in islice(events, start, None):
            if self.stage is CLOSED:
                break
            self._guarded(self._on_event, event)
            if self._restarted is not None:
                tail, self._restarted = self._restarted, None
                if tail and self.stage is not CLOSED:
                    self._run(self.tokenizer.feed, tail)
                error = None  # later events and errors belong to the discarded tail
                break
        if error is not None and self.stage is not CLOSED:
            self.close(error.condition, error.text, cause="parse")
        self._tree_cache = None  # the parsed negotiation element is not needed past its input call

    def _guarded(self, handler, *args) -> None:
        """Run a handler; a bug in it closes this stream instead of escaping to the runtime."""
        try:
            handler(*args)
        except Exception as exc:  # noqa: BLE001 - the session must never raise on input
            log.exception("internal error in stream negotiation")
            self.close("internal-server-error", f"internal error: {type(exc).__name__}", cause="local")

    def _on_event(self, event) -> None:
        if isinstance(event, StreamHeader):
            self._on_header(event)
        elif isinstance(event, StreamEnd):
            self._on_peer_close(None, None)
        else:
            self._on_element(event)

    # -- elements

    def _on_element(self, element) -> None:
        ns = element.ns
        if ns == SERVER_NS and element.name in STANZA_KINDS:
            if element.prefix is not None:
                self.close("bad-namespace-prefix", f"jabber:server elements must not be prefixed ({element.prefix}:)",
                           cause="stanza")
                return
            verdict = pol.check_stanza(element.from_, element.to, self.inbound_pairs, self.config.local_domains)
            if isinstance(verdict, pol.Refusal):
                self.close(*verdict, cause="stanza")
            else:
                self.emit(Stanza(element, verdict[1], verdict[0]))  # verdict: (local, remote) = (to, from)
            return
        handler = _HANDLERS.get((ns, element.name))
        if handler is not None:
            handler(self, element)
        elif ns in _FOREIGN_CONTENT_NS:
            self.close("invalid-namespace", f"<{element.name}/> in content namespace {ns or '(none)'!r}; this is a jabber:server stream",
                       cause="stanza" if element.name in STANZA_KINDS else "negotiation")
        else:
            self.close("unsupported-stanza-type", f"unknown first-level element {{{ns}}}{element.name}")

    def _on_stream_error(self, element) -> None:
        tree = self.tree(element)
        self._on_peer_close(stream_condition(first_condition(tree, STREAMS_NS)), text_in(tree, STREAMS_NS))

    def _on_peer_close(self, condition: str | None, text: str | None) -> None:
        if not self._close_sent:
            self._out += STREAM_CLOSE
            self._close_sent = True
        self._end_input()
        self.emit(PeerClosed(condition, text))
        reason = "the peer closed the stream" + (f" with <{condition}/>" if condition else "")
        self._fail_pending(condition or "remote-server-timeout", f"{reason}: {text}" if text else reason)

    def _raise_stanza_limit(self) -> None:
        self.tokenizer.max_stanza_bytes = self.config.policy.max_stanza_bytes


_HANDLERS = {
    **tls.HANDLERS,
    **sasl.HANDLERS,
    **dialback.HANDLERS,
    **bidi.HANDLERS,
    **sm.HANDLERS,
    (STREAM_NS, "features"): Session._on_features,
    (STREAM_NS, "error"): Session._on_stream_error,
}
