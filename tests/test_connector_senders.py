"""The connector's index of which open streams may send a pair (router/net/connector.py):
a closing stream hands its pairs to another sender of the same pair, looks at no
other stream, and leaves nothing of itself in the index."""

from __future__ import annotations

import pytest

from relay_objects import make_world


@pytest.fixture
def world():
    yield from make_world()


def test_a_closed_stream_leaves_the_index_and_asks_no_unrelated_stream(world, monkeypatch):
    relay, _, (a, b) = world
    connector = relay.connector
    for stream in (a, b):  # as an outbound stream for the pair (svc.test -> its remote) would be
        stream.session.outbound_pairs = stream.session.inbound_pairs
        connector.routes_changed(stream)
    assert set(connector._senders) == {tuple(a.session.inbound_pairs[0]), tuple(b.session.inbound_pairs[0])}
    asked = []
    monkeypatch.setattr(connector, "routes_changed", lambda stream: asked.append(stream))
    connector.unroute(a)
    assert asked == []  # b carries another pair: it is not asked to take a's over
    assert all(a not in senders for senders in connector._senders.values())
    assert tuple(a.session.inbound_pairs[0]) not in connector._senders
