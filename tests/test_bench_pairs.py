"""bench/pairs.py: the figures read from one bench.compare run, and the table of medians."""

from __future__ import annotations

from bench.pairs import figures, table


def point(streams: int, delivered: float, **cpu: float) -> dict:
    return {"config": {"streams": streams}, "throughput": {"delivered_per_s": delivered},
            "latency_ms": {"p50": 1.5, "p99": 4.0}, "cpu_percent": {"generator": 60.0, "echo": 30.0, **cpu}}


RUN = {
    "relay": {"points": [point(10, 50_000, relay=50.0)]},  # 10 µs per stanza
    "relay-hop": {"points": [point(10, 25_000, **{"relay-hop": 40.0, "relay-hop:n2": 30.0, "nats": 20.0})]},  # 36
    "floor": {"points": [point(10, 100_000, floor=80.0)]},
}


def test_one_run_gives_each_targets_cost_the_hop_and_the_floor_share():
    got = figures(RUN)
    assert got["relay 10: target µs/stanza"] == 10.0
    assert (got["relay 10: latency p50 ms"], got["relay 10: latency p99 ms"]) == (1.5, 4.0)  # the generator and the echo component are not the target
    assert got["relay-hop 10: target µs/stanza"] == 36.0
    assert got["one hop 10: % of a local delivery"] == 130.0  # (36 - 10) / 2 / 10
    assert got["one hop 10: % of a local delivery, relay processes alone"] == 90.0  # n1 + n2: (28 - 10) / 2 / 10
    assert got["relay / floor 10: per core, %"] == 80.0  # 100,000/s per core against 125,000/s


def test_the_table_gives_medians_and_their_ratio_and_skips_what_one_side_lacks():
    before = [{"x": 10.0, "only before": 1.0}, {"x": 30.0}, {"x": 20.0}]
    after = [{"x": 5.0}, {"x": 15.0}, {"x": 10.0}]
    rows = table(before, after).splitlines()
    assert rows[2:] == ["| x | 10.0, 30.0, 20.0 | 5.0, 15.0, 10.0 | 20.0 | 10.0 | 0.50 |"]
