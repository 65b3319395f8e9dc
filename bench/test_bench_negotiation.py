"""Full S2S negotiations per second: two `Session`s wired back to back, no sockets.

Plaintext Server Dialback with a bidi request: initiator header -> features ->
`<bidi/>` + `<db:result/>` -> the receiver's `VerifyKey` is answered by
recomputing the XEP-0185 key as the authoritative server would -> `type='valid'`.

SASL EXTERNAL: STARTTLS on both sides, then `tls_established` hands each
session the other's certificate (from `router.trust.pki`, one test CA both trust),
as the runtime does when the handshake is over; the TLS record layer itself is
not part of the measure. Each handshake verifies the peer's chain and its
identity for the domain (RFC 6125), which is the cost that matters here.
"""

from __future__ import annotations

import pytest

from router.trust import certs, pki
from router.negotiation import events as ev
from router.negotiation.dialback import dialback_key
from router.negotiation.pairs import Pair
from router.negotiation.session import Session, SessionConfig
from router.trust.policy import Policy

SECRET = "bench-dialback-secret-0123456789"
INITIATOR = SessionConfig(local_domains=frozenset({"a.example"}), dialback_secret=SECRET, tls_client=False,
                          tls_offered=False, has_certificate=False, bidi="always", policy=Policy(require_encryption=False))
RECEIVER = SessionConfig(local_domains=frozenset({"b.example"}), dialback_secret="other-network-secret-0123",
                         tls_offered=False, has_certificate=False, bidi="always", policy=Policy(require_encryption=False))
MAX_ROUNDS = 20  # a dialback handshake needs 3 round trips; more means it is stuck


def negotiate() -> tuple[Session, Session]:
    initiator = Session("initiator", INITIATOR, "a.example", "b.example")
    receiver = Session("receiver", RECEIVER)
    for _ in range(MAX_ROUNDS):
        receiver.receive_data(initiator.data_to_send())
        for event in receiver.events():
            if isinstance(event, ev.VerifyKey):
                good = event.key == dialback_key(SECRET, event.receiving, event.originating, event.stream_id)
                receiver.key_verified(event.token, "valid" if good else "invalid")
        initiator.receive_data(receiver.data_to_send())
        done = [e for e in initiator.events() if isinstance(e, ev.Authenticated)]
        if done:
            return initiator, receiver
    raise AssertionError("dialback did not complete")


def record_rate(benchmark) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["handshakes/s"] = round(1 / benchmark.stats.stats.mean)


def test_dialback_handshakes_per_second(benchmark):
    initiator, receiver = benchmark(negotiate)
    assert Pair("b.example", "a.example") in receiver.inbound_pairs  # a.example may send to b.example
    record_rate(benchmark)


@pytest.fixture(scope="module")
def external_configs():
    ca = pki.make_ca("Bench CA")
    trust = certs.TrustStore((ca.cert,))
    chains = {domain: [pki.make_leaf(ca, domain).cert_der()] for domain in ("a.example", "b.example")}
    common = dict(dialback_secret=SECRET, trust_store=trust, tls_offered=True, tls_client=True, has_certificate=True,
                  bidi="encrypted", policy=Policy(require_encryption=True))
    initiator = SessionConfig(local_domains=frozenset({"a.example"}), **common)
    receiver = SessionConfig(local_domains=frozenset({"b.example"}), **common)
    return initiator, receiver, chains


def negotiate_external(initiator_config, receiver_config, chains) -> tuple[Session, Session]:
    initiator = Session("initiator", initiator_config, "a.example", "b.example")
    receiver = Session("receiver", receiver_config)
    for _ in range(MAX_ROUNDS):
        receiver.receive_data(initiator.data_to_send())
        if any(isinstance(e, ev.StartTLS) for e in receiver.events()):
            receiver.tls_established(chains["a.example"])
        initiator.receive_data(receiver.data_to_send())
        events = initiator.events()
        if any(isinstance(e, ev.StartTLS) for e in events):
            initiator.tls_established(chains["b.example"])
        authenticated = [e for e in events if isinstance(e, ev.Authenticated)]
        if authenticated:
            assert authenticated[0].mechanism == "EXTERNAL"
            return initiator, receiver
    raise AssertionError("STARTTLS + SASL EXTERNAL did not complete")


def test_sasl_external_handshakes_per_second(benchmark, external_configs):
    initiator, receiver = benchmark(negotiate_external, *external_configs)
    assert Pair("b.example", "a.example") in receiver.inbound_pairs  # a.example may send to b.example
    assert initiator.encrypted and receiver.encrypted
    record_rate(benchmark)
