"""Server Dialback in every role (XEP-0220; XEP-0185 keys; XEP-0288 §2.2 and §4 on bidi streams)."""

from __future__ import annotations

import pytest

from router.trust import pki
from router.negotiation import events as ev
from router.negotiation.dialback import dialback_key
from router.negotiation.pairs import Pair
from router.negotiation.session import Session
from router.trust.policy import Policy
from test_negotiation_support import canonical, config, pki_world  # noqa: F401
from test_negotiation_stream import closed_with, header

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def result(from_="a.example", to="b.example", key="k", type_=None):
    t = f" type='{type_}'" if type_ else ""
    body = f">{key}</db:result>" if type_ is None else "/>"
    return f"<db:result from='{from_}' to='{to}'{t}{body}".encode()


def opened(**overrides):
    session = Session("receiver", config(["b.example", "c.example"], "secret-b", **overrides))
    session.receive_data(header())
    session.data_to_send()
    return session


def ask(session, data):
    session.receive_data(data)
    return session.data_to_send(), session.events()


def dialback_error_condition(out: bytes) -> str | None:
    items = canonical(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                      b"xmlns='jabber:server' xmlns:db='jabber:server:dialback'>" + out)
    for kind, *rest in items[1:]:
        if kind == "element" and b"type=\"error\"" in rest[0]:
            return rest[0].split(f'xmlns="{STANZAS}"'.encode())[0].rsplit(b"<", 1)[1].strip().decode()
    return None


def test_receiving_server_emits_verify_key_and_never_answers_on_its_own():
    """XEP-0220 §2.2.1: the receiving server verifies the sender before accepting stanzas for the pair."""
    session = opened()
    out, events = ask(session, result(key="  abc  "))
    assert out == b"" and events == [ev.VerifyKey(events[0].token, "b.example", "a.example", session.stream_id, "abc")]


def test_key_is_not_verified_over_its_own_stream():
    """XEP-0288 §2.2: never verify a key over the connection the request came on; XEP-0220 §2.1.2: verify over a
    separate connection."""
    session = opened()
    _, events = ask(session, result())
    with pytest.raises(ValueError):
        session.request_verify(events[0].token, "b.example", "a.example", session.stream_id, "k")


def test_unknown_target_is_item_not_found_without_closing():
    """XEP-0220 §2.2.1: an unknown Target Domain gets an <item-not-found/> dialback error; the stream stays."""
    session = opened()
    out, events = ask(session, result(to="nope.example"))
    assert dialback_error_condition(out) == "item-not-found" and not events and not session.closed


def test_duplicate_request_is_verified_once_and_a_valid_pair_answered_at_once():
    """XEP-0220 §2.1.1 leaves re-verification open: a duplicate shares one verification, an already valid pair is
    answered at once and never downgraded."""
    session = opened()
    _, first = ask(session, result())
    _, second = ask(session, result())
    assert len(first) == 1 and second == []
    session.key_verified(first[0].token, "valid")
    assert session.data_to_send() == b"<db:result from='b.example' to='a.example' type='valid'/>"
    session.events()
    out, events = ask(session, result())
    assert out == b"<db:result from='b.example' to='a.example' type='valid'/>" and events == []


def test_invalid_with_other_pairs_is_forbidden_and_keeps_the_stream():
    """XEP-0220 §2.2.1, §2.1.2: invalid while other pairs are valid: <forbidden/> dialback error, stream stays."""
    session = opened()
    _, events = ask(session, result())
    session.key_verified(events[0].token, "valid")
    session.data_to_send()
    _, events = ask(session, result(from_="rooms.a.example"))
    token = [e for e in events if isinstance(e, ev.VerifyKey)][0].token
    session.key_verified(token, "invalid")
    assert dialback_error_condition(session.data_to_send()) == "forbidden"
    assert not session.closed and set(session.inbound_pairs) == {Pair("b.example", "a.example")}


def test_late_or_unknown_key_verified_answers_are_ignored():
    """XEP-0220 §2.1.2: a verification answer that matches no pending request is dropped."""
    session = opened()
    session.key_verified(12345, "valid")
    assert session.data_to_send() == b"" and not session.inbound_pairs


@pytest.mark.parametrize("text", ["<db:result from='b.example' to='a.example' type='valid'/>",
                                  "<db:result from='b.example' to='a.example' type='invalid'/>"])
def test_typed_result_without_request_closes(text):
    """XEP-0220 §2.2, §3.1 (the 2012 unsolicited-dialback vulnerability): a typed db:result nobody asked for."""
    session = opened()
    _, events = ask(session, text.encode())
    assert closed_with(events) == ["not-authorized"] and not session.outbound_pairs


def test_typed_verify_must_match_our_request():
    """XEP-0220 §2.1.2, §3.1: a db:verify answer must match the (from, to, id) of a request we sent."""
    session = Session("initiator", config(["b.example"], "s"), "b.example", "a.example", verify_only=True)
    session.request_verify("t1", "b.example", "a.example", "ID1", "key")
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                         b"xmlns:db='jabber:server:dialback' id='v1' from='a.example' version='1.0'>"
                         b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
    assert b"<db:verify from='b.example' to='a.example' id='ID1'>key</db:verify>" in session.data_to_send()
    session.receive_data(b"<db:verify from='a.example' to='b.example' id='OTHER' type='valid'/>")
    assert closed_with(session.events()) == ["not-authorized"]


def test_authoritative_server_answers_valid_and_invalid_and_unknown_target():
    """XEP-0220 §2.2.2: recompute the key, answer valid/invalid with from/to swapped and the same id; an unknown
    target gets <item-not-found/> and the stream stays."""
    session = opened()
    key = dialback_key("secret-b", "x.example", "b.example", "SID")
    out, _ = ask(session, f"<db:verify from='x.example' to='b.example' id='SID'>{key}</db:verify>".encode())
    assert out == b"<db:verify from='b.example' to='x.example' id='SID' type='valid'/>"
    out, _ = ask(session, f"<db:verify from='x.example' to='b.example' id='SID2'>{key}</db:verify>".encode())
    assert out == b"<db:verify from='b.example' to='x.example' id='SID2' type='invalid'/>"
    out, events = ask(session, f"<db:verify from='x.example' to='z.example' id='SID'>{key}</db:verify>".encode())
    assert dialback_error_condition(out) == "item-not-found" and b"id='SID'" in out and not session.closed
    assert not session.inbound_pairs


def test_dialback_time_federation_refusal_is_a_dialback_error():
    """RFC 6120 §13.14: federation is a local choice; XEP-0220 §2.5: a <policy-violation/> dialback error."""
    session = opened(policy=Policy(require_encryption=False, deny=("evil.example",)))
    out, events = ask(session, result(from_="evil.example"))
    assert dialback_error_condition(out) == "policy-violation" and not events and not session.closed


def test_tls_required_before_dialback_is_policy_violation():
    """XEP-0220 §2.5 table: <policy-violation/> when TLS is required before dialback."""
    session = Session("receiver", config(["b.example"], policy=Policy(require_encryption=True)))
    session.receive_data(header(version=None))  # a 0.9 peer cannot start TLS
    session.data_to_send()
    out, events = ask(session, result())
    assert dialback_error_condition(out) == "policy-violation" and not events


def test_secure_auth_domain_gets_not_authorized(pki_world):
    """XEP-0220 §2.5 table: <not-authorized/> when a certificate (PKIX) proof is required and absent."""
    ca, _ = pki_world
    policy = Policy(require_encryption=False, auth_overrides={"a.example": "secure"})
    session = Session("receiver", config(["b.example"], trust=[ca], policy=policy, tls_offered=False))
    session.receive_data(header(version=None))
    session.data_to_send()
    out, _ = ask(session, result())
    assert dialback_error_condition(out) == "not-authorized"


def test_certificate_that_proves_the_sender_skips_the_authoritative_server(pki_world):
    """XEP-0220 §1.2, XEP-0344 §2.4-§3: a trusted certificate naming the Sender Domain, checked when the
    db:result arrives, replaces asking the authoritative server."""
    ca, _ = pki_world
    session = Session("receiver", config(["b.example"], trust=[ca]))
    session.receive_data(header() + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    session.tls_established([pki.make_leaf(ca, "a.example", dns_ids=["a.example", "rooms.a.example"]).cert_der()])
    session.receive_data(header())
    session.data_to_send(), session.events()
    out, events = ask(session, result(from_="rooms.a.example"))
    assert out == b"<db:result from='b.example' to='rooms.a.example' type='valid'/>"
    assert events == [ev.Authenticated(Pair("b.example", "rooms.a.example"), "dialback+pkix", "inbound")]
    _, events = ask(session, result(from_="other.example"))
    assert [type(e) for e in events] == [ev.VerifyKey]  # no certificate for that one


def test_improper_dialback_addresses_close_the_stream():
    session = opened()
    _, events = ask(session, b"<db:result from='a.example'>k</db:result>")
    assert closed_with(events) == ["improper-addressing"]


# ---------------------------------------------------------------- initiating side


def initiator(errors=True, **overrides):
    session = Session("initiator", config(["a.example", "rooms.a.example"], "secret-a", **overrides), "a.example", "b.example")
    dialback = "<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>" if errors else "<dialback xmlns='urn:xmpp:features:dialback'/>"
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                         b"xmlns:db='jabber:server:dialback' id='SID' from='b.example' version='1.0'>"
                         + f"<stream:features>{dialback}</stream:features>".encode())
    return session


def test_initiator_step1_carries_the_xep0185_key():
    """XEP-0220 §2.1.1 Step 1: <db:result from='Sender' to='Target'> with the XEP-0185 key."""
    session = initiator()
    key = dialback_key("secret-a", "b.example", "a.example", "SID")
    assert session.data_to_send().endswith(f"<db:result from='a.example' to='b.example'>{key}</db:result>".encode())


def test_request_pair_deduplicates_and_piggybacks():
    """XEP-0220 §2.1.1: no second key while the pair is pending; §2.6.1: a new Sender Domain on the same stream."""
    session = initiator()
    session.data_to_send()
    assert session.request_pair(Pair("rooms.a.example", "b.example"))
    assert session.request_pair(Pair("rooms.a.example", "b.example"))
    assert session.data_to_send().count(b"<db:result") == 1


def test_target_multiplexing_needs_dialback_errors():
    """XEP-0220 §2.6.2: target multiplexing only if the receiver advertised dialback <errors/>."""
    assert initiator(errors=True).request_pair(Pair("a.example", "other.example"))
    assert not initiator(errors=False).request_pair(Pair("a.example", "other.example"))
    assert not initiator().request_pair(Pair("not-ours.example", "b.example"))


@pytest.mark.parametrize(
    "answer, condition, bounce",
    [
        ("<db:result from='b.example' to='a.example' type='invalid'/>", "invalid", "internal-server-error"),
        ("<db:result from='b.example' to='a.example' type='error'><error type='cancel'>"
         f"<remote-server-timeout xmlns='{STANZAS}'/></error></db:result>", "remote-server-timeout", "remote-server-timeout"),
    ],
)
def test_failed_pair_tells_how_to_bounce(answer, condition, bounce):
    """XEP-0220 §2.1.1: queued stanzas bounce with <internal-server-error/> after invalid, with
    <remote-server-timeout/> after a dialback error."""
    session = initiator()
    session.events()
    session.receive_data(answer.encode())
    [event] = session.events()
    assert (type(event), event.pair, event.condition, event.bounce) == (
        ev.AuthFailed, Pair("a.example", "b.example"), condition, bounce)
    assert "b.example" in event.text and condition in event.text  # the bounces say why
    assert not session.outbound_pairs and not session.closed


def test_initiator_rejects_a_result_for_a_pair_it_did_not_request():
    """XEP-0220 §2.1.1, §3.1: a result must match a request we sent over the same stream."""
    session = initiator()
    session.receive_data(b"<db:result from='b.example' to='rooms.a.example' type='valid'/>")
    assert closed_with(session.events()) == ["not-authorized"] and not session.outbound_pairs


def test_closing_with_pending_requests_fails_them():
    """XEP-0220 §2.1.1: the stream closing while we wait is a dialback error; §2.1.2: pending verifies fail."""
    session = initiator()
    session.request_verify("v", "a.example", "b.example", "ID", "k")
    session.events()
    session.receive_data(b"</stream:stream>")
    events = session.events()
    assert events[0] == ev.PeerClosed(None, None)
    assert ev.AuthFailed(Pair("a.example", "b.example"), "remote-server-timeout", "remote-server-timeout") in events
    assert ev.VerifyResult("v", "remote-server-timeout") in events


def test_connection_lost_fails_pending_verifies():
    """XEP-0220 §2.1.2: verify requests pending on a closed connection count as failed."""
    session = Session("initiator", config(["b.example"]), "b.example", "a.example", verify_only=True)
    session.request_verify("v", "b.example", "a.example", "ID", "k")
    session.connection_lost()
    assert session.events() == [ev.VerifyResult("v", "remote-server-timeout")]


def test_dialback_request_on_our_stream_without_bidi_is_refused():
    """XEP-0288 §2.2: dialback requests on our outgoing stream need bidi; without it, a <not-allowed/> dialback
    error (XEP-0220 §2.5), or a stream error for a peer without dialback errors."""
    session = initiator()
    session.data_to_send()
    session.receive_data(b"<db:result from='b.example' to='a.example'>k</db:result>")
    assert dialback_error_condition(session.data_to_send()) == "not-allowed" and not session.closed
    session = initiator(errors=False)
    session.receive_data(b"<db:result from='b.example' to='a.example'>k</db:result>")
    assert closed_with(session.events()) == ["undefined-condition"]  # a peer without <errors/> gets a stream error


def test_verify_request_on_an_inbound_stream_waits_for_its_header():
    """A db:verify may ride any other stream to the authoritative server, inbound ones too
    (XEP-0220 §2.1.2: an existing stream may be reused)."""
    session = Session("receiver", config(["b.example"], "secret-b"))
    session.request_verify("t", "b.example", "a.example", "SID", "key")
    assert session.data_to_send() == b""
    session.receive_data(header())
    assert session.data_to_send().split(b"</stream:features>")[1] == (
        b"<db:verify from='b.example' to='a.example' id='SID'>key</db:verify>")
    session.receive_data(b"<db:verify from='a.example' to='b.example' id='SID' type='invalid'/>")
    assert session.events() == [ev.VerifyResult("t", "invalid")]
