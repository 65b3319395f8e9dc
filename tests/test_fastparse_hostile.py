"""Hostile input catalogue: every attack or malformation gets the RFC 6120 condition it calls for.

Conditions follow RFC 6120: §11.1 (comments, PIs, DTDs, undefined entities ->
restricted-xml), §11.3/§4.9.3.13 (XML and namespace well-formedness ->
not-well-formed), §4.9.3.22 (an unsupported encoding *or bytes that violate
the rules of UTF-8* -> unsupported-encoding), §4.8.1/§4.8.5 (stream namespace
and prefixes), §4.9.3.14 (limits -> policy-violation).
"""

import pytest

from router._fastparse import (
    DEFAULT_MAX_ATTRIBUTE_VALUE_LENGTH,
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_NAME_LENGTH,
    DEFAULT_MAX_STANZA_BYTES,
    Element,
    ParseError,
    StreamHeader,
    Tokenizer,
)

STREAM_TAG = (
    b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns:db='jabber:server:dialback' to='a.example' from='b.example' version='1.0'>"
)
HEADER = b"<?xml version='1.0'?>" + STREAM_TAG


def in_stanza(inner):
    return HEADER + b"<message to='a.example' from='b.example'>" + inner + b"</message>"


BILLION_LAUGHS = (
    b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
    + b"".join(
        b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10)
    )
    + b"]>"
    + STREAM_TAG
    + b"<message>&lol9;</message>"
)
EXTERNAL_ENTITY = (
    b"<?xml version='1.0'?><!DOCTYPE foo [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"
    + STREAM_TAG
    + b"<message><body>&xxe;</body></message>"
)

# (id, bytes, condition)
CATALOGUE = [
    # RFC 6120 §11.1 restricted XML
    ("billion-laughs", BILLION_LAUGHS, "restricted-xml"),
    ("external-entity", EXTERNAL_ENTITY, "restricted-xml"),
    ("doctype-before-header", b"<?xml version='1.0'?><!DOCTYPE stream:stream>" + STREAM_TAG, "restricted-xml"),
    ("doctype-without-declaration", b"<!DOCTYPE stream:stream>" + STREAM_TAG, "restricted-xml"),
    ("undefined-entity-in-text", in_stanza(b"<body>&foo;</body>"), "restricted-xml"),
    ("undefined-entity-in-attribute", HEADER + b"<message to='&foo;'/>", "restricted-xml"),
    ("comment-in-stanza", in_stanza(b"<!-- hi -->"), "restricted-xml"),
    ("comment-between-stanzas", HEADER + b"<message/><!-- hi --><message/>", "restricted-xml"),
    ("comment-before-header", b"<?xml version='1.0'?><!-- hi -->" + STREAM_TAG, "restricted-xml"),
    ("pi-in-stanza", in_stanza(b"<?php echo 1; ?>"), "restricted-xml"),
    ("pi-between-stanzas", HEADER + b"<?xml-stylesheet href='a'?>", "restricted-xml"),
    ("standalone-no", b"<?xml version='1.0' standalone='no'?>" + STREAM_TAG, "restricted-xml"),
    # RFC 6120 §4.9.3.22 / §11.6: only UTF-8, and only valid UTF-8
    ("encoding-iso-8859-1", b"<?xml version='1.0' encoding='ISO-8859-1'?>" + STREAM_TAG, "unsupported-encoding"),
    ("overlong-c0-80", in_stanza(b"<body>\xc0\x80</body>"), "unsupported-encoding"),
    ("overlong-e0-80-80", in_stanza(b"<body>\xe0\x80\x80</body>"), "unsupported-encoding"),
    ("overlong-f0-80-80-80", in_stanza(b"<body>\xf0\x80\x80\x80</body>"), "unsupported-encoding"),
    ("truncated-utf8-then-ascii", in_stanza(b"<body>\xe2\x82a</body>"), "unsupported-encoding"),
    ("encoded-surrogate-ed-a0-80", in_stanza(b"<body>\xed\xa0\x80</body>"), "unsupported-encoding"),
    ("beyond-u10ffff-f4-90", in_stanza(b"<body>\xf4\x90\x80\x80</body>"), "unsupported-encoding"),
    ("byte-ff-in-text", in_stanza(b"<body>\xff</body>"), "unsupported-encoding"),
    ("byte-fe-in-text", in_stanza(b"<body>\xfe</body>"), "unsupported-encoding"),
    ("byte-ff-in-attribute", HEADER + b"<message to='\xff'/>", "unsupported-encoding"),
    ("byte-ff-in-name", HEADER + b"<mess\xffage/>", "unsupported-encoding"),
    ("utf16-bom", b"\xff\xfe<\x00?\x00x\x00", "unsupported-encoding"),
    # XML 1.0 characters and references
    ("charref-nul", in_stanza(b"<body>&#0;</body>"), "not-well-formed"),
    ("charref-surrogate", in_stanza(b"<body>&#xD800;</body>"), "not-well-formed"),
    ("charref-beyond-unicode", in_stanza(b"<body>&#x110000;</body>"), "not-well-formed"),
    ("charref-escape-char", in_stanza(b"<body>&#x1b;</body>"), "not-well-formed"),
    ("charref-nul-in-attribute", HEADER + b"<message id='&#0;'/>", "not-well-formed"),
    ("charref-not-hex", in_stanza(b"<body>&#xZZ;</body>"), "not-well-formed"),
    ("bare-ampersand", in_stanza(b"<body>fish & chips</body>"), "not-well-formed"),
    ("control-01-in-text", in_stanza(b"<body>a\x01b</body>"), "not-well-formed"),
    ("control-1b-in-text", in_stanza(b"<body>a\x1bb</body>"), "not-well-formed"),
    ("control-01-in-attribute", HEADER + b"<message id='a\x01b'/>", "not-well-formed"),
    ("control-1b-in-attribute", HEADER + b"<message id='a\x1bb'/>", "not-well-formed"),
    ("nul-byte-in-text", in_stanza(b"<body>a\x00b</body>"), "not-well-formed"),
    ("noncharacter-fffe", in_stanza(b"<body>\xef\xbf\xbe</body>"), "not-well-formed"),
    ("cdata-end-in-text", in_stanza(b"<body>a]]>b</body>"), "not-well-formed"),
    # Namespaces in XML 1.0
    ("unbound-element-prefix", in_stanza(b"<p:x/>"), "not-well-formed"),
    ("unbound-top-level-prefix", HEADER + b"<foo:bar/>", "not-well-formed"),
    ("unbound-attribute-prefix", HEADER + b"<message p:x='1'/>", "not-well-formed"),
    ("redeclared-xml-prefix", HEADER + b"<message xmlns:xml='urn:other'/>", "not-well-formed"),
    ("declared-xmlns-prefix", HEADER + b"<message xmlns:xmlns='urn:other'/>", "not-well-formed"),
    (
        "other-prefix-bound-to-xml-namespace",
        HEADER + b"<message xmlns:x='http://www.w3.org/XML/1998/namespace'/>",
        "not-well-formed",
    ),
    ("empty-prefixed-namespace", HEADER + b"<message xmlns:p=''/>", "not-well-formed"),
    ("duplicate-attribute", HEADER + b"<message id='1' id='2'/>", "not-well-formed"),
    (
        "duplicate-attribute-after-ns-expansion",
        HEADER + b"<message xmlns:a='urn:same' xmlns:b='urn:same' a:x='1' b:x='2'/>",
        "not-well-formed",
    ),
    ("duplicate-namespace-declaration", HEADER + b"<message xmlns:a='urn:a' xmlns:a='urn:b'/>", "not-well-formed"),
    # Tags
    ("mismatched-end-tag", in_stanza(b"<body>hi</bodx>"), "not-well-formed"),
    ("unclosed-child", HEADER + b"<message><body></message>", "not-well-formed"),
    ("stream-end-inside-stanza", HEADER + b"<message><body>hi</stream:stream>", "not-well-formed"),
    (
        "new-stream-header-inside-stanza",
        HEADER + b"<message><stream:stream to='a.example' version='1.0'>",
        "not-well-formed",
    ),
    ("end-tag-without-start", HEADER + b"</message>", "not-well-formed"),
    ("lt-in-attribute-value", HEADER + b"<message to='a<b'/>", "not-well-formed"),
    ("unquoted-attribute", HEADER + b"<message to=a.example/>", "not-well-formed"),
    ("attribute-without-value", HEADER + b"<message checked/>", "not-well-formed"),
    ("no-space-between-attributes", HEADER + b"<message to='a'from='b'/>", "not-well-formed"),
    ("name-starting-with-digit", in_stanza(b"<1x/>"), "not-well-formed"),
    ("two-colons-in-name", HEADER + b"<message xmlns:a='urn:a'><a:b:c/></message>", "not-well-formed"),
    ("text-at-top-level", HEADER + b"hello<message/>", "not-well-formed"),
    ("cdata-at-top-level", HEADER + b"<![CDATA[x]]>", "not-well-formed"),
    ("data-after-stream-end", HEADER + b"</stream:stream><message/>", "not-well-formed"),
    ("whitespace-before-declaration", b" " + HEADER, "not-well-formed"),
    # RFC 6120 §4.8.1 / §4.8.5 stream namespace and prefixes
    (
        "wrong-stream-namespace",
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://example.com/streams' to='a.example'>",
        "invalid-namespace",
    ),
    ("stream-prefix-foo", b"<foo:stream xmlns='jabber:server' xmlns:foo='http://etherx.jabber.org/streams'>", "bad-namespace-prefix"),
    (
        "prefixed-jabber-server-stanza",
        HEADER + b"<x:message xmlns:x='jabber:server' to='a.example'/>",
        "bad-namespace-prefix",
    ),
    # RFC 6120 §4.9.3.14 limits
    ("nesting-bomb", in_stanza(b"<a>" * (DEFAULT_MAX_DEPTH + 1)), "policy-violation"),
    (
        "attribute-bomb",
        HEADER + b"<message" + b"".join(b" a%d='x'" % i for i in range(DEFAULT_MAX_ATTRIBUTES + 1)) + b"/>",
        "policy-violation",
    ),
    ("very-long-element-name", in_stanza(b"<" + b"n" * (DEFAULT_MAX_NAME_LENGTH + 1) + b"/>"), "policy-violation"),
    (
        "very-long-attribute-name",
        HEADER + b"<message " + b"n" * (DEFAULT_MAX_NAME_LENGTH + 1) + b"='1'/>",
        "policy-violation",
    ),
    (
        "very-long-attribute-value",
        HEADER + b"<message id='" + b"v" * (DEFAULT_MAX_ATTRIBUTE_VALUE_LENGTH + 1) + b"'/>",
        "policy-violation",
    ),
    ("stanza-over-default-limit", in_stanza(b"<body>" + b"x" * DEFAULT_MAX_STANZA_BYTES + b"</body>"), "policy-violation"),
]


@pytest.mark.parametrize(("data", "condition"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_catalogue_in_one_feed(data, condition):
    with pytest.raises(ParseError) as info:
        Tokenizer().feed(data)
    assert info.value.condition == condition, info.value.text


@pytest.mark.parametrize(("data", "condition"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_catalogue_byte_by_byte(data, condition, drive):
    # Same verdict when every byte arrives in its own read (the state survives between reads);
    # the few huge cases go in 1000-byte reads to keep the suite fast.
    step = 1 if len(data) < 20000 else 1000
    _, err = drive(Tokenizer(), [data[i : i + step] for i in range(0, len(data), step)], via="buffer")
    assert err is not None, "accepted"
    assert err.condition == condition, err.text


@pytest.mark.parametrize(
    ("data", "marker"),
    [
        (in_stanza(b"<body>ab\xffcd</body>"), b"\xff"),
        (in_stanza(b"<body>ab\x01cd</body>"), b"\x01"),
        (HEADER + b"<message to='a<b'/>", b"<b'"),
        (HEADER + b"   hello", b"hello"),
        (HEADER + b"<message/><!-- x -->", b"<!--"),
    ],
    ids=["invalid-utf8", "control-char", "lt-in-attribute", "top-level-text", "comment"],
)
def test_error_offset_points_at_the_offending_byte(data, marker):
    with pytest.raises(ParseError) as info:
        Tokenizer().feed(data)
    assert info.value.offset == data.index(marker)
    assert str(info.value.offset) in info.value.text


def test_error_offset_counts_across_reads_and_compactions(drive):
    tokenizer = Tokenizer()
    good = b"<message to='a.example'><body>" + b"x" * 5000 + b"</body></message>"
    stream = HEADER + good * 20 + b"<message>\x02</message>"
    _, err = drive(tokenizer, [stream[i : i + 1000] for i in range(0, len(stream), 1000)], via="buffer")
    assert err.condition == "not-well-formed"
    assert err.offset == stream.index(b"\x02")
    assert str(err.offset) in err.text


def test_tokenizer_stays_dead_after_an_error():
    tokenizer = Tokenizer()
    with pytest.raises(ParseError) as first:
        tokenizer.feed(HEADER + b"<message>&bogus;</message>")
    for retry in (
        lambda: tokenizer.feed(b"<message/>"),
        lambda: tokenizer.feed(b""),
        lambda: tokenizer.buffer_updated(0),
    ):
        with pytest.raises(ParseError) as again:
            retry()
        assert (again.value.condition, again.value.offset) == (first.value.condition, first.value.offset)
    # A BufferedProtocol may still ask for a buffer while it is torn down.
    assert len(tokenizer.get_buffer(10)) >= 10


def test_events_completed_before_the_error_are_on_the_error():
    good = b"<message to='a.example' id='good'><body>ok</body></message>"
    tokenizer = Tokenizer()
    with pytest.raises(ParseError) as info:
        tokenizer.feed(HEADER + good + b"<message id='bad'><!-- x --></message>")
    header, element = info.value.events
    assert isinstance(header, StreamHeader) and header.to == "a.example"
    assert isinstance(element, Element) and element.id == "good"
    assert bytes(tokenizer.buffer[element.start : element.end]) == good


def test_error_events_exclude_the_bad_element():
    tokenizer = Tokenizer()
    tokenizer.feed(HEADER)
    with pytest.raises(ParseError) as info:
        tokenizer.feed(b"<message id='bad'>\x01</message>")
    assert info.value.events == []


@pytest.mark.parametrize("chunk", [1, 100, 999])
def test_oversize_stanza_fails_as_soon_as_limit_is_crossed(chunk):
    # The stanza never ends: the tokenizer must not wait for its end tag.
    limit = 10000
    tokenizer = Tokenizer(max_stanza_bytes=limit)
    tokenizer.feed(HEADER)
    stanza = b"<message><body>" + b"x" * (3 * limit)
    sent = 0
    with pytest.raises(ParseError) as info:
        while sent < len(stanza):
            tokenizer.feed(stanza[sent : sent + chunk])
            sent += chunk
    assert info.value.condition == "policy-violation"
    assert sent <= limit < sent + chunk, "must fail in the read that crosses the limit"
    assert info.value.offset == len(HEADER) + limit
    assert str(limit) in info.value.text


def test_stanza_of_exactly_the_limit_passes():
    limit = 10000
    stanza = b"<message><body>" + b"x" * (limit - len(b"<message><body></body></message>")) + b"</body></message>"
    assert len(stanza) == limit
    tokenizer = Tokenizer(max_stanza_bytes=limit)
    header, element = tokenizer.feed(HEADER + stanza)
    assert element.end - element.start == limit
    with pytest.raises(ParseError) as info:
        Tokenizer(max_stanza_bytes=limit).feed(HEADER + stanza.replace(b"<body>", b"<body>x"))
    assert info.value.condition == "policy-violation"


def test_max_stanza_bytes_is_writable_at_runtime():
    # Small before authentication, raised afterwards.
    big = b"<message><body>" + b"x" * 20000 + b"</body></message>"
    tokenizer = Tokenizer(max_stanza_bytes=10000)
    tokenizer.feed(HEADER)
    tokenizer.max_stanza_bytes = 100000
    assert [e.name for e in tokenizer.feed(big)] == ["message"]
    tokenizer.max_stanza_bytes = 10000
    with pytest.raises(ParseError) as info:
        tokenizer.feed(big)
    assert info.value.condition == "policy-violation"


# A header small enough for tight limits: one attribute, a 13-byte name, a 32-byte value.
TINY_HEADER = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"


@pytest.mark.parametrize(
    ("limits", "ok", "too_much"),
    [
        ({"max_depth": 3}, b"<message><a><b/></a></message>", b"<message><a><b><c/></b></a></message>"),
        ({"max_attributes": 2}, b"<message to='a' id='1'/>", b"<message to='a' id='1' type='chat'/>"),
        ({"max_name_length": 13}, b"<message><abcdefghijklm/></message>", b"<message><abcdefghijklmn/></message>"),
        ({"max_attribute_value_length": 32}, b"<message id='%s'/>" % (b"v" * 32), b"<message id='%s'/>" % (b"v" * 33)),
    ],
    ids=["depth", "attributes", "name-length", "attribute-value-length"],
)
def test_limits_are_exact(limits, ok, too_much):
    # The limits count nesting below the stream element, attributes per element (declarations included),
    # bytes per qualified name and raw bytes per attribute value.
    assert [type(e) for e in Tokenizer(**limits).feed(TINY_HEADER + ok)] == [StreamHeader, Element]
    with pytest.raises(ParseError) as info:
        Tokenizer(**limits).feed(TINY_HEADER + too_much)
    assert info.value.condition == "policy-violation"
    assert info.value.text


def test_standalone_yes_is_also_refused():
    with pytest.raises(ParseError) as info:
        Tokenizer().feed(b"<?xml version='1.0' standalone='yes'?>" + STREAM_TAG)
    assert info.value.condition == "restricted-xml"


@pytest.mark.parametrize("encoding", [b"UTF-8", b"utf-8"])
def test_utf8_encoding_declaration_is_accepted(encoding):
    (header,) = Tokenizer().feed(b"<?xml version='1.0' encoding='" + encoding + b"'?>" + STREAM_TAG)
    assert isinstance(header, StreamHeader)
