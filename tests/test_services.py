"""Built-in services: ping, disco#info, echo, sink and the stanza-error rules."""

from __future__ import annotations

import pytest
from lxml import etree

from router.metrics import RelayMetrics
from router.routing.services import DISCO_INFO_NS, PING_NS, STANZAS_NS, Services

STREAM_OPEN = (
    "<stream:stream xmlns='{ns}' xmlns:stream='http://etherx.jabber.org/streams' "
    "xmlns:db='jabber:server:dialback'>"
)


def parse(stanza: str, ns: str = "jabber:server") -> etree._Element:
    """The stanza as the relay sees it: parsed inside its stream's context."""
    root = etree.fromstring(STREAM_OPEN.format(ns=ns) + stanza + "</stream:stream>")
    return root[0]


def reply_of(data: bytes) -> etree._Element:
    assert b"xmlns=\"jabber:server\"" not in data.split(b">", 1)[0]  # stream declares the content ns
    return parse(data.decode())


@pytest.fixture
def services():
    return Services(["relay.example"], ["echo.relay.example"], ["sink.relay.example"], RelayMetrics())


def test_ping_gets_an_empty_result(services):
    out = services.handle(
        parse("<iq from='capulet.lit' to='relay.example' id='s2s1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
    )
    assert out == b'<iq from="relay.example" to="capulet.lit" id="s2s1" type="result"/>'
    assert services.metrics.service_stanzas.get("ping") == 1


@pytest.mark.parametrize(
    "domain, identity",
    [("relay.example", ("server", "im")), ("echo.relay.example", ("component", "generic"))],
)
def test_disco_info_lists_identity_and_features(services, domain, identity):
    out = services.handle(
        parse(f"<iq from='a@peer.example/r' to='{domain}' id='d1' type='get'><query xmlns='{DISCO_INFO_NS}'/></iq>")
    )
    reply = reply_of(out)
    assert (reply.get("type"), reply.get("id"), reply.get("to"), reply.get("from")) == (
        "result", "d1", "a@peer.example/r", domain
    )
    assert reply.tag == "{jabber:server}iq"
    query = reply.find(f"{{{DISCO_INFO_NS}}}query")
    ident = query.find(f"{{{DISCO_INFO_NS}}}identity")
    assert (ident.get("category"), ident.get("type")) == identity
    features = {f.get("var") for f in query.findall(f"{{{DISCO_INFO_NS}}}feature")}
    assert features == {DISCO_INFO_NS, PING_NS}


def error_condition(reply: etree._Element) -> tuple[str, str]:
    error = reply.find("{jabber:server}error")
    condition = next(c for c in error if c.tag != f"{{{STANZAS_NS}}}text")
    return error.get("type"), etree.QName(condition).localname


@pytest.mark.parametrize(
    "stanza, expected",
    [
        ("<iq from='p.example' to='relay.example' id='v' type='get'><query xmlns='jabber:iq:version'/></iq>",
         ("cancel", "service-unavailable")),
        ("<iq from='p.example' to='relay.example' id='v' type='set'><ping xmlns='urn:xmpp:ping'/></iq>",
         ("cancel", "service-unavailable")),
        ("<iq from='p.example' to='relay.example' id='v' type='get'/>", ("modify", "bad-request")),
        ("<iq from='p.example' to='relay.example' id='v' type='get'><a xmlns='x'/><b xmlns='y'/></iq>",
         ("modify", "bad-request")),
        ("<iq from='p.example' to='relay.example' id='v' type='get'>"
         f"<query xmlns='{DISCO_INFO_NS}' node='n'/></iq>", ("cancel", "item-not-found")),
        ("<message from='u@p.example' to='relay.example' id='v'><body>hi</body></message>",
         ("cancel", "service-unavailable")),
    ],
)
def test_unsupported_requests_get_stanza_errors(services, stanza, expected):
    reply = reply_of(services.handle(parse(stanza)))
    assert reply.get("type") == "error" and reply.get("id") == "v"
    assert reply.get("from") == "relay.example" and reply.get("to").endswith("p.example")
    assert error_condition(reply) == expected
    assert reply.find(f"{{jabber:server}}error/{{{STANZAS_NS}}}text").text
    # the original payload is not echoed back
    assert [etree.QName(c).localname for c in reply] == ["error"]


@pytest.mark.parametrize(
    "stanza",
    [
        "<iq from='p.example' to='relay.example' id='r' type='result'/>",
        "<iq from='p.example' to='relay.example' id='r' type='error'><error type='cancel'>"
        f"<service-unavailable xmlns='{STANZAS_NS}'/></error></iq>",
        "<message from='p.example' to='echo.relay.example' type='error'><error type='cancel'>"
        f"<service-unavailable xmlns='{STANZAS_NS}'/></error></message>",
        "<presence from='u@p.example/r' to='relay.example'/>",
        "<message from='p.example' to='relay.example' type='headline'><body>x</body></message>",
    ],
)
def test_never_answered(services, stanza):
    assert services.handle(parse(stanza)) is None


@pytest.mark.parametrize("to", ["nobody@relay.example", "nobody@relay.example/res", "a@relay.example/b@c"])
@pytest.mark.parametrize(
    "payload", [f"<ping xmlns='{PING_NS}'/>", f"<query xmlns='{DISCO_INFO_NS}'/>", "<query xmlns='jabber:iq:version'/>"]
)
def test_iq_to_a_user_that_does_not_exist_is_service_unavailable(services, to, payload):
    """RFC 6120 §10.5.3.1 / RFC 6121 §8.5.1: the server domains have no accounts."""
    out = services.handle(parse(f"<iq from='juliet@capulet.lit/balcony' to='{to}' id='u1' type='get'>{payload}</iq>"))
    reply = reply_of(out)
    assert (reply.get("type"), reply.get("id"), reply.get("from"), reply.get("to")) == (
        "error", "u1", to, "juliet@capulet.lit/balcony"
    )
    assert error_condition(reply) == ("cancel", "service-unavailable")
    assert [etree.QName(c).localname for c in reply] == ["error"]
    assert services.metrics.service_stanzas.get("error") == 1


@pytest.mark.parametrize("message_type", [None, "chat", "normal", "headline", "groupchat"])
def test_message_to_a_user_that_does_not_exist_bounces(services, message_type):
    type_attr = f" type='{message_type}'" if message_type else ""
    out = services.handle(
        parse(f"<message from='u@p.example' to='nobody@relay.example' id='m'{type_attr}><body>hi</body></message>")
    )
    reply = reply_of(out)
    assert (reply.get("type"), reply.get("from"), reply.get("id")) == ("error", "nobody@relay.example", "m")
    assert error_condition(reply) == ("cancel", "service-unavailable")


@pytest.mark.parametrize(
    "stanza",
    [
        "<presence from='u@p.example/r' to='nobody@relay.example'/>",
        "<presence from='u@p.example' to='nobody@relay.example' type='subscribe'/>",
        "<presence from='u@p.example' to='nobody@relay.example' type='probe'/>",
        "<iq from='p.example' to='nobody@relay.example' id='r' type='result'/>",
        "<message from='p.example' to='nobody@relay.example' type='error'><error type='cancel'>"
        f"<service-unavailable xmlns='{STANZAS_NS}'/></error></message>",
    ],
)
def test_user_that_does_not_exist_never_answers_presence_results_or_errors(services, stanza):
    assert services.handle(parse(stanza)) is None


@pytest.mark.parametrize("to", ["relay.example/res", "relay.example/x@y"])
def test_domain_with_a_resource_is_the_server_itself(services, to):
    """RFC 6120 §10.5.2: <domainpart/resourcepart> is handled by the server; an '@'
    in the resource does not make it an account."""
    out = services.handle(parse(f"<iq from='p.example' to='{to}' id='d' type='get'><ping xmlns='{PING_NS}'/></iq>"))
    assert reply_of(out).get("type") == "result"


def test_users_at_echo_and_sink_keep_their_service(services):
    ping = f"<ping xmlns='{PING_NS}'/>"
    for domain in ("echo.relay.example", "sink.relay.example"):
        out = services.handle(parse(f"<iq from='p.example' to='someone@{domain}' id='p' type='get'>{ping}</iq>"))
        assert reply_of(out).get("type") == "result"
    assert services.handle(parse("<message from='p.example' to='someone@sink.relay.example'/>")) is None
    assert services.sink_received == 2


def test_echo_returns_the_message_with_addresses_swapped(services):
    out = services.handle(
        parse(
            "<message from='juliet@capulet.lit/balcony' to='echo.relay.example' id='m1' type='chat' xml:lang='en'>"
            "<body>wherefore &amp; why</body><x xmlns='urn:example:ext'><y/></x></message>"
        )
    )
    assert out == (
        b'<message from="echo.relay.example" to="juliet@capulet.lit/balcony" id="m1" type="chat" xml:lang="en">'
        b'<body>wherefore &amp; why</body><x xmlns="urn:example:ext"><y/></x></message>'
    )
    assert services.metrics.service_stanzas.get("echo") == 1


def test_echo_from_a_component_stream_moves_content_to_jabber_server(services):
    stanza = parse(
        "<message from='bot.relay.example' to='user@echo.relay.example'><body>hi</body></message>",
        ns="jabber:component:accept",
    )
    out = services.handle(stanza)
    assert out == b'<message from="user@echo.relay.example" to="bot.relay.example"><body>hi</body></message>'
    assert reply_of(out).find("{jabber:server}body").text == "hi"


def test_sink_counts_and_drops_but_still_answers_iq(services):
    for i in range(3):
        assert services.handle(parse(f"<message from='p.example' to='sink.relay.example' id='{i}'><body/></message>")) is None
    assert services.handle(parse("<presence from='p.example' to='sink.relay.example'/>")) is None
    out = services.handle(
        parse("<iq from='p.example' to='sink.relay.example' id='p' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
    )
    assert reply_of(out).get("type") == "result"
    assert services.sink_received == 5
    assert services.metrics.service_stanzas.get("sink") == 5


def test_from_config(tmp_path):
    from router.config import parse_config

    config = parse_config(
        '[server]\ndomains = ["a.example"]\ndialback_secret = "0123456789abcdef"\n'
        '[services]\necho = ["e.a.example"]\nsink = ["s.a.example"]\n',
        tmp_path,
    )
    services = Services.from_config(config)
    assert services.domains == {"a.example", "e.a.example", "s.a.example"}
    assert services.handle(parse("<message from='p.example' to='s.a.example'/>")) is None
    assert services.sink_received == 1
