"""Wiring for negotiation tests: two `Session`s back to back, TLS simulated with pki.py certificates.

Imported by the other negotiation test modules (``from test_negotiation_support import ...``);
its own tests check the wiring itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from lxml import etree

from router.trust import certs, pki
from router.negotiation import events as ev
from router.negotiation.session import Session, SessionConfig
from router.trust.policy import Policy

MAX_ROUNDS = 50  # bound on ping-pong rounds in one pump


def config(domains, secret="s3cr3t", *, trust=(), policy=None, **overrides) -> SessionConfig:
    """A SessionConfig for tests: encryption optional unless `policy` says otherwise."""
    store = certs.TrustStore(tuple(c.cert for c in trust))
    return SessionConfig(
        local_domains=frozenset(domains),
        dialback_secret=secret,
        trust_store=store,
        policy=policy or Policy(require_encryption=False),
        **overrides,
    )


@dataclass
class Wire:
    """An initiating and a receiving session connected by a simulated TCP (+TLS) connection."""

    initiator: Session
    receiver: Session
    initiator_chain: tuple[bytes, ...] = ()
    receiver_chain: tuple[bytes, ...] = ()
    i_events: list = field(default_factory=list)
    r_events: list = field(default_factory=list)
    i_bytes: bytearray = field(default_factory=bytearray)  # everything the initiator wrote
    r_bytes: bytearray = field(default_factory=bytearray)

    def pump(self) -> None:
        """Move bytes both ways until both sides are quiet; run TLS when both asked for it."""
        for _ in range(MAX_ROUNDS):
            moved = False
            data = self.initiator.data_to_send()
            self._take_events()
            if data:
                moved = True
                self.i_bytes += data
                self.receiver.receive_data(data)
            data = self.receiver.data_to_send()
            self._take_events()
            if data:
                moved = True
                self.r_bytes += data
                self.initiator.receive_data(data)
            self._take_events()
            if self._tls_pending("r") and self._tls_pending("i"):
                self._tls_done["r"] = self._tls_done["i"] = True
                self.receiver.tls_established(self.initiator_chain)
                self.initiator.tls_established(self.receiver_chain)
                moved = True
            if not moved:
                return
        raise AssertionError("sessions kept talking for too many rounds")

    def __post_init__(self) -> None:
        self._tls_done = {"i": True, "r": True}
        self.answered: set = set()

    def _take_events(self) -> None:
        for side, session, sink in (("i", self.initiator, self.i_events), ("r", self.receiver, self.r_events)):
            for event in session.events():
                sink.append(event)
                if isinstance(event, ev.StartTLS):
                    self._tls_done[side] = False

    def _tls_pending(self, side: str) -> bool:
        return not self._tls_done[side]

    def of(self, side: str, kind) -> list:
        return [e for e in (self.i_events if side == "i" else self.r_events) if isinstance(e, kind)]

    def verify(self, side: str, verifier_config: SessionConfig, authority_config: SessionConfig) -> list["Wire"]:
        """Answer each new `VerifyKey` of `side` by a real db:verify exchange on a new wire.

        The verifying server opens a verify-only initiating session (`verifier_config`) to a
        receiving session acting as the authoritative server (`authority_config`).
        """
        session = self.initiator if side == "i" else self.receiver
        wires = []
        for event in self.of(side, ev.VerifyKey):
            if event.token in self.answered:
                continue
            self.answered.add(event.token)
            verifier = Session("initiator", verifier_config, event.receiving, event.originating, verify_only=True)
            wire = Wire(verifier, Session("receiver", authority_config))
            verifier.request_verify(event.token, event.receiving, event.originating, event.stream_id, event.key)
            wire.pump()
            results = wire.of("i", ev.VerifyResult)
            assert [r.token for r in results] == [event.token]
            session.key_verified(event.token, results[0].result)
            wires.append(wire)
        self.pump()
        return wires


@pytest.fixture(scope="session")
def pki_world():
    """A private CA and leaf certificates for the names of the example conversations (test_flows.py)."""
    ca = pki.make_ca("Negotiation Test CA")
    leaves = {
        name: pki.make_leaf(ca, name)
        for name in ("capulet.lit", "montague.lit", "capulet.example", "montague.example")
    }
    return ca, leaves


def test_wire_moves_bytes_and_reaches_a_header_exchange():
    a = Session("initiator", config(["a.example"]), "a.example", "b.example")
    b = Session("receiver", config(["b.example"], tls_offered=False))
    wire = Wire(a, b)
    wire.pump()
    assert wire.i_bytes.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert b.stream_id is not None and a.stream_id == b.stream_id


# ---------------------------------------------------------------- literal conversations (test_flows.py)

_STANZA_START = (b"<message", b"<presence", b"<iq")
_ERROR_TEXT_PARENT_NS = ("urn:ietf:params:xml:ns:xmpp-",)


def script(block: str, connection: int) -> list[tuple[str, bytes]]:
    """The writes of one TCP connection of a conversation block (lines `PARTY@N: bytes`), as (party, bytes)."""
    writes = []
    for line in block.splitlines():
        party, _, rest = line.partition("@")
        number, _, data = rest.partition(": ")
        if int(number) == connection:
            writes.append((party, data.encode()))
    return writes


def is_runtime_write(data: bytes) -> bool:
    """Stanzas and keepalives are written by the runtime, not by the session."""
    return data.startswith(_STANZA_START) or not data.strip()


def canonical(data: bytes) -> list[tuple]:
    """One direction's bytes as comparable items: headers (attributes, namespaces, id) and
    elements in exclusive C14N, with human-readable <text/> of error elements dropped."""
    from router._fastparse import Tokenizer
    from router.wire.xml import parse_element

    items = []
    segments = [b"<?xml" + part for part in bytes(data).split(b"<?xml") if part]
    for segment in segments:
        tokenizer = Tokenizer()
        namespaces = {}
        for event in tokenizer.feed(segment):
            kind = type(event).__name__
            if kind == "StreamHeader":
                namespaces = event.namespaces
                attrs = {k: v for k, v in event.attributes.items() if k not in ("id", "{http://www.w3.org/XML/1998/namespace}lang")}
                items.append(("header", tuple(sorted(attrs.items())), tuple(sorted(namespaces.items(), key=str)), event.id))
            elif kind == "StreamEnd":
                items.append(("end",))
            else:
                elem = parse_element(tokenizer.buffer[event.start : event.end], namespaces)
                for text in elem.iter("{*}text"):
                    parent = text.getparent()
                    if parent is not None and etree.QName(text).namespace.startswith(_ERROR_TEXT_PARENT_NS):
                        parent.remove(text)
                items.append(("element", etree.tostring(elem, method="c14n", exclusive=True)))
    return items


class Player:
    """Plays party `me` of a scripted connection with `session`: the peer's writes are fed
    verbatim, our expected writes are collected for comparison with what the session wrote.

    `actions[i]` runs just before our i-th expected write (counting every write of ours,
    runtime ones included): the runtime's part (key_verified, request_pair, close, ...).
    """

    def __init__(self, session: Session, writes, me: str, *, peer_chain=(), actions=None):
        self.session = session
        self.writes = writes
        self.me = me
        self.peer_chain = tuple(peer_chain)
        self.actions = actions or {}
        self.expected = bytearray()
        self.actual = bytearray()
        self.events: list = []

    def drain(self) -> None:
        self.actual += self.session.data_to_send()
        for event in self.session.events():
            self.events.append(event)
            if isinstance(event, ev.StartTLS):
                self.actual += self.session.data_to_send()
                self.session.tls_established(self.peer_chain)
        self.actual += self.session.data_to_send()

    def run(self, upto: int | None = None) -> "Player":
        mine = 0
        for party, data in self.writes[:upto]:
            self.drain()
            if party == self.me:
                if mine in self.actions:
                    self.actions[mine](self)
                    self.drain()
                mine += 1
                if not is_runtime_write(data):
                    self.expected += data
            else:
                self.session.receive_data(data)
        self.drain()
        return self

    def feed(self, data: bytes) -> "Player":
        self.drain()
        self.session.receive_data(data)
        self.drain()
        return self

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def assert_wrote_expected(self) -> None:
        assert canonical(self.actual) == canonical(self.expected)
