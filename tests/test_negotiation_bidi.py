"""XEP-0288 bidirectional streams: the feature and request namespaces (§2.1-§2.2), TLS first (§2.1),
which pairs each side may use (§2.2) and the checks on stanzas coming back."""

from __future__ import annotations

from router.trust import pki
from router.negotiation import events as ev
from router.negotiation.pairs import Pair
from router.negotiation.session import Session
from router.trust.policy import Policy
from test_negotiation_support import Wire, config, pki_world  # noqa: F401
from test_negotiation_stream import closed_with, features_of, header

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
BIDI_REQUEST = b"<bidi xmlns='urn:xmpp:bidi'/>"


def secured(ca, leaf_name="a.example", **overrides):
    session = Session("receiver", config(["b.example", "c.example"], trust=[ca], **overrides))
    session.receive_data(header() + STARTTLS)
    session.tls_established([pki.make_leaf(ca, leaf_name).cert_der()])
    session.data_to_send(), session.events()  # the pre-TLS exchange
    session.receive_data(header())
    return session


def test_bidi_offered_after_tls_by_default_and_before_in_always_mode(pki_world):
    """XEP-0288 §2.1: bidi is enabled only after STARTTLS, so it is offered after TLS (before it too with
    bidi = "always")."""
    ca, _ = pki_world
    plain = Session("receiver", config(["b.example"]))
    plain.receive_data(header())
    assert b"urn:xmpp:features:bidi" not in plain.data_to_send()
    session = secured(ca)
    [feats] = features_of(session.data_to_send())
    assert b'<bidi xmlns="urn:xmpp:features:bidi"></bidi>' in feats
    always = Session("receiver", config(["b.example"], bidi="always"))
    always.receive_data(header())
    assert b"urn:xmpp:features:bidi" in always.data_to_send()
    off = secured(ca, bidi="off")
    assert b"bidi" not in off.data_to_send()


def test_bidi_requested_before_tls_is_ignored_in_encrypted_mode():
    """XEP-0288 §2.1: STARTTLS is completed before bidi is enabled."""
    session = Session("receiver", config(["b.example"]))
    session.receive_data(header() + BIDI_REQUEST)
    assert not session.bidi and not session.closed
    assert not [e for e in session.events() if isinstance(e, ev.BidiEnabled)]


def test_tls_restart_discards_a_pre_tls_bidi_request(pki_world):
    """XEP-0288 §2.1; RFC 6120 §5.4.3.3: what was negotiated before TLS is forgotten."""
    ca, _ = pki_world
    session = Session("receiver", config(["b.example"], bidi="always"))
    session.receive_data(header() + BIDI_REQUEST)
    assert session.bidi
    session.receive_data(STARTTLS)
    session.tls_established([])
    assert not session.bidi


def test_request_pipelined_with_dialback_then_inverse_pairs_only(pki_world):
    """XEP-0288 §2.2: the request may be pipelined with db:result; then only the inverse of the verified pair."""
    ca, _ = pki_world
    session = secured(ca, leaf_name="untrusted-name.example")
    session.data_to_send()
    session.receive_data(BIDI_REQUEST + b"<db:result from='a.example' to='b.example'>k</db:result>")
    events = session.events()
    assert isinstance(events[0], ev.BidiEnabled) and isinstance(events[1], ev.VerifyKey)
    assert not session.outbound_pairs  # XEP-0288 §2.2: nothing may be sent before the peer is verified
    session.key_verified(events[1].token, "valid")
    assert set(session.outbound_pairs) == {Pair("b.example", "a.example")}  # XEP-0288 §2.2: the inverse, not c.example
    directions = [(e.direction, e.pair) for e in session.events() if isinstance(e, ev.Authenticated)]
    assert directions == [("inbound", Pair("b.example", "a.example")), ("outbound", Pair("b.example", "a.example"))]


def test_bidi_request_after_authentication_is_ignored(pki_world):
    """XEP-0288 §2.2: bidi is requested before SASL or dialback; a later request is ignored."""
    ca, _ = pki_world
    session = secured(ca, leaf_name="other.example")
    session.receive_data(b"<db:result from='a.example' to='b.example'>k</db:result>")
    token = session.events()[0].token
    session.key_verified(token, "valid")
    session.receive_data(BIDI_REQUEST)
    assert not session.bidi and not session.outbound_pairs and not session.closed


def test_feature_namespace_sent_as_a_request_enables_nothing(pki_world):
    """XEP-0288 §2.1-§2.2: the request is urn:xmpp:bidi; the feature namespace sent as a request
    enables nothing and closes nothing (ejabberd once used the namespaces the other way round)."""
    ca, _ = pki_world
    session = secured(ca)
    session.receive_data(b"<bidi xmlns='urn:xmpp:features:bidi'/>")
    assert not session.bidi and not session.closed
    assert not [e for e in session.events() if isinstance(e, ev.BidiEnabled)]


def test_sasl_bidi_pairs_are_header_to_from_inverse(pki_world):
    """XEP-0288 §2.2: after SASL the receiver may send from the header's 'to' to the header's 'from'."""
    ca, _ = pki_world
    a = Session("initiator", config(["a.example"], trust=[ca]), "a.example", "b.example")
    b = Session("receiver", config(["b.example", "c.example"], trust=[ca]))
    wire = Wire(a, b, (pki.make_leaf(ca, "a.example").cert_der(),), (pki.make_leaf(ca, "b.example").cert_der(),))
    wire.pump()
    assert set(b.outbound_pairs) == {Pair("b.example", "a.example")}
    assert set(a.inbound_pairs) == {Pair("a.example", "b.example")}  # b.example may send to a.example


def _bidi_initiator(ca):
    a = Session("initiator", config(["a.example"], trust=[ca]), "a.example", "b.example")
    b = Session("receiver", config(["b.example", "c.example"], trust=[ca]))
    wire = Wire(a, b, (pki.make_leaf(ca, "a.example").cert_der(),), (pki.make_leaf(ca, "b.example").cert_der(),))
    wire.pump()
    a.events()
    return a


def test_initiator_checks_stanzas_coming_back(pki_world):
    """XEP-0288 §2.2, RFC 6120 §8.1.1.2, §8.1.2.2: stanzas arriving on our outgoing bidi stream get the
    receiving-side checks."""
    ca, _ = pki_world
    a = _bidi_initiator(ca)
    a.receive_data(b"<message from='r@b.example' to='j@a.example'/>")
    assert [type(e) for e in a.events()] == [ev.Stanza]
    a.receive_data(b"<message from='r@c.example' to='j@a.example'/>")
    assert closed_with(a.events()) == ["invalid-from"]  # c.example was never authenticated here
    a = _bidi_initiator(ca)
    a.receive_data(b"<message from='r@b.example' to='j@elsewhere.example'/>")
    assert closed_with(a.events()) == ["host-unknown"]


def test_stanzas_on_our_stream_without_bidi_are_not_authorized(pki_world):
    ca, _ = pki_world
    a = Session("initiator", config(["a.example"], trust=[ca], bidi="off"), "a.example", "b.example")
    b = Session("receiver", config(["b.example"], trust=[ca]))
    wire = Wire(a, b, (pki.make_leaf(ca, "a.example").cert_der(),), (pki.make_leaf(ca, "b.example").cert_der(),))
    wire.pump()
    assert not a.bidi and not b.outbound_pairs and set(a.outbound_pairs) == {("a.example", "b.example")}
    a.receive_data(b"<message from='r@b.example' to='j@a.example'/>")
    assert closed_with(a.events()) == ["not-authorized"]


def test_no_reverse_dialback_over_bidi_by_default(pki_world):
    """XEP-0288 §2.2 lets the receiver run dialback over bidi but does not say which stream id keys it, and
    Prosody and ejabberd do not support it: off unless bidi_reverse_dialback."""
    ca, _ = pki_world
    session = secured(ca, leaf_name="x.example")
    session.receive_data(BIDI_REQUEST + b"<db:result from='a.example' to='b.example'>k</db:result>")
    token = [e for e in session.events() if isinstance(e, ev.VerifyKey)][0].token
    session.key_verified(token, "valid")
    session.data_to_send()
    assert not session.request_pair(Pair("c.example", "a.example"))
    assert session.data_to_send() == b""
    enabled = secured(ca, leaf_name="x.example", bidi_reverse_dialback=True)
    enabled.receive_data(BIDI_REQUEST + b"<db:result from='a.example' to='b.example'>k</db:result>")
    token = [e for e in enabled.events() if isinstance(e, ev.VerifyKey)][0].token
    enabled.key_verified(token, "valid")
    enabled.data_to_send()
    assert enabled.request_pair(Pair("c.example", "a.example"))
    assert enabled.data_to_send().startswith(b"<db:result from='c.example' to='a.example'>")
    assert not enabled.request_pair(Pair("c.example", "never-seen.example"))  # only domains the peer proved


def test_secure_domain_is_sent_to_and_heard_from_only_with_a_proving_certificate(pki_world):
    """Our dialback proves who we are, not who the peer is: a domain our policy says must
    use certificates gets stanzas from us, and may send back over bidi, only if the TLS
    peer's certificate proves it; otherwise the pair fails with the reason and, with no
    other pair on it, the stream ends (RFC 6120 §13.7.2: the initiator validates the
    receiver's certificate; XEP-0288 §2.2: stanzas coming back over bidi are checked too)."""
    ca, _ = pki_world
    policy = Policy(require_encryption=False, auth_overrides={"b.example": "secure"})
    for receiver_name, proven in (("b.example", True), ("impostor.example", False)):
        a = Session("initiator", config(["a.example"], trust=[ca], policy=policy), "a.example", "b.example")
        b = Session("receiver", config(["b.example"], trust=[ca]))
        wire = Wire(a, b, (pki.make_leaf(ca, "x.example").cert_der(),), (pki.make_leaf(ca, receiver_name).cert_der(),))
        wire.pump()
        wire.verify("r", config(["b.example"], "s3cr3t"), config(["a.example"], "s3cr3t"))
        assert a.bidi
        assert (set(a.outbound_pairs) == {("a.example", "b.example")}) == proven
        assert (Pair("a.example", "b.example") in a.inbound_pairs) == proven
        failures = wire.of("i", ev.AuthFailed)
        if proven:
            assert not failures and not a.closed
        else:
            [failure] = failures
            assert (failure.pair, failure.bounce) == (Pair("a.example", "b.example"), "remote-server-timeout")
            assert "certificate" in failure.text
            assert closed_with(wire.i_events) == ["policy-violation"]


def test_bidi_wired_with_mandatory_tls_and_required_flags(pki_world):
    """XEP-0288 §2.1: STARTTLS before bidi; RFC 6120 §5.3.1: only <starttls><required/> before TLS."""
    ca, _ = pki_world
    strict = Policy(require_encryption=True)
    a = Session("initiator", config(["a.example"], trust=[ca], policy=strict), "a.example", "b.example")
    b = Session("receiver", config(["b.example"], trust=[ca], policy=strict))
    wire = Wire(a, b, (pki.make_leaf(None, "a.example").cert_der(),), (pki.make_leaf(ca, "b.example").cert_der(),))
    wire.pump()
    first_features = bytes(wire.r_bytes).split(b"<stream:features>")[1].split(b"</stream:features>")[0]
    assert first_features == b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
    assert b"<dialback xmlns='urn:xmpp:features:dialback'><errors/><required/></dialback>" in wire.r_bytes
    wire.verify("r", config(["b.example"], "s3cr3t", policy=strict), config(["a.example"], "s3cr3t", policy=strict))
    assert set(b.inbound_pairs) == set(b.outbound_pairs) == {Pair("b.example", "a.example")}
