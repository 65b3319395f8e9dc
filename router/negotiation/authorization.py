"""Which domain pairs one S2S stream may carry, and the requests for more that are still pending on it.

`Authorizations` is a mixin of `Session` that keeps this state (no slots of
its own: `Session.__slots__` lays out its `FIELDS`, under the session's
public attribute names): the pairs authorized in each direction, our
outbound pairs not yet decided, and the outstanding dialback requests in
both directions, to which answers are matched (XEP-0220 §2.1.1, §2.1.2,
§3.1). It emits `Authenticated`, `AuthFailed` and `VerifyResult` events as
pairs are decided. It is not used on its own: it relies on the session's
outboxes (`send`, `emit`), `close`, stage and certificate check, as listed
in `_SESSION_PARTS`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from router.trust import policy as pol
from router.wire.jid import normalize_domain
from router.negotiation import dialback, sm
from router.negotiation.events import AuthFailed, Authenticated, SmStarted, VerifyResult
from router.negotiation.pairs import NO_PAIRS, NO_REQUESTS, Pair, with_pair, without
from router.negotiation.sasl import EXTERNAL
from router.negotiation.state import CLOSED, DIALBACK, NO_MATCH, SASL_ONLY

log = logging.getLogger("router.negotiation")

# What this class uses of the session it is a base of.
_SESSION_PARTS = ("role", "config", "stage", "watch", "stream_id", "remote_domain", "advertised", "bidi", "_close_sent",
                  "verify_only", "send", "emit", "close", "peer_certificate_ok", "_advance", "_dialback_ready",
                  "_guarded", "_raise_stanza_limit", "start_stream_management")


class Authorizations:
    """The pairs a stream carries and the requests pending on it (a base class of `Session`)."""

    __slots__ = ()  # a mixin: `Session.__slots__` lays out FIELDS
    FIELDS = ("inbound_pairs", "outbound_pairs", "results_out", "results_in", "verifies_out",
              "_requested", "_wanted", "_verify_queue")

    def _init_authorizations(self, wanted: Pair | None) -> None:
        """Nothing authorized or pending; an initiator asks for its `wanted` pair at once."""
        # tuples, a frozenset past a few (see pairs.py): a stream nearly always carries one pair each way
        # every pair is Pair(local, remote), whichever way it lets stanzas flow
        self.inbound_pairs: tuple[Pair, ...] | frozenset[Pair] = ()  # the peer may send remote -> local
        self.outbound_pairs: tuple[Pair, ...] | frozenset[Pair] = ()  # we may send local -> remote
        self.results_out: frozenset[Pair] = NO_PAIRS  # db:result requests we sent
        self.results_in: Mapping[Pair, object] = NO_REQUESTS  # the peer's db:result requests we verify -> token
        self.verifies_out: Mapping[tuple[str, str, str], list] = NO_REQUESTS  # (receiving, originating, id) -> tokens
        self._requested: frozenset[Pair] = NO_PAIRS  # outbound pairs asked for, not yet decided
        # tuples, like the pair sets: empty on an idle stream, so shared
        self._wanted: tuple[Pair, ...] = ()  # ... and not yet sent as db:result
        self._verify_queue: tuple[tuple, ...] = ()
        if wanted is not None:
            self._requested = frozenset({wanted})
            self._wanted = (wanted,)

    def _allow_inbound(self, pair: Pair) -> None:
        """The peer may send ``pair.remote -> pair.local`` (the session's watcher is told)."""
        self.inbound_pairs = with_pair(self.inbound_pairs, pair)
        if self.watch is not None:
            self.watch()

    # ------------------------------------------------------------------ public API (Session)

    def request_pair(self, pair: Pair) -> bool:
        """Ask to send ``pair.local -> pair.remote`` on this stream; False when this stream cannot carry it."""
        try:
            pair = Pair(normalize_domain(pair[0]), normalize_domain(pair[1]))
        except ValueError:
            return False
        if (
            self.stage is CLOSED or self.stage is SASL_ONLY or self._close_sent or self.verify_only
            or pair.local not in self.config.local_domains
        ):
            return False
        if pair in self.outbound_pairs or pair in self._requested:
            return True
        if not self._may_carry(pair):
            return False
        self._requested |= {pair}
        if self._dialback_ready():
            self._guarded(self._send_result_request, pair)
        else:
            self._wanted += (pair,)
        return True

    def request_verify(self, token, receiving: str, originating: str, stream_id: str, key: str) -> None:
        """Send ``<db:verify/>`` for another stream's `VerifyKey`; the answer is a `VerifyResult`."""
        if token in self.results_in.values():
            raise ValueError("a dialback key must not be verified over the stream that carried it (XEP-0288 §2.2)")
        if self.stage is CLOSED or self._close_sent:
            self.emit(VerifyResult(token, "remote-server-timeout"))
        elif self._dialback_ready():
            self._send_verify_request(token, receiving, originating, stream_id, key)
        else:
            self._verify_queue += ((token, receiving, originating, stream_id, key),)

    # ------------------------------------------------------------------ pairs decided (state.Negotiator)

    def accept_inbound(self, pair: Pair, mechanism: str) -> None:
        """The peer may now send ``pair.remote -> pair.local``; with bidi we may send the inverse."""
        self._allow_inbound(pair)
        self._raise_stanza_limit()
        self.emit(Authenticated(pair, mechanism, "inbound"))
        if self.bidi and pair not in self.outbound_pairs:
            self.outbound_pairs = with_pair(self.outbound_pairs, pair)
            self._requested = without(self._requested, pair)
            self.emit(Authenticated(pair, mechanism, "outbound"))

    def accept_outbound(self, pair: Pair, mechanism: str) -> None:
        """We may now send ``pair.local -> pair.remote``; with bidi the peer may send the inverse.

        Our own authentication proves nothing about the peer: a remote domain that
        must authenticate with a certificate gets no stanza unless the TLS peer
        proved it too (RFC 6120 §13.7.2: the initiator validates the receiver's
        certificate); without any other pair the stream then ends."""
        remote = pair.remote
        if self.config.policy.auth_mode(remote) == pol.AUTH_SECURE and not self.peer_certificate_ok(remote):
            text = (f"{remote} must prove its identity with a trusted certificate (secure authentication), "
                    f"and the certificate it presented does not")
            self.outbound_failed(pair, "not-authorized", "remote-server-timeout", text)
            if not self.outbound_pairs and not self.inbound_pairs:
                self.close("policy-violation", text)
            return
        self._requested = without(self._requested, pair)
        self.outbound_pairs = with_pair(self.outbound_pairs, pair)
        self._raise_stanza_limit()
        enable = sm.request(self, self.advertised)
        if enable is not None:  # before the pair is reported: its queued stanzas are counted (XEP-0198 §4)
            self.send(enable)
            self.start_stream_management()
            self.emit(SmStarted(outbound=True, inbound=False))
        self.emit(Authenticated(pair, mechanism, "outbound"))
        if self.bidi and pair not in self.inbound_pairs:
            self._allow_inbound(pair)
            self.emit(Authenticated(pair, mechanism, "inbound"))

    def outbound_failed(self, pair: Pair, condition: str, bounce: str, text: str | None = None) -> None:
        """Our request for ``pair.local -> pair.remote`` failed; queued stanzas bounce with `bounce`."""
        self._requested = without(self._requested, pair)
        self.results_out = without(self.results_out, pair)
        self.emit(AuthFailed(pair, condition, bounce, text))

    def fail_outbound(self, condition: str, text: str) -> None:
        """Every outbound pair still pending on this stream failed."""
        log.info("outbound negotiation failed (%s): %s", condition, text)
        for pair in sorted(self._requested):
            self.emit(AuthFailed(pair, condition, "remote-server-timeout", text))
        self._requested = self.results_out = NO_PAIRS
        self._wanted = ()

    # -- SASL EXTERNAL authorizes the header pair (RFC 6120 §6.4.6; with bidi, XEP-0288 §2.2)

    def _sasl_inbound(self, pair: Pair) -> None:
        """Receiver: SASL EXTERNAL proved the peer as `pair.remote`; it may send to `pair.local`."""
        self._allow_inbound(pair)
        self.emit(Authenticated(pair, EXTERNAL, "inbound"))

    def _sasl_bidi_outbound(self, pair: Pair) -> None:
        """Receiver, bidi after SASL: with the restarted stream's features sent, we may send the inverse."""
        self.outbound_pairs = with_pair(self.outbound_pairs, pair)
        self.emit(Authenticated(pair, EXTERNAL, "outbound"))

    def _sasl_outbound(self, pair: Pair) -> None:
        """Initiator: SASL EXTERNAL proved us as `pair.local` to `pair.remote`, so that pair needs no dialback."""
        if pair in self._requested:
            self.accept_outbound(pair, EXTERNAL)
            self._wanted = tuple(p for p in self._wanted if p != pair)

    # ------------------------------------------------------------------ answers matched to requests (state.Negotiator)

    def await_verification(self, pair: Pair, token) -> None:
        """A `VerifyKey` for the peer's request to send ``pair.remote -> pair.local`` went to the runtime."""
        if not self.results_in:
            self.results_in = {}
        self.results_in[pair] = token

    def verification_answered(self, token) -> Pair | None:
        """The request that `key_verified` answers, no longer pending; None if none is."""
        pair = next((p for p, t in self.results_in.items() if t == token), None)
        if pair is not None:
            del self.results_in[pair]
            if not self.results_in:
                self.results_in = NO_REQUESTS
        return pair

    def result_answered(self, pair: Pair) -> bool:
        """A typed ``<db:result/>`` answers our request for ``pair.local -> pair.remote``; False if we sent none."""
        if pair not in self.results_out:
            return False
        self.results_out = without(self.results_out, pair)
        return True

    def verify_answered(self, receiving: str, originating: str, stream_id: str | None):
        """The token of the oldest ``<db:verify/>`` we sent with these values; `NO_MATCH` if none."""
        key = (receiving, originating, stream_id)
        tokens = self.verifies_out.get(key)
        if not tokens:
            return NO_MATCH
        token = tokens.pop(0)
        if not tokens:
            del self.verifies_out[key]
            if not self.verifies_out:
                self.verifies_out = NO_REQUESTS
        return token

    # ------------------------------------------------------------------ internals

    def _start_dialback(self) -> None:
        """Initiator, negotiation done: send the wanted db:result requests, or fail them without dialback."""
        if self.config.dialback and dialback.available(self):
            self._advance(DIALBACK)
            wanted, self._wanted = self._wanted, ()
            for pair in wanted:
                self._send_result_request(pair)
            self._flush_verifies()
            return
        self._advance(SASL_ONLY)
        for pair in self._wanted:
            self.outbound_failed(pair, "unsupported-feature", "remote-server-timeout",
                                 f"{self.remote_domain} offers no authentication we can use (no dialback)")
        self._wanted = ()
        for token, *_ in self._verify_queue:
            self.emit(VerifyResult(token, "remote-server-timeout"))
        self._verify_queue = ()

    def _may_carry(self, pair: Pair) -> bool:
        """Can a new pair go over this stream (XEP-0220 §2.6, XEP-0288 §2.2)?"""
        remote = pair.remote
        if self.role == "receiver":
            return (
                self.bidi and self.config.bidi_reverse_dialback
                and any(p.remote == remote for p in self.inbound_pairs)
            )
        if remote == self.remote_domain:
            return True  # sender multiplexing (§2.6.1)
        return (self.advertised is not None and self.advertised.dialback_errors) or (
            self.bidi and any(p.remote == remote for p in self.inbound_pairs)
        )

    def _send_result_request(self, pair: Pair) -> None:
        self.results_out |= {pair}
        self.send(dialback.result_request(self.config.dialback_secret, pair.local, pair.remote, self.stream_id))

    def _send_verify_request(self, token, receiving: str, originating: str, stream_id: str, key: str) -> None:
        if not self.verifies_out:
            self.verifies_out = {}
        self.verifies_out.setdefault((receiving, originating, stream_id), []).append(token)
        self.send(dialback.verify_request(receiving, originating, stream_id, key))

    def _flush_verifies(self) -> None:
        queue, self._verify_queue = self._verify_queue, ()
        for request in queue:
            self._send_verify_request(*request)

    def _fail_pending(self, condition: str, text: str) -> None:
        """The stream ends: every pending request failed (XEP-0220 §2.1.1, §2.1.2)."""
        if self._requested:
            self.fail_outbound(condition, text)
        pending = [t for tokens in self.verifies_out.values() for t in tokens]
        pending += [request[0] for request in self._verify_queue]
        self.verifies_out = NO_REQUESTS
        self._verify_queue = ()
        for token in pending:
            self.emit(VerifyResult(token, "remote-server-timeout"))
        self.results_in = NO_REQUESTS
