"""Differential tests: the tokenizer against lxml (libxml2), the oracle named in DESIGN.md.

On valid streams both must find the same top-level elements: each tokenizer
range, re-parsed by lxml inside the stream header's context, must give the
element lxml found in the whole stream (compared serialised), with the
same name, namespace, prefix and routing attributes. On XML-invalid input both
reject. Where XMPP is stricter than XML (RFC 6120 §11) lxml accepts and the
tokenizer must reject: those cases are listed explicitly.
"""

import pytest
from lxml import etree

from router._fastparse import XML_NS, Element, ParseError, StreamEnd, StreamHeader, Tokenizer

STREAM_NS = "http://etherx.jabber.org/streams"
PREFIXED_HEADER = (
    b"<?xml version='1.0'?>"
    b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns:db='jabber:server:dialback' to='a.example' from='b.example' version='1.0' xml:lang='en'>"
)
PREFIX_FREE_HEADER = (
    b"<stream xmlns='http://etherx.jabber.org/streams' to='a.example' from='b.example' version=\"1.0\">"
)

STANZAS = [
    b"<message to='a.example' from='b.example' type='chat' id='m1'><body>hello</body></message>",
    b"<message to='x@a.example/r' from='y@b.example' id='e1'><body>a &lt; b &amp;&amp; c &gt; d "
    b"&quot;q&quot; &apos;s&apos; &#233;&#xE9;&#x1F600;</body></message>",
    b"<message to='a.example' from='b.example'><body>\xc3\xa9t\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 "
    b"\xf0\x9f\x98\x80 \xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82</body></message>",
    b"<message to='a&amp;b.example' from='&#98;.example' id='&lt;1&gt;'/>",
    b'<message to="a.example" from=\'b.example\' id="it\'s"><body>mixed quotes</body></message>',
    b"<message  to = 'a.example'\n\tfrom='b.example' ><body >spaces</body ></message >",
    b"<message xml:lang='de' to='a.example'><body xml:lang='fr'>bonjour</body></message>",
    b"<message to='a.example'><body><![CDATA[<not> &a; tag ]] ]>]]></body></message>",
    b"<message to='a.example'><html xmlns='http://jabber.org/protocol/xhtml-im'>"
    b"<body xmlns='http://www.w3.org/1999/xhtml'><p style='font-weight:bold'>hi <em>there</em><br/></p>"
    b"</body></html></message>",
    b"<message to='a.example'><x:data xmlns:x='urn:example:x' x:attr='1' attr='2'><x:item/></x:data>"
    b"</message>",
    b"<presence from='b.example' to='a.example'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
    b"node='http://example.org' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/></presence>",
    b"<iq type='get' id='p1' to='a.example' from='b.example'><ping xmlns='urn:xmpp:ping'/></iq>",
    b"<iq type='result' id='v1'><vCard xmlns='vcard-temp'><FN>A\r\nB</FN></vCard></iq>",
    b"<db:result from='b.example' to='a.example'>b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3</db:result>",
    b"<db:verify from='a.example' to='b.example' id='417GAF25' type='valid'/>",
    b"<message xmlns='jabber:server' to='a.example'><body>own default namespace</body></message>",
    b"<message to='a.example'><thread xmlns:p='urn:p' p:parent='1'>t</thread><p:q xmlns:p='urn:other'/></message>",
    b"<message to='a.example'><body>tabs\tand\nnewlines\r\nand &#x9;&#10;&#13;refs</body></message>",
    b"<message to='a.example'><body>&#x10FFFF;&#xFFFD;\xef\xbf\xbd\xf4\x8f\xbf\xbf</body></message>",
    b"<message to='a.example'><body>gt > alone and ] and ]] and ]>x</body></message>",
    b"<message to='a.example'><\xc3\xa9l\xc3\xa9ment xmlns='urn:u' \xc3\xa0ttr='v'>x</\xc3\xa9l\xc3\xa9ment></message>",
    b"<message to='a.example'><a><b><c><d><e><f>deep</f></e></d></c></b></a></message>",
    b"<stream:features><bidi xmlns='urn:xmpp:features:bidi'/></stream:features>",
    b"<message to='a.example' xmlns:xml='http://www.w3.org/XML/1998/namespace'/>",
]


def lxml_top_level(stream):
    """Top-level elements lxml finds in a whole stream: (tag, prefix, attrib, serialised bytes)."""
    parser = etree.XMLPullParser(events=("start", "end"), resolve_entities=False, no_network=True)
    parser.feed(stream)
    parser.close()
    found, depth = [], 0
    for action, element in parser.read_events():
        depth += 1 if action == "start" else -1
        if action == "end" and depth == 1:
            found.append((element.tag, element.prefix, dict(element.attrib), canonical(element)))
    return found


def canonical(element):
    # Plain serialisation: C14N refuses relative namespace URIs such as 'vcard-temp'.
    return etree.tostring(element, with_tail=False)


def reparse_in_context(header_bytes, header, raw):
    """lxml's reading of a tokenizer range placed inside its own stream header."""
    closing = b"</stream:stream>" if header.prefix else b"</stream>"
    root = etree.fromstring(header_bytes + raw + closing, etree.XMLParser(resolve_entities=False, no_network=True))
    (child,) = root
    return child


def local(tag):
    return tag.rpartition("}")[2]


def namespace(tag):
    return tag[1:].partition("}")[0] if tag.startswith("{") else ""


def assert_same_as_lxml(stream, pairs):
    header_event, header_raw = pairs[0]
    assert isinstance(header_event, StreamHeader)
    assert isinstance(pairs[-1][0], StreamEnd)
    elements = [(e, raw) for e, raw in pairs if isinstance(e, Element)]
    expected = lxml_top_level(stream)
    assert len(elements) == len(expected)
    for (event, raw), (tag, prefix, attrib, serialised) in zip(elements, expected):
        assert raw[:1] == b"<" and raw[-1:] == b">"
        assert canonical(reparse_in_context(header_raw, header_event, raw)) == serialised
        assert (event.name, event.ns, event.prefix) == (local(tag), namespace(tag), prefix)
        assert (event.to, event.from_, event.type, event.id, event.lang) == (
            attrib.get("to"),
            attrib.get("from"),
            attrib.get("type"),
            attrib.get("id"),
            attrib.get(f"{{{XML_NS}}}lang"),
        )


@pytest.mark.parametrize("header", [PREFIXED_HEADER, PREFIX_FREE_HEADER], ids=["prefixed", "prefix-free"])
@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_valid_stream_matches_lxml(header, chunk, drive):
    stanzas = [s for s in STANZAS if header is PREFIXED_HEADER or not s.startswith((b"<db:", b"<stream:"))]
    if header is PREFIX_FREE_HEADER:
        # RFC 6120 §4.8.2 prefix-free style: every stanza declares jabber:server itself.
        stanzas = [s if b"xmlns='jabber:server'" in s else s.replace(b" ", b" xmlns='jabber:server' ", 1) for s in stanzas]
    stream = header + b" \n".join(stanzas) + (b"</stream:stream>" if header is PREFIXED_HEADER else b"</stream>")
    chunks = [stream] if chunk is None else [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    pairs, err = drive(Tokenizer(), chunks, via="buffer")
    assert err is None, err.text
    assert_same_as_lxml(stream, pairs)


@pytest.mark.parametrize("stanza", STANZAS, ids=range(len(STANZAS)))
def test_each_stanza_alone_matches_lxml(stanza, drive):
    stream = PREFIXED_HEADER + stanza + b"</stream:stream>"
    pairs, err = drive(Tokenizer(), [stream])
    assert err is None, err.text
    assert_same_as_lxml(stream, pairs)


# XML-level errors: libxml2 and the tokenizer must both refuse them.
XML_INVALID = {
    "mismatched-end": b"<message><body></bodx></message>",
    "unclosed-child": b"<message><body></message>",
    "duplicate-attribute": b"<message id='1' id='2'/>",
    "duplicate-expanded-attribute": b"<message xmlns:a='urn:u' xmlns:b='urn:u' a:x='1' b:x='2'/>",
    "unbound-prefix": b"<message><p:x/></message>",
    "unbound-attribute-prefix": b"<message p:x='1'/>",
    "xml-prefix-rebound": b"<message xmlns:xml='urn:x'/>",
    "xmlns-prefix-declared": b"<message xmlns:xmlns='urn:x'/>",
    "empty-prefixed-namespace": b"<message xmlns:p=''/>",
    "lt-in-attribute": b"<message id='a<b'/>",
    "unquoted-attribute": b"<message id=1/>",
    "attribute-without-value": b"<message id/>",
    "no-space-between-attributes": b"<message id='1'to='a'/>",
    "bare-ampersand": b"<message><body>a & b</body></message>",
    "unterminated-reference": b"<message><body>&amp</body></message>",
    "charref-nul": b"<message><body>&#0;</body></message>",
    "charref-surrogate": b"<message><body>&#xDFFF;</body></message>",
    "charref-too-big": b"<message><body>&#x110000;</body></message>",
    "charref-empty": b"<message><body>&#;</body></message>",
    "charref-bad-digit": b"<message><body>&#12a;</body></message>",
    "control-char-text": b"<message><body>\x01</body></message>",
    "control-char-attribute": b"<message id='\x1b'/>",
    "noncharacter-ffff": b"<message><body>\xef\xbf\xbf</body></message>",
    "cdata-end-in-text": b"<message><body>]]></body></message>",
    "cdata-end-in-attribute-is-fine-but-lt-not": b"<message id=']]><'/>",
    "overlong-utf8": b"<message><body>\xc1\xbf</body></message>",
    "truncated-utf8": b"<message><body>\xe2\x82</body></message>",
    "surrogate-utf8": b"<message><body>\xed\xbf\xbf</body></message>",
    "invalid-lead-byte": b"<message><body>\xf8\x88\x80\x80\x80</body></message>",
    "continuation-without-lead": b"<message><body>\x80</body></message>",
    "name-starts-with-digit": b"<message><1a/></message>",
    "name-starts-with-dash": b"<message><-a/></message>",
    "double-colon-name": b"<message xmlns:a='urn:a'><a:b:c/></message>",
    "empty-local-name": b"<message xmlns:a='urn:a'><a:/></message>",
    "space-after-lt": b"< message/>",
    "attribute-in-end-tag": b"<message></message id='1'>",
    "slash-then-space": b"<message/ >",
    "bad-cdata-opener": b"<message><![CDAT[x]]></message>",
    "stream-end-inside-stanza": b"<message></stream:stream>",
}


@pytest.mark.parametrize("stanza", XML_INVALID.values(), ids=XML_INVALID.keys())
def test_xml_invalid_input_is_rejected_by_both(stanza):
    stream = PREFIXED_HEADER + stanza + b"</stream:stream>"
    with pytest.raises(etree.XMLSyntaxError):
        lxml_top_level(stream)
    with pytest.raises(ParseError):
        Tokenizer().feed(stream)


# RFC 6120 forbids what XML allows: lxml accepts these, the tokenizer must refuse them.
XMPP_STRICTER = {
    "comment": (PREFIXED_HEADER + b"<message><!-- c --></message>", "restricted-xml"),
    "processing-instruction": (PREFIXED_HEADER + b"<message><?pi x?></message>", "restricted-xml"),
    "doctype": (b"<!DOCTYPE stream:stream>" + PREFIXED_HEADER[21:], "restricted-xml"),
    "internal-entity": (
        b"<!DOCTYPE stream:stream [<!ENTITY e 'x'>]>" + PREFIXED_HEADER[21:] + b"<message>&e;</message>",
        "restricted-xml",
    ),
    "standalone": (b"<?xml version='1.0' standalone='no'?>" + PREFIXED_HEADER[21:], "restricted-xml"),
    "iso-8859-1": (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + PREFIXED_HEADER[21:], "unsupported-encoding"),
    "top-level-text": (PREFIXED_HEADER + b"hello<message/>", "not-well-formed"),
    "stream-element-inside-stanza": (
        PREFIXED_HEADER + b"<message><stream:stream to='x'></stream:stream></message>",
        "not-well-formed",
    ),
    "prefixed-jabber-server": (PREFIXED_HEADER + b"<x:message xmlns:x='jabber:server'/>", "bad-namespace-prefix"),
    "stream-prefix-not-stream": (
        b"<s:stream xmlns='jabber:server' xmlns:s='http://etherx.jabber.org/streams'>",
        "bad-namespace-prefix",
    ),
    "wrong-stream-namespace": (
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams2'>",
        "invalid-namespace",
    ),
}


@pytest.mark.parametrize(("stream", "condition"), XMPP_STRICTER.values(), ids=XMPP_STRICTER.keys())
def test_xmpp_forbids_what_lxml_accepts(stream, condition):
    closing = b"</s:stream>" if stream.startswith(b"<s:") else b"</stream:stream>"
    lxml_top_level(stream + closing)  # raises XMLSyntaxError if libxml2 refused it
    with pytest.raises(ParseError) as info:
        Tokenizer().feed(stream + closing)
    assert info.value.condition == condition, info.value.text


@pytest.mark.parametrize("uri", ["urn:\xc3\xbcn\xc3\xaf".encode("latin-1"), b"urn:a b", b"a%zz"], ids=["iri", "space", "bad-escape"])
def test_libxml2_refuses_non_uri_namespace_names(uri):
    # A libxml2 specific: Namespaces in XML has no constraint on URI syntax (expat, as used by
    # Prosody, accepts these), so the tokenizer accepts and forwards them; whoever parses such a
    # stanza with lxml must expect XMLSyntaxError.
    stanza = b"<message><x xmlns:p='" + uri + b"' p:a='1'/></message>"
    with pytest.raises(etree.XMLSyntaxError, match="is not a valid URI"):
        lxml_top_level(PREFIXED_HEADER + stanza + b"</stream:stream>")
    _, element = Tokenizer().feed(PREFIXED_HEADER + stanza)
    assert element.name == "message"


# Fields and flags lxml cannot check.


def test_prefixed_header_fields():
    (header,) = Tokenizer().feed(PREFIXED_HEADER)
    assert header.prefix == "stream"
    assert header.namespaces == {None: "jabber:server", "stream": STREAM_NS, "db": "jabber:server:dialback"}
    assert (header.to, header.from_, header.id, header.version, header.lang) == (
        "a.example",
        "b.example",
        None,
        "1.0",
        "en",
    )
    assert header.attributes["to"] == "a.example"
    assert header.attributes[f"{{{XML_NS}}}lang"] == "en"


def test_prefix_free_header_rfc6120_4_8_2(drive):
    stanza = b"<message xmlns='jabber:server' to='a.example' id='x'><body>hi</body></message>"
    pairs, err = drive(Tokenizer(), [PREFIX_FREE_HEADER + stanza + b"</stream>"])
    assert err is None
    (header, header_raw), (element, raw), (end, end_raw) = pairs
    assert header.prefix is None and header.namespaces == {None: STREAM_NS}
    assert header_raw == PREFIX_FREE_HEADER
    assert (element.name, element.ns, element.id, element.own_xmlns) == ("message", "jabber:server", "x", True)
    assert raw == stanza
    assert isinstance(end, StreamEnd) and end_raw == b"</stream>"


def test_header_range_excludes_xml_declaration(drive):
    pairs, _ = drive(Tokenizer(), [PREFIXED_HEADER])
    ((header, raw),) = pairs
    assert raw == PREFIXED_HEADER[len(b"<?xml version='1.0'?>") :]
    assert header.start == len(b"<?xml version='1.0'?>")


def test_whitespace_keepalives_are_not_events(drive):
    tokenizer = Tokenizer()
    tokenizer.feed(PREFIXED_HEADER)
    for keepalive in (b" ", b"\n", b"\r\n\t  "):
        assert tokenizer.feed(keepalive) == []
    pairs, err = drive(tokenizer, [b"<message id='1'/>", b"\n \n", b"<message id='2'/>  "])
    assert err is None
    assert [raw for _, raw in pairs] == [b"<message id='1'/>", b"<message id='2'/>"]


def test_stream_end_event(drive):
    pairs, err = drive(Tokenizer(), [PREFIXED_HEADER, b"<message/>", b"\n</stream:stream>"])
    assert err is None
    end, raw = pairs[-1]
    assert isinstance(end, StreamEnd) and raw == b"</stream:stream>"


def test_stanza_split_at_every_byte_gives_the_same_element(drive):
    stanza = STANZAS[1]
    for cut in range(1, len(stanza)):
        pairs, err = drive(Tokenizer(), [PREFIXED_HEADER + stanza[:cut], stanza[cut:]])
        assert err is None
        assert [raw for _, raw in pairs[1:]] == [stanza], cut


@pytest.mark.parametrize(
    ("stanza", "header_prefix"),
    [
        (b"<db:result from='b.example' to='a.example'>key</db:result>", True),
        (b"<message><stream:error/></message>", True),
        (b"<message><x db:attr='1' xmlns='urn:x'/></message>", True),
        (b"<result xmlns='jabber:server:dialback' from='b.example'>key</result>", False),
        (b"<d:result xmlns:d='jabber:server:dialback'>key</d:result>", False),
        (b"<message><p:x xmlns:p='urn:p'><p:y/></p:x></message>", False),
        (b"<message><db:x xmlns:db='urn:own'/></message>", False),
        (b"<message to='a.example'><body>plain</body></message>", False),
    ],
    ids=["db-result", "stream-prefix-inside", "db-attribute", "default-ns", "own-prefix", "own-nested-prefix",
         "redeclared-db", "plain"],
)
def test_header_prefix_flag(stanza, header_prefix):
    header, element = Tokenizer().feed(PREFIXED_HEADER + stanza)
    assert element.header_prefix is header_prefix


def test_dialback_element_fields():
    _, element = Tokenizer().feed(PREFIXED_HEADER + b"<db:result from='b.example' to='a.example'>k</db:result>")
    assert (element.name, element.ns, element.prefix) == ("result", "jabber:server:dialback", "db")
    assert (element.from_, element.to) == ("b.example", "a.example")


@pytest.mark.parametrize(
    ("stanza", "own_xmlns"),
    [
        (b"<message xmlns='jabber:server' to='a.example'/>", True),
        (b"<message to='a.example'/>", False),
        (b"<message to='a.example'><x xmlns='urn:x'/></message>", False),
    ],
    ids=["declares-default", "inherits-default", "child-declares"],
)
def test_own_xmlns_flag(stanza, own_xmlns):
    _, element = Tokenizer().feed(PREFIXED_HEADER + stanza)
    assert (element.ns, element.own_xmlns) == ("jabber:server", own_xmlns)


def test_attributes_are_decoded():
    _, element = Tokenizer().feed(
        PREFIXED_HEADER
        + b"<message to='a&amp;b' from='&#x63;&#100;&lt;&gt;&quot;&apos;' type=\"x\ty\" id='\xc3\xa9'/>"
    )
    assert element.to == "a&b"
    assert element.from_ == "cd<>\"'"
    assert element.type == "x y"  # attribute-value normalisation: a literal tab becomes a space
    assert element.id == "\xe9"


def test_xml_lang_on_stanza_only():
    _, with_lang, without = Tokenizer().feed(
        PREFIXED_HEADER + b"<message xml:lang='de'/><message><body xml:lang='fr'/></message>"
    )
    assert with_lang.lang == "de"
    assert without.lang is None  # inherited languages are the caller's business (RFC 6120 §4.7.4)
