"""Server Dialback (XEP-0220, keys per XEP-0185) in every role, on any stream.

* Initiating: ``<db:result>`` requests for our (local, remote) pairs, the
  typed answer authorizes sending.
* Receiving: an un-typed ``<db:result>`` becomes a `VerifyKey` event; the
  runtime asks the authoritative server over *another* connection (never
  this one, XEP-0288 §2.2) and answers with `Session.key_verified`. A
  certificate that proves the sender domain is accepted at once
  (XEP-0344 "dialback without dialing back", checked when the request arrives).
* Authoritative: an un-typed ``<db:verify>`` for one of our domains is
  answered from the shared secret; a typed one must match a request we sent.

Typed answers are accepted only when they match an outstanding request on
this stream in this direction, keyed by the `Pair` or (from, to, id): the
2012 unsolicited-dialback attack (XEP-0220 §3.1, XSF security notice of
2012-08-21) is a typed answer nobody asked for. Anything unmatched closes the
stream with ``<not-authorized/>``.

The session keeps the outstanding requests (`Session.results_out`,
`results_in`, `verifies_out`); this module renders the requests it sends
(`result_request`, `verify_request`) and matches answers through
`Negotiator.result_answered`, `verify_answered` and `verification_answered`.
Same shape as the other feature modules: `offer`, `available` (the
initiator's choice: dialback has no request of its own) and `HANDLERS`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools

from router.trust import policy as pol
from router.wire.errors import error_child
from router.wire.jid import normalize_domain
from router.wire.namespaces import DIALBACK_FEATURE_NS, DIALBACK_NS, STANZAS_NS
from router.negotiation.events import VerifyKey, VerifyResult
from router.negotiation.features import Offer
from router.negotiation.pairs import Pair
from router.negotiation.state import NO_MATCH, Negotiator
from router.wire.xml import attr, first_condition, text_in, text_node

_tokens = itertools.count(1)  # VerifyKey tokens, unique in the process

# When a peer never advertised <errors/>, a dialback error must become a stream error.
_STREAM_EQUIVALENT = {
    "item-not-found": "host-unknown",
    "policy-violation": "policy-violation",
    "not-authorized": "not-authorized",
    "remote-connection-failed": "remote-connection-failed",
    "remote-server-not-found": "remote-connection-failed",
    "remote-server-timeout": "remote-connection-failed",
    "resource-constraint": "resource-constraint",
}


def dialback_key(secret: str, receiving: str, originating: str, stream_id: str) -> str:
    """XEP-0185: HMAC-SHA256 keyed with hex(SHA-256(secret)) over "receiving originating streamid"."""
    hashed = hashlib.sha256(secret.encode("utf-8")).hexdigest().encode("ascii")
    message = f"{receiving} {originating} {stream_id}".encode("utf-8")
    return hmac.new(hashed, message, hashlib.sha256).hexdigest()


def key_matches(secret: str, receiving: str, originating: str, stream_id: str, key: str) -> bool:
    """Is `key` ours for these inputs? Compared in constant time, so timing tells an attacker nothing."""
    expected = dialback_key(secret, receiving, originating, stream_id)
    return hmac.compare_digest(expected.encode("ascii"), key.strip().encode("utf-8"))


def offer(s: Negotiator, sasl_offered: bool) -> Offer | None:
    """``<dialback><errors/></dialback>``; required when it is the only way left to authenticate."""
    if not s.config.dialback or s.sasl_done:
        return None
    if s.remote_domain is not None and s.config.policy.auth_mode(s.remote_domain) == pol.AUTH_SECURE:
        return None
    return Offer("dialback", DIALBACK_FEATURE_NS, children="<errors/>", required=not sasl_offered)


def available(s: Negotiator) -> bool:
    """Initiator: may we send dialback elements to this peer at all?"""
    adv = s.advertised
    return s.peer_declares_dialback or (adv is not None and adv.dialback)


# ---------------------------------------------------------------- sending (the session records the request)


def result_request(secret: str, local: str, remote: str, stream_id: str) -> bytes:
    """Step 1: ask the peer to accept ``local -> remote`` (XEP-0220 §2.1.1), keyed with its stream ID."""
    key = dialback_key(secret, remote, local, stream_id)
    return f"<db:result from={attr(local)} to={attr(remote)}>{key}</db:result>".encode()


def verify_request(receiving: str, originating: str, stream_id: str, key: str) -> bytes:
    """Step 2, sent to the authoritative server of `originating` (XEP-0220 §2.1.2)."""
    return (f"<db:verify from={attr(receiving)} to={attr(originating)} id={attr(stream_id)}>"
            f"{text_node(key)}</db:verify>").encode()


def send_error(s: Negotiator, kind: str, from_: str, to: str, condition: str, text: str, stream_id: str | None = None) -> None:
    """A dialback error (XEP-0220 §2.5): not fatal for the stream, unless the peer cannot read it."""
    if s.role == "initiator" and not (s.advertised is not None and s.advertised.dialback_errors):
        s.close(_STREAM_EQUIVALENT.get(condition, "undefined-condition"), text)
        return
    id_attr = f" id={attr(stream_id)}" if stream_id is not None else ""
    s.send(
        f"<db:{kind} from={attr(from_)} to={attr(to)}{id_attr} type='error'>{error_child(condition, text)}</db:{kind}>".encode()
    )


# ---------------------------------------------------------------- receiving


def _addresses(s: Negotiator, element) -> tuple[str, str] | None:
    try:
        return normalize_domain(element.from_ or ""), normalize_domain(element.to or "")
    except ValueError as exc:
        s.close("improper-addressing", f"dialback <{element.name}/> needs valid 'from' and 'to': {exc}")
        return None


def handle_result(s: Negotiator, element) -> None:
    addresses = _addresses(s, element)
    if addresses is None:
        return
    from_, to = addresses
    if element.type is None:
        _result_request(s, from_, to, (s.tree(element).text or "").strip())
    else:
        _result_answer(s, from_, to, element)


def _result_request(s: Negotiator, remote: str, local: str, key: str) -> None:
    """Step 1 received: the peer asserts it is `remote` and wants to send to our `local`."""
    if s.role == "initiator" and not s.bidi:
        send_error(s, "result", local, remote, "not-allowed", "dialback requests are only accepted on this stream with bidi")
        return
    if not s.config.dialback:
        send_error(s, "result", local, remote, "not-allowed", "dialback is disabled here")
        return
    if local not in s.config.local_domains:
        send_error(s, "result", local, remote, "item-not-found", f"{local} is not served here")
        return
    pair = Pair(local, remote)
    if pair in s.inbound_pairs:
        # already valid: answer at once and never downgrade an existing authorization
        # (XEP-0220 §2.1.1 leaves re-verification open)
        _send_valid(s, remote, local)
        return
    if pair in s.results_in:
        return  # already being verified: one verification answers both requests
    federation = pol.federation_allowed(s.config.policy, remote)
    if not federation:
        send_error(s, "result", local, remote, "policy-violation", federation.text)
        return
    if s.encrypted and s.peer_certificate_ok(remote):
        _send_valid(s, remote, local)
        s.accept_inbound(pair, "dialback+pkix")  # XEP-0344 §2.4: the certificate proves `remote`
        return
    decision = pol.auth_mechanism_allowed(s.config.policy, remote, pol.MECHANISM_DIALBACK, s.encrypted)
    if not decision:
        send_error(s, "result", local, remote, decision.condition, decision.text)
        return
    token = next(_tokens)
    s.await_verification(pair, token)
    s.emit(VerifyKey(token, local, remote, s.stream_id, key))


def key_verified(s: Negotiator, token, result: str, text: str | None = None) -> None:
    """Step 4: the authoritative server's answer for a `VerifyKey` (XEP-0220 §2.2.1)."""
    pair = s.verification_answered(token)
    if pair is None:
        return  # the stream dropped that request (closed or re-keyed); nothing is waiting for it
    local, remote = pair
    if result == "valid":
        _send_valid(s, remote, local)
        s.accept_inbound(pair, "dialback")
    elif result == "invalid":
        if s.inbound_pairs:
            send_error(s, "result", local, remote, "forbidden", f"the dialback key for {remote} is not valid")
        else:
            s.send(f"<db:result from={attr(local)} to={attr(remote)} type='invalid'/>".encode())
            s.close(None, f"the dialback key for {remote} -> {local} is not valid")
    else:
        condition = result if result in _DIALBACK_CONDITIONS else "remote-server-timeout"
        send_error(s, "result", local, remote, condition, text or f"could not verify the dialback key of {remote}")


def _send_valid(s: Negotiator, remote: str, local: str) -> None:
    s.send(f"<db:result from={attr(local)} to={attr(remote)} type='valid'/>".encode())


def _result_answer(s: Negotiator, remote: str, local: str, element) -> None:
    """Step 4 received: the answer to one of our requests, and only that."""
    pair = Pair(local, remote)
    if not s.result_answered(pair):
        s.close("not-authorized", f"unsolicited dialback result for {local} -> {remote} on this stream")
        return
    if element.type == "valid":
        s.accept_outbound(pair, "dialback")
    elif element.type == "invalid":
        s.outbound_failed(pair, "invalid", "internal-server-error",
                          f"{remote} answered our dialback key for {local} with type='invalid'")
    elif element.type == "error":
        condition, text = _error_of(s, element)
        s.outbound_failed(pair, condition, "remote-server-timeout",
                          f"{remote} refused dialback for {local}: {condition}" + (f" ({text})" if text else ""))
    else:
        s.close("bad-format", f"dialback result type {element.type!r} is not valid, invalid or error")


def _error_of(s: Negotiator, element) -> tuple[str, str | None]:
    """The stanza error condition and text of a dialback ``type='error'`` answer."""
    for sub in s.tree(element):
        if isinstance(sub.tag, str) and sub.tag.endswith("}error"):
            return first_condition(sub, STANZAS_NS) or "undefined-condition", text_in(sub, STANZAS_NS)
    return "undefined-condition", None


def handle_verify(s: Negotiator, element) -> None:
    addresses = _addresses(s, element)
    if addresses is None:
        return
    from_, to = addresses
    if element.type is None:
        _verify_request(s, from_, to, element)
        return
    token = s.verify_answered(to, from_, element.id)
    if token is NO_MATCH:
        s.close("not-authorized", f"unsolicited dialback verify answer for {to} -> {from_} on this stream")
        return
    if element.type in ("valid", "invalid"):
        s.emit(VerifyResult(token, element.type))
    elif element.type == "error":
        s.emit(VerifyResult(token, _error_of(s, element)[0]))
    else:
        s.close("bad-format", f"dialback verify type {element.type!r} is not valid, invalid or error")


def _verify_request(s: Negotiator, receiving: str, originating: str, element) -> None:
    """Step 3 as the authoritative server: recompute the key for our own domain (XEP-0220 §2.2.2)."""
    if not element.id:
        send_error(s, "verify", originating, receiving, "bad-request", "<db:verify/> needs an 'id'")
        return
    if originating not in s.config.local_domains:
        send_error(s, "verify", originating, receiving, "item-not-found", f"{originating} is not served here", element.id)
        return
    key = (s.tree(element).text or "").strip()
    verdict = "valid" if key_matches(s.config.dialback_secret, receiving, originating, element.id, key) else "invalid"
    s.send(
        f"<db:verify from={attr(originating)} to={attr(receiving)} id={attr(element.id)} type='{verdict}'/>".encode()
    )


_DIALBACK_CONDITIONS = frozenset(
    {"item-not-found", "remote-connection-failed", "remote-server-not-found", "remote-server-timeout",
     "policy-violation", "not-authorized", "forbidden", "not-acceptable", "resource-constraint",
     "internal-server-error", "bad-request", "undefined-condition"}
)

HANDLERS = {(DIALBACK_NS, "result"): handle_result, (DIALBACK_NS, "verify"): handle_verify}
