"""The benchmark corpus, generated once per session."""

import pytest

from bench.corpus import make_stream


@pytest.fixture(scope="session")
def corpus():
    """``(stream bytes, number of top-level stanzas)`` of the seeded S2S stream."""
    return make_stream()
