"""The harness's own proof: real Prosody and ejabberd federate with each other on loopback.

These run without the relay; if they fail, the relay interop tests cannot be trusted.
"""

from __future__ import annotations

import re

import pytest
import uvloop

from .harness import DIALBACK, MODES, PLAINTEXT, SECURE, deliver

pytestmark = pytest.mark.interop


def ejabberd_accepted(log: str, direction: str, mechanism: str, transport: str, local: str, remote: str) -> bool:
    """Whether ejabberd logged an authenticated S2S stream (direction: inbound/outbound)."""
    route = f"{remote} -> {local}" if direction == "inbound" else f"{local} -> {remote}"
    pattern = rf"\({transport}\|<[^>]*>\) Accepted {direction} s2s {mechanism} authentication {re.escape(route)} "
    return re.search(pattern, log) is not None


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_prosody_and_ejabberd_federate(federation, mode):
    """a.test (Prosody) <-> c.test (ejabberd): a message each way, authenticated as the mode says."""
    fed = federation(mode)
    a = fed.prosody("a.test", "127.0.0.2")
    c = fed.ejabberd("c.test", "127.0.0.4")
    fed.start()

    async def exchange():
        async with await a.component() as on_a, await c.component() as on_c:
            await deliver(on_a, "alice@a.test", on_c, "bob@c.test")
            await deliver(on_c, "bob@c.test", on_a, "alice@a.test/desk")

    uvloop.run(exchange())
    # ejabberd 23.01 has no XEP-0288 bidi: one connection per direction
    assert (a.accepted_s2s_connections(), c.accepted_s2s_connections()) == (1, 1)
    fed.stop()  # flushes ejabberd's log

    mechanism = "EXTERNAL" if mode is SECURE else "dialback"
    transport = "tls" if mode.tls else "tcp"
    log = c.log_text()
    assert ejabberd_accepted(log, "inbound", mechanism, transport, "c.test", "a.test")
    assert ejabberd_accepted(log, "outbound", mechanism, transport, "c.test", "a.test")
    if mode is DIALBACK:
        # ejabberd offers EXTERNAL even when it cannot verify a.test's cert, then refuses it
        assert "SASL EXTERNAL with c.test failed" in a.log_text()


@pytest.mark.parametrize("bidi", [True, False], ids=["bidi", "no-bidi"])
def test_prosody_pair_bidi_uses_one_connection(federation, bidi):
    """a.test <-> b.test (both Prosody, STARTTLS + SASL EXTERNAL): with mod_s2s_bidi one TCP
    connection carries both directions; without it each direction opens its own."""
    fed = federation(SECURE)
    a = fed.prosody("a.test", "127.0.0.2", bidi=bidi)
    b = fed.prosody("b.test", "127.0.0.3", bidi=bidi)
    fed.start()

    async def exchange():
        async with await a.component() as on_a, await b.component() as on_b:
            await deliver(on_a, "alice@a.test", on_b, "bob@b.test")
            await deliver(on_b, "bob@b.test", on_a, "alice@a.test")
            await deliver(on_a, "alice@a.test", on_b, "carol@b.test")

    uvloop.run(exchange())

    connections = a.accepted_s2s_connections() + b.accepted_s2s_connections()
    assert connections == (1 if bidi else 2)
    assert ("Requesting bidirectional stream" in a.log_text() + b.log_text()) is bidi


def test_plaintext_mode_never_negotiates_tls(federation):
    """The plaintext mode must really stay plaintext (no STARTTLS offered or taken)."""
    fed = federation(PLAINTEXT)
    a = fed.prosody("a.test", "127.0.0.2")
    b = fed.prosody("b.test", "127.0.0.3")
    fed.start()

    async def exchange():
        async with await a.component() as on_a, await b.component() as on_b:
            await deliver(on_a, "alice@a.test", on_b, "bob@b.test")
            await deliver(on_b, "bob@b.test", on_a, "alice@a.test")

    uvloop.run(exchange())
    logs = a.log_text() + b.log_text()
    assert "Stream encrypted" not in logs
    assert "verified dialback key... it is valid" in logs
