"""Fixtures shared by the test modules."""

import pytest


def _drive(tokenizer, chunks, via="feed"):
    """Push ``chunks`` into ``tokenizer`` and collect ``(event, raw bytes)`` pairs.

    The raw bytes of each event's range are copied right after the call that
    returned it, because offsets only hold until the next read. ``via`` is
    ``"feed"`` (bytes), ``"memoryview"`` (feed a memoryview) or ``"buffer"``
    (``get_buffer``/``buffer_updated`` as an ``asyncio.BufferedProtocol``).
    Returns ``(pairs, error)``; ``error`` is the ``ParseError`` that stopped
    the stream (its ``events`` are already in ``pairs``) or ``None``.
    """
    from router._fastparse import ParseError

    pairs = []

    def collect(events):
        buf = tokenizer.buffer
        pairs.extend((event, bytes(buf[event.start : event.end])) for event in events)

    try:
        for chunk in chunks:
            if via == "feed":
                collect(tokenizer.feed(bytes(chunk)))
            elif via == "memoryview":
                collect(tokenizer.feed(memoryview(bytearray(chunk))))
            else:
                view = memoryview(chunk)
                while view:
                    target = tokenizer.get_buffer(len(view))
                    n = min(len(target), len(view))
                    assert n > 0, "get_buffer returned an empty buffer"
                    target[:n] = view[:n]
                    target.release()
                    view = view[n:]
                    collect(tokenizer.buffer_updated(n))
    except ParseError as err:
        collect(err.events)
        return pairs, err
    return pairs, None


@pytest.fixture(scope="session")
def drive():
    """The chunked-feeding helper (session scoped so Hypothesis tests can use it)."""
    return _drive
