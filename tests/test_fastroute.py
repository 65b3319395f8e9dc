"""The compiled stanza router (router/_fastroute.pyx): what it routes itself, what it
leaves to the Python handlers, and that a read mixing both keeps stream order.

The relay objects are `relay_objects.make_world`'s: S2S streams from a.test and
b.test authenticated by dialback, and the component serving svc.test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_objects import DOMAIN, REMOTE_SECRET, make_world, message, read
from router.cluster.frames import Carried, decode_batch, outbox
from router.negotiation.dialback import dialback_key
from router.negotiation.pairs import Pair
from router.negotiation.session import Session


@pytest.fixture
def world():
    yield from make_world()


@pytest.fixture
def taken(monkeypatch):
    """The (first event's name, start) of every call that gave events to a session."""
    calls = []
    original = Session.take

    def take(self, events, start, error):
        calls.append((getattr(events[start], "name", type(events[start]).__name__) if start < len(events) else None,
                      start))
        original(self, events, start, error)

    monkeypatch.setattr(Session, "take", take)
    return calls


def sent(relay, transport) -> bytes:
    relay.router.flush_writes()
    return b"".join(transport.calls)


def test_authorized_stanzas_are_routed_without_the_session(world, taken):
    relay, to_component, (a, _) = world
    stanzas = [message("a.test", n) for n in range(3)]
    read(a, b"".join(stanzas))
    assert sent(relay, to_component) == b"".join(stanzas)
    assert taken == []
    assert relay.metrics.stanzas_routed.get("component") == 3  # the C counters, as scraped
    assert (a.stanzas_in, relay.table.local[DOMAIN].stanzas_out) == (3, 3)  # per stream, for ctl
    assert b'xmpp_router_stanzas_routed_total{destination="component"} 3.0' in relay.metrics.render()


def test_a_dialback_request_mid_read_keeps_stream_order(world, taken):
    """stanza, <db:result/> for a new pair, stanza: the session gets the read from the
    <db:result/> on, and order holds; the new pair's stanzas then take the compiled path."""
    relay, to_component, (a, _) = world
    key = dialback_key(REMOTE_SECRET, DOMAIN, "c.test", a.session.stream_id)
    first, last = message("a.test", 1), message("a.test", 2)
    read(a, first + f"<db:result from='c.test' to='{DOMAIN}'>{key}</db:result>".encode() + last)
    assert sent(relay, to_component) == first + last
    assert taken == [("result", 1)]
    assert b"<db:result from='svc.test' to='c.test' type='valid'/>" in b"".join(a.transport.calls)
    taken.clear()
    read(a, message("c.test", 3) + message("a.test", 4))
    assert taken == [] and sent(relay, to_component).endswith(message("c.test", 3) + message("a.test", 4))


def test_a_stanza_from_an_unauthenticated_domain_closes_the_stream_after_the_ones_before(world, taken):
    relay, to_component, (a, _) = world
    first = message("a.test", 1)
    read(a, first + message("d.test", 2) + message("a.test", 3))
    assert sent(relay, to_component) == first
    assert taken == [("message", 1)]
    assert a.closing and b"<invalid-from" in b"".join(a.transport.calls)


def test_a_stream_whose_session_ended_routes_nothing_more(world, taken):
    """The compiled path reads the session's pairs from the stream, which its watch keeps:
    once the session's input ends, none are left there."""
    relay, to_component, (a, _) = world
    assert a.inbound_pairs == a.session.inbound_pairs == (Pair(DOMAIN, "a.test"),)
    read(a, message("d.test", 1))
    assert a.closing and a.inbound_pairs is None
    before = sent(relay, to_component)
    read(a, message("a.test", 2))
    assert sent(relay, to_component) == before


def test_a_parse_error_mid_read_delivers_what_came_before(world):
    relay, to_component, (a, _) = world
    first = message("a.test", 1)
    read(a, first + b"<message from='u@a.test' to='bot@svc.test'><body></message>")
    assert sent(relay, to_component) == first
    assert a.closing and b"<not-well-formed" in b"".join(a.transport.calls)


def test_a_component_reply_is_routed_to_the_remote_stream(world, taken):
    relay, to_component, (a, _) = world
    component = relay.table.local[DOMAIN]
    relay.table.add_remote(Pair("svc.test", "a.test"), a)  # as an outbound stream for the pair would be
    reply = f"<message from='bot@{DOMAIN}' to='u@a.test' id='r1'><body>hi</body></message>".encode()
    before = len(a.transport.calls)
    read(component, reply)
    relay.router.flush_writes()
    out = b"".join(a.transport.calls[before:])
    assert out == reply  # the component's namespace is the default one: the bytes need no fix-up
    assert taken == [] and relay.metrics.stanzas_routed.get("remote") == 1


def test_a_component_stanza_from_another_domain_closes_it(world):
    relay, to_component, _ = world
    component = relay.table.local[DOMAIN]
    read(component, b"<message from='x@other.test' to='u@a.test'/>")
    assert component.closing and b"<invalid-from" in b"".join(to_component.calls)


def test_bytes_read_and_written_are_counted(world):
    relay, to_component, (a, _) = world
    received = relay.metrics.bytes_received.get("s2s")
    written = relay.metrics.bytes_sent.get("component")
    read(a, message("a.test", 1))
    relay.router.flush_writes()
    assert relay.metrics.bytes_received.get("s2s") - received == len(message("a.test", 1))
    assert relay.metrics.bytes_sent.get("component") - written == len(message("a.test", 1))


def test_a_stanza_for_a_destination_another_member_holds_is_framed_into_its_outbox(world):
    """Once the bus knows who holds a destination (``bus_routes``), the compiled path frames
    the stanza into that member's outbox itself (without it, the slow path would queue it)."""
    relay, _, _ = world
    component = relay.table.local[DOMAIN]
    due = []
    box = outbox("n1.0", "n2.0", due.append)
    profile = relay.delivery.s2s_output
    relay.router.bus_routes = {(DOMAIN, "c.test"): (profile, (box,))}
    held = f"<message from='bot@{DOMAIN}' to='u@c.test' id='h1'><body>x</body></message>".encode()
    read(component, held)
    assert due == [box]
    [(payload, count)] = box.take()
    assert count == 1
    assert decode_batch(payload) == ("n1.0", [Carried("message", None, f"bot@{DOMAIN}", "u@c.test", "h1", DOMAIN,
                                                      "c.test", held)])
    assert not relay.table.pending


def test_a_batch_from_another_member_is_delivered_in_place_stanza_by_stanza(world):
    """Runs of stanzas for the same pair, interleaved with others, and one for a
    destination with no stream here (answered by the slow path), each where it belongs."""
    relay, _, (a, b) = world
    relay.table.add_remote(Pair("svc.test", "a.test"), a)
    relay.table.add_remote(Pair("svc.test", "b.test"), b)
    before = {s: len(s.transport.calls) for s in (a, b)}
    box = outbox("n2.0", "n1.0", lambda _: None)
    sent_to = {"a.test": [], "b.test": []}
    for n, remote in enumerate(["a.test", "a.test", "b.test", "a.test", "x.test", "b.test", "b.test"]):
        data = f"<message from='bot@svc.test' to='u@{remote}' id='m{n}'/>".encode()
        sent_to.setdefault(remote, []).append(data)
        box.put(Carried("message", None, "bot@svc.test", f"u@{remote}", f"m{n}", "svc.test", remote, data))
    [(payload, _)] = box.take()
    slow = []
    sender, answers = relay.router.take_batch(payload, lambda *record: slow.append(record) or ("gone", "x"))
    relay.router.flush_writes()
    assert sender == "n2.0"
    assert answers == [None, None, None, None, ("gone", "x"), None, None]
    assert slow == [("svc.test", "x.test", sent_to["x.test"][0])]
    for stream, remote in ((a, "a.test"), (b, "b.test")):
        assert b"".join(stream.transport.calls[before[stream]:]) == b"".join(sent_to[remote])


def frames_of(payload: bytes) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]] | None:
    """The bus's batch format read by the letter (router.cluster.frames): parts of a 4-byte
    big-endian length and its bytes; the sender, then a header (from NUL to, both
    non-empty) and the bytes of each stanza. None when the bytes are not such a batch."""
    parts, pos = [], 0
    while pos < len(payload):
        size = int.from_bytes(payload[pos:pos + 4], "big")
        if len(payload) - pos < 4 or size > len(payload) - pos - 4:
            return None
        parts.append(payload[pos + 4:pos + 4 + size])
        pos += 4 + size
    headers = [header.split(b"\0") for header in parts[1::2]]
    if not parts or len(parts) % 2 == 0 or any(len(h) != 2 or not all(h) for h in headers):
        return None
    return parts[0], [(f, t, data) for (f, t), data in zip(headers, parts[2::2])]


def test_a_damaged_batch_is_refused_whole_or_taken_as_its_frames_say(world):
    """Any byte of a batch changed, or the batch cut short: take_batch refuses it before
    delivering anything, or delivers each stanza's own bytes to its pair's stream, hands
    the rest to the slow path and answers a domain that is not UTF-8 with bad-request,
    exactly as a plain reading of the format says. A length read past the payload would
    deliver bytes that are not in it."""
    relay, _, (a, b) = world
    relay.table.add_remote(Pair("svc.test", "a.test"), a)
    relay.table.add_remote(Pair("svc.test", "b.test"), b)
    box = outbox("n2.0", "n1.0", lambda _: None)
    for n, remote in enumerate(["a.test", "b.test", "x.test", "a.test"]):
        box.put(Carried("message", None, "bot@svc.test", f"u@{remote}", f"m{n}", "svc.test", remote,
                        f"<message from='bot@svc.test' to='u@{remote}' id='m{n}'/>".encode()))
    [(valid, _)] = box.take()

    @settings(max_examples=400, deadline=None)
    @given(st.integers(0, len(valid) - 1), st.integers(0, 255), st.integers(0, len(valid)), st.booleans())
    def damaged(at, value, cut, cut_short):
        payload = bytes(valid[:cut] if cut_short else valid[:at] + bytes([value]) + valid[at + 1:])
        before = {s: len(s.transport.calls) for s in (a, b)}
        slow = []
        expected = frames_of(payload)
        try:
            sender, answers = relay.router.take_batch(payload, lambda *record: slow.append(record) or ("gone", "x"))
        except ValueError:
            sender = None
        relay.router.flush_writes()
        written = {s: b"".join(s.transport.calls[before[s]:]) for s in (a, b)}
        if expected is None or sender is None:
            assert sender is None and not slow and written == {a: b"", b: b""}
            assert expected is None or not is_utf8(expected[0])
            return
        want = {a: b"", b: b""}
        want_answers, want_slow = [], []
        for from_, to, data in expected[1]:
            if not (is_utf8(from_) and is_utf8(to)):
                want_answers.append(("bad-request", "a cluster bus frame whose domains are not UTF-8"))
            elif (from_, to) in ((b"svc.test", b"a.test"), (b"svc.test", b"b.test")):
                want[a if to == b"a.test" else b] += data
                want_answers.append(None)
            else:
                want_slow.append((from_.decode(), to.decode(), data))
                want_answers.append(("gone", "x"))
        assert (sender, answers, slow, written) == (expected[0].decode(), want_answers, want_slow, want)

    damaged()


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
