"""Addresses at the relay's own server domain over real sockets: the domain answers,
an account there does not exist (RFC 6120 §10.5.3.1, RFC 6121 §8.5.1)."""

from __future__ import annotations

import pytest

from router.net.component_client import ComponentClient

from .conftest import arun, running

SECRET = "secret-of-a"
STANZAS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
CONTENT = "{jabber:component:accept}"


@pytest.fixture
def spec(relay_spec):
    return relay_spec("relay", domains=("relay.test",), components={"a.relay.test": SECRET})


def condition_of(error) -> str:
    return next(child.tag for child in error.find(CONTENT + "error") if child.tag != STANZAS + "text")


def test_stanzas_to_a_user_that_does_not_exist(spec):
    async def scenario():
        async with running(spec.config()), ComponentClient() as a:
            await a.connect("127.0.0.1", spec.component_port, "a.relay.test", SECRET)
            a.send("<iq from='x@a.relay.test/r' to='nobody@relay.test' id='q1' type='get'>"
                   "<ping xmlns='urn:xmpp:ping'/></iq>")
            error = await a.receive()
            assert (error.tag, error.get("type"), error.get("id"), error.get("from"), error.get("to")) == (
                CONTENT + "iq", "error", "q1", "nobody@relay.test", "x@a.relay.test/r")
            assert condition_of(error) == STANZAS + "service-unavailable"

            a.send("<message from='x@a.relay.test' to='nobody@relay.test/r' id='m1'><body>hi</body></message>")
            bounce = await a.receive()
            assert (bounce.tag, bounce.get("type"), bounce.get("id")) == (CONTENT + "message", "error", "m1")
            assert condition_of(bounce) == STANZAS + "service-unavailable"

            # presence to nobody gets no answer: the next stanza back is the domain's own pong
            a.send("<presence from='x@a.relay.test' to='nobody@relay.test' type='subscribe' id='s1'/>")
            a.send("<iq from='x@a.relay.test/r' to='relay.test' id='q2' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
            pong = await a.receive()
            assert (pong.get("type"), pong.get("id"), pong.get("from")) == ("result", "q2", "relay.test")

    arun(scenario())
