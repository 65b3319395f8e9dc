"""The relay (r.test) federating with real Prosody 0.12 and ejabberd 23.01.

Each test starts its own peers and relay. The relay's whole domain r.test is a
component, so ``bot@r.test`` below is a ComponentClient on the relay's component
port, just as ``alice@a.test`` is one on Prosody's and ``carl@c.test`` on ejabberd's.
How a stream was authenticated is read from the peers' logs (the relay's log format
is not a contract); how many TCP connections carry it, from /proc/net/tcp.
"""

from __future__ import annotations

import re
import uuid

import pytest
import uvloop

from .harness import DIALBACK, PLAINTEXT, SECURE, Federation, deliver, expect_bounce, free_port, message

pytestmark = pytest.mark.interop

BOT = "bot@r.test"
ALICE = "alice@a.test"
CARL = "carl@c.test"


def ejabberd_accepted(log: str, direction: str, mechanism: str, transport: str, route: str) -> bool:
    """ejabberd logged an authenticated S2S stream, e.g. ("inbound", "EXTERNAL", "tls", "r.test -> c.test")."""
    pattern = rf"\({transport}\|<[^>]*>\) Accepted {direction} s2s {mechanism} authentication {re.escape(route)} "
    return re.search(pattern, log) is not None


def prosody_relay(federation, mode, *, smacks: bool = False, **relay_options):
    fed: Federation = federation(mode)
    a = fed.prosody("a.test", "127.0.0.2", smacks=smacks)
    r = fed.relay(**relay_options)
    fed.start()
    return a, r


def ejabberd_relay(federation, mode, **relay_options):
    fed: Federation = federation(mode)
    c = fed.ejabberd("c.test", "127.0.0.4")
    r = fed.relay(**relay_options)
    fed.start()
    return fed, c, r


# --- Prosody <-> relay ------------------------------------------------------------------


async def round_trip(on_a, on_r, initiator: str) -> None:
    """A message each way between alice@a.test and bot@r.test, ``initiator``'s side first."""
    if initiator == "prosody":
        await deliver(on_a, ALICE, on_r, BOT)
        await deliver(on_r, BOT, on_a, ALICE)
    else:
        await deliver(on_r, BOT, on_a, ALICE)
        await deliver(on_a, ALICE, on_r, BOT)


@pytest.mark.parametrize("initiator", ["prosody", "relay"])
def test_prosody_secure_external_bidi_one_connection(federation, initiator):
    """STARTTLS + SASL EXTERNAL + XEP-0288: whoever opens the stream, the reply comes back
    over it, so exactly one TCP connection carries both directions."""
    a, r = prosody_relay(federation, SECURE)

    async def exchange():
        async with await a.component() as on_a, await r.component() as on_r:
            await round_trip(on_a, on_r, initiator)
            await deliver(on_a, ALICE, on_r, "other@r.test")
            return a.accepted_s2s_connections() + r.accepted_s2s_connections()

    assert uvloop.run(exchange()) == 1
    log = a.log_text()
    if initiator == "prosody":
        assert "SASL EXTERNAL with r.test succeeded" in log
        assert "Requesting bidirectional stream" in log
    else:
        assert "Accepting SASL EXTERNAL identity from r.test" in log
        assert "Requested bidirectional stream" in log
    assert "dialback key" not in log


@pytest.mark.parametrize("initiator", ["prosody", "relay"])
def test_prosody_stream_management_counts_agree_both_ways(federation, initiator):
    """Prosody 0.12's mod_smacks speaks XEP-0198 on S2S: over one bidi stream each side asks for acks
    (Prosody after every stanza, the relay with sm_ack_every = 1) and each side's h matches what the
    other sent, or Prosody would log and close ("The client says it handled ...")."""
    a, r = prosody_relay(federation, SECURE, smacks=True, options={"s2s": {"sm_ack_every": 1}})

    async def exchange():
        async with await a.component() as on_a, await r.component() as on_r:
            for _ in range(3):
                await round_trip(on_a, on_r, initiator)
            return a.accepted_s2s_connections() + r.accepted_s2s_connections()

    assert uvloop.run(exchange()) == 1
    log = a.log_text()
    assert "Enabling stream management" in log
    assert re.search(r"Received ack request, acking for [1-9]", log)  # it answers our <r/> with its count
    assert re.search(r"#queue = 0 \(acked: [1-9]", log)  # our <a h/> acknowledged exactly what it sent
    assert "says it handled" not in log


def test_prosody_dialback_bidi_with_untrusted_certificates(federation):
    """STARTTLS + dialback + bidi: nobody's certificate verifies, dialback authenticates,
    and the reply reuses the stream the first message opened."""
    a, r = prosody_relay(federation, DIALBACK)

    async def exchange():
        async with await a.component() as on_a, await r.component() as on_r:
            await deliver(on_a, ALICE, on_r, BOT)
            opened = a.accepted_s2s_connections(), r.accepted_s2s_connections()
            await deliver(on_r, BOT, on_a, ALICE)
            await deliver(on_a, ALICE, on_r, BOT)
            return opened, (a.accepted_s2s_connections(), r.accepted_s2s_connections())

    opened, after_replies = uvloop.run(exchange())
    assert after_replies == opened  # the replies needed no new connection
    log = a.log_text()
    assert "Stream encrypted" in log
    assert "certificate chain validation result: invalid" in log
    assert "Requesting bidirectional stream" in log
    assert "SASL EXTERNAL with r.test succeeded" not in log


def test_prosody_plaintext_dialback(federation):
    a, r = prosody_relay(federation, PLAINTEXT)

    async def exchange():
        async with await a.component() as on_a, await r.component() as on_r:
            await deliver(on_a, ALICE, on_r, BOT)
            await deliver(on_r, BOT, on_a, ALICE)

    uvloop.run(exchange())
    log = a.log_text()
    assert "Stream encrypted" not in log
    assert re.search(r"verified dialback key\.\.\. it is valid|Received\[s2sout\w*\]: <result[^\n]*type='valid'", log)


# --- ejabberd <-> relay -----------------------------------------------------------------


@pytest.mark.parametrize("initiator", ["ejabberd", "relay"])
def test_ejabberd_secure_external_two_connections(federation, initiator):
    """STARTTLS + SASL EXTERNAL both ways; ejabberd 23.01 has no bidi, so two connections."""
    fed, c, r = ejabberd_relay(federation, SECURE)

    async def exchange():
        async with await c.component() as on_c, await r.component() as on_r:
            if initiator == "ejabberd":
                await deliver(on_c, CARL, on_r, BOT)
                await deliver(on_r, BOT, on_c, CARL)
            else:
                await deliver(on_r, BOT, on_c, CARL)
                await deliver(on_c, CARL, on_r, BOT)
            return c.accepted_s2s_connections(), r.accepted_s2s_connections()

    assert uvloop.run(exchange()) == (1, 1)
    fed.stop()  # flushes ejabberd's log
    log = c.log_text()
    assert ejabberd_accepted(log, "inbound", "EXTERNAL", "tls", "r.test -> c.test")
    assert ejabberd_accepted(log, "outbound", "EXTERNAL", "tls", "c.test -> r.test")


def test_ejabberd_dialback_after_external_fails(federation):
    """Certificates untrusted: ejabberd still offers EXTERNAL and refuses it; the relay must
    fall back to dialback (and ejabberd, finding no usable EXTERNAL at the relay, too)."""
    fed, c, r = ejabberd_relay(federation, DIALBACK)

    async def exchange():
        async with await c.component() as on_c, await r.component() as on_r:
            await deliver(on_r, BOT, on_c, CARL)
            await deliver(on_c, CARL, on_r, BOT)

    uvloop.run(exchange())
    fed.stop()
    log = c.log_text()
    assert ejabberd_accepted(log, "inbound", "dialback", "tls", "r.test -> c.test")
    assert ejabberd_accepted(log, "outbound", "dialback", "tls", "c.test -> r.test")


def test_ejabberd_plaintext_dialback(federation):
    fed, c, r = ejabberd_relay(federation, PLAINTEXT)

    async def exchange():
        async with await c.component() as on_c, await r.component() as on_r:
            await deliver(on_c, CARL, on_r, BOT)
            await deliver(on_r, BOT, on_c, CARL)

    uvloop.run(exchange())
    fed.stop()
    log = c.log_text()
    assert ejabberd_accepted(log, "inbound", "dialback", "tcp", "r.test -> c.test")
    assert ejabberd_accepted(log, "outbound", "dialback", "tcp", "c.test -> r.test")


# --- failures -----------------------------------------------------------------------------


def test_peer_down_bounces_to_sender_and_spares_other_peers(federation):
    """A peer that went away, and one that never listened: the relay's component gets an
    error reply naming the domain, while the other peers keep federating."""
    fed = federation(SECURE)
    a = fed.prosody("a.test", "127.0.0.2")
    b = fed.prosody("b.test", "127.0.0.3")
    c = fed.ejabberd("c.test", "127.0.0.4")
    fed.route("never.test", "127.0.0.5", free_port("127.0.0.5"))  # nothing listens there
    r = fed.relay()
    fed.start()

    async def scenario():
        async with await r.component() as on_r, await a.component() as on_a, await c.component() as on_c:
            async with await b.component() as on_b:
                await deliver(on_r, BOT, on_b, "bob@b.test")
            b.stop()
            bounces = {}
            for recipient in ("bob@b.test", "nobody@never.test"):
                lost = uuid.uuid4().hex
                on_r.send(message(BOT, recipient, "anyone there?", lost))
                bounces[recipient.partition("@")[2]] = await expect_bounce(on_r, lost)
            await deliver(on_r, BOT, on_a, ALICE)
            await deliver(on_c, CARL, on_r, BOT)
            await deliver(on_a, ALICE, on_r, BOT)
            return bounces

    for domain, bounce in uvloop.run(scenario()).items():
        assert bounce.condition in ("remote-server-not-found", "remote-server-timeout"), bounce
        assert bounce.text and domain in bounce.text, bounce


def test_peer_refusing_our_certificate_bounces_with_reason(federation):
    """Prosody (s2s_secure_auth) refuses the relay's untrusted certificate with a stream error;
    the relay's component learns why, and ejabberd, which accepts dialback, is unaffected."""
    fed = federation(SECURE)
    a = fed.prosody("a.test", "127.0.0.2")
    c = fed.ejabberd("c.test", "127.0.0.4")
    r = fed.relay(trusted=False, options={"policy": {"secure_auth": False}})
    fed.start()

    async def scenario():
        async with await r.component() as on_r, await c.component() as on_c:
            refused = uuid.uuid4().hex
            on_r.send(message(BOT, ALICE, "let me in", refused))
            bounce = await expect_bounce(on_r, refused)
            await deliver(on_r, BOT, on_c, CARL)
            await deliver(on_c, CARL, on_r, BOT)
            return bounce

    bounce = uvloop.run(scenario())
    assert bounce.condition in ("remote-server-not-found", "remote-server-timeout", "not-authorized")
    assert bounce.text and re.search(r"certificate|not-authorized|trust", bounce.text, re.IGNORECASE), bounce
    assert "Forbidding insecure connection" in a.log_text() or "not trusted" in a.log_text()


# --- the relay's defaults -------------------------------------------------------------------


def test_default_config_with_required_flags_federates_with_both(federation):
    """Only what a deployment must name (domain, certificate, trust anchor, listeners, routes),
    every other option at its default, plus XEP-0192 <required/> flags on features: Prosody and
    ejabberd both still federate with the relay, each way."""
    fed = federation(SECURE)
    a = fed.prosody("a.test", "127.0.0.2")
    c = fed.ejabberd("c.test", "127.0.0.4")
    r = fed.relay(defaults=True, options={"s2s": {"required_flags": True}})
    fed.start()

    async def exchange():
        async with await a.component() as on_a, await c.component() as on_c, await r.component() as on_r:
            await deliver(on_a, ALICE, on_r, BOT)
            await deliver(on_r, BOT, on_a, ALICE)
            await deliver(on_c, CARL, on_r, BOT)
            await deliver(on_r, BOT, on_c, CARL)

    uvloop.run(exchange())
