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
this stream in this direction, keyed by (from, to) or (from, to, id): the
2012 unsolicited-dialback attack (tricky.md T-07) is a typed answer nobody
asked for. Anything unmatched closes the stream with ``<not-authorized/>``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from typing import TYPE_CHECKING

from router import policy as pol
from router.errors import STANZAS_NS, error_child
from router.negotiation.events import VerifyKey, VerifyResult
from router.negotiation.features import DIALBACK_FEATURE_NS, Offer
from router.negotiation.pairs import NO_REQUESTS, without
from router.xml import DIALBACK_NS, attr, first_condition, text_in, text_node

if TYPE_CHECKING:
    from router.negotiation.session import Session

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
    """Constant-time check of a received key (T-11)."""
    expected = dialback_key(secret, receiving, originating, stream_id)
    return hmac.compare_digest(expected.encode("ascii"), key.strip().encode("utf-8"))


def offer(s: Session, sasl_offered: bool) -> Offer | None:
    """``<dialback><errors/></dialback>``; required when it is the only way left to authenticate."""
    if not s.config.dialback or s.sasl_done:
        return None
    if s.remote_domain is not None and s.config.policy.auth_mode(s.remote_domain) == pol.AUTH_SECURE:
        return None
    return Offer("dialback", DIALBACK_FEATURE_NS, children="<errors/>", required=not sasl_offered)


def available(s: Session) -> bool:
    """Initiator: may we send dialback elements to this peer at all?"""
    adv = s.advertised
    return s.peer_declares_dialback or (adv is not None and adv.dialback)


# ---------------------------------------------------------------- sending


def send_result_request(s: Session, local: str, remote: str) -> None:
    """Step 1: ask the peer to accept ``local -> remote`` (XEP-0220 §2.1.1)."""
    key = dialback_key(s.config.dialback_secret, remote, local, s.stream_id)
    s.results_out |= {(local, remote)}
    s.send(f"<db:result from={attr(local)} to={attr(remote)}>{key}</db:result>".encode())


def send_verify_request(s: Session, token, receiving: str, originating: str, stream_id: str, key: str) -> None:
    """Step 2, sent to the authoritative server of `originating` (XEP-0220 §2.1.2)."""
    if not s.verifies_out:
        s.verifies_out = {}
    s.verifies_out.setdefault((receiving, originating, stream_id), []).append(token)
    s.send(
        f"<db:verify from={attr(receiving)} to={attr(originating)} id={attr(stream_id)}>{text_node(key)}</db:verify>".encode()
    )


def send_error(s: Session, kind: str, from_: str, to: str, condition: str, text: str, stream_id: str | None = None) -> None:
    """A dialback error (XEP-0220 §2.5): not fatal for the stream, unless the peer cannot read it."""
    if s.role == "initiator" and not (s.advertised is not None and s.advertised.dialback_errors):
        s.close(_STREAM_EQUIVALENT.get(condition, "undefined-condition"), text)
        return
    id_attr = f" id={attr(stream_id)}" if stream_id is not None else ""
    s.send(
        f"<db:{kind} from={attr(from_)} to={attr(to)}{id_attr} type='error'>{error_child(condition, text)}</db:{kind}>".encode()
    )


# ---------------------------------------------------------------- receiving


def _addresses(s: Session, element) -> tuple[str, str] | None:
    try:
        return s.normalize(element.from_ or ""), s.normalize(element.to or "")
    except ValueError as exc:
        s.close("improper-addressing", f"dialback <{element.name}/> needs valid 'from' and 'to': {exc}")
        return None


def handle_result(s: Session, element) -> None:
    addresses = _addresses(s, element)
    if addresses is None:
        return
    from_, to = addresses
    if element.type is None:
        _result_request(s, from_, to, (s.tree(element).text or "").strip())
    else:
        _result_answer(s, from_, to, element)


def _result_request(s: Session, remote: str, local: str, key: str) -> None:
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
    pair = (remote, local)
    if pair in s.inbound_pairs:
        # T-06: already valid; never downgrade an existing authorization
        _send_valid(s, remote, local)
        return
    if pair in s.results_in:
        return  # one verification answers both requests (T-06)
    federation = pol.federation_allowed(s.config.policy, remote)
    if not federation:
        send_error(s, "result", local, remote, "policy-violation", federation.text)
        return
    if s.encrypted and s.peer_certificate_ok(remote):
        _send_valid(s, remote, local)
        s.accept_inbound(remote, local, "dialback+pkix")  # XEP-0344 §2.4: the certificate proves `remote`
        return
    decision = pol.auth_mechanism_allowed(s.config.policy, remote, pol.MECHANISM_DIALBACK, s.encrypted)
    if not decision:
        send_error(s, "result", local, remote, decision.condition, decision.text)
        return
    token = next(_tokens)
    if not s.results_in:
        s.results_in = {}
    s.results_in[pair] = token
    s.emit(VerifyKey(token, local, remote, s.stream_id, key))


def key_verified(s: Session, token, result: str, text: str | None = None) -> None:
    """Step 4: the authoritative server's answer for a `VerifyKey` (XEP-0220 §2.2.1)."""
    pair = next((p for p, t in s.results_in.items() if t == token), None)
    if pair is None:
        return  # the stream dropped that request (closed or re-keyed); nothing is waiting for it
    del s.results_in[pair]
    if not s.results_in:
        s.results_in = NO_REQUESTS
    remote, local = pair
    if result == "valid":
        _send_valid(s, remote, local)
        s.accept_inbound(remote, local, "dialback")
    elif result == "invalid":
        if s.inbound_pairs:
            send_error(s, "result", local, remote, "forbidden", f"the dialback key for {remote} is not valid")
        else:
            s.send(f"<db:result from={attr(local)} to={attr(remote)} type='invalid'/>".encode())
            s.close(None, f"the dialback key for {remote} -> {local} is not valid")
    else:
        condition = result if result in _DIALBACK_CONDITIONS else "remote-server-timeout"
        send_error(s, "result", local, remote, condition, text or f"could not verify the dialback key of {remote}")


def _send_valid(s: Session, remote: str, local: str) -> None:
    s.send(f"<db:result from={attr(local)} to={attr(remote)} type='valid'/>".encode())


def _result_answer(s: Session, remote: str, local: str, element) -> None:
    """Step 4 received: the answer to one of our requests, and only that."""
    if (local, remote) not in s.results_out:
        s.close("not-authorized", f"unsolicited dialback result for {local} -> {remote} on this stream")
        return
    s.results_out = without(s.results_out, (local, remote))
    if element.type == "valid":
        s.accept_outbound(local, remote, "dialback")
    elif element.type == "invalid":
        s.outbound_failed(local, remote, "invalid", "internal-server-error",
                          f"{remote} answered our dialback key for {local} with type='invalid'")
    elif element.type == "error":
        condition, text = _error_of(s, element)
        s.outbound_failed(local, remote, condition, "remote-server-timeout",
                          f"{remote} refused dialback for {local}: {condition}" + (f" ({text})" if text else ""))
    else:
        s.close("bad-format", f"dialback result type {element.type!r} is not valid, invalid or error")


def _error_of(s: Session, element) -> tuple[str, str | None]:
    """The stanza error condition and text of a dialback ``type='error'`` answer."""
    for sub in s.tree(element):
        if isinstance(sub.tag, str) and sub.tag.endswith("}error"):
            return first_condition(sub, STANZAS_NS) or "undefined-condition", text_in(sub, STANZAS_NS)
    return "undefined-condition", None


def handle_verify(s: Session, element) -> None:
    addresses = _addresses(s, element)
    if addresses is None:
        return
    from_, to = addresses
    if element.type is None:
        _verify_request(s, from_, to, element)
        return
    tokens = s.verifies_out.get((to, from_, element.id))
    if not tokens:
        s.close("not-authorized", f"unsolicited dialback verify answer for {to} -> {from_} on this stream")
        return
    token = tokens.pop(0)
    if not tokens:
        del s.verifies_out[(to, from_, element.id)]
        if not s.verifies_out:
            s.verifies_out = NO_REQUESTS
    if element.type in ("valid", "invalid"):
        s.emit(VerifyResult(token, element.type))
    elif element.type == "error":
        s.emit(VerifyResult(token, _error_of(s, element)[0]))
    else:
        s.close("bad-format", f"dialback verify type {element.type!r} is not valid, invalid or error")


def _verify_request(s: Session, receiving: str, originating: str, element) -> None:
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
