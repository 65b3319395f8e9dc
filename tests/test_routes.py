"""The route table, pending queues and backoff (sans-IO, no sockets)."""

from router.negotiation.pairs import Pair
from router.routing.routes import Backoff, PendingQueue, Queued, RouteTable


def queued(n: int, since: float) -> Queued:
    return Queued(b"<message/>", "message", None, f"a{n}@x.test", "b@y.test", str(n), since)


def test_pending_queue_is_bounded_by_count_and_age():
    queue = PendingQueue(max_stanzas=2, max_age=10.0)
    assert queue.push(queued(0, since=0.0))
    assert queue.push(queued(1, since=5.0))
    assert not queue.push(queued(2, since=6.0))  # full: the caller bounces it
    assert [q.id for q in queue.expired(now=12.0)] == ["0"]  # only the one older than 10 s
    assert [q.id for q in queue.drain()] == ["1"]
    assert not queue.items


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    backoff = Backoff(base=1.0, cap=8.0)
    delays = [backoff.failed(now=0.0, rng=lambda: 1.0) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert Backoff(base=1.0, cap=8.0).failed(now=0.0, rng=lambda: 0.0) == 0.5  # jitter halves at most
    assert backoff.wait(now=3.0) == 5.0


def test_backoff_entries_are_forgotten_on_success_and_after_a_quiet_cap():
    """Per-domain state stays bounded: one entry per domain that failed recently."""
    table = RouteTable()
    for i in range(100):
        table.backoff_for(f"d{i}.test", 1.0, 8.0).failed(now=0.0, rng=lambda: 1.0)  # wait ends at 1.0
    table.backoff_succeeded("d0.test")
    assert "d0.test" not in table.backoff and len(table.backoff) == 99
    table.prune_backoff(now=8.5)  # 7.5 s after the waits ended: within one cap, still counted
    assert len(table.backoff) == 99
    table.backoff_for("d1.test", 1.0, 8.0).failed(now=8.5, rng=lambda: 1.0)  # d1 keeps failing
    table.prune_backoff(now=9.5)
    assert list(table.backoff) == ["d1.test"] and table.backoff["d1.test"].failures == 2


def test_first_stream_keeps_a_pair_and_closing_it_frees_every_pair():
    table = RouteTable()
    first, second = object(), object()
    assert table.add_remote(Pair("a.test", "b.test"), first)
    assert table.add_remote(Pair("a2.test", "b.test"), first)
    assert not table.add_remote(Pair("a.test", "b.test"), second)  # one output stream per pair (RFC 6120 §10.1)
    assert table.remote[Pair("a.test", "b.test")] is first
    assert list(table.links_to("b.test")) == [first]
    assert table.remove_link(first) == {Pair("a.test", "b.test"), Pair("a2.test", "b.test")}
    assert not table.remote
    assert list(table.links_to("b.test")) == []
    assert table.add_remote(Pair("a.test", "b.test"), second)
    assert table.add_remote(Pair("a.test", "c.test"), first)
    assert list(table.links_to("b.test")) == [second] and list(table.links_to("c.test")) == [first]


def test_local_targets_are_removed_only_by_their_owner():
    table = RouteTable()
    owner, other = object(), object()
    table.set_local("bot.a.test", owner)
    assert not table.remove_local("bot.a.test", other)
    assert table.remove_local("bot.a.test", owner)
    assert "bot.a.test" not in table.local


def test_queue_for_reports_creation_once():
    table = RouteTable()
    queue, created = table.queue_for(Pair("a.test", "b.test"), 10, 1.0)
    again, created_again = table.queue_for(Pair("a.test", "b.test"), 10, 1.0)
    assert created and not created_again and again is queue
    queue.push(queued(0, 0.0))
    assert [q.id for q in table.take_queue(Pair("a.test", "b.test"))] == ["0"]
    assert table.take_queue(Pair("a.test", "b.test")) == []
