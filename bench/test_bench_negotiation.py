"""Full S2S negotiations per second: two `Session`s wired back to back, no sockets.

Plaintext Server Dialback with a bidi request: initiator header -> features ->
`<bidi/>` + `<db:result/>` -> the receiver's `VerifyKey` is answered by
recomputing the XEP-0185 key as the authoritative server would -> `type='valid'`.
(SASL EXTERNAL needs a TLS layer between the two sessions; not measured here yet.)
"""

from __future__ import annotations

from router.negotiation import events as ev
from router.negotiation.dialback import dialback_key
from router.negotiation.session import Session, SessionConfig
from router.policy import Policy

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


def test_dialback_handshakes_per_second(benchmark):
    initiator, receiver = benchmark(negotiate)
    assert ("b.example", "a.example") in receiver.inbound_pairs or ("a.example", "b.example") in receiver.inbound_pairs
