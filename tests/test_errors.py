"""Stream and stanza error builders (router/wire/errors.py), checked by parsing the bytes with lxml."""

import pytest
from lxml import etree

from router.wire import errors

STREAM_WRAP = (b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server'>", b"</stream:stream>")


def parse_in_stream(data: bytes):
    return etree.fromstring(STREAM_WRAP[0] + data + STREAM_WRAP[1])[0]


def test_stream_error_has_one_condition_and_text():
    """RFC 6120 §4.9.2: exactly one defined condition, an optional <text/>."""
    elem = parse_in_stream(errors.stream_error("host-unknown", "x <y> & z"))
    assert elem.tag == "{http://etherx.jabber.org/streams}error"
    assert [c.tag for c in elem] == [f"{{{errors.STREAMS_NS}}}host-unknown", f"{{{errors.STREAMS_NS}}}text"]
    assert elem[1].text == "x <y> & z"
    assert elem[1].get("{http://www.w3.org/XML/1998/namespace}lang") == "en"


def test_stream_error_without_text():
    elem = parse_in_stream(errors.stream_error("reset"))
    assert [c.tag for c in elem] == [f"{{{errors.STREAMS_NS}}}reset"]


def test_unknown_conditions_are_refused_when_sending_and_mapped_when_receiving():
    """RFC 6120 §4.9.2: an unknown condition is treated as <undefined-condition/>; RFC 3920's xml-not-well-formed
    is not-well-formed."""
    with pytest.raises(ValueError):
        errors.stream_error("invalid-id")
    assert errors.stream_condition("invalid-id") == "undefined-condition"
    assert errors.stream_condition("xml-not-well-formed") == "not-well-formed"
    assert errors.stream_condition("conflict") == "conflict"
    assert errors.stream_condition(None) == "undefined-condition"


def test_bounce_swaps_addresses_mirrors_id_and_carries_the_condition():
    """RFC 6120 §8.3.1-§8.3.2: an error stanza swaps 'from'/'to', mirrors 'id' and carries one condition."""
    data = errors.bounce("message", "juliet@capulet.example/balcony", "romeo@montague.example", "ju2ba41c", "chat",
                         "remote-server-timeout", "cannot reach montague.example")
    elem = parse_in_stream(data)
    assert elem.tag == "{jabber:server}message"
    assert (elem.get("from"), elem.get("to"), elem.get("id"), elem.get("type")) == (
        "romeo@montague.example", "juliet@capulet.example/balcony", "ju2ba41c", "error")
    error = elem.find("{jabber:server}error")
    assert error.get("type") == "wait"  # RFC 6120 §8.3.3.17
    assert error[0].tag == f"{{{errors.STANZAS_NS}}}remote-server-timeout"
    assert error.find(f"{{{errors.STANZAS_NS}}}text").text == "cannot reach montague.example"


def test_dialback_invalid_bounce_is_internal_server_error_cancel():
    """XEP-0220 §2.1.1: stanzas of a pair found invalid bounce with <internal-server-error/> (RFC 6120 §8.3.3.6:
    cancel)."""
    elem = parse_in_stream(errors.bounce("iq", "a@b.example", "c.example", "1", "get", "internal-server-error"))
    assert elem.find("{jabber:server}error").get("type") == "cancel"
    assert elem.get("id") == "1"


@pytest.mark.parametrize("kind, stanza_type", [("message", "error"), ("iq", "result"), ("iq", "error"), ("presence", "error")])
def test_errors_and_results_are_never_bounced(kind, stanza_type):
    """RFC 6120 §8.3.1: never answer an error with an error; §8.2.3: IQ results are not answered."""
    assert errors.bounce(kind, "a@b.example", "c@d.example", "1", stanza_type, "service-unavailable") is None


def test_bounce_without_id_has_no_id_and_escapes_addresses():
    """RFC 6120 §8.3.1: 'id' is mirrored only when the original had one."""
    elem = parse_in_stream(errors.bounce("presence", "a'b@x.example", None, None, None, "service-unavailable"))
    assert elem.get("id") is None and elem.get("to") == "a'b@x.example" and elem.get("from") is None


def test_error_child_rejects_unknown_conditions():
    with pytest.raises(ValueError):
        errors.error_child("no-such-condition")
    assert "remote-connection-failed" in errors.error_child("remote-connection-failed")  # XEP-0220 §2.5 table
