"""The cluster bus's pure parts: who holds what (router/cluster/members.py) and the
bytes of a batch and its answer (router/cluster/frames.py)."""

from __future__ import annotations

import pytest

from router.cluster.frames import MAX_BATCH_BYTES, Carried, FrameError, answers_for, decode_answers, decode_batch, encode_answers, outbox
from router.cluster.frames import carried as carried_from  # the tests' carried() makes them
from router.cluster.members import MAX_MEMBERS, Announcement, Members, pick


def announce(member: str, components=(), pairs=()) -> Announcement:
    return Announcement(member, member.split(".")[0], tuple(components), tuple(pairs))


def test_a_component_connected_on_two_members_is_spread_by_sender_and_stable():
    members = Members("n3.0", "n3", ttl=3.0)
    members.update(announce("n1.0", ["c.test"]), 0.0)
    members.update(announce("n2.0", ["c.test"]), 0.0)
    holders = members.component_holders("c.test")
    assert {pick(holders, f"u{k}@s.test") for k in range(50)} == {"n1.0", "n2.0"}
    assert len({pick(members.component_holders("c.test"), "u7@s.test") for _ in range(5)}) == 1
    assert members.component_holders("other.test") == ()


def test_a_pair_held_on_this_node_is_preferred():
    members = Members("n1.0", "n1", ttl=3.0)
    members.update(announce("n2.0", pairs=[("c.test", "r.test")]), 0.0)
    members.update(announce("n1.1", pairs=[("c.test", "r.test")]), 0.0)
    assert members.pair_holders(("c.test", "r.test")) == ("n1.1",)


def test_owners_of_a_remote_domain_are_the_same_for_every_worker_of_a_node():
    views = []
    for me in ("n1.0", "n1.1", "n1.2"):
        members = Members(me, "n1", ttl=3.0)
        for other in ("n1.0", "n1.1", "n1.2", "n2.0"):
            members.update(announce(other), 0.0)
        views.append([members.owners(f"d{k}.test", 1) for k in range(40)])
    assert views[0] == views[1] == views[2]
    assert {owner[0] for owner in views[0]} == {"n1.0", "n1.1", "n1.2"}  # domains spread over the workers
    assert all(len(owner) == 1 and owner[0].startswith("n1.") for owner in views[0])


def test_silent_members_are_forgotten_with_their_routes():
    members = Members("n1.0", "n1", ttl=3.0)
    members.update(announce("n2.0", ["b.test"], [("b.test", "r.test")]), 0.0)
    members.update(announce("n3.0", ["b.test"]), 2.0)
    assert members.expire(4.0) == ["n2.0"]
    assert members.component_holders("b.test") == ("n3.0",)
    assert members.pair_holders(("b.test", "r.test")) == ()
    members.update(announce("n3.0", []), 4.5)  # a new announcement replaces the old one
    assert members.component_holders("b.test") == ()


def test_every_change_of_the_table_is_told_and_a_heartbeat_is_not():
    told = []
    members = Members("n1.0", "n1", ttl=3.0, on_change=lambda: told.append(1))
    members.update(announce("n2.0", ["b.test"]), 0.0)
    members.update(announce("n2.0", ["b.test"]), 1.0)  # a heartbeat
    assert len(told) == 1
    members.update(announce("n2.0", ["c.test"]), 2.0)
    members.expire(9.0)
    assert len(told) == 3


def test_the_table_of_members_is_bounded_and_ignores_us():
    members = Members("n1.0", "n1", ttl=3.0)
    assert not members.update(announce("n1.0", ["x.test"]), 0.0)
    for i in range(MAX_MEMBERS + 5):
        members.update(announce(f"m{i}.0"), 0.0)
    assert len(members) == MAX_MEMBERS


@pytest.mark.parametrize("bad", [{"member": "n2.0"}, {"member": "x.0", "node": "n2", "components": [], "pairs": []},
                                 {"member": "n2.0", "node": "n2", "components": [], "pairs": [["only-one"]]}])
def test_malformed_announcements_are_refused(bad):
    with pytest.raises((ValueError, KeyError, TypeError)):
        Announcement.from_json(bad)


def carried(i: int, size: int = 10) -> Carried:
    kind = None if i % 2 else "chat"
    data = (f"<message from='u{i}@a.test' to='b@b.test' id='id{i}'" + (f" type='{kind}'" if kind else "")
            + ">" + "x" * size + "</message>").encode()
    return Carried("message", kind, f"u{i}@a.test", "b@b.test", f"id{i}", "a.test", "b.test", data)


def framed(sender: str, items: list[Carried]) -> list[tuple[bytearray, int]]:
    """``items`` through one member's outbox, as one event-loop iteration sends them."""
    due = []
    box = outbox(sender, "n2.0", due.append)
    for item in items:
        box.put(item)
    assert due == [box]  # told once, at the first stanza
    return box.take()


def test_a_batch_round_trips_whole_and_refuses_truncation():
    items = [carried(i) for i in range(5)]
    [(payload, count)] = framed("n1.0", items)
    assert count == 5
    assert decode_batch(payload) == ("n1.0", items)
    with pytest.raises(FrameError):
        decode_batch(payload[:-3])
    with pytest.raises(FrameError):
        decode_batch(payload[:12] + b"\xff" + payload[13:])
    with pytest.raises(FrameError):  # a header without its to domain
        decode_batch(payload.replace(b"a.test\0b.test", b"a.test\0\0\0\0\0\0\0", 1))


def test_batches_are_split_under_the_payload_limit_in_order():
    items = [carried(i, size=200_000) for i in range(7)]
    batches = framed("n1.0", items)
    decoded = [decode_batch(payload)[1] for payload, _ in batches]
    assert [item for batch in decoded for item in batch] == items
    assert [count for _, count in batches] == [len(batch) for batch in decoded]
    assert all(sum(len(i.data) for i in batch) <= MAX_BATCH_BYTES or len(batch) == 1 for batch in decoded)
    assert len(batches) > 1


def test_what_a_bounce_needs_is_read_back_from_the_stanza():
    assert carried_from("a.test", "b.test", carried(3).data) == carried(3)
    prefixed = b"<x:iq xmlns:x='jabber:server' type='get' id='p1' from='a.test' to='b.test'/>"
    assert carried_from("a.test", "b.test", prefixed)[:5] == ("iq", "get", "a.test", "b.test", "p1")
    with pytest.raises(FrameError):
        carried_from("a.test", "b.test", b"<message to='b.test'")


def test_an_outbox_starts_anew_after_each_take():
    due = []
    box = outbox("n1.0", "n2.0", due.append)
    box.put(carried(0))
    assert len(box.take()) == 1 and box.count == 0
    assert box.take() == []
    box.put(carried(1))
    assert due == [box, box]
    [(payload, _)] = box.take()
    assert decode_batch(payload)[1] == [carried(1)]


def test_answers_round_trip_and_must_match_the_batch():
    refused = [None, ("service-unavailable", "b.test is not connected")]
    entries = decode_answers(encode_answers([(7, [None, None]), (8, refused)]))
    assert entries == [(7, None), (8, [None, ["service-unavailable", "b.test is not connected"]])]
    assert answers_for(entries[0][1], 2) == [None, None]
    assert answers_for(entries[1][1], 2) == refused
    with pytest.raises(FrameError):
        answers_for(entries[1][1], 3)
    assert answers_for([["made-up", "a newer member's condition"]], 1) == [("undefined-condition",
                                                                             "a newer member's condition")]
    for malformed in ([[5, "x"]], [["gone", None]], [["gone"]], [[]]):  # a bounce could not be built from these
        with pytest.raises(FrameError):
            answers_for(malformed, 1)
    for malformed in (b"ok", b"{}", b"[[7]]", b"[[\"7\", null]]", b"[[7, 3]]"):
        with pytest.raises(FrameError):
            decode_answers(malformed)
