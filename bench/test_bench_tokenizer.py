"""Tokenizer throughput against the parsers a Python XMPP server would otherwise use.

Each benchmark splits one stream into its top-level stanzas, reading it in
fixed-size chunks as a socket would deliver it. No timing is asserted: the
figures go to ``benchmark.extra_info`` and docs/benchmarks.md.
"""

import pyexpat
import xml.etree.ElementTree as ElementTree

import pytest
from lxml import etree

from router._fastparse import Element, Tokenizer

CHUNK_SIZES = [4096, 65536]


def tokenizer_stanzas(chunks):
    """Full validation; each Element carries the decoded routing attributes."""
    tokenizer = Tokenizer()
    count = 0
    for chunk in chunks:
        for event in tokenizer.feed(chunk):
            if isinstance(event, Element) and event.to is not None:
                count += 1
    return count


def pyexpat_stanzas(chunks):
    """Namespace-aware expat with start/end handlers tracking depth."""
    parser = pyexpat.ParserCreate("UTF-8", namespace_separator=" ")
    state = {"depth": 0, "count": 0}

    def start(name, attributes):
        state["depth"] += 1

    def end(name):
        state["depth"] -= 1
        if state["depth"] == 1:
            state["count"] += 1

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    for chunk in chunks:
        parser.Parse(chunk, False)
    parser.Parse(b"", True)
    return state["count"]


def elementtree_stanzas(chunks):
    """What slixmpp does: XMLPullParser start/end events, dropping finished stanzas."""
    parser = ElementTree.XMLPullParser(events=("start", "end"))
    depth = count = 0
    root = None
    for chunk in chunks:
        parser.feed(chunk)
        for action, element in parser.read_events():
            if action == "start":
                depth += 1
                if depth == 1:
                    root = element
            else:
                depth -= 1
                if depth == 1:
                    count += 1
                    root.clear()
    parser.close()
    return count


def lxml_stanzas(chunks):
    """lxml's pull parser, clearing each finished stanza and its predecessors."""
    parser = etree.XMLPullParser(events=("start", "end"))
    depth = count = 0
    for chunk in chunks:
        parser.feed(chunk)
        for action, element in parser.read_events():
            if action == "start":
                depth += 1
            else:
                depth -= 1
                if depth == 1:
                    count += 1
                    element.clear(keep_tail=True)
                    while element.getprevious() is not None:
                        del element.getparent()[0]
    parser.close()
    return count


PARSERS = {
    "tokenizer": tokenizer_stanzas,
    "pyexpat": pyexpat_stanzas,
    "elementtree-pull": elementtree_stanzas,
    "lxml-pull": lxml_stanzas,
}


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES, ids=lambda n: f"{n // 1024}KiB")
@pytest.mark.parametrize("parser", PARSERS, ids=str)
def test_split_stream(benchmark, corpus, parser, chunk_size):
    benchmark.group = f"split an S2S stream, {chunk_size // 1024} KiB reads"
    stream, stanzas = corpus
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
    count = benchmark.pedantic(PARSERS[parser], args=(chunks,), rounds=10, iterations=1, warmup_rounds=1)
    assert count == stanzas  # every parser really saw every stanza
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["MB/s"] = round(len(stream) / mean / 1e6, 1)
    benchmark.extra_info["stanzas/s"] = round(stanzas / mean)
    benchmark.extra_info["bytes"] = len(stream)
    benchmark.extra_info["stanzas"] = stanzas
