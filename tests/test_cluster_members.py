"""The cluster bus's pure parts: who holds what (router/cluster/members.py) and the
bytes of a batch and its answer (router/cluster/frames.py)."""

from __future__ import annotations

import pytest

from router.cluster.frames import (
    MAX_BATCH_BYTES,
    Carried,
    FrameError,
    decode_answer,
    decode_batch,
    encode_answer,
    encode_batch,
    split,
)
from router.cluster.members import MAX_MEMBERS, Announcement, Members


def announce(member: str, components=(), pairs=()) -> Announcement:
    return Announcement(member, member.split(".")[0], tuple(components), tuple(pairs))


def test_a_component_connected_on_two_members_is_spread_by_sender_and_stable():
    members = Members("n3.0", "n3", ttl=3.0)
    members.update(announce("n1.0", ["c.test"]), 0.0)
    members.update(announce("n2.0", ["c.test"]), 0.0)
    chosen = {members.component_holder("c.test", f"u{k}@s.test") for k in range(50)}
    assert chosen == {"n1.0", "n2.0"}
    assert all(members.component_holder("c.test", "u7@s.test") == members.component_holder("c.test", "u7@s.test")
               for _ in range(5))
    assert members.component_holder("other.test", "u@s.test") is None


def test_a_pair_held_on_this_node_is_preferred():
    members = Members("n1.0", "n1", ttl=3.0)
    members.update(announce("n2.0", pairs=[("c.test", "r.test")]), 0.0)
    members.update(announce("n1.1", pairs=[("c.test", "r.test")]), 0.0)
    assert {members.pair_holder(("c.test", "r.test"), f"u{k}") for k in range(30)} == {"n1.1"}


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
    assert members.component_holder("b.test", "x") == "n3.0"
    assert members.pair_holder(("b.test", "r.test"), "x") is None
    members.update(announce("n3.0", []), 4.5)  # a new announcement replaces the old one
    assert members.component_holder("b.test", "x") is None


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
    return Carried("message", None if i % 2 else "chat", f"u{i}@a.test", "b@b.test", f"id{i}", "a.test", "b.test",
                   b"<message>" + b"x" * size + b"</message>")


def test_a_batch_round_trips_whole_and_refuses_truncation():
    items = [carried(i) for i in range(5)]
    payload = encode_batch("n1.0", items)
    assert decode_batch(payload) == ("n1.0", items)
    with pytest.raises(FrameError):
        decode_batch(payload[:-3])
    with pytest.raises(FrameError):
        decode_batch(payload[:12] + b"\xff" + payload[13:])


def test_batches_are_split_under_the_payload_limit_in_order():
    items = [carried(i, size=200_000) for i in range(7)]
    batches = split(items)
    assert [item for batch in batches for item in batch] == items
    assert all(sum(len(i.data) for i in batch) <= MAX_BATCH_BYTES or len(batch) == 1 for batch in batches)
    assert len(batches) > 1


def test_answers_round_trip_and_must_match_the_batch():
    assert decode_answer(encode_answer([None, None]), 2) == [None, None]
    answers = [None, ("service-unavailable", "b.test is not connected")]
    assert decode_answer(encode_answer(answers), 2) == answers
    with pytest.raises(FrameError):
        decode_answer(encode_answer(answers), 3)
