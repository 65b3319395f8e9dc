"""One S2S connection's protocol as a sans-IO object (the h11 / websockets pattern).

`Session` owns the connection's `Tokenizer`, all negotiation and
authorization state, and two outboxes: bytes (`data_to_send`) and events
(`events`). The feature modules (`tls`, `sasl`, `dialback`, `bidi`) are
functions over the session: each offers its feature, handles its elements
and emits events. Nothing here does I/O, and nothing raises on bad input:
every protocol error becomes a stream error and a `Closed` event.

Stanzas take a short path: one `router.policy.check_stanza` call over the
tokenizer's decoded ``from``/``to`` and a `Stanza` event; lxml is used only
for negotiation elements.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from router import certs
from router import policy as pol
from router._fastparse import ParseError, StreamEnd, StreamHeader, Tokenizer
from router.errors import STANZA_KINDS, STREAM_CONDITIONS, STREAMS_NS, stream_condition, stream_error
from router.jid import normalize_domain
from router.negotiation import bidi, dialback, features, sasl, tls
from router.negotiation.events import (
    AuthFailed,
    Authenticated,
    Closed,
    PeerClosed,
    Stanza,
    StartTLS,
    VerifyResult,
)
from router.negotiation.pairs import NO_PAIRS, NO_REQUESTS, Pair, with_pair, without
from router.xml import CLIENT_NS, DIALBACK_NS, SERVER_NS, STREAM_CLOSE, STREAM_NS, first_condition, parse_element, stream_header, text_in

log = logging.getLogger("router.negotiation")

OUR_VERSION = (1, 0)
_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")
# Content namespaces we do not serve: a first-level element in one is <invalid-namespace/> (RFC 6120 §4.8.3).
_FOREIGN_CONTENT_NS = frozenset({"", CLIENT_NS, "jabber:component:accept"})
_HEADER_NAMESPACES = frozenset({STREAM_NS, SERVER_NS, DIALBACK_NS})
# The few distinct feature sets a receiver offers, shared between streams.
_OFFERED: dict[frozenset[str], frozenset[str]] = {}


def new_stream_id() -> str:
    """128 random bits in hex: unpredictable, non-repeating and NMTOKEN-safe (RFC 6120 §4.7.3, T-08)."""
    return secrets.token_hex(16)


def parse_version(value: str | None) -> tuple[int, int] | None:
    """Numeric (major, minor), leading zeros ignored (§4.7.5); None for a version-less (0.9) peer."""
    if value is None:
        return None
    match = _VERSION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"version {value!r} is not 'major.minor'")
    version = int(match.group(1)), int(match.group(2))
    return OUR_VERSION if version == OUR_VERSION else version  # one tuple shared by every 1.0 stream


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session needs to decide; built once by the runtime from `router.config`."""

    local_domains: frozenset[str]
    dialback_secret: str
    trust_store: certs.TrustStore = field(default_factory=certs.TrustStore)
    # remote domain -> the only anchors its certificates may chain to, instead of
    # trust_store (RFC 6120 §13.6: a peer provisioned with its own anchors)
    peer_trust: Mapping[str, certs.TrustStore] = field(default_factory=dict)
    policy: pol.Policy = field(default_factory=pol.Policy)
    tls_offered: bool = True  # receiver: we hold a certificate and offer STARTTLS
    tls_client: bool = True  # initiator: we start TLS when offered
    has_certificate: bool = True  # initiator: we present a client certificate, so EXTERNAL may work
    dialback: bool = True  # offer and use Server Dialback
    bidi: str = "encrypted"  # "encrypted" | "always" | "off": offer / request XEP-0288
    bidi_reverse_dialback: bool = False  # receiver may piggyback its own domains over bidi (T-09)
    required_flags: bool = True  # XEP-0192 <required/> on features other than <starttls/>
    sasl_max_failures: int = 3  # failed <auth/> attempts tolerated (RFC 6120 §6.4.5: 2-5)
    sasl_send_authzid: bool = True  # initiator sends base64(from) as authzid (XEP-0178), else '='
    default_lang: str = "en"

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_domains", frozenset(normalize_domain(d) for d in self.local_domains))
        object.__setattr__(self, "peer_trust", {normalize_domain(d): store for d, store in self.peer_trust.items()})
        if self.bidi not in ("encrypted", "always", "off"):
            raise ValueError(f"bidi mode {self.bidi!r} is not 'encrypted', 'always' or 'off'")


class Session:
    """Negotiation and authorization of one S2S stream, in either role.

    One exists per connection, so it has ``__slots__`` and keeps negotiation-only
    state (pending requests, the parsed negotiation element, certificate checks)
    small or shared once the stream is idle.

    ``Session("initiator", config, local, remote)`` writes its stream header at
    once and asks to send ``local -> remote``; ``Session("receiver", config)``
    waits for the peer's header. ``verify_only`` initiators only carry
    ``<db:verify/>`` requests (`request_verify`) and skip optional TLS.
    ``direct_tls``: the connection is TLS from the first byte (XEP-0368); the
    runtime calls `tls_established` before any data.
    """

    __slots__ = (
        "role", "config", "verify_only", "tokenizer", "local_domain", "remote_domain", "_new_id",
        "inbound_pairs", "outbound_pairs", "encrypted", "peer_chain", "sasl_done", "sasl_failures",
        "sasl_tried", "sasl_pending", "sasl_condition", "results_out", "results_in", "verifies_out",
        "_requested", "_wanted", "_verify_queue", "_out", "_events", "_cert_status", "_tree_cache",
        "_restarted", "_awaiting_tls", "_direct_tls_pending", "_close_sent", "_dead",
        "_dialback_unavailable", "bidi",
        # per stream (reset on restart)
        "stream_id", "peer_version", "peer_declares_dialback", "stream_lang", "advertised", "offered",
        "starttls_sent", "_header_sent", "_header_seen", "_dialback_started",
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
        # tuples (see pairs.py): a stream nearly always carries one pair each way
        self.inbound_pairs: tuple[Pair, ...] = ()  # (remote, local) the peer may send
        self.outbound_pairs: tuple[Pair, ...] = ()  # (local, remote) we may send
        self.encrypted = False
        self.peer_chain: tuple[bytes, ...] = ()
        self.sasl_done = False
        self.sasl_failures = 0
        self.sasl_tried = False
        self.sasl_pending = False
        self.sasl_condition: str | None = None
        self.results_out: frozenset[tuple[str, str]] = NO_PAIRS  # db:result requests we sent: (local, remote)
        self.results_in: Mapping[tuple[str, str], object] = NO_REQUESTS  # requests we verify: (remote, local) -> token
        self.verifies_out: Mapping[tuple[str, str, str], list] = NO_REQUESTS  # (receiving, originating, id) -> tokens
        self._requested: frozenset[tuple[str, str]] = NO_PAIRS  # outbound pairs asked for, not yet decided
        # tuples, like the pair sets: empty on an idle stream, so shared
        self._wanted: tuple[tuple[str, str], ...] = ()  # ... and not yet sent as db:result
        self._verify_queue: tuple[tuple, ...] = ()
        self._out = b""  # bytes, not a bytearray: an idle stream holds the shared empty one
        self._events: list | tuple = ()  # a list while events wait to be drained
        self._cert_status: dict[str, bool] | None = None  # domain -> proven by the TLS chain; made when asked
        self._tree_cache: tuple[object, object] | None = None
        self._restarted: bytes | None = None
        self._awaiting_tls = False
        self._direct_tls_pending = direct_tls
        self._close_sent = False
        self._dead = False  # no more input is processed
        self._dialback_unavailable = False  # initiator: negotiation ended without dialback
        self.bidi = False
        self._reset_stream_state()
        if role == "initiator" and not verify_only:
            self._requested = frozenset({(self.local_domain, self.remote_domain)})
            self._wanted = ((self.local_domain, self.remote_domain),)
        if role == "initiator" and not direct_tls:
            self._send_header()

    # ------------------------------------------------------------------ public API: input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer (after TLS: decrypted)."""
        if self._input_refused():
            return
        self._run(self.tokenizer.feed, data)
        self._tree_cache = None  # the parsed negotiation element is not needed past its input call

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self.tokenizer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._input_refused():
            return
        self._run(self.tokenizer.buffer_updated, nbytes)
        self._tree_cache = None  # the parsed negotiation element is not needed past its input call

    def tls_established(self, peer_chain_der) -> None:
        """The TLS handshake after `StartTLS` (or a direct-TLS connection's) finished."""
        if not (self._awaiting_tls or self._direct_tls_pending) or self._dead:
            self.close("internal-server-error", "TLS was established when the stream did not expect it", cause="local")
            return
        self._awaiting_tls = self._direct_tls_pending = False
        self.encrypted = True
        self.peer_chain = tuple(peer_chain_der or ())
        self._cert_status = None
        # RFC 6120 §5.4.3.3: everything learned before TLS is forgotten
        if self.role == "receiver":
            self.local_domain = self.remote_domain = None
        self.bidi = False
        self._reset_stream_state()
        if self.role == "initiator":
            self._send_header()

    def key_verified(self, token, result: str, text: str | None = None) -> None:
        """Answer to a `VerifyKey`: "valid", "invalid" or a dialback error condition
        (with ``text`` saying why, for the peer)."""
        if not self._dead:
            self._guarded(dialback.key_verified, self, token, result, text)

    def request_pair(self, local: str, remote: str) -> bool:
        """Ask to send ``local -> remote`` on this stream; False when this stream cannot carry it."""
        try:
            local, remote = normalize_domain(local), normalize_domain(remote)
        except ValueError:
            return False
        if (
            self._dead or self._close_sent or self.verify_only or self._dialback_unavailable
            or local not in self.config.local_domains
        ):
            return False
        pair = (local, remote)
        if pair in self.outbound_pairs or pair in self._requested:
            return True
        if not self._may_carry(local, remote):
            return False
        self._requested |= {pair}
        if self._dialback_ready():
            self._guarded(dialback.send_result_request, self, local, remote)
        else:
            self._wanted += (pair,)
        return True

    def request_verify(self, token, receiving: str, originating: str, stream_id: str, key: str) -> None:
        """Send ``<db:verify/>`` for another stream's `VerifyKey`; the answer is a `VerifyResult`."""
        if token in self.results_in.values():
            raise ValueError("a dialback key must not be verified over the stream that carried it (XEP-0288 §2.2)")
        if self._dead or self._close_sent:
            self.emit(VerifyResult(token, "remote-server-timeout"))
        elif self._dialback_ready():
            dialback.send_verify_request(self, token, receiving, originating, stream_id, key)
        else:
            self._verify_queue += ((token, receiving, originating, stream_id, key),)

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
            self._dead = True
        self._out += STREAM_CLOSE
        self._close_sent = True
        self.emit(Closed(condition, text, cause))
        self._fail_pending(condition or "remote-server-timeout", text or "stream closed")

    def connection_lost(self) -> None:
        """TCP is gone: whatever was pending failed."""
        if not self._dead:
            self._dead = True
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
        return self._close_sent or self._dead

    # ------------------------------------------------------------------ helpers for feature modules

    def send(self, data: bytes) -> None:
        if not self._close_sent:
            self._out += data

    def emit(self, event) -> None:
        if self._events:
            self._events.append(event)
        else:
            self._events = [event]

    def normalize(self, domain: str) -> str:
        return normalize_domain(domain)

    def tree(self, element):
        """The lxml tree of a negotiation element, in its header's namespace context."""
        if self._tree_cache is None or self._tree_cache[0] is not element:
            raw = self.tokenizer.buffer[element.start : element.end]
            self._tree_cache = (element, parse_element(raw, self.tokenizer.header.namespaces))
        return self._tree_cache[1]

    def peer_certificate_ok(self, domain: str) -> bool:
        """Does the TLS peer's chain reach our trust store and name `domain` (RFC 6125)?"""
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
        self._awaiting_tls = True
        self._restarted = b""
        self.emit(StartTLS(self.local_domain if self.role == "receiver" else self.remote_domain))

    def sasl_succeeded(self, end: int) -> None:
        """``<success/>`` was sent or received: restart the stream after byte `end` (§6.4.6)."""
        self._restarted = self.tokenizer.restart(end)
        self.sasl_done = True
        self._raise_stanza_limit()
        if self.role == "receiver":
            self.inbound_pairs = with_pair(self.inbound_pairs, (self.remote_domain, self.local_domain))
            self.emit(Authenticated(self.remote_domain, self.local_domain, sasl.EXTERNAL, "inbound"))
            self._reset_stream_state()
        else:
            self._reset_stream_state()
            self._send_header()

    def accept_inbound(self, remote: str, local: str, mechanism: str) -> None:
        """The peer may now send ``remote -> local``; with bidi we may send the inverse."""
        self.inbound_pairs = with_pair(self.inbound_pairs, (remote, local))
        self._raise_stanza_limit()
        self.emit(Authenticated(remote, local, mechanism, "inbound"))
        if self.bidi and (local, remote) not in self.outbound_pairs:
            self.outbound_pairs = with_pair(self.outbound_pairs, (local, remote))
            self._requested = without(self._requested, (local, remote))
            self.emit(Authenticated(remote, local, mechanism, "outbound"))

    def accept_outbound(self, local: str, remote: str, mechanism: str) -> None:
        """We may now send ``local -> remote``; with bidi the peer may send the inverse.

        Our own authentication proves nothing about the peer: a remote domain that
        must authenticate with a certificate gets no stanza unless the TLS peer
        proved it too (RFC 6120 §13.7.2: the initiator validates the receiver's
        certificate); without any other pair the stream then ends."""
        if not self._peer_proven_enough(remote):
            text = (f"{remote} must prove its identity with a trusted certificate (secure authentication), "
                    f"and the certificate it presented does not")
            self.outbound_failed(local, remote, "not-authorized", "remote-server-timeout", text)
            if not self.outbound_pairs and not self.inbound_pairs:
                self.close("policy-violation", text)
            return
        self._requested = without(self._requested, (local, remote))
        self.outbound_pairs = with_pair(self.outbound_pairs, (local, remote))
        self._raise_stanza_limit()
        self.emit(Authenticated(remote, local, mechanism, "outbound"))
        if self.bidi and (remote, local) not in self.inbound_pairs:
            self.inbound_pairs = with_pair(self.inbound_pairs, (remote, local))
            self.emit(Authenticated(remote, local, mechanism, "inbound"))

    def _peer_proven_enough(self, remote: str) -> bool:
        """Our own authentication proves nothing about the peer: a domain that must
        authenticate with a certificate is only trusted if the TLS peer proved it."""
        return self.config.policy.auth_mode(remote) != pol.AUTH_SECURE or self.peer_certificate_ok(remote)

    def outbound_failed(self, local: str, remote: str, condition: str, bounce: str, text: str | None = None) -> None:
        self._requested = without(self._requested, (local, remote))
        self.results_out = without(self.results_out, (local, remote))
        self.emit(AuthFailed(remote, local, condition, bounce, text))

    def fail_outbound(self, condition: str, text: str) -> None:
        """Every outbound pair still pending on this stream failed."""
        log.info("outbound negotiation failed (%s): %s", condition, text)
        for local, remote in sorted(self._requested):
            self.emit(AuthFailed(remote, local, condition, "remote-server-timeout", text))
        self._requested = self.results_out = NO_PAIRS
        self._wanted = ()

    def continue_negotiation(self) -> None:
        """Initiator: take the next step the peer's features (or their absence) allow."""
        adv = self.advertised
        if self.sasl_done:
            if adv.required:
                self._unsupported_required(adv)
                return
            pair = (self.local_domain, self.remote_domain)
            if pair in self._requested:
                self.accept_outbound(*pair, sasl.EXTERNAL)
                self._wanted = tuple(p for p in self._wanted if p != pair)
            self._start_dialback()
            return
        if tls.choose(self, adv):
            return
        if not self.encrypted and adv.starttls_required:
            self._unsupported_required(adv)  # we cannot start TLS (config.tls_client is off)
            return
        if not self.encrypted and not self.verify_only and self.tls_required():
            self._give_up("policy-violation", f"our policy requires TLS but {self.remote_domain} does not offer it")
            return
        if not self.verify_only:
            bidi.choose(self, adv)
            if sasl.choose(self, adv):
                return
        if self.config.dialback and dialback.available(self):
            self._start_dialback()
            return
        if self.sasl_condition is not None:
            self._give_up("policy-violation", f"SASL EXTERNAL failed ({self.sasl_condition}) and dialback is not available")
        elif adv.required:
            self._unsupported_required(adv)
        else:
            self._give_up("unsupported-feature", f"{self.remote_domain} offers no authentication method we support")

    # ------------------------------------------------------------------ internals

    def _reset_stream_state(self) -> None:
        """Per-stream state that a restart discards."""
        self.stream_id: str | None = None
        self.peer_version: tuple[int, int] | None = OUR_VERSION
        self.peer_declares_dialback = False
        self.stream_lang = self.config.default_lang
        self.advertised: features.Advertised | None = None
        self.offered: frozenset[str] = frozenset()
        self.starttls_sent = False
        self._header_sent = False
        self._header_seen = False
        self._dialback_started = False

    def _input_refused(self) -> bool:
        if self._dead:
            return True
        if self._awaiting_tls or self._direct_tls_pending:
            self.close("policy-violation", "data arrived before the TLS handshake completed")
            return True
        return False

    def _run(self, call, arg) -> None:
        try:
            events, error = call(arg), None
        except ParseError as exc:
            events, error = exc.events, exc
        for event in events:
            if self._dead:
                return
            self._guarded(self._on_event, event)
            if self._restarted is not None:
                tail, self._restarted = self._restarted, None
                if tail and not self._dead:
                    self._run(self.tokenizer.feed, tail)
                return  # later events and errors belong to the discarded tail
        if error is not None and not self._dead:
            self.close(error.condition, error.text, cause="parse")

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

    # -- headers

    def _send_header(self) -> None:
        if self.role == "initiator":
            header = stream_header(
                to=self.remote_domain, from_=self.local_domain, stream_id=None,
                version="1.0", lang=self.config.default_lang,
            )
        else:
            if self.stream_id is None:
                self.stream_id = self._new_id()
            version = self.peer_version
            header = stream_header(
                to=self.remote_domain, from_=self.local_domain or "", stream_id=self.stream_id,
                version=None if version is None else "%d.%d" % min(version, OUR_VERSION), lang=self.stream_lang,
            )
        self._out += header
        self._header_sent = True

    def _on_header(self, header) -> None:
        if self._header_seen:
            self.close("bad-format", "a second stream header without a restart")
            return
        self._header_seen = True
        namespaces = header.namespaces
        if header.prefix not in ("stream", None):
            self.close("bad-namespace-prefix", f"stream prefix {header.prefix!r} is not accepted; use 'stream'")
            return
        if namespaces.get(header.prefix) != STREAM_NS:
            self.close("invalid-namespace", "the stream element is not in http://etherx.jabber.org/streams")
            return
        if header.prefix is not None and namespaces.get(None, SERVER_NS) != SERVER_NS:
            self.close("invalid-namespace", f"content namespace {namespaces.get(None)!r} is not jabber:server")
            return
        extra = sorted(uri for uri in namespaces.values() if uri not in _HEADER_NAMESPACES)
        if extra:
            self.close("invalid-namespace", f"namespace {extra[0]} must be declared in stanzas, not on the stream header")
            return
        self.peer_declares_dialback = DIALBACK_NS in namespaces.values()
        if header.lang:
            self.stream_lang = header.lang
        try:
            version = parse_version(header.version)
        except ValueError as exc:
            self.close("unsupported-version", str(exc))
            return
        self.peer_version = version if version is None or version >= OUR_VERSION else None
        if self.role == "receiver":
            self._on_initial_header(header)
        else:
            self._on_response_header(header)

    def _on_initial_header(self, header) -> None:
        try:
            to = normalize_domain(header.to) if header.to else None
        except ValueError:
            to = None
        if to is None or to not in self.config.local_domains:
            self.close("host-unknown", f"{header.to!r} is not served here" if header.to else "the stream header has no 'to'")
            return
        try:
            from_ = normalize_domain(header.from_) if header.from_ else None
        except ValueError as exc:
            self.local_domain = to
            self.close("invalid-from", f"the stream header's 'from' is not a domain: {exc}")
            return
        if self.sasl_done and (from_ != self.remote_domain or to != self.local_domain):
            self.close("invalid-from", f"the restarted stream must keep from={self.remote_domain} to={self.local_domain}")
            return
        self.local_domain, self.remote_domain = to, from_
        if from_ is not None:
            federation = pol.federation_allowed(self.config.policy, from_)
            if not federation:
                self.close(federation.condition, federation.text)
                return
        self._send_header()
        if self.peer_version is not None:  # RFC 6120 §4.7.5: a 0.9 peer gets no features, dialback only
            self._send_features()
        if self._dialback_ready() and not self._close_sent:
            self._flush_verifies()  # requests made while the peer's header was still missing

    def _send_features(self) -> None:
        to, from_ = self.local_domain, self.remote_domain
        offers = self._offers()
        offered = frozenset(offer.name for offer in offers)
        self.offered = _OFFERED.setdefault(offered, offered)
        self.send(features.render(offers, self.config.required_flags))
        if not self.authenticated and not self.offered & {"starttls", "mechanisms", "dialback"}:
            self.close("policy-violation", f"no authentication method acceptable for {from_} is available on this stream")
            return
        if self.sasl_done and self.bidi:
            self.outbound_pairs = with_pair(self.outbound_pairs, (to, from_))
            self.emit(Authenticated(from_, to, sasl.EXTERNAL, "outbound"))

    def _offers(self) -> list[features.Offer]:
        """Receiver's features for this stage, in XEP-0170 order; only STARTTLS while it is required."""
        tls_offer = tls.offer(self)
        if tls_offer is not None and tls_offer.required:
            return [tls_offer]
        sasl_offer = sasl.offer(self)
        candidates = [tls_offer, sasl_offer, dialback.offer(self, sasl_offer is not None), bidi.offer(self)]
        return [offer for offer in candidates if offer is not None]

    def _on_response_header(self, header) -> None:
        if not header.id:
            self.close("bad-format", "the response stream header has no 'id' (RFC 6120 §4.7.3)")
            return
        self.stream_id = header.id
        if self.peer_version is None:
            self.advertised = features.Advertised()  # 0.9 peer: no features will come
            self.continue_negotiation()

    # -- elements

    def _on_element(self, element) -> None:
        ns = element.ns
        if ns == SERVER_NS and element.name in STANZA_KINDS:
            if element.prefix is not None:
                self.close("bad-namespace-prefix", f"jabber:server elements must not be prefixed ({element.prefix}:)",
                           cause="stanza")
                return
            verdict = pol.check_stanza(element.from_, element.to, self.inbound_pairs, self.config.local_domains)
            if verdict is None:
                self.emit(Stanza(element))
            else:
                self.close(*verdict, cause="stanza")
            return
        handler = _HANDLERS.get((ns, element.name))
        if handler is not None:
            handler(self, element)
        elif ns in _FOREIGN_CONTENT_NS:
            self.close("invalid-namespace", f"<{element.name}/> in content namespace {ns or '(none)'!r}; this is a jabber:server stream",
                       cause="stanza" if element.name in STANZA_KINDS else "negotiation")
        else:
            self.close("unsupported-stanza-type", f"unknown first-level element {{{ns}}}{element.name}")

    def _on_features(self, element) -> None:
        if self.role != "initiator":
            self.close("unsupported-stanza-type", "<stream:features/> sent to the receiving server")
            return
        advertised = features.parse(self.tree(element))
        if self.advertised is not None:
            if advertised.empty:
                return  # RFC 6120 §4.3.5: an empty features element may follow completion
            self.close("unsupported-stanza-type", "new stream features without a stream restart (§4.3.5)")
            return
        self.advertised = advertised
        self.continue_negotiation()

    def _on_stream_error(self, element) -> None:
        tree = self.tree(element)
        self._on_peer_close(stream_condition(first_condition(tree, STREAMS_NS)), text_in(tree, STREAMS_NS))

    def _on_peer_close(self, condition: str | None, text: str | None) -> None:
        if not self._close_sent:
            self._out += STREAM_CLOSE
            self._close_sent = True
        self._dead = True
        self.emit(PeerClosed(condition, text))
        reason = "the peer closed the stream" + (f" with <{condition}/>" if condition else "")
        self._fail_pending(condition or "remote-server-timeout", f"{reason}: {text}" if text else reason)

    # -- dialback plumbing

    def _dialback_ready(self) -> bool:
        if self._awaiting_tls or self.stream_id is None:
            return False
        if self.role == "initiator":
            return self._dialback_started
        return self._header_sent and self.peer_declares_dialback

    def _may_carry(self, local: str, remote: str) -> bool:
        """Can a new pair go over this stream (XEP-0220 §2.6, XEP-0288 §2.2)?"""
        if self.role == "receiver":
            return (
                self.bidi and self.config.bidi_reverse_dialback
                and any(r == remote for r, _ in self.inbound_pairs)
            )
        if remote == self.remote_domain:
            return True  # sender multiplexing (§2.6.1)
        return (self.advertised is not None and self.advertised.dialback_errors) or (
            self.bidi and any(r == remote for r, _ in self.inbound_pairs)
        )

    def _start_dialback(self) -> None:
        if not self._dialback_started and self.config.dialback and dialback.available(self):
            self._dialback_started = True
        if not self._dialback_started:
            self._dialback_unavailable = True
            for local, remote in self._wanted:
                self.outbound_failed(local, remote, "unsupported-feature", "remote-server-timeout",
                                     f"{self.remote_domain} offers no authentication we can use (no dialback)")
            self._wanted = ()
            for token, *_ in self._verify_queue:
                self.emit(VerifyResult(token, "remote-server-timeout"))
            self._verify_queue = ()
            return
        wanted, self._wanted = self._wanted, ()
        for local, remote in wanted:
            dialback.send_result_request(self, local, remote)
        self._flush_verifies()

    def _flush_verifies(self) -> None:
        queue, self._verify_queue = self._verify_queue, ()
        for request in queue:
            dialback.send_verify_request(self, *request)

    def _give_up(self, condition: str, text: str) -> None:
        self.fail_outbound(condition, text)
        self.close(condition, text)

    def _unsupported_required(self, adv) -> None:
        self._give_up("unsupported-feature", f"the peer requires features we do not support: {', '.join(sorted(adv.required))}")

    def _fail_pending(self, condition: str, text: str) -> None:
        if self._requested:
            self.fail_outbound(condition, text)
        pending = [t for tokens in self.verifies_out.values() for t in tokens]
        pending += [request[0] for request in self._verify_queue]
        self.verifies_out = NO_REQUESTS
        self._verify_queue = ()
        for token in pending:
            self.emit(VerifyResult(token, "remote-server-timeout"))  # XEP-0220 §2.1.2
        self.results_in = NO_REQUESTS

    def _raise_stanza_limit(self) -> None:
        self.tokenizer.max_stanza_bytes = self.config.policy.max_stanza_bytes


_HANDLERS = {
    **tls.HANDLERS,
    **sasl.HANDLERS,
    **dialback.HANDLERS,
    **bidi.HANDLERS,
    (STREAM_NS, "features"): Session._on_features,
    (STREAM_NS, "error"): Session._on_stream_error,
}
