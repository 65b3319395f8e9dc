"""STARTTLS and SASL EXTERNAL in both roles (RFC 6120 §5, §6, §13.7; XEP-0178; XEP-0368)."""

from __future__ import annotations

import base64
import datetime

import pytest

from router.trust import certs, pki
from router.negotiation import events as ev
from router.negotiation.pairs import Pair
from router.negotiation.session import Session
from test_negotiation_support import Wire, config, pki_world  # noqa: F401
from test_negotiation_stream import closed_with, features_of, header

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def auth(payload: str) -> bytes:
    return f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>{payload}</auth>".encode()


def secured_receiver(ca, chain, *, from_="a.example", **overrides):
    """A receiver after STARTTLS with `chain` as the peer's certificates, post-TLS features sent."""
    session = Session("receiver", config(["b.example"], trust=[ca], **overrides))
    session.receive_data(header(from_=from_) + STARTTLS)
    assert isinstance(session.events()[-1], ev.StartTLS)
    session.tls_established(chain)
    session.data_to_send()
    session.receive_data(header(from_=from_))
    return session


def test_starttls_not_offered_gets_failure_and_close():
    """RFC 6120 §5.4.2.2: STARTTLS that was not offered gets <failure/>, then the stream and TCP close."""
    session = Session("receiver", config(["b.example"], tls_offered=False))
    session.receive_data(header() + STARTTLS)
    out = session.data_to_send()
    assert b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in out and out.endswith(b"</stream:stream>")
    assert closed_with(session.events()) == ["policy-violation"]


def test_bytes_after_starttls_close_the_stream():
    """RFC 6120 §5.3.3: nothing may follow <starttls/> before <proceed/>."""
    session = Session("receiver", config(["b.example"]))
    session.receive_data(header() + STARTTLS + b"<message from='x@a.example' to='y@b.example'/>")
    out, events = session.data_to_send(), session.events()
    assert b"<proceed" not in out and b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in out
    assert closed_with(events) == ["policy-violation"] and not any(isinstance(e, ev.StartTLS) for e in events)


def test_bytes_after_proceed_close_the_stream():
    """RFC 6120 §5.4.2.3, §5.4.3.1: TLS starts right after <proceed/>; no XML before the handshake."""
    session = Session("initiator", config(["a.example"]), "a.example", "b.example")
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' id='x1' "
                         b"from='b.example' version='1.0'><stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                         b"</stream:features>")
    assert session.data_to_send().endswith(STARTTLS)
    session.receive_data(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq/>")
    events = session.events()
    assert closed_with(events) == ["policy-violation"] and not any(isinstance(e, ev.StartTLS) for e in events)


def test_proceed_then_restart_without_closing_the_stream(pki_world):
    """RFC 6120 §5.4.2.3: TLS starts right after the '>' of <proceed/>; §4.3.3: a restart sends no </stream>."""
    ca, _ = pki_world
    session = Session("receiver", config(["b.example"], trust=[ca]))
    session.receive_data(header() + STARTTLS)
    out = session.data_to_send()
    assert out.endswith(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>") and b"</stream:stream>" not in out
    assert session.events()[-1] == ev.StartTLS("b.example")
    session.receive_data(b"<message/>")  # plaintext while the handshake should run
    assert closed_with(session.events()) == ["policy-violation"]


def test_pre_tls_state_is_discarded_and_starttls_not_offered_again(pki_world):
    """RFC 6120 §5.4.3.3: after TLS, forget the pre-TLS 'from', stream id and features; new id, no STARTTLS."""
    ca, leaves = pki_world
    session = Session("receiver", config(["b.example"], trust=[ca]))
    session.receive_data(header(from_="first.example") + STARTTLS)
    first_id = session.stream_id
    session.tls_established([pki.make_leaf(ca, "a.example").cert_der()])
    session.data_to_send()
    assert session.remote_domain is None and session.stream_id is None
    session.receive_data(header(from_="a.example"))
    out = session.data_to_send()
    assert session.stream_id != first_id and session.remote_domain == "a.example"
    [feats] = features_of(out)
    assert b"starttls" not in feats and b"EXTERNAL" in feats


def test_tls_established_when_not_expected_closes():
    session = Session("receiver", config(["b.example"]))
    session.receive_data(header())
    session.tls_established([])
    assert closed_with(session.events()) == ["internal-server-error"]


def test_direct_tls_receiver_never_offers_starttls(pki_world):
    """XEP-0368 §3: STARTTLS is never used over direct TLS."""
    ca, _ = pki_world
    session = Session("receiver", config(["b.example"], trust=[ca]), direct_tls=True)
    session.tls_established([pki.make_leaf(ca, "a.example").cert_der()])
    session.receive_data(header())
    [feats] = features_of(session.data_to_send())
    assert b"starttls" not in feats and b"EXTERNAL" in feats and session.encrypted


def test_direct_tls_initiator_writes_its_header_only_after_the_handshake():
    session = Session("initiator", config(["a.example"]), "a.example", "b.example", direct_tls=True)
    assert session.data_to_send() == b""
    session.tls_established([])
    assert session.data_to_send().startswith(b"<?xml version='1.0'?><stream:stream")


# ---------------------------------------------------------------- EXTERNAL offer: certificate kinds


@pytest.mark.parametrize(
    "make, offered",
    [
        (lambda ca: pki.make_leaf(ca, "a.example"), True),  # DNS-ID
        (lambda ca: pki.make_leaf(ca, "a.example", dns_ids=[], srv_ids=["a.example"]), True),  # SRV-ID only
        (lambda ca: pki.make_leaf(ca, "a.example", dns_ids=[], xmpp_addrs=["a.example"]), True),  # xmppAddr only
        (lambda ca: pki.make_leaf(ca, "a.example", client_auth=False), True),  # serverAuth-only (XEP-0178)
        (lambda ca: pki.make_leaf(ca, "other.example"), False),  # wrong name
        (lambda ca: pki.make_leaf(None, "a.example"), False),  # self-signed
        (lambda ca: pki.make_leaf(ca, "a.example", not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
                                  not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc)), False),  # expired
    ],
    ids=["dns-id", "srv-id", "xmppaddr", "serverauth-only", "wrong-name", "self-signed", "expired"],
)
def test_external_offered_only_for_a_trusted_matching_certificate(pki_world, make, offered):
    """RFC 6120 §6.3.4, XEP-0178 §3 step 9: EXTERNAL only for a trusted certificate naming 'from' (RFC 6120
    §13.7.1.2, §13.7.2.1: DNS-ID, SRV-ID or xmppAddr)."""
    ca, _ = pki_world
    session = secured_receiver(ca, [make(ca).cert_der()])
    [feats] = features_of(session.data_to_send())
    assert (b"<mechanism>EXTERNAL</mechanism>" in feats) == offered
    # dialback stays available (and is the required one) when EXTERNAL is not offered (XEP-0170)
    assert (b"<errors></errors><required></required></dialback>" in feats) == (not offered)


@pytest.mark.parametrize("payload", ["=", base64.b64encode(b"a.example").decode(), " YS5leGFtcGxl\n ", "QS5FeGFtcGxl"])
def test_external_success_with_or_without_authzid_then_restart(pki_world, payload):
    """RFC 6120 §6.3.8 and XEP-0178 §3: accept both '=' and base64(from); §6.4.6: restart with a new stream id."""
    ca, _ = pki_world
    session = secured_receiver(ca, [pki.make_leaf(ca, "a.example").cert_der()])
    session.data_to_send()
    before_id = session.stream_id
    session.receive_data(auth(payload))
    assert session.data_to_send() == f"<success xmlns='{SASL}'/>".encode()
    assert session.events() == [ev.Authenticated(Pair("b.example", "a.example"), "EXTERNAL", "inbound")]
    session.receive_data(header())
    out = session.data_to_send()
    assert session.stream_id != before_id and features_of(out) == [b'<stream:features xmlns:stream="http://etherx.jabber.org/streams"></stream:features>']
    session.receive_data(b"<message from='j@a.example/r' to='r@b.example'/>")
    assert [type(e) for e in session.events()] == [ev.Stanza]


@pytest.mark.parametrize(
    "payload, condition",
    [
        (base64.b64encode(b"other.example").decode(), "invalid-authzid"),
        ("not base64!", "malformed-request"),
        ("YS5leGFtcGxl=", "malformed-request"),  # bad padding
        ("YR==", "malformed-request"),  # non-zero padding bits (RFC 6120 §6.3.5)
        ("", "malformed-request"),  # an empty initial response must be '='
    ],
)
def test_bad_initial_responses_are_sasl_failures(pki_world, payload, condition):
    """RFC 6120 §6.3.8: an authzid the peer may not assume is <invalid-authzid/>; §6.3.5: the data must be base64
    (RFC 4648 §4, zero padding bits)."""
    ca, _ = pki_world
    session = secured_receiver(ca, [pki.make_leaf(ca, "a.example").cert_der()])
    session.data_to_send()
    session.receive_data(auth(payload))
    out = session.data_to_send()
    assert out.startswith(f"<failure xmlns='{SASL}'><{condition}/>".encode())
    assert not session.closed and not session.inbound_pairs


def test_abort_answers_aborted(pki_world):
    """RFC 6120 §6.4.4: <abort/> is answered <failure><aborted/></failure>."""
    ca, _ = pki_world
    session = secured_receiver(ca, [pki.make_leaf(ca, "a.example").cert_der()])
    session.data_to_send()
    session.receive_data(f"<abort xmlns='{SASL}'/>".encode())
    assert session.data_to_send().startswith(f"<failure xmlns='{SASL}'><aborted/>".encode())


def test_sasl_retries_are_bounded_then_policy_violation(pki_world):
    """RFC 6120 §6.4.5: a few retries, then a <policy-violation/> stream error."""
    ca, _ = pki_world
    session = secured_receiver(ca, [pki.make_leaf(ca, "a.example").cert_der()], sasl_max_failures=2)
    session.data_to_send()
    for attempt in range(2):
        session.receive_data(auth("!!"))
        assert not session.closed, attempt
    session.receive_data(auth("!!"))
    assert closed_with(session.events()) == ["policy-violation"]


def test_external_before_tls_is_encryption_required():
    """RFC 6120 §6.3.4: a mechanism that needs TLS is not available before it (<encryption-required/>)."""
    session = Session("receiver", config(["b.example"]))
    session.receive_data(header() + auth("="))
    assert session.data_to_send().split(b"</stream:features>")[1].startswith(f"<failure xmlns='{SASL}'><encryption-required/>".encode())


def test_external_with_a_mismatching_certificate_is_not_authorized(pki_world):
    """XEP-0178 §3 step 11b: a certificate that does not name 'from' gets <failure><not-authorized/>."""
    ca, _ = pki_world
    session = secured_receiver(ca, [pki.make_leaf(ca, "other.example").cert_der()])
    session.data_to_send()
    session.receive_data(auth("="))
    assert session.data_to_send().startswith(f"<failure xmlns='{SASL}'><not-authorized/>".encode())


def test_restarted_header_must_keep_the_authenticated_from(pki_world):
    """RFC 6120 §6.4.6: the header after SASL success must come from the authenticated identity."""
    ca, _ = pki_world
    session = secured_receiver(ca, [pki.make_leaf(ca, "a.example").cert_der()])
    session.receive_data(auth("="))
    session.events()
    session.receive_data(header(from_="evil.example"))
    assert closed_with(session.events()) == ["invalid-from"]


# ---------------------------------------------------------------- initiator side


def _wired(ca, initiator_leaf, receiver_leaf, **initiator_overrides):
    a = Session("initiator", config(["a.example"], trust=[ca], **initiator_overrides), "a.example", "b.example")
    b = Session("receiver", config(["b.example"], trust=[ca]))
    wire = Wire(a, b, (initiator_leaf.cert_der(),), (receiver_leaf.cert_der(),))
    wire.pump()
    return wire


RESPONSE = (b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
            b"xmlns:db='jabber:server:dialback' id='%s' from='b.example' version='1.0'>")


def initiator_after_tls(**overrides) -> Session:
    """An initiator that negotiated STARTTLS and got the post-TLS response header."""
    session = Session("initiator", config(["a.example"], **overrides), "a.example", "b.example")
    session.receive_data(RESPONSE % b"x1" + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                         b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    session.tls_established([])
    session.receive_data(RESPONSE % b"x2")
    session.data_to_send(), session.events()
    return session


def test_initiator_sends_base64_from_as_authzid_or_equals(pki_world):
    """XEP-0178 §3: the initiator sends base64(from) as authzid, or '=' (RFC 6120 §6.3.8, §6.4.2)."""
    ca, _ = pki_world
    wire = _wired(ca, pki.make_leaf(ca, "a.example"), pki.make_leaf(ca, "b.example"))
    assert b">YS5leGFtcGxl</auth>" in wire.i_bytes and set(wire.initiator.outbound_pairs) == {("a.example", "b.example")}
    wire = _wired(ca, pki.make_leaf(ca, "a.example"), pki.make_leaf(ca, "b.example"), sasl_send_authzid=False)
    assert b"mechanism='EXTERNAL'>=</auth>" in wire.i_bytes and wire.receiver.sasl_done


def test_sasl_success_pipelined_with_the_next_header_is_re_fed(pki_world):
    """RFC 6120 §6.4.6: the bytes after <success/> belong to the new stream."""
    session = initiator_after_tls()
    session.receive_data(b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                         b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>")
    assert b"<auth " in session.data_to_send()
    session.receive_data(f"<success xmlns='{SASL}'/>".encode()
                         + b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' id='x3' "
                           b"from='b.example' version='1.0'><stream:features/>")
    assert session.stream_id == "x3"
    assert set(session.outbound_pairs) == {("a.example", "b.example")}
    assert [e.mechanism for e in session.events() if isinstance(e, ev.Authenticated)] == ["EXTERNAL"]


def test_initiator_falls_back_to_dialback_when_external_fails(pki_world):
    """XEP-0178 §3 step 11b, XEP-0170 §3: without EXTERNAL, Server Dialback over the TLS stream.

    The receiver trusts the CA but our certificate names another domain: EXTERNAL is not
    offered (nothing to try), so dialback is used; when offered and refused, dialback follows too."""
    ca, _ = pki_world
    wire = _wired(ca, pki.make_leaf(ca, "other.example"), pki.make_leaf(ca, "b.example"))
    assert b"<auth" not in wire.i_bytes and b"<db:result from='a.example' to='b.example'>" in wire.i_bytes
    session = initiator_after_tls()
    session.receive_data(b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism>"
                         b"</mechanisms><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
    assert b"<auth " in session.data_to_send()
    session.receive_data(f"<failure xmlns='{SASL}'><not-authorized/></failure>".encode())
    assert b"<db:result from='a.example' to='b.example'>" in session.data_to_send()
    assert not session.closed


def test_initiator_gives_up_when_external_fails_and_no_dialback():
    """RFC 6120 §6.4.5: out of mechanisms, the initiator closes rather than waits; §6.5: an unknown failure
    condition means not-authorized."""
    session = initiator_after_tls(dialback=False)
    session.receive_data(b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism>"
                         b"</mechanisms></stream:features>")
    session.receive_data(f"<failure xmlns='{SASL}'><bogus-condition/></failure>".encode())
    events = session.events()
    assert closed_with(events) == ["policy-violation"]
    assert [e.condition for e in events if isinstance(e, ev.AuthFailed)] == ["policy-violation"]
    assert session.sasl_condition == "not-authorized"  # unknown failure conditions mean not-authorized (§6.5)


def test_peer_with_its_own_anchors_is_checked_against_those_only(pki_world):
    """RFC 6120 §13.6: a peer provisioned with specific trust anchors must not be
    accepted through the generic store, and its own CA counts for it alone."""
    ca, _ = pki_world
    partner_ca = pki.make_ca("Partner CA")
    pinned = {"A.Example": certs.TrustStore((partner_ca.cert,))}  # normalized like every domain
    cases = [
        ("a.example", ca, False),  # the generic CA no longer proves a.example
        ("a.example", partner_ca, True),
        ("c.example", ca, True),  # other peers still use the generic store
        ("c.example", partner_ca, False),
    ]
    for domain, issuer, offered in cases:
        session = secured_receiver(ca, [pki.make_leaf(issuer, domain).cert_der()], from_=domain, peer_trust=pinned)
        [feats] = features_of(session.data_to_send())
        assert (b"<mechanism>EXTERNAL</mechanism>" in feats) == offered, (domain, issuer is ca)
