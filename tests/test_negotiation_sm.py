"""XEP-0198 on S2S, sans-IO: the receiver offers ``<sm/>`` and answers ``<enable/>``; the initiator
enables it before its first pair is reported; ``<r/>`` and ``<a h/>`` become events, read whole, byte by
byte and with trailing data; what is out of place is refused as §3 and §4 say."""

from __future__ import annotations

import pytest

from router.negotiation import events as ev
from router.negotiation.session import Session
from test_negotiation_stream import closed_with, header
from test_negotiation_support import Wire, config

SM = "urn:xmpp:sm:3"
ENABLE = f"<enable xmlns='{SM}'/>".encode()
ENABLED = f"<enabled xmlns='{SM}'/>".encode()


def federated(initiator_sm: bool = True, receiver_sm: bool = True) -> Wire:
    """a.example -> b.example authorized by dialback, each side with XEP-0198 on or off."""
    wire = Wire(Session("initiator", config(["a.example"], stream_management=initiator_sm), "a.example", "b.example"),
                Session("receiver", config(["b.example"], stream_management=receiver_sm)))
    wire.pump()
    wire.verify("r", config(["b.example"]), config(["a.example"]))
    assert wire.initiator.outbound_pairs
    return wire


def enabled_receiver() -> Session:
    session = Session("receiver", config(["b.example"], stream_management=True))
    session.receive_data(header() + ENABLE)
    assert session.sm_enabled
    session.data_to_send(), session.events()
    return session


def test_the_initiator_enables_before_its_pair_is_reported_and_both_sides_start_counting():
    """§4: the sender of <enable/> counts what it sends from there; the receiver what it receives and,
    from its <enabled/>, what it sends; the initiator counts what it receives from <enabled/> on."""
    wire = federated()
    assert f"<sm xmlns='{SM}'/>".encode() in wire.r_bytes
    assert wire.i_bytes.count(ENABLE) == 1 and wire.r_bytes.count(ENABLED) == 1
    order = [type(e) for e in wire.i_events if isinstance(e, ev.SmStarted)
             or isinstance(e, ev.Authenticated) and e.direction == "outbound"]
    assert order == [ev.SmStarted, ev.Authenticated, ev.SmStarted]  # counting starts before any stanza is routed
    assert wire.of("i", ev.SmStarted) == [ev.SmStarted(outbound=True, inbound=False),
                                         ev.SmStarted(outbound=False, inbound=True)]
    assert wire.of("r", ev.SmStarted) == [ev.SmStarted(outbound=True, inbound=True)]
    assert wire.initiator.sm_enabled and wire.receiver.sm_enabled


@pytest.mark.parametrize("initiator_sm, receiver_sm", [(True, False), (False, True)])
def test_nothing_is_enabled_unless_offered_and_wanted(initiator_sm, receiver_sm):
    wire = federated(initiator_sm, receiver_sm)
    assert (f"<sm xmlns='{SM}'/>".encode() in wire.r_bytes) == receiver_sm
    assert ENABLE not in wire.i_bytes
    assert not wire.of("i", ev.SmStarted) and not wire.of("r", ev.SmStarted)


def test_acks_and_requests_become_events_whole_byte_by_byte_and_with_trailing_data():
    data = f"<a xmlns='{SM}' h='42'/><r xmlns='{SM}'/><a xmlns='{SM}' h='4294967295'/><r xmlns='{SM}'".encode()
    for chunks in ([data], [bytes([b]) for b in data]):
        session = enabled_receiver()
        for chunk in chunks:
            session.receive_data(chunk)
        assert session.events() == [ev.Acked(42), ev.AckRequested(), ev.Acked(4294967295)]
        session.receive_data(b"/>")  # the trailing element completes
        assert session.events() == [ev.AckRequested()]


@pytest.mark.parametrize("h", ["", "-1", "4294967296", "1.0", " 1", "\u0661"])
def test_an_h_that_is_not_an_unsigned_32_bit_integer_closes_the_stream(h):
    session = enabled_receiver()
    session.receive_data(f"<a xmlns='{SM}' h='{h}'/>".encode())
    assert closed_with(session.events()) == ["invalid-xml"]


def test_requests_and_acks_before_enabling_are_ignored():
    session = Session("receiver", config(["b.example"], stream_management=True))
    session.receive_data(header() + f"<r xmlns='{SM}'/><a xmlns='{SM}' h='3'/>".encode())
    assert not [e for e in session.events() if not isinstance(e, ev.Closed)]
    assert not session.closed


def test_a_second_enable_fails_and_one_to_a_receiver_without_it_is_not_implemented():
    session = enabled_receiver()
    session.receive_data(ENABLE)
    assert session.data_to_send() == (f"<failed xmlns='{SM}'><unexpected-request "
                                      f"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>").encode()
    assert not session.events()
    off = Session("receiver", config(["b.example"]))
    off.receive_data(header())
    off.data_to_send()
    off.receive_data(ENABLE)
    assert b"<feature-not-implemented" in off.data_to_send() and not off.sm_enabled


def test_enable_sent_to_the_initiator_closes_the_stream():
    wire = federated()
    wire.initiator.receive_data(ENABLE)
    assert closed_with(wire.initiator.events()) == ["unsupported-stanza-type"]


def test_the_initiator_stops_counting_when_the_receiver_refuses():
    """§3: <failed/> answers <enable/>; what the initiator kept for re-sending is let go."""
    wire = Wire(Session("initiator", config(["a.example"], stream_management=True), "a.example", "b.example"),
                Session("receiver", config(["b.example"], stream_management=True)))
    wire.pump()
    wire.receiver.stop_stream_management()  # as if it had been turned off before the peer's <enable/>
    wire.receiver.config = config(["b.example"], stream_management=False)
    wire.verify("r", config(["b.example"]), config(["a.example"]))
    assert b"<failed" in wire.r_bytes
    assert wire.of("i", ev.SmStopped) == [ev.SmStopped()] and not wire.initiator.sm_enabled


def test_tls_forgets_stream_management():
    """RFC 6120 §5.4.3.3: everything negotiated before TLS is forgotten."""
    session = Session("receiver", config(["b.example"], stream_management=True))
    session.receive_data(header() + ENABLE + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    session.events()
    session.tls_established([])
    assert not session.sm_enabled
