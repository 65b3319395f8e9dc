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
from router.negotiation import dialback
from router.negotiation.events import AuthFailed, Authenticated, VerifyResult
from router.negotiation.pairs import NO_PAIRS, NO_REQUESTS, Pair, with_pair, without
from router.negotiation.sasl import EXTERNAL
from router.negotiation.state import CLOSED, DIALBACK, NO_MATCH, SASL_ONLY

log = logging.getLogger("router.negotiation")

# What this class uses of the session it is a base of.
_SESSION_PARTS = ("role", "config", "stage", "stream_id", "remote_domain", "advertised", "bidi", "_close_sent",
                  "verify_only", "send", "emit", "close", "peer_certificate_ok", "_advance", "_dialback_ready",
                  "_guarded", "_raise_stanza_limit")


class Authorizations:
    """The pairs a stream carries and the requests pending on it (a base class of `Session`)."""

    __slots__ = ()  # a mixin: `Session.__slots__` lays out FIELDS
    FIELDS = ("inbound_pairs", "outbound_pairs", "results_out", "results_in", "verifies_out",
              "_requested", "_wanted", "_verify_queue")

    def _init_authorizations(self, wanted: Pair | None) -> None:
        """Nothing authorized or pending; an initiator asks for its `wanted` pair at once."""
        # tuples (see pairs.py): a stream nearly always carries one pair each way
        self.inbound_pairs: tuple[Pair, ...] = ()  # (remote, local) the peer may send
        self.outbound_pairs: tuple[Pair, ...] = ()  # (local, remote) we may send
        self.results_out: frozenset[Pair] = NO_PAIRS  # db:result requests we sent: (local, remote)
        self.results_in: Mapping[Pair, object] = NO_REQUESTS  # requests we verify: (remote, local) -> token
        self.verifies_out: Mapping[tuple[str, str, str], list] = NO_REQUESTS  # (receiving, originating, id) -> tokens
        self._requested: frozenset[Pair] = NO_PAIRS  # outbound pairs asked for, not yet decided
        # tuples, like the pair sets: empty on an idle stream, so shared
        self._wanted: tuple[Pair, ...] = ()  # ... and not yet sent as db:result
        self._verify_queue: tuple[tuple, ...] = ()
        if wanted is not None:
            self._requested = frozenset({wanted})
            self._wanted = (wanted,)

    # ------------------------------------------------------------------ public API (Session)

    def request_pair(self, local: str, remote: str) -> bool:
        """Ask to send ``local -> remote`` on this stream; False when this stream cannot carry it."""
        try:
            local, remote = normalize_domain(local), normalize_domain(remote)
        except ValueError:
            return False
        if (
            self.stage is CLOSED or self.stage is SASL_ONLY or self._close_sent or self.verify_only
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
            self._guarded(self._send_result_request, local, remote)
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
        if self.config.policy.auth_mode(remote) == pol.AUTH_SECURE and not self.peer_certificate_ok(remote):
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

    def outbound_failed(self, local: str, remote: str, condition: str, bounce: str, text: str | None = None) -> None:
        """Our request for ``local -> remote`` failed; queued stanzas bounce with `bounce`."""
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

    # -- SASL EXTERNAL authorizes the header pair (RFC 6120 §6.4.6; with bidi, XEP-0288 §2.2)

    def _sasl_inbound(self, remote: str, local: str) -> None:
        """Receiver: SASL EXTERNAL proved the peer as `remote`; it may send to `local`."""
        self.inbound_pairs = with_pair(self.inbound_pairs, (remote, local))
        self.emit(Authenticated(remote, local, EXTERNAL, "inbound"))

    def _sasl_bidi_outbound(self, local: str, remote: str) -> None:
        """Receiver, bidi after SASL: with the restarted stream's features sent, we may send the inverse."""
        self.outbound_pairs = with_pair(self.outbound_pairs, (local, remote))
        self.emit(Authenticated(remote, local, EXTERNAL, "outbound"))

    def _sasl_outbound(self, local: str, remote: str) -> None:
        """Initiator: SASL EXTERNAL proved us as `local` to `remote`, so that pair needs no dialback."""
        pair = (local, remote)
        if pair in self._requested:
            self.accept_outbound(local, remote, EXTERNAL)
            self._wanted = tuple(p for p in self._wanted if p != pair)

    # ------------------------------------------------------------------ answers matched to requests (state.Negotiator)

    def await_verification(self, pair: Pair, token) -> None:
        """A `VerifyKey` for the peer's request ``pair`` = (remote, local) went to the runtime."""
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

    def result_answered(self, local: str, remote: str) -> bool:
        """A typed ``<db:result/>`` answers our request for ``local -> remote``; False if we sent none."""
        if (local, remote) not in self.results_out:
            return False
        self.results_out = without(self.results_out, (local, remote))
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
            for local, remote in wanted:
                self._send_result_request(local, remote)
            self._flush_verifies()
            return
        self._advance(SASL_ONLY)
        for local, remote in self._wanted:
            self.outbound_failed(local, remote, "unsupported-feature", "remote-server-timeout",
                                 f"{self.remote_domain} offers no authentication we can use (no dialback)")
        self._wanted = ()
        for token, *_ in self._verify_queue:
            self.emit(VerifyResult(token, "remote-server-timeout"))
        self._verify_queue = ()

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

    def _send_result_request(self, local: str, remote: str) -> None:
        self.results_out |= {(local, remote)}
        self.send(dialback.result_request(self.config.dialback_secret, local, remote, self.stream_id))

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
