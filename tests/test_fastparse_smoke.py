"""Smoke tests of the tokenizer written with it (the full suite is test_fastparse_*.py)."""

import pytest

from router._fastparse import ParseError, Tokenizer

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"to='a.example' from='b.example' version='1.0' xml:lang='en'>"
)
STANZAS = (
    b"<db:result from='b.example' to='a.example'>KEY</db:result>\n "
    b"<message from='x@b.example/r' to='y@a.example' type='chat' id='i&amp;1' xml:lang='fr'>"
    b"<body>h\xc3\xa9llo &lt;&#x263a;&#128512; <![CDATA[<x>]]]]></body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    b"<iq xmlns='jabber:server' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>"
)
STREAM = HEADER + STANZAS + b"</stream:stream>"


def summary(tokenizer, events):
    """Comparable facts of events, with the bytes of their ranges."""
    out = []
    for event in events:
        raw = bytes(tokenizer.buffer[event.start:event.end])
        fields = {k: getattr(event, k) for k in ("name", "ns", "prefix", "to", "from_", "type", "id", "lang",
                                                 "header_prefix", "own_xmlns", "version") if hasattr(event, k)}
        out.append((type(event).__name__, raw, fields))
    return out


def feed_in_chunks(data, size, **limits):
    tokenizer = Tokenizer(**limits)
    out = []
    for i in range(0, len(data), size):
        out += summary(tokenizer, tokenizer.feed(data[i:i + size]))
    return out


def test_whole_stream_events():
    tokenizer = Tokenizer()
    events = tokenizer.feed(STREAM)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["StreamHeader", "Element", "Element", "Element", "StreamEnd"]
    header, result, message, iq, end = events
    assert header.prefix == "stream" and header.to == "a.example" and header.from_ == "b.example"
    assert header.namespaces == {None: "jabber:server", "stream": "http://etherx.jabber.org/streams",
                                 "db": "jabber:server:dialback"}
    assert header.attributes["{http://www.w3.org/XML/1998/namespace}lang"] == "en"
    assert (result.name, result.ns, result.prefix, result.header_prefix) == (
        "result", "jabber:server:dialback", "db", True)
    assert (message.name, message.ns, message.id, message.lang, message.header_prefix, message.own_xmlns) == (
        "message", "jabber:server", "i&1", "fr", False, False)
    assert iq.own_xmlns and iq.type == "get"
    assert bytes(tokenizer.buffer[end.start:end.end]) == b"</stream:stream>"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_any_split_gives_the_same_events(size):
    assert feed_in_chunks(STREAM, size) == feed_in_chunks(STREAM, len(STREAM))


def test_buffered_protocol_keeps_the_bytes_of_held_views():
    tokenizer = Tokenizer()
    held = []
    for i in range(0, len(STREAM), 50):
        chunk = STREAM[i:i + 50]
        view = tokenizer.get_buffer(len(chunk))
        view[:len(chunk)] = chunk
        for event in tokenizer.buffer_updated(len(chunk)):
            if hasattr(event, "ns"):
                held.append((memoryview(tokenizer.buffer)[event.start:event.end], event.name))
    assert [bytes(v) for v, _ in held] == [s[1] for s in feed_in_chunks(STREAM, len(STREAM))[1:4]]


def test_restart_returns_tail_and_expects_new_header():
    tokenizer = Tokenizer()
    first = HEADER + b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    # the scanner stops after <success/>: the pipelined new header is left unscanned
    events = tokenizer.feed(first + HEADER[:30])
    success = events[-1]
    assert success.name == "success"
    tail = tokenizer.restart(success.end)
    assert tail == HEADER[:30]
    events = tokenizer.feed(tail + HEADER[30:] + b"<presence/>")
    assert [type(e).__name__ for e in events] == ["StreamHeader", "Element"]
    assert tokenizer.header is events[0]
    assert bytes(tokenizer.buffer[events[0].start:events[0].end]) == HEADER[21:]
    assert tokenizer.offset == len(HEADER) + len(b"<presence/>")


def test_restart_refuses_to_forget_an_error_before_the_restart_point():
    tokenizer = Tokenizer()
    with pytest.raises(ParseError):
        tokenizer.feed(HEADER + b"<presence/><a>\x01")
    with pytest.raises(ParseError):
        tokenizer.restart(len(HEADER) + len(b"<presence/><a>\x01"))


PREFIX_FREE = b"<stream xmlns='http://etherx.jabber.org/streams'>"


@pytest.mark.parametrize("data, condition", [
    (HEADER + b"<a><b></a>", "not-well-formed"),
    (HEADER + b"<a x='1' x='2'/>", "not-well-formed"),
    (HEADER + b"<a xmlns:p='u' xmlns:q='u' p:x='1' q:x='2'/>", "not-well-formed"),
    (HEADER + b"<p:a/>", "not-well-formed"),
    (HEADER + b"<a x='<'/>", "not-well-formed"),
    (HEADER + b"<a x=1/>", "not-well-formed"),
    (HEADER + b"<a>]]></a>", "not-well-formed"),
    (HEADER + b"<a>\xc0\x80</a>", "unsupported-encoding"),
    (HEADER + b"<a>\xed\xa0\x80</a>", "unsupported-encoding"),
    (HEADER + b"<a>\xef\xbf\xbf</a>", "not-well-formed"),
    (HEADER + b"<a>\x01</a>", "not-well-formed"),
    (HEADER + b"<a>&#0;</a>", "not-well-formed"),
    (HEADER + b"<a>&#xD800;</a>", "not-well-formed"),
    (HEADER + b"<a>&#x110000;</a>", "not-well-formed"),
    (HEADER + b"hello", "not-well-formed"),
    (HEADER + b"<a><stream:stream></a>", "not-well-formed"),
    (HEADER + b"<a></stream:stream>", "not-well-formed"),
    (HEADER + b"<a xmlns:xml='urn:x'/>", "not-well-formed"),
    (HEADER + b"<a xmlns:p=''/>", "not-well-formed"),
    (HEADER + b"<!-- c -->", "restricted-xml"),
    (HEADER + b"<a><?pi x?></a>", "restricted-xml"),
    (b"<!DOCTYPE x><stream:stream/>", "restricted-xml"),
    (HEADER + b"<a>&nbsp;</a>", "restricted-xml"),
    (b"<?xml version='1.0' standalone='no'?>", "restricted-xml"),
    (b"<?xml version='1.0' encoding='ISO-8859-1'?>", "unsupported-encoding"),
    (b"<stream:stream xmlns:stream='urn:wrong'>", "invalid-namespace"),
    (b"<s:stream xmlns:s='http://etherx.jabber.org/streams'>", "bad-namespace-prefix"),
    (HEADER + b"<x:message xmlns:x='jabber:server'/>", "bad-namespace-prefix"),
])
def test_violations(data, condition):
    for size in (1, len(data)):
        tokenizer = Tokenizer()
        with pytest.raises(ParseError) as info:
            for i in range(0, len(data), size):
                tokenizer.feed(data[i:i + size])
        assert info.value.condition == condition
        assert str(info.value.offset) in info.value.text


def test_prefix_free_stream_and_utf8_encoding_any_case():
    data = b"\xef\xbb\xbf<?xml version='1.0' encoding='utf-8'?>" + PREFIX_FREE + b"<message xmlns='jabber:server'/></stream>"
    assert [k for k, _, _ in feed_in_chunks(data, 1)] == ["StreamHeader", "Element", "StreamEnd"]


def test_limits_fail_while_the_stanza_is_still_arriving():
    tokenizer = Tokenizer(max_stanza_bytes=1000)
    tokenizer.feed(HEADER + b"<message><body>")
    with pytest.raises(ParseError) as info:
        for _ in range(100):
            tokenizer.feed(b"x" * 100)
    assert info.value.condition == "policy-violation"
    assert info.value.offset == len(HEADER) + 1000
    with pytest.raises(ParseError) as again:
        tokenizer.feed(b"</body></message>")
    assert again.value is info.value


@pytest.mark.parametrize("limits, data", [
    ({"max_depth": 3}, b"<a><b><c><d/></c></b></a>"),
    ({"max_attributes": 2}, b"<a x='1' y='2' z='3'/>"),
    ({"max_name_length": 8}, b"<abcdefghij/>"),
    ({"max_attribute_value_length": 4}, b"<a x='12345'/>"),
])
def test_configured_limits(limits, data):
    with pytest.raises(ParseError) as info:
        Tokenizer(**limits).feed(HEADER + data)
    assert info.value.condition == "policy-violation"


def test_error_carries_events_completed_before_it():
    with pytest.raises(ParseError) as info:
        Tokenizer().feed(HEADER + b"<presence/><a>\x00</a>")
    assert [type(e).__name__ for e in info.value.events] == ["StreamHeader", "Element"]


@pytest.mark.parametrize("stanza, header_prefix", [
    (b"<message db:a='1'/>", True),
    (b"<message xmlns:x='urn:x' x:a='1' xml:lang='en'/>", False),
    (b"<message><x:y xmlns:x='urn:x'><db:z/></x:y></message>", True),
])
def test_attribute_prefixes_do_not_change_the_element_namespace(stanza, header_prefix):
    (element,) = Tokenizer().feed(HEADER + stanza)[1:]
    assert (element.name, element.ns, element.header_prefix) == ("message", "jabber:server", header_prefix)


def test_header_attributes_all_reported_and_routing_ones_kept_as_fields():
    tokenizer = Tokenizer()
    [header] = tokenizer.feed(HEADER.replace(b"' version=", b"' x:y='1' xmlns:x='urn:x' extra='&lt;v' version="))
    assert header.attributes == {"to": "a.example", "from": "b.example", "version": "1.0", "extra": "<v",
                                 "{urn:x}y": "1", "{http://www.w3.org/XML/1998/namespace}lang": "en"}
    assert header.other_attributes == {"extra": "<v", "{urn:x}y": "1"}
    [plain] = Tokenizer().feed(HEADER)
    assert plain.other_attributes is None  # an ordinary header keeps no dict


def test_streams_with_the_same_header_declarations_share_one_namespace_map():
    first, second = Tokenizer(), Tokenizer()
    [a] = first.feed(HEADER)
    [b] = second.feed(HEADER.replace(b"a.example", b"c.example"))
    assert a.namespaces is b.namespaces  # one map per distinct set of declarations (idle memory)
    [other] = Tokenizer().feed(HEADER.replace(b"xmlns:db='jabber:server:dialback' ", b""))
    assert other.namespaces is not a.namespaces and "db" not in other.namespaces
    # the shared URIs still resolve elements of each stream
    [result] = second.feed(b"<db:result from='b.example' to='c.example'>K</db:result>")
    assert result.ns == "jabber:server:dialback" and result.header_prefix


def test_dialback_domains_reuse_the_header_strings():
    tokenizer = Tokenizer()
    [header] = tokenizer.feed(HEADER)
    [result] = tokenizer.feed(b"<db:result from='b.example' to='a.example'>K</db:result>")
    assert result.from_ is header.from_ and result.to is header.to


def test_release_keeps_the_header_declarations_after_the_arena_grew():
    tokenizer = Tokenizer()
    tokenizer.feed(HEADER)
    wide = "".join(f" xmlns:p{i}='urn:example:a-fairly-long-namespace-name:{i}'" for i in range(12))
    [message] = tokenizer.feed(f"<message from='x@b.example' to='y@a.example'{wide}><p3:x/></message>".encode())
    assert message.name == "message"
    tokenizer.release()
    [result] = tokenizer.feed(b"<db:result from='b.example' to='a.example'>K</db:result>")
    assert result.ns == "jabber:server:dialback"
    [iq] = tokenizer.feed(b"<iq from='x@b.example' to='y@a.example' type='get' id='1'><stream:x/></iq>")
    assert iq.header_prefix
