"""How each stream of a connection opens, in either role: headers both ways, then features and the step taken on them.

`Opening` is a mixin of `Session` (no slots of its own: `Session.__slots__`
lays out its `FIELDS`) that holds the per-stream state a restart discards
(stream ID, the peer's version and language, features) and handles the
opening elements: the receiver answers the initial header with its own and
the features for the stage (RFC 6120 §4.3.2, §4.7), after the runtime's DANE
verdict when SASL EXTERNAL depends on one (`dane_verdict`); the initiator reads the
response header and the features, and takes the step `negotiate.next_step`
chooses. Header checks are `headers`' pure functions. It is not used on its
own: it relies on the session's stage moves, outboxes, `close` and
authorization methods, as listed in `_SESSION_PARTS`.
"""

from __future__ import annotations

from router.negotiation import features, headers, negotiate
from router.negotiation.events import CheckDane
from router.negotiation.headers import OUR_VERSION
from router.negotiation.pairs import Pair
from router.negotiation.state import CLOSED, DIALBACK, FEATURES, HEADER, OPEN, SASL
from router.trust import dane

# The few distinct feature sets a receiver offers, shared between streams.
_OFFERED: dict[frozenset[str], frozenset[str]] = {}
# What this class uses of the session it is a base of.
_SESSION_PARTS = ("role", "config", "stage", "local_domain", "remote_domain", "sasl_done", "sasl_tried",
                  "authenticated", "bidi", "encrypted", "_new_id", "_out", "_close_sent", "_cert_status", "send",
                  "emit", "close", "tree", "enable_bidi", "peer_certificate_ok", "fail_outbound", "_advance",
                  "_flush_verifies", "_start_dialback", "_sasl_outbound", "_sasl_bidi_outbound")


class Opening:
    """Per-stream state and the opening of each stream (a base class of `Session`)."""

    __slots__ = ()  # a mixin: `Session.__slots__` lays out FIELDS
    FIELDS = ("stream_id", "peer_version", "peer_declares_dialback", "stream_lang", "advertised", "offered", "_header_sent",
              "_dane_pending")

    def _reset_stream_state(self) -> None:
        """Per-stream state that a restart discards."""
        self.stream_id: str | None = None
        self.peer_version: tuple[int, int] | None = OUR_VERSION
        self.peer_declares_dialback = False
        self.stream_lang = self.config.default_lang
        self.advertised: features.Advertised | None = None  # initiator: the peer's features
        self.offered: frozenset[str] = frozenset()  # receiver: the names of the features we offered
        self._header_sent = False
        self._dane_pending: str | None = None  # receiver: the domain whose DANE verdict our features wait for

    def _send_header(self) -> None:
        if self.role == "initiator":
            header = headers.initial_header(self.local_domain, self.remote_domain, self.config.default_lang)
        else:
            if self.stream_id is None:
                self.stream_id = self._new_id()
            header = headers.response_header(self.local_domain, self.remote_domain, self.stream_id,
                                             self.peer_version, self.stream_lang)
        self._out += header
        self._header_sent = True

    def _on_header(self, header) -> None:
        if self.stage is not HEADER:
            self.close("bad-format", "a second stream header without a restart")
            return
        refusal = headers.namespace_refusal(header)
        if refusal is not None:
            self.close(*refusal)
            return
        self.peer_declares_dialback = headers.declares_dialback(header)
        if header.lang:
            self.stream_lang = header.lang
        try:
            self.peer_version = headers.peer_version(header.version)
        except ValueError as exc:
            self.close("unsupported-version", str(exc))
            return
        if self.role == "receiver":
            self._on_initial_header(header)
        else:
            self._on_response_header(header)

    # ------------------------------------------------------------------ receiver

    def _on_initial_header(self, header) -> None:
        local, remote, refusal = headers.initial_addresses(header, self.config, self.sasl_done,
                                                           self.local_domain, self.remote_domain)
        self.local_domain, self.remote_domain = local, remote
        if refusal is not None:
            self.close(*refusal)
            return
        self._send_header()
        self._advance(OPEN)
        if self.peer_version is not None and self._dane_wanted():
            self._dane_pending = self.remote_domain
            self.emit(CheckDane(self.remote_domain))
            return
        self._open_features()

    def _open_features(self) -> None:
        """Receiver, our header sent: the features, then what waited for the peer's header."""
        if self.peer_version is not None:  # RFC 6120 §4.7.5: a 0.9 peer gets no features, dialback only
            self._send_features()
        if self._dialback_ready() and not self._close_sent:
            self._flush_verifies()  # requests made while the peer's header was still missing

    def _dane_wanted(self) -> bool:
        """Receiver: must the features wait for DANE? Only when SASL EXTERNAL depends on it: an
        encrypted, unauthenticated stream whose certificate our trust store does not accept
        for the header's domain, and that domain not exempt (``[tls] dane_exempt``)."""
        domain, config = self.remote_domain, self.config
        return (config.dane and self.encrypted and not self.authenticated and domain is not None
                and not dane.exempt(domain, config.dane_exempt) and not self.peer_certificate_ok(domain))

    def dane_verdict(self, domain: str, matched: bool | None, text: str | None = None) -> None:
        """The runtime's DANE check of the peer's certificate for `domain` (RFC 7673): True,
        it matches the domain's TLSA records and proves the domain as a trusted certificate
        would; False, usable records exist and none matches; None, there are no usable records.

        Receiver, answering `CheckDane`: the features follow (SASL EXTERNAL offered if proven).
        Initiator, after `tls_established`: False means the connection "MUST NOT be used"
        (RFC 7673 §3.4), so every pending pair fails and the stream ends with `text`."""
        if self.stage is CLOSED:
            return
        if matched:
            if self._cert_status is None:
                self._cert_status = {}
            self._cert_status[domain] = True  # `peer_certificate_ok` answers from here
        if self.role == "initiator":
            if matched is False:
                self.fail_outbound("policy-violation", text)
                self.close("policy-violation", text)
        elif self._dane_pending == domain:
            self._dane_pending = None
            self._open_features()

    def _send_features(self) -> None:
        offers = negotiate.offers(self)
        offered = frozenset(offer.name for offer in offers)
        self.offered = _OFFERED.setdefault(offered, offered)
        self.send(features.render(offers, self.config.required_flags))
        if not self.authenticated and not self.offered & {"starttls", "mechanisms", "dialback"}:
            self.close("policy-violation",
                       f"no authentication method acceptable for {self.remote_domain} is available on this stream")
            return
        if self.sasl_done and self.bidi:
            self._sasl_bidi_outbound(Pair(self.local_domain, self.remote_domain))

    # ------------------------------------------------------------------ initiator

    def _on_response_header(self, header) -> None:
        if not header.id:
            self.close("bad-format", "the response stream header has no 'id' (RFC 6120 §4.7.3)")
            return
        self.stream_id = header.id
        self._advance(FEATURES)
        if self.peer_version is None:
            self.advertised = features.Advertised()  # 0.9 peer: no features will come
            self.continue_negotiation()

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

    def continue_negotiation(self) -> None:
        """Initiator: take the step that `negotiate.next_step` chooses from the peer's features."""
        step = negotiate.next_step(self, self.advertised)
        if step.bidi is not None:
            self.send(step.bidi)
            self.enable_bidi()
        if step.stage is CLOSED:
            self.fail_outbound(step.condition, step.text)
            self.close(step.condition, step.text)
        elif step.stage is DIALBACK:
            if self.sasl_done:
                self._sasl_outbound(Pair(self.local_domain, self.remote_domain))
                if self.stage is CLOSED:
                    return  # the peer's certificate did not prove it and nothing else is authorized
            self._start_dialback()
        else:
            if step.stage is SASL:
                self.sasl_tried = True
            self._advance(step.stage)
            self.send(step.request)

    # ------------------------------------------------------------------ both

    def _dialback_ready(self) -> bool:
        """Can db:result / db:verify requests go out on this stream now?"""
        if self.role == "initiator":
            return self.stage is DIALBACK
        return self.stage is OPEN and self._header_sent and self.peer_declares_dialback
