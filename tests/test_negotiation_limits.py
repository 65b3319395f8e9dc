"""XEP-0478 stream limits: the ``<limits/>`` feature a receiver announces (§2.1, byte-exact, on every features
element but a mandatory-STARTTLS one) and what an initiator reads of a peer's (absent, malformed, byte by byte)."""

from __future__ import annotations

import pytest
from lxml import etree

from router.negotiation import events as ev
from router.negotiation import features
from router.negotiation.features import MAX_ANNOUNCED_LIMIT, StreamLimits
from router.negotiation.pairs import Pair
from router.negotiation.session import Session
from router.trust.policy import Policy
from test_negotiation_support import Wire, config
from test_negotiation_stream import _initiator_after_features, header

LIMITS = StreamLimits(max_bytes=10000, idle_seconds=600)
RENDERED = (b"<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>10000</max-bytes>"
            b"<idle-seconds>600</idle-seconds></limits>")
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
DIALBACK = b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"


def receiver_features(**overrides) -> bytes:
    session = Session("receiver", config(["b.example"], **overrides))
    session.receive_data(header())
    out = session.data_to_send()
    return out[out.index(b"<stream:features"):]


def test_receiver_announces_max_bytes_and_idle_seconds_last_in_its_features():
    """XEP-0478 §2.1: <limits xmlns='urn:xmpp:stream-limits:0'> with <max-bytes/> and <idle-seconds/>."""
    assert receiver_features(stream_limits=LIMITS, tls_offered=False, required_flags=False) == (
        b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>" + RENDERED
        + b"</stream:features>")


def test_a_zero_value_is_left_out_and_none_announces_nothing():
    """§2.1: the element SHOULD contain both children; one we do not enforce is not announced."""
    assert b"<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>5000</max-bytes></limits>" in receiver_features(
        stream_limits=StreamLimits(5000, 0))
    assert b"<limits xmlns='urn:xmpp:stream-limits:0'><idle-seconds>30</idle-seconds></limits>" in \
        receiver_features(stream_limits=StreamLimits(0, 30))
    assert b"limits" not in receiver_features(stream_limits=StreamLimits(0, 0))
    assert b"limits" not in receiver_features()


def test_not_announced_beside_a_mandatory_starttls_but_after_it():
    """RFC 6120 §5.3.1: with mandatory TLS only <starttls/> is offered; XEP-0478 §3: the features of each
    new stream carry the limits again."""
    session = Session("receiver", config(["b.example"], policy=Policy(require_encryption=True),
                                         stream_limits=LIMITS))
    session.receive_data(header())
    assert b"limits" not in session.data_to_send()
    session.receive_data(STARTTLS)
    session.data_to_send()
    session.tls_established([])
    session.receive_data(header())
    assert RENDERED + b"</stream:features>" in session.data_to_send()


def test_initiator_reads_the_peer_limits_and_negotiates_as_before():
    feats = b"<stream:features>" + DIALBACK + RENDERED + b"</stream:features>"
    session, out, _ = _initiator_after_features(feats)
    assert session.advertised.limits == LIMITS
    assert b"<db:result from='a.example' to='b.example'>" in out  # an unknown-to-negotiation feature: not required


def test_absent_limits_say_nothing():
    session, _, _ = _initiator_after_features(b"<stream:features>" + DIALBACK + b"</stream:features>")
    assert session.advertised.limits == StreamLimits(0, 0)


def test_a_max_bytes_below_rfc_6120s_floor_counts_as_the_floor():
    """RFC 6120 §13.12: a stanza size limit "MUST NOT be less than 10000 bytes"."""
    element = etree.fromstring("<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>5000</max-bytes>"
                               "<idle-seconds>5</idle-seconds></limits>")
    assert features.parse_limits(element) == StreamLimits(10000, 5)


@pytest.mark.parametrize("text, value", [
    ("10000", 10000), (" 10000\n", 10000), ("", 0), ("abc", 0), ("-5", 0), ("+5", 0), ("1.5", 0), ("1e4", 0),
    ("0", 0), ("\u0663", 0), (str(MAX_ANNOUNCED_LIMIT), MAX_ANNOUNCED_LIMIT), (str(MAX_ANNOUNCED_LIMIT + 1), 0),
    ("9" * 40, 0),
])
def test_each_value_is_a_positive_decimal_integer_or_nothing(text, value):
    """§2.1: "Contains an integer"; anything else (or a size no stanza reaches) is ignored, not trusted."""
    element = etree.fromstring(f"<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>{text}</max-bytes>"
                               f"<idle-seconds>{text}</idle-seconds></limits>")
    assert features.parse_limits(element) == StreamLimits(value, value)


def test_children_in_another_namespace_and_limits_outside_its_namespace_are_ignored():
    outside = b"<stream:features>" + DIALBACK + b"<limits><max-bytes>10</max-bytes></limits></stream:features>"
    assert _initiator_after_features(outside)[0].advertised.limits == StreamLimits(0, 0)
    foreign = (b"<stream:features>" + DIALBACK + b"<limits xmlns='urn:xmpp:stream-limits:0'>"
               b"<max-bytes xmlns='urn:example'>10</max-bytes><idle-seconds>7</idle-seconds><extra/></limits>"
               b"</stream:features>")
    assert _initiator_after_features(foreign)[0].advertised.limits == StreamLimits(0, 7)


def test_features_fed_byte_by_byte_and_with_trailing_data_read_the_same():
    """The tokenizer resumes mid-element: the limits read do not depend on how the bytes arrive."""
    response = (b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                b"xmlns='jabber:server' xmlns:db='jabber:server:dialback' id='abc123' from='b.example' "
                b"to='a.example' version='1.0'>")
    feats = b"<stream:features>" + DIALBACK + RENDERED + b"</stream:features>"
    for trailing, pairs in ((b"", ()), (b" <db:result from='b.example' to='a.example' type='valid'/><iq",
                                         (Pair("a.example", "b.example"),))):
        data = response + feats + trailing
        whole, split = (Session("initiator", config(["a.example"]), "a.example", "b.example") for _ in range(2))
        whole.receive_data(data)
        for i in range(len(data)):
            split.receive_data(data[i:i + 1])
        for session in (whole, split):
            assert session.advertised.limits == LIMITS and not session.closed
            assert session.outbound_pairs == pairs  # the trailing answer to our db:result was read too


def test_two_sessions_back_to_back_carry_the_receivers_limits_to_the_initiator():
    initiator = Session("initiator", config(["a.example"]), "a.example", "b.example")
    wire = Wire(initiator, Session("receiver", config(["b.example"], tls_offered=False, stream_limits=LIMITS)))
    wire.pump()
    assert RENDERED in bytes(wire.r_bytes)
    assert initiator.advertised.limits == LIMITS


@pytest.mark.parametrize("announced", [LIMITS, None])
def test_a_bidi_request_carries_the_initiators_limits_to_the_receiver(announced):
    """XEP-0478 §2.2: "the <limits/> element can be included in the <bidi/> element"."""
    wire = Wire(Session("initiator", config(["a.example"], bidi="always", stream_limits=announced),
                        "a.example", "b.example"),
                Session("receiver", config(["b.example"], bidi="always")))
    wire.pump()
    request = b"<bidi xmlns='urn:xmpp:bidi'>" + RENDERED + b"</bidi>" if announced else b"<bidi xmlns='urn:xmpp:bidi'/>"
    assert request in wire.i_bytes
    assert [e.limits for e in wire.of("r", ev.BidiEnabled)] == [announced or StreamLimits()]
