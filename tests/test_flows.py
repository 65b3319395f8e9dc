"""Three S2S example conversations, byte for byte, run two ways.

`FLOW_BLOCKS` holds each conversation followed by its variants. Every line `PARTY@N: bytes`
is one write by PARTY on TCP connection N: C/S (O/R in the classic one) are the two ends of
the main connection, A/M authoritative servers reached over other connections.

* `EXTERNAL_BIDI`: STARTTLS, SASL EXTERNAL and bidi on one connection, stanzas both ways
  (XEP-0288 Example 3, errata fixed); variants: the stream errors of RFC 6120 §4.3.5,
  §8.1.2.2, §8.1.1.2 and §11.1, and EXTERNAL refused (XEP-0178 §3 step 11b);
* `DIALBACK_BIDI`: dialback on a bidi stream from a self-signed initiator, db:verify over
  separate connections, then reverse dialback for conference.montague.lit (XEP-0288
  Examples 4-5, XEP-0220 §2, real XEP-0185 keys); variants: unknown target, the
  authoritative server saying invalid or unreachable, an unsolicited result (XEP-0220 §3.1);
* `CLASSIC_DIALBACK`: the XEP-0220 example conversation (capulet.example -> montague.example,
  keys of XEP-0220 Examples 1 and 5): two connections, no TLS, a piggybacked sender
  (§2.6.1) and a return connection for errors (RFC 6120 §4.9.1.4); variants: unknown
  target, an error from the authoritative server, a prefix-free peer (RFC 6120 §9.2).

The two ways:

* literal: one `Session` plays one party and is fed the other party's bytes exactly as
  written here; what it writes must equal the conversation's bytes after parsing
  (attribute order and quote style aside; dialback keys and stream ids exactly);
* wired: both parties are `Session`s connected back to back (TLS simulated with
  certificates from router.trust.pki, dialback keys checked by a third session acting as the
  authoritative server over another wire) and must end with the same pairs.
"""

from __future__ import annotations


import pytest

from router.trust import pki
from router.negotiation import events as ev
from router.negotiation.pairs import Pair
from router.negotiation.session import Session
from test_negotiation_support import Player, Wire, canonical, config, pki_world, script  # noqa: F401

FLOW_BLOCKS = (
    """\
C@1: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='montague.lit' from='capulet.lit' xml:lang='en' version='1.0'>
S@1: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='65b30434afd7646699d077f7affcb2c120c48e18' from='montague.lit' to='capulet.lit' version='1.0'>
S@1: <stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><bidi xmlns='urn:xmpp:features:bidi'/></stream:features>
C@1: <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>
S@1: <proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>
C@1: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='montague.lit' from='capulet.lit' xml:lang='en' version='1.0'>
S@1: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a' from='montague.lit' to='capulet.lit' version='1.0'>
S@1: <stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms><bidi xmlns='urn:xmpp:features:bidi'/></stream:features>
C@1: <bidi xmlns='urn:xmpp:bidi'/>
C@1: <auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>Y2FwdWxldC5saXQ=</auth>
S@1: <success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>
C@1: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='montague.lit' from='capulet.lit' xml:lang='en' version='1.0'>
S@1: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='3f0c9a7d51e24b8e96d1c7a2b4e8f0d35a6c1b92' from='montague.lit' to='capulet.lit' version='1.0'>
S@1: <stream:features/>
C@1: <iq from='juliet@capulet.lit/balcony' to='montague.lit' type='get' id='8dfc70af'><ping xmlns='urn:xmpp:ping'/></iq>
S@1: <iq from='montague.lit' to='juliet@capulet.lit/balcony' type='result' id='8dfc70af'/>
S@1: <message from='romeo@montague.lit/orchard' to='juliet@capulet.lit' type='chat' id='r0m1' xml:lang='en'><body>Neither, fair saint, if either thee dislike.</body></message>
C@1: <message from='juliet@capulet.lit/balcony' to='romeo@montague.lit' type='chat' id='ju2ba41c' xml:lang='en'><body>Art thou not Romeo, and a Montague?</body></message>
C@1:  
C@1: </stream:stream>
S@1: </stream:stream>
""",
    """\
C@1: <message from='juliet@capulet.lit/balcony' to='romeo@montague.lit' type='chat'><body>early</body></message>
S@1: <stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>
C@1: <message from='romeo@montague.lit' to='nurse@montague.lit' type='chat'><body>spoof</body></message>
S@1: <stream:error><invalid-from xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>
C@1: <message from='juliet@capulet.lit/balcony'><body>Wherefore art thou?</body></message>
S@1: <stream:error><improper-addressing xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>
C@1: <message from='juliet@capulet.lit/balcony' to='tybalt@verona.lit'><body>relay me</body></message>
S@1: <stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>
C@1: <message from='juliet@capulet.lit/balcony' to='romeo@montague.lit'><!--x--><body>hi</body></message>
S@1: <stream:error><restricted-xml xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>
S@1: <failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>
""",
    """\
C@1: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='montague.lit' from='capulet.lit' xml:lang='en' version='1.0'>
S@1: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='65b30434afd7646699d077f7affcb2c120c48e18' from='montague.lit' to='capulet.lit' version='1.0'>
S@1: <stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback><bidi xmlns='urn:xmpp:features:bidi'/></stream:features>
C@1: <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>
S@1: <proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>
C@1: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='montague.lit' from='capulet.lit' xml:lang='en' version='1.0'>
S@1: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a' from='montague.lit' to='capulet.lit' version='1.0'>
S@1: <stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback><bidi xmlns='urn:xmpp:features:bidi'/></stream:features>
C@1: <bidi xmlns='urn:xmpp:bidi'/>
C@1: <db:result from='capulet.lit' to='montague.lit'>3388d61d1e7d79749d56c31dfadbb2d9dca69cb0ebc8d88748a83c18f27ae915</db:result>
S@2: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='capulet.lit' from='montague.lit' xml:lang='en' version='1.0'>
A@2: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='a83fd2c61e5b4d90e7c2' from='capulet.lit' to='montague.lit' version='1.0'>
A@2: <stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>
S@2: <db:verify from='montague.lit' to='capulet.lit' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a'>3388d61d1e7d79749d56c31dfadbb2d9dca69cb0ebc8d88748a83c18f27ae915</db:verify>
A@2: <db:verify from='capulet.lit' to='montague.lit' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a' type='valid'/>
S@2: </stream:stream>
A@2: </stream:stream>
S@1: <db:result from='montague.lit' to='capulet.lit' type='valid'/>
C@1: <iq from='juliet@capulet.lit/balcony' to='montague.lit' type='get' id='8dfc70af'><ping xmlns='urn:xmpp:ping'/></iq>
S@1: <iq from='montague.lit' to='juliet@capulet.lit/balcony' type='result' id='8dfc70af'/>
S@1: <db:result from='conference.montague.lit' to='capulet.lit'>21a6ad90105b239ca465925833f3ecc4c3f240325e428154bddaac53e179d839</db:result>
C@3: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='conference.montague.lit' from='capulet.lit' xml:lang='en' version='1.0'>
M@3: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' xml:lang='en' id='c41e99b07f2d3a6511d8' from='conference.montague.lit' to='capulet.lit' version='1.0'>
M@3: <stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>
C@3: <db:verify from='capulet.lit' to='conference.montague.lit' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a'>21a6ad90105b239ca465925833f3ecc4c3f240325e428154bddaac53e179d839</db:verify>
M@3: <db:verify from='conference.montague.lit' to='capulet.lit' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a' type='valid'/>
C@3: </stream:stream>
M@3: </stream:stream>
C@1: <db:result from='capulet.lit' to='conference.montague.lit' type='valid'/>
S@1: <message from='balcony@conference.montague.lit/romeo' to='juliet@capulet.lit/balcony' type='groupchat' id='g1'><body>O, she doth teach the torches to burn bright!</body></message>
C@1: <presence from='juliet@capulet.lit/balcony' to='balcony@conference.montague.lit/juliet' id='p1'/>
C@1: </stream:stream>
S@1: </stream:stream>
""",
    """\
C@1: <db:result from='capulet.lit' to='nonexistent.montague.lit'>0000</db:result>
S@1: <db:result from='nonexistent.montague.lit' to='capulet.lit' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>
A@2: <db:verify from='capulet.lit' to='montague.lit' id='b5cd769b1dc292c6f6557fe76cabc4d112333f9a' type='invalid'/>
S@1: <db:result from='montague.lit' to='capulet.lit' type='invalid'/>
S@1: </stream:stream>
S@1: <db:result from='montague.lit' to='capulet.lit' type='error'><error type='cancel'><remote-connection-failed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>
C@1: <db:result from='victim.example' to='montague.lit' type='valid'/>
""",
    """\
O@1: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='montague.example' from='capulet.example' version='1.0'>
R@1: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' id='D60000229F' from='montague.example' to='capulet.example' version='1.0' xml:lang='en'>
R@1: <stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>
O@1: <db:result from='capulet.example' to='montague.example'>b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3</db:result>
R@2: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='capulet.example' from='montague.example' version='1.0'>
A@2: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' id='kS29fGw4vQ71' from='capulet.example' to='montague.example' version='1.0' xml:lang='en'>
A@2: <stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>
R@2: <db:verify from='montague.example' id='D60000229F' to='capulet.example'>b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3</db:verify>
A@2: <db:verify from='capulet.example' id='D60000229F' to='montague.example' type='valid'/>
R@1: <db:result from='montague.example' to='capulet.example' type='valid'/>
O@1: <message from='juliet@capulet.example/balcony' id='ju2ba41c' to='romeo@montague.example' type='chat' xml:lang='en'><body>Art thou not Romeo, and a Montague?</body></message>
O@1: <db:result from='rooms.capulet.example' to='montague.example'>8acfc019f4065de59e88f08d4532376c61c8becf61ce78a25156e42fdbd0b69c</db:result>
O@1: <presence from='juliet@capulet.example/balcony' to='romeo@montague.example' id='pr1'/>
R@2: <db:verify from='montague.example' id='D60000229F' to='rooms.capulet.example'>8acfc019f4065de59e88f08d4532376c61c8becf61ce78a25156e42fdbd0b69c</db:verify>
A@2: <db:verify from='rooms.capulet.example' id='D60000229F' to='montague.example' type='valid'/>
R@2: </stream:stream>
A@2: </stream:stream>
R@1: <db:result from='montague.example' to='rooms.capulet.example' type='valid'/>
O@1: <message from='balcony@rooms.capulet.example/nurse' to='romeo@montague.example' type='groupchat' id='g7'><body>Anon, good nurse!</body></message>
R@3: <?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='capulet.example' from='montague.example' version='1.0'>
A@3: <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' id='417GAF25' from='capulet.example' to='montague.example' version='1.0' xml:lang='en'>
A@3: <stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>
R@3: <db:result from='montague.example' to='capulet.example'>225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d</db:result>
O@1: <db:verify from='capulet.example' id='417GAF25' to='montague.example'>225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d</db:verify>
R@1: <db:verify from='montague.example' id='417GAF25' to='capulet.example' type='valid'/>
A@3: <db:result from='capulet.example' to='montague.example' type='valid'/>
R@3: <message from='romeo@montague.example/orchard' id='r2' to='juliet@capulet.example/balcony' type='chat' xml:lang='en'><body>Neither, fair saint, if either thee dislike.</body></message>
R@3: <message from='romeo@montague.example' id='ju2ba41c' to='juliet@capulet.example/balcony' type='error'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>
""",
    """\
O@1: <db:result from='capulet.example' to='chat.montague.example'>74d66f15f64fb4d23e2e914a6db561f1f73e2d3e9af6021726b8585756bf98a3</db:result>
R@1: <db:result from='chat.montague.example' to='capulet.example' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>
A@2: <db:verify from='capulet.example' id='D60000229F' to='montague.example' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:verify>
R@1: <stream from='montague.example' id='D60000229F' to='capulet.example' version='1.0' xmlns='http://etherx.jabber.org/streams'>
R@1: <features xmlns='http://etherx.jabber.org/streams'><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></features>
R@1: <db:result xmlns:db='jabber:server:dialback' from='montague.example' to='capulet.example' type='valid'/>
""",
)

(EXTERNAL_BIDI, EXTERNAL_BIDI_VARIANTS, DIALBACK_BIDI, DIALBACK_BIDI_VARIANTS,
 CLASSIC_DIALBACK, CLASSIC_DIALBACK_VARIANTS) = FLOW_BLOCKS

CAPULET_SECRET = "s3cr3tf0rd14lb4ck"
MONTAGUE_SECRET = "d14lb4ck43v3r"
EXTERNAL_BIDI_IDS = ("65b30434afd7646699d077f7affcb2c120c48e18", "b5cd769b1dc292c6f6557fe76cabc4d112333f9a",
         "3f0c9a7d51e24b8e96d1c7a2b4e8f0d35a6c1b92")
KEY_BIDI_CAPULET = "3388d61d1e7d79749d56c31dfadbb2d9dca69cb0ebc8d88748a83c18f27ae915"
KEY_BIDI_CONFERENCE = "21a6ad90105b239ca465925833f3ecc4c3f240325e428154bddaac53e179d839"
KEY_CLASSIC_CAPULET = "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"
KEY_CLASSIC_ROOMS = "8acfc019f4065de59e88f08d4532376c61c8becf61ce78a25156e42fdbd0b69c"
KEY_CLASSIC_REVERSE = "225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d"


def ids(*values):
    iterator = iter(values)
    return lambda: next(iterator)


def test_vendored_vectors_match_the_spec_file():
    """FLOW_BLOCKS copies the conversations of the project's S2S notes, kept outside this
    repository (/work/shared/spec/flows.md); where that file exists, the copy must match it."""
    import re
    from pathlib import Path

    spec = Path("/work/shared/spec/flows.md")
    if not spec.exists():
        pytest.skip("the S2S notes (/work/shared/spec/flows.md) are not on this machine")
    blocks = re.findall(r"```\n(.*?)```", spec.read_text(), re.S)
    lines = ["\n".join(l for l in b.split("\n") if re.match(r"^[A-Z]@\d: ", l)) for b in blocks]
    assert tuple(block + "\n" for block in lines) == FLOW_BLOCKS


# ---------------------------------------------------------------- STARTTLS + SASL EXTERNAL + bidi


def montague_lit(leaves, ca, **overrides):
    options = dict(trust=[ca], bidi="always", dialback=False, required_flags=False)
    options.update(overrides)
    return config(["montague.lit"], MONTAGUE_SECRET, **options)


def capulet_lit(ca, **overrides):
    return config(["capulet.lit"], CAPULET_SECRET, trust=[ca], **overrides)


def test_external_bidi_receiver_literal(pki_world):
    ca, leaves = pki_world
    session = Session("receiver", montague_lit(leaves, ca), new_id=ids(*EXTERNAL_BIDI_IDS))
    writes = script(EXTERNAL_BIDI, 1)
    player = Player(session, writes, "S", peer_chain=[leaves["capulet.lit"].cert_der()])
    player.run()
    player.assert_wrote_expected()
    assert [e.direction for e in player.of(ev.Authenticated)] == ["inbound", "outbound"]
    assert set(session.inbound_pairs) == set(session.outbound_pairs) == {Pair("montague.lit", "capulet.lit")}
    stanzas = player.of(ev.Stanza)
    assert [s.element.name for s in stanzas] == ["iq", "message"]
    assert player.of(ev.PeerClosed) == [ev.PeerClosed(None, None)]


def test_external_bidi_initiator_literal(pki_world):
    ca, leaves = pki_world
    session = Session("initiator", capulet_lit(ca, bidi="always"), "capulet.lit", "montague.lit")
    writes = script(EXTERNAL_BIDI, 1)
    close_index = sum(1 for party, _ in writes if party == "C") - 1
    player = Player(session, writes, "C", peer_chain=[leaves["montague.lit"].cert_der()],
                    actions={close_index: lambda p: p.session.close()})
    player.run()
    player.assert_wrote_expected()
    assert set(session.outbound_pairs) == set(session.inbound_pairs) == {Pair("capulet.lit", "montague.lit")}
    assert [s.element.name for s in player.of(ev.Stanza)] == ["iq", "message"]


def _external_bidi_receiver_until(pki_world, marker: bytes, **overrides):
    """An EXTERNAL_BIDI receiver fed C's writes up to (excluding) the first one containing `marker`."""
    ca, leaves = pki_world
    session = Session("receiver", montague_lit(leaves, ca, **overrides), new_id=ids(*EXTERNAL_BIDI_IDS))
    writes = script(EXTERNAL_BIDI, 1)
    upto = next(i for i, (party, data) in enumerate(writes) if party == "C" and marker in data)
    return Player(session, writes, "S", peer_chain=[leaves["capulet.lit"].cert_der()]).run(upto)


def _variant(label: str) -> tuple[bytes, bytes]:
    """The (peer write, our expected answer) of a negative variant of EXTERNAL_BIDI."""
    lines = script(EXTERNAL_BIDI_VARIANTS, 1)
    labels = ["early-stanza", "spoofed-from", "no-to", "foreign-to", "comment", "external-refused"]
    if label == "external-refused":
        return b"", lines[-1][1]
    index = labels.index(label)
    return lines[2 * index][1], lines[2 * index + 1][1]


def _assert_closed_with(player, condition):
    closed = player.of(ev.Closed)
    assert [c.condition for c in closed] == [condition]
    assert closed[0].text  # every error says what was wrong


def test_external_bidi_stanza_before_sasl_is_not_authorized(pki_world):
    """RFC 6120 §4.3.5, §4.9.3.12."""
    player = _external_bidi_receiver_until(pki_world, b"<bidi")
    sent, answer = _variant("early-stanza")
    before = bytes(player.actual)
    player.feed(sent)
    assert canonical_tail(player.actual, before) == canonical_tail(answer)
    _assert_closed_with(player, "not-authorized")
    assert not player.of(ev.Stanza)


def canonical_tail(data: bytes, before: bytes = b"") -> list:
    """Canonical items of what was written after `before`, in a stream context of ours."""
    from test_negotiation_support import canonical

    header = (b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
              b"xmlns='jabber:server' xmlns:db='jabber:server:dialback'>")
    return canonical(header + bytes(data)[len(before):])[1:]


@pytest.mark.parametrize(
    "label, condition",
    [("spoofed-from", "invalid-from"), ("no-to", "improper-addressing"), ("foreign-to", "host-unknown"),
     ("comment", "restricted-xml")],
)
def test_external_bidi_variants_after_authentication(pki_world, label, condition):
    """Spoofed 'from' (RFC 6120 §8.1.2.2), no 'to' and a 'to' not served here (§8.1.1.2), a comment (§11.1)."""
    player = _external_bidi_receiver_until(pki_world, b"<iq ")
    assert set(player.session.inbound_pairs) == {Pair("montague.lit", "capulet.lit")}
    sent, answer = _variant(label)
    before = bytes(player.actual)
    player.feed(sent)
    assert canonical_tail(player.actual, before) == canonical_tail(answer)
    _assert_closed_with(player, condition)
    assert not player.of(ev.Stanza)


def test_external_bidi_certificate_for_another_name(pki_world):
    """XEP-0178 §3 step 11b: the certificate does not name 'from' -> <failure><not-authorized/>, the
    stream stays for dialback."""
    ca, leaves = pki_world
    session = Session("receiver", montague_lit(leaves, ca, dialback=True), new_id=ids(*EXTERNAL_BIDI_IDS))
    writes = script(EXTERNAL_BIDI, 1)
    upto = next(i for i, (party, data) in enumerate(writes) if party == "C" and b"<bidi" in data)
    wrong = pki.make_leaf(ca, "tybalt.lit")
    player = Player(session, writes, "S", peer_chain=[wrong.cert_der()]).run(upto)
    assert b"EXTERNAL" not in player.actual  # never offered for a certificate that does not match
    before = bytes(player.actual)
    player.feed(writes[upto + 1][1])  # the <auth/> (EXTERNAL, authzid capulet.lit)
    _, answer = _variant("external-refused")
    assert canonical_tail(player.actual, before) == canonical_tail(answer)
    assert not session.closed and not session.inbound_pairs


# ---------------------------------------------------------------- dialback on a bidi stream

DIALBACK_BIDI_IDS = ("65b30434afd7646699d077f7affcb2c120c48e18", "b5cd769b1dc292c6f6557fe76cabc4d112333f9a")
MONTAGUE_NETWORK = ["montague.lit", "conference.montague.lit"]


def montague_network(ca, **overrides):
    options = dict(trust=[ca], bidi="always", required_flags=False, bidi_reverse_dialback=True)
    options.update(overrides)
    return config(MONTAGUE_NETWORK, MONTAGUE_SECRET, **options)


def capulet_network(ca, **overrides):
    options = dict(trust=[ca], required_flags=False)
    options.update(overrides)
    return config(["capulet.lit"], CAPULET_SECRET, **options)


@pytest.fixture(scope="module")
def self_signed_capulet():
    return pki.make_leaf(None, "capulet.lit")


def _only(items):
    assert len(items) == 1, items
    return items[0]


def test_dialback_bidi_receiver_literal(pki_world, self_signed_capulet):
    ca, leaves = pki_world
    session = Session("receiver", montague_network(ca), new_id=ids(*DIALBACK_BIDI_IDS))

    def verified(player):
        key = _only(player.of(ev.VerifyKey))
        assert key == ev.VerifyKey(key.token, "montague.lit", "capulet.lit", DIALBACK_BIDI_IDS[1], KEY_BIDI_CAPULET)
        player.session.key_verified(key.token, "valid")

    def reverse_dialback(player):
        assert player.session.request_pair(Pair("conference.montague.lit", "capulet.lit"))

    player = Player(session, script(DIALBACK_BIDI, 1), "S", peer_chain=[self_signed_capulet.cert_der()],
                    actions={5: verified, 7: reverse_dialback})
    player.run()
    player.assert_wrote_expected()
    assert set(session.inbound_pairs) == set(session.outbound_pairs) == {
        Pair("montague.lit", "capulet.lit"), Pair("conference.montague.lit", "capulet.lit")}
    assert [s.element.name for s in player.of(ev.Stanza)] == ["iq", "presence"]
    assert not player.of(ev.Closed) and player.of(ev.PeerClosed)


def test_dialback_bidi_initiator_literal(pki_world, self_signed_capulet):
    ca, leaves = pki_world
    session = Session("initiator", capulet_network(ca, bidi="always"), "capulet.lit", "montague.lit")

    def verified(player):
        key = _only(player.of(ev.VerifyKey))
        # XEP-0288 §2.2 does not say which stream id keys reverse dialback: the only one on the
        # connection is the receiver's
        assert key == ev.VerifyKey(key.token, "capulet.lit", "conference.montague.lit", DIALBACK_BIDI_IDS[1],
                                   KEY_BIDI_CONFERENCE)
        player.session.key_verified(key.token, "valid")

    player = Player(session, script(DIALBACK_BIDI, 1), "C", peer_chain=[leaves["montague.lit"].cert_der()],
                    actions={6: verified, 8: lambda p: p.session.close()})
    player.run()
    player.assert_wrote_expected()  # includes our db:result with the exact key 3388d61d...
    assert set(session.outbound_pairs) == set(session.inbound_pairs) == {
        Pair("capulet.lit", "montague.lit"), Pair("capulet.lit", "conference.montague.lit")}
    assert [s.element.name for s in player.of(ev.Stanza)] == ["iq", "message"]


@pytest.mark.parametrize("connection", [2, 3])
def test_dialback_bidi_verify_connections_literal(pki_world, connection):
    """TCP#2 (S asks A about capulet.lit) and TCP#3 (C asks M about conference.montague.lit), both ends."""
    ca, _ = pki_world
    if connection == 2:
        asker, authority_party, asker_party = montague_network(ca), "A", "S"
        authority = config(["capulet.lit"], CAPULET_SECRET, bidi="encrypted", required_flags=False)
        request = ("montague.lit", "capulet.lit", DIALBACK_BIDI_IDS[1], KEY_BIDI_CAPULET)
        authority_id = "a83fd2c61e5b4d90e7c2"
    else:
        asker, authority_party, asker_party = capulet_network(ca), "M", "C"
        authority = config(MONTAGUE_NETWORK, MONTAGUE_SECRET, bidi="encrypted", required_flags=False)
        request = ("capulet.lit", "conference.montague.lit", DIALBACK_BIDI_IDS[1], KEY_BIDI_CONFERENCE)
        authority_id = "c41e99b07f2d3a6511d8"
    writes = script(DIALBACK_BIDI, connection)

    verifier = Session("initiator", asker, request[0], request[1], verify_only=True)
    verifier.request_verify("token-1", *request)
    player = Player(verifier, writes, asker_party, actions={2: lambda p: p.session.close()}).run()
    player.assert_wrote_expected()
    assert player.of(ev.VerifyResult) == [ev.VerifyResult("token-1", "valid")]

    answering = Player(Session("receiver", authority, new_id=ids(authority_id)), writes, authority_party).run()
    answering.assert_wrote_expected()
    assert not answering.session.inbound_pairs  # answering db:verify authorizes nothing


def _dialback_bidi_receiver_with_pending_key(pki_world, self_signed_capulet):
    ca, _ = pki_world
    session = Session("receiver", montague_network(ca), new_id=ids(*DIALBACK_BIDI_IDS))
    writes = script(DIALBACK_BIDI, 1)
    upto = next(i for i, (party, data) in enumerate(writes) if party == "S" and b"type='valid'" in data)
    return Player(session, writes, "S", peer_chain=[self_signed_capulet.cert_der()]).run(upto)


def test_dialback_bidi_unknown_target_gets_item_not_found_and_the_stream_stays(pki_world, self_signed_capulet):
    """XEP-0220 §2.2.1, §2.5."""
    variants = script(DIALBACK_BIDI_VARIANTS, 1)
    player = _dialback_bidi_receiver_with_pending_key(pki_world, self_signed_capulet)
    before = bytes(player.actual)
    player.feed(variants[0][1])
    assert canonical_tail(player.actual, before) == canonical_tail(variants[1][1])
    assert not player.session.closed


@pytest.mark.parametrize("result, expected_lines", [("invalid", (2, 3)), ("remote-connection-failed", (4,))])
def test_dialback_bidi_authoritative_answers(pki_world, self_signed_capulet, result, expected_lines):
    """The authoritative server says invalid on the only pair -> type='invalid' and close (XEP-0220
    §2.2.1); it cannot be reached -> a <remote-connection-failed/> dialback error (XEP-0220 §2.5)."""
    variants = script(DIALBACK_BIDI_VARIANTS, 1)
    player = _dialback_bidi_receiver_with_pending_key(pki_world, self_signed_capulet)
    key = _only(player.of(ev.VerifyKey))
    before = bytes(player.actual)
    player.session.key_verified(key.token, result)
    player.drain()
    expected = b"".join(variants[i][1] for i in expected_lines)
    assert canonical_tail(player.actual, before) == canonical_tail(expected)
    assert not player.session.inbound_pairs and not player.session.outbound_pairs
    assert player.session.closed == (result == "invalid")


def test_dialback_bidi_unsolicited_valid_result_is_rejected(pki_world, self_signed_capulet):
    """XEP-0220 §3.1, XEP-0288 §4 (the 2012 unsolicited-dialback vulnerability): a typed db:result
    nobody asked for must never open montague.lit -> victim.example."""
    variants = script(DIALBACK_BIDI_VARIANTS, 1)
    player = _dialback_bidi_receiver_with_pending_key(pki_world, self_signed_capulet)
    player.feed(variants[-1][1])
    _assert_closed_with(player, "not-authorized")
    assert ("montague.lit", "victim.example") not in player.session.outbound_pairs
    assert not any(e.direction == "outbound" for e in player.of(ev.Authenticated))


# ---------------------------------------------------------------- classic dialback, piggybacking (XEP-0220 example)

CAPULET_EXAMPLE = ["capulet.example", "rooms.capulet.example"]


def montague_example(**overrides):
    options = dict(tls_offered=False, bidi="off", required_flags=False)
    options.update(overrides)
    return config(["montague.example"], MONTAGUE_SECRET, **options)


def capulet_example(**overrides):
    options = dict(tls_offered=False, bidi="off", required_flags=False)
    options.update(overrides)
    return config(CAPULET_EXAMPLE, CAPULET_SECRET, **options)


def test_classic_dialback_receiver_literal():
    session = Session("receiver", montague_example(), new_id=ids("D60000229F"))
    keys = iter([("capulet.example", KEY_CLASSIC_CAPULET), ("rooms.capulet.example", KEY_CLASSIC_ROOMS)])

    def verified(player):
        originating, key = next(keys)
        event = player.of(ev.VerifyKey)[-1]
        assert event == ev.VerifyKey(event.token, "montague.example", originating, "D60000229F", key)
        player.session.key_verified(event.token, "valid")

    player = Player(session, script(CLASSIC_DIALBACK, 1), "R", actions={2: verified, 3: verified}).run()
    player.assert_wrote_expected()  # includes answering O's db:verify for 417GAF25 as valid
    assert set(session.inbound_pairs) == {Pair("montague.example", "capulet.example"),
                                          Pair("montague.example", "rooms.capulet.example")}
    assert not session.outbound_pairs  # no bidi: R must open its own connection (TCP#3)
    assert [s.element.name for s in player.of(ev.Stanza)] == ["message", "presence", "message"]


def test_classic_dialback_initiator_literal():
    session = Session("initiator", capulet_example(), "capulet.example", "montague.example")
    player = Player(
        session, script(CLASSIC_DIALBACK, 1), "O",
        actions={
            3: lambda p: p.session.request_pair(Pair("rooms.capulet.example", "montague.example")),
            6: lambda p: p.session.request_verify("tcp3", "capulet.example", "montague.example", "417GAF25",
                                                  KEY_CLASSIC_REVERSE),
        },
    ).run()
    player.assert_wrote_expected()  # keys b4835385... and 8acfc019... computed from D60000229F exactly
    assert set(session.outbound_pairs) == {("capulet.example", "montague.example"), ("rooms.capulet.example", "montague.example")}
    assert not session.inbound_pairs
    assert player.of(ev.VerifyResult) == [ev.VerifyResult("tcp3", "valid")]


def test_classic_dialback_verify_connection_literal():
    writes = script(CLASSIC_DIALBACK, 2)
    verifier = Session("initiator", montague_example(), "montague.example", "capulet.example", verify_only=True)
    verifier.request_verify(1, "montague.example", "capulet.example", "D60000229F", KEY_CLASSIC_CAPULET)
    player = Player(verifier, writes, "R", actions={
        2: lambda p: p.session.request_verify(2, "montague.example", "rooms.capulet.example", "D60000229F", KEY_CLASSIC_ROOMS),
        3: lambda p: p.session.close(),
    }).run()
    player.assert_wrote_expected()
    assert player.of(ev.VerifyResult) == [ev.VerifyResult(1, "valid"), ev.VerifyResult(2, "valid")]

    authority = Player(Session("receiver", capulet_example(), new_id=ids("kS29fGw4vQ71")), writes, "A").run()
    authority.assert_wrote_expected()


def test_classic_dialback_reverse_connection_literal():
    writes = script(CLASSIC_DIALBACK, 3)
    initiator = Player(Session("initiator", montague_example(), "montague.example", "capulet.example"), writes, "R").run()
    initiator.assert_wrote_expected()  # db:result key 225cc5aa... (XEP-0220 Ex. 5) from stream id 417GAF25
    assert set(initiator.session.outbound_pairs) == {("montague.example", "capulet.example")}

    def verified(player):
        event = _only(player.of(ev.VerifyKey))
        assert event == ev.VerifyKey(event.token, "capulet.example", "montague.example", "417GAF25", KEY_CLASSIC_REVERSE)
        player.session.key_verified(event.token, "valid")

    receiver = Player(Session("receiver", capulet_example(), new_id=ids("417GAF25")), writes, "A",
                      actions={2: verified}).run()
    receiver.assert_wrote_expected()
    assert set(receiver.session.inbound_pairs) == {Pair("capulet.example", "montague.example")}


def test_classic_dialback_unknown_target_gets_item_not_found():
    """XEP-0220 §2.2.1: a dialback error, the stream stays and nobody is asked."""
    variants = script(CLASSIC_DIALBACK_VARIANTS, 1)
    session = Session("receiver", montague_example(), new_id=ids("D60000229F"))
    player = Player(session, script(CLASSIC_DIALBACK, 1), "R").run(upto=3)
    before = bytes(player.actual)
    player.feed(variants[0][1])
    assert canonical_tail(player.actual, before) == canonical_tail(variants[1][1])
    assert not session.closed and not player.of(ev.VerifyKey)


def test_classic_dialback_authoritative_server_answers_with_an_error():
    """XEP-0220 §2.2.2 (Example 8): the error reaches the verification that asked."""
    verifier = Session("initiator", montague_example(), "montague.example", "capulet.example", verify_only=True)
    verifier.request_verify("t", "montague.example", "capulet.example", "D60000229F", KEY_CLASSIC_CAPULET)
    writes = [w for w in script(CLASSIC_DIALBACK, 2) if b"type='valid'" not in w[1]][:4]
    player = Player(verifier, writes, "R").run()
    player.feed(script(CLASSIC_DIALBACK_VARIANTS, 2)[0][1])
    assert player.of(ev.VerifyResult) == [ev.VerifyResult("t", "item-not-found")]
    assert not verifier.closed


def test_classic_dialback_prefix_free_peer():
    """The receiving server writes prefix-free (RFC 6120 §9.2); its db: prefix is declared inline."""
    session = Session("initiator", capulet_example(), "capulet.example", "montague.example")
    player = Player(session, [], "O")
    for _, data in script(CLASSIC_DIALBACK_VARIANTS, 1)[2:]:
        player.feed(data)
    written = canonical(player.actual)
    assert written[0][0] == "header"
    assert written[1:] == canonical_tail(
        f"<db:result from='capulet.example' to='montague.example'>{KEY_CLASSIC_CAPULET}</db:result>".encode()
    )
    assert set(session.outbound_pairs) == {("capulet.example", "montague.example")}
    assert not session.closed


# ---------------------------------------------------------------- wired: both ends are Sessions


def _chain(credential):
    return (credential.cert_der(),)


def test_external_bidi_wired_ends_with_the_same_pairs(pki_world):
    ca, leaves = pki_world
    initiator = Session("initiator", config(["capulet.lit"], CAPULET_SECRET, trust=[ca]), "capulet.lit", "montague.lit")
    receiver = Session("receiver", config(["montague.lit"], MONTAGUE_SECRET, trust=[ca]))
    wire = Wire(initiator, receiver, _chain(leaves["capulet.lit"]), _chain(leaves["montague.lit"]))
    wire.pump()
    assert initiator.encrypted and receiver.encrypted and initiator.bidi and receiver.bidi
    # each side names a pair (its own domain, the peer's); with bidi it carries it both ways
    assert set(initiator.outbound_pairs) == set(initiator.inbound_pairs) == {Pair("capulet.lit", "montague.lit")}
    assert set(receiver.inbound_pairs) == set(receiver.outbound_pairs) == {Pair("montague.lit", "capulet.lit")}
    assert {e.mechanism for e in wire.of("i", ev.Authenticated) + wire.of("r", ev.Authenticated)} == {"EXTERNAL"}
    receiver.receive_data(b"<message from='juliet@capulet.lit/balcony' to='romeo@montague.lit'><body>a</body></message>")
    initiator.receive_data(b"<message from='romeo@montague.lit/orchard' to='juliet@capulet.lit'><body>b</body></message>")
    wire.pump()
    assert len(wire.of("r", ev.Stanza)) == len(wire.of("i", ev.Stanza)) == 1
    assert not wire.of("i", ev.Closed) and not wire.of("r", ev.Closed)


def test_dialback_bidi_wired_with_reverse_dialback(pki_world, self_signed_capulet):
    ca, leaves = pki_world
    capulet = config(["capulet.lit"], CAPULET_SECRET, trust=[ca])
    montague = config(MONTAGUE_NETWORK, MONTAGUE_SECRET, trust=[ca], bidi_reverse_dialback=True)
    initiator = Session("initiator", capulet, "capulet.lit", "montague.lit")
    receiver = Session("receiver", montague)
    wire = Wire(initiator, receiver, _chain(self_signed_capulet), _chain(leaves["montague.lit"]))
    wire.pump()
    assert not initiator.outbound_pairs  # waiting for the authoritative server
    verify_wires = wire.verify("r", montague, capulet)
    assert b"<db:verify" in bytes(verify_wires[0].i_bytes) and not verify_wires[0].initiator.encrypted
    assert receiver.request_pair(Pair("conference.montague.lit", "capulet.lit"))
    wire.pump()
    wire.verify("i", capulet, montague)
    pairs = {Pair("capulet.lit", "montague.lit"), Pair("capulet.lit", "conference.montague.lit")}
    assert set(initiator.outbound_pairs) == set(initiator.inbound_pairs) == pairs
    assert set(receiver.inbound_pairs) == set(receiver.outbound_pairs) == {Pair(p.remote, p.local) for p in pairs}
    assert all(e.mechanism == "dialback" for e in wire.of("r", ev.Authenticated))


def test_classic_dialback_wired_with_piggybacking():
    capulet = capulet_example(required_flags=True)
    montague = montague_example(required_flags=True)
    outgoing = Wire(Session("initiator", capulet, "capulet.example", "montague.example"), Session("receiver", montague))
    outgoing.pump()
    outgoing.verify("r", montague, capulet)
    assert outgoing.initiator.request_pair(Pair("rooms.capulet.example", "montague.example"))
    outgoing.pump()
    outgoing.verify("r", montague, capulet)
    pairs = {Pair("capulet.example", "montague.example"), Pair("rooms.capulet.example", "montague.example")}
    assert set(outgoing.initiator.outbound_pairs) == pairs
    assert set(outgoing.receiver.inbound_pairs) == {Pair(p.remote, p.local) for p in pairs}
    assert not outgoing.initiator.inbound_pairs and not outgoing.receiver.outbound_pairs

    reverse = Wire(Session("initiator", montague, "montague.example", "capulet.example"), Session("receiver", capulet))
    reverse.pump()
    reverse.verify("r", capulet, montague)
    assert set(reverse.initiator.outbound_pairs) == {("montague.example", "capulet.example")}
    assert set(reverse.receiver.inbound_pairs) == {Pair("capulet.example", "montague.example")}
    # a stanza for a pair not validated on the stream is fatal (RFC 6120 §8.1.2.2)
    outgoing.receiver.receive_data(b"<message from='tybalt@tybalt.example' to='romeo@montague.example'/>")
    outgoing.pump()
    assert [c.condition for c in outgoing.of("r", ev.Closed)] == ["invalid-from"]


def test_dialback_bidi_wired_invalid_key_bounces_and_closes(pki_world, self_signed_capulet):
    """A forged key (wrong secret) is answered invalid by the real authoritative server."""
    ca, leaves = pki_world
    forger = config(["capulet.lit"], "not-the-capulet-secret", trust=[ca])
    montague = config(MONTAGUE_NETWORK, MONTAGUE_SECRET, trust=[ca])
    wire = Wire(Session("initiator", forger, "capulet.lit", "montague.lit"), Session("receiver", montague),
                _chain(self_signed_capulet), _chain(leaves["montague.lit"]))
    wire.pump()
    wire.verify("r", montague, config(["capulet.lit"], CAPULET_SECRET))
    assert wire.of("i", ev.AuthFailed) == [ev.AuthFailed(Pair("capulet.lit", "montague.lit"), "invalid", "internal-server-error")]
    assert not wire.receiver.inbound_pairs and wire.receiver.closed
