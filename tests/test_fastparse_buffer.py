"""Receive-buffer contract: linear work, a buffer something still views is never written again, restart()."""

import pytest

from router._fastparse import Element, ParseError, StreamEnd, StreamHeader, Tokenizer

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns:db='jabber:server:dialback' to='a.example' from='b.example' version='1.0'>"
)


def stanza(i, size=200):
    body = (b"%d " % i) * (size // 8)
    return b"<message to='a.example' from='b.example' id='m%d'><body>%s</body></message>" % (i, body)


def write_through_buffer(tokenizer, data):
    """What uvloop does for a BufferedProtocol: write into get_buffer(), then buffer_updated()."""
    events, view = [], memoryview(data)
    while view:
        target = tokenizer.get_buffer(len(view))
        n = min(len(target), len(view))
        target[:n] = view[:n]
        target.release()
        view = view[n:]
        events += tokenizer.buffer_updated(n)
    return events


# Linear work: 2 MiB fed one byte per read takes a few seconds. Anything that touches the
# partial stanza on every read (rescanning it, or copying it into a buffer grown by a
# constant) does ~2e12 byte operations here and hits the timeout. No timing is asserted.
# (At 256 KiB a copying implementation still finishes in about a second, so it is 2 MiB.)
BIG = 2 << 20


@pytest.mark.timeout(60)
def test_two_mebibyte_stanza_fed_one_byte_at_a_time():
    big = b"<message to='a.example'><body>" + b"0123456789abcde\xc3\xa9" * (BIG // 17) + b"</body></message>"
    tokenizer = Tokenizer(max_stanza_bytes=2 * BIG)
    tokenizer.feed(HEADER)
    events = []
    for i in range(len(big)):
        events += tokenizer.feed(big[i : i + 1])
    (element,) = events
    assert element.end - element.start == len(big)
    assert bytes(tokenizer.buffer[element.start : element.end]) == big


@pytest.mark.timeout(60)
def test_two_mebibyte_stanza_one_byte_per_buffer_updated():
    big = b"<message to='a.example'><body>" + b"x&amp;y&#233;" * (BIG // 13) + b"</body></message>"
    tokenizer = Tokenizer(max_stanza_bytes=2 * BIG)
    tokenizer.feed(HEADER)
    events = []
    for i in range(len(big)):
        target = tokenizer.get_buffer(1)
        target[0] = big[i]
        target.release()
        events += tokenizer.buffer_updated(1)
    (element,) = events
    assert bytes(tokenizer.buffer[element.start : element.end]) == big


@pytest.mark.timeout(60)
def test_long_start_tag_fed_one_byte_at_a_time():
    # State inside a start tag (names, attribute values, references) must survive reads too.
    attributes = b"".join(b" a%d='%s&amp;&#x41;'" % (i, b"v" * 60000) for i in range(8))
    big = b"<message" + attributes + b"/>"
    tokenizer = Tokenizer()
    tokenizer.feed(HEADER)
    events = []
    for i in range(len(big)):
        events += tokenizer.feed(big[i : i + 1])
    assert [e.name for e in events] == ["message"]


def test_a_buffer_nothing_else_refers_to_is_reused_in_place():
    tokenizer = Tokenizer()
    write_through_buffer(tokenizer, HEADER)
    first = id(tokenizer.buffer)  # its id: holding the buffer itself would make it shared
    for i in range(50):
        write_through_buffer(tokenizer, stanza(i) + stanza(i + 1)[:100])
        write_through_buffer(tokenizer, stanza(i + 1)[100:])
    assert id(tokenizer.buffer) == first


@pytest.mark.parametrize("via", ["buffer", "feed"])
def test_a_buffer_a_view_still_refers_to_is_never_written_again(via):
    tokenizer = Tokenizer()
    read = write_through_buffer if via == "buffer" else lambda t, data: t.feed(data)
    events = read(tokenizer, HEADER + stanza(0) + stanza(1)[:77])
    element = events[-1]
    pinned = tokenizer.buffer
    held = memoryview(pinned)[element.start : element.end]  # like a pending transport.write()
    forwarded = bytes(held)
    snapshot = bytes(pinned)

    rest = stanza(1)[77:] + b"".join(stanza(i, size=3000) for i in range(2, 200))
    seen = []
    for i in range(0, len(rest), 1500):
        seen += [bytes(tokenizer.buffer[e.start : e.end]) for e in read(tokenizer, rest[i : i + 1500])]

    assert tokenizer.buffer is not pinned
    assert bytes(held) == forwarded == stanza(0)
    assert bytes(pinned) == snapshot, "the pinned buffer was written to"
    assert seen == [stanza(1)] + [stanza(i, size=3000) for i in range(2, 200)]
    held.release()


def test_once_its_views_are_gone_a_buffer_is_reused_again():
    tokenizer = Tokenizer()
    element = tokenizer.feed(HEADER + stanza(0))[-1]
    held = memoryview(tokenizer.buffer)[element.start : element.end]
    viewed = id(held.obj)
    tokenizer.feed(stanza(1)[:50])
    fresh = id(tokenizer.buffer)
    assert fresh != viewed and bytes(held) == stanza(0)
    held.release()
    for i in range(2, 30):
        tokenizer.feed(stanza(1)[50:] if i == 2 else stanza(i))
    assert id(tokenizer.buffer) == fresh


def test_offsets_are_absolute_across_compactions():
    tokenizer = Tokenizer()
    stream = HEADER + b"".join(stanza(i, size=5000) for i in range(40))
    for i in range(0, len(stream), 3333):
        tokenizer.feed(stream[i : i + 3333])
    assert tokenizer.offset == len(stream)


def read_until(tokenizer, stream, chunk, name):
    """Feed ``stream`` in chunks until the element ``name`` arrives; returns (events, bytes fed).

    Bytes after a stream-ending element (TLS records, a new XML declaration) make the
    scanner fail; the events before the failure are on the error and restart() forgets it.
    """
    events = []
    for i in range(0, len(stream), chunk):
        try:
            events += tokenizer.feed(stream[i : i + chunk])
        except ParseError as err:
            events += err.events
        if any(isinstance(e, Element) and e.name == name for e in events):
            return events, i + chunk
    raise AssertionError(f"no <{name}/> in the stream")


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_restart_after_starttls_returns_the_exact_tail(chunk):
    starttls = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    tail = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03<not xml>"  # a TLS ClientHello, say
    stream = HEADER + starttls + tail
    tokenizer = Tokenizer()
    events, fed = read_until(tokenizer, stream, chunk, "starttls")
    element = events[-1]
    assert element.name == "starttls"
    assert bytes(tokenizer.buffer[element.start : element.end]) == starttls
    assert tokenizer.restart(element.end) + stream[fed:] == tail


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_restart_after_sasl_success_accepts_a_new_header(chunk):
    success = b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    new_stream = HEADER + stanza(7) + b"</stream:stream>"
    stream = HEADER + success + new_stream
    tokenizer = Tokenizer()
    events, fed = read_until(tokenizer, stream, chunk, "success")
    tail = tokenizer.restart(events[-1].end) + stream[fed:]
    assert tail == new_stream
    assert tokenizer.header is None
    after = tokenizer.feed(tail)
    assert [type(e) for e in after] == [StreamHeader, Element, StreamEnd]
    header, element, end = after
    assert tokenizer.header is header
    assert header.start == len(b"<?xml version='1.0'?>"), "offsets count from the restart"
    assert bytes(tokenizer.buffer[element.start : element.end]) == stanza(7)
    assert tokenizer.offset == len(new_stream)


@pytest.mark.parametrize(
    "ender",
    [
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
    ],
    ids=["starttls", "proceed", "success"],
)
def test_call_stops_after_a_document_ending_element(ender):
    # The XML document ends there: bytes after it wait for restart() or for the next read.
    tokenizer = Tokenizer()
    events = tokenizer.feed(HEADER + ender + b"<message id='after'/>")
    assert [bytes(tokenizer.buffer[e.start : e.end]) for e in events[1:]] == [ender]
    assert [e.id for e in tokenizer.feed(b"<message id='next'/>")] == ["after", "next"]


def test_restart_offset_outside_the_buffer_is_refused():
    tokenizer = Tokenizer()
    tokenizer.feed(HEADER)
    with pytest.raises(ValueError):
        tokenizer.restart(len(tokenizer.buffer) + 1)
    with pytest.raises(ValueError):
        tokenizer.restart(-1)


def test_restart_does_not_clear_an_error_before_the_restart_point():
    tokenizer = Tokenizer()
    data = HEADER + b"<message>\x01</message>"
    with pytest.raises(ParseError) as info:
        tokenizer.feed(data)
    assert info.value.condition == "not-well-formed"
    with pytest.raises(ParseError):
        tokenizer.restart(len(data))


def test_release_drops_the_buffer_only_between_elements():
    """An idle stream holds no receive buffer; a partial element keeps its bytes."""
    tok = Tokenizer()
    tok.feed(HEADER)
    tok.release()
    assert len(tok.buffer) == 0
    events = tok.feed(b"<message to='a@b' from='c@d'><body>par")
    assert events == []
    tok.release()
    assert len(tok.buffer) > 0  # the partial stanza is kept
    (message,) = tok.feed(b"tial</body></message>")
    assert bytes(tok.buffer[message.start:message.end]) == (
        b"<message to='a@b' from='c@d'><body>partial</body></message>")
    assert tok.offset == len(HEADER) + len(b"<message to='a@b' from='c@d'><body>partial</body></message>")


def test_release_keeps_parsing_correct_after_dropping_per_element_arrays():
    """After release() frees the per-element arrays, attributes, nesting and
    entity decoding still work (they are reallocated on demand)."""
    tok = Tokenizer()
    tok.feed(HEADER)
    for round_ in range(3):
        tok.release()
        stanza = (b"<message to='a@b' from='c@d' type='chat' id='m%d' a1='1' a2='2' a3='3' a4='4' a5='5'"
                  b" a6='6' a7='7' a8='8' a9='9'><x xmlns='urn:x'><y><z q='&amp;&lt;'>t</z></y></x></message>"
                  % round_)
        (message,) = tok.feed(stanza)
        assert (message.to, message.from_, message.type, message.id) == ("a@b", "c@d", "chat", "m%d" % round_)
        assert bytes(tok.buffer[message.start:message.end]) == stanza
