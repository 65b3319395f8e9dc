"""Hypothesis: negotiation elements in random order, with garbage between them, always end in
a defined stream error (or a clean close), never in an exception or an internal error."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.wire.errors import STREAM_CONDITIONS
from router.negotiation import events as ev
from router.negotiation.session import Session
from test_negotiation_support import config
from test_negotiation_stream import header

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"

NEGOTIATION = [
    f"<starttls xmlns='{TLS}'/>", f"<proceed xmlns='{TLS}'/>", f"<failure xmlns='{TLS}'/>",
    f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>=</auth>", f"<auth xmlns='{SASL}' mechanism='PLAIN'>AGEAYg==</auth>",
    f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>!!</auth>", f"<abort xmlns='{SASL}'/>", f"<response xmlns='{SASL}'/>",
    f"<success xmlns='{SASL}'/>", f"<failure xmlns='{SASL}'><aborted/></failure>",
    "<db:result from='a.example' to='b.example'>k</db:result>", "<db:result from='a.example' to='zz.example'>k</db:result>",
    "<db:result from='b.example' to='a.example' type='valid'/>", "<db:result from='a.example' to='b.example' type='bogus'/>",
    "<db:result from='b.example' to='a.example' type='error'><error type='cancel'/></db:result>",
    "<db:verify from='a.example' to='b.example' id='x'>k</db:verify>", "<db:verify from='a.example' to='b.example'>k</db:verify>",
    "<db:verify from='b.example' to='a.example' id='x' type='valid'/>", "<db:result to='b.example'>k</db:result>",
    "<db:unknown/>", "<bidi xmlns='urn:xmpp:bidi'/>", "<bidi xmlns='urn:xmpp:features:bidi'/>",
    "<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>",
    "<stream:features/>", "<message from='x@a.example' to='y@b.example'/>", "<iq type='get'/>",
    "<message xmlns='jabber:client'/>", "<foo xmlns='urn:x'/>", " ",
    "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
]
GARBAGE = [b"<<", b"</nope>", b"\xff\xfe", b"<!--x-->", b"<?pi x?>", b"&bogus;", b"<a b='1' b='2'/>", b"<x:y/>",
           b"<!DOCTYPE x>", b"\x00"]

elements = st.lists(st.sampled_from(NEGOTIATION), max_size=12)


def drive(session: Session, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        session.receive_data(chunk)
        for event in session.events():
            events.append(event)
            if isinstance(event, ev.StartTLS):
                session.data_to_send()
                session.tls_established([])
        session.data_to_send()
    return events


def check_ending(session: Session, events: list, must_close: bool) -> None:
    ends = [e for e in events if isinstance(e, (ev.Closed, ev.PeerClosed))]
    assert len(ends) <= 2  # our close, then possibly nothing more
    for end in ends:
        if isinstance(end, ev.Closed) and end.condition is not None:
            assert end.condition in STREAM_CONDITIONS
            assert end.condition != "internal-server-error", end.text  # a handler raised
            assert end.text
    if must_close:
        assert ends, "garbage did not close the stream"


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=elements, garbage=st.sampled_from(GARBAGE), after=elements, cuts=st.lists(st.integers(0, 4000), max_size=6),
       version=st.sampled_from(["1.0", None]))
def test_receiver_random_negotiation_then_garbage_always_ends_in_a_defined_stream_error(before, garbage, after, cuts, version):
    session = Session("receiver", config(["b.example"], "s", bidi="always"))
    data = header(version=version) + "".join(before).encode() + garbage + "".join(after).encode()
    events = drive(session, _split(data, cuts))
    check_ending(session, events, must_close=True)
    assert session.closed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=elements, garbage=st.one_of(st.none(), st.sampled_from(GARBAGE)), cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_initiator_random_peer_elements_never_escape(steps, garbage, cuts):
    session = Session("initiator", config(["a.example"], "s", bidi="always"), "a.example", "b.example")
    session.data_to_send()
    response = (b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                b"xmlns:db='jabber:server:dialback' id='r1' from='b.example' version='1.0'>")
    data = response + "".join(steps).encode() + (garbage or b"")
    events = drive(session, _split(data, cuts))
    check_ending(session, events, must_close=garbage is not None)


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=200))
def test_arbitrary_bytes_after_the_header_never_escape(payload):
    session = Session("receiver", config(["b.example"], "s"))
    events = drive(session, [header(), payload])
    check_ending(session, events, must_close=False)
