"""``python -m bench.load`` against a cluster on one nats-server: node n1 of two
workers, node n2 (one process) holding the echo component, the generator's
streams spread over the nodes, so stanzas go remote -> n1 worker -> bus -> n2 ->
component -> n2 -> bus -> n1 worker -> remote, and remote -> n2 -> component ->
n2 -> remote. Mid-run an n1 worker is SIGKILLed (the supervisor restarts it), or
a whole node n3 carrying streams of its own; then every stanza sent must be
exactly one of: echoed, bounced back to the generator, its echo bounced to the
component, or not taken (sent on a stream that died after the last XEP-0198 h
its peer gave), each stream's echoes in order, and every stanza the relay gave
up on the bus must have come back as a bounce. The restarted worker and the
remaining nodes take traffic again.

Nothing acknowledged is lost: an XEP-0198 ``<a/>`` waits until what it counts
has left the process (``StreamAcks.answer``), and a member says "taken" only
once the writes are its transports' (``Bus._on_batch``). One ambiguity stays,
and is allowed: a member that wrote a stanza and died before its answer reached
the sender cannot be told from one that died before writing it, so the sender
bounces it on the timeout; it is then delivered and bounced
(``more_than_one``), never delivered twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from bench.loadlib import targets, wire

from .conftest import ROOT, free_port
from .nodes import eventually, node, per_worker, samples, scrape

DOMAIN = targets.BENCH_DOMAIN  # the echo component's, and the generator's stanzas' destination
SECRET = "cluster-load-component-secret"
STREAMS = 12
RATE = 3000  # stanzas/s over all streams
DURATION = 3.0  # seconds of load after the warmup; the kill comes within its first second
ROUND_TRIPS_BEFORE_KILL = 200  # echoes the doomed process carried back: the load flows through it
BUS_TIMEOUT = 1.0  # a member that died holding a batch is given up on well before the run ends
GENERATOR_TIMEOUT = 60.0
ACK_EVERY = 1  # an XEP-0198 ack asked with every write: the acknowledged stanzas reach the kill
@pytest.fixture
def listen_port():
    """The generator's own S2S listener (its simulated servers' authoritative server)."""
    return free_port()


@pytest.fixture
def cluster(relay_spec, nats_url, listen_port):
    """Factory: the spec of node ``name`` of ``workers`` processes; every node routes the simulated
    servers to the generator."""

    def make(name: str, workers: int = 1):
        return relay_spec(
            name, domains=(f"{name}.cluster.test",), components={DOMAIN: SECRET}, tls=False,
            routes={wire.load_domain(index): listen_port for index in range(STREAMS + 4)},
            metrics_port=free_port(), policy={"require_encryption": False},
            s2s={"bidi": "always", "close_timeout": 2.0},
            cluster={"node": name, "nats": [nats_url], "workers": workers, "bus_timeout": BUS_TIMEOUT})

    return make


@contextmanager
def generating(specs, echo_spec, out: Path, listen_port: int, streams: int = STREAMS, duration: float = DURATION):
    """bench.load over the S2S ports of ``specs`` (round-robin), the echo component on ``echo_spec``'s
    component port; killed if the test is done with it before it finished."""
    argv = [sys.executable, "-m", "bench.load", "--target-domain", DOMAIN, "--echo",
            f"127.0.0.1:{echo_spec.component_port}", "--echo-secret", SECRET, "--streams", str(streams),
            "--rate", str(RATE), "--duration", str(duration), "--warmup", "0.5", "--drain", "3",
            "--sm-ack-every", str(ACK_EVERY), "--listen-port", str(listen_port), "--quiet", "--output", str(out),
            "--workdir", str(out.with_suffix(""))]
    for spec in specs:
        argv += ["--target", f"127.0.0.1:{spec.s2s_port}"]
    with open(out.with_suffix(".log"), "w") as log:
        generator = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield generator
    finally:
        if generator.poll() is None:
            generator.kill()
        generator.wait()


def finished(generator: subprocess.Popen, out: Path) -> dict:
    """The generator's one load point, once it has exited."""
    generator.wait(GENERATOR_TIMEOUT)
    log = out.with_suffix(".log").read_text()
    assert generator.returncode in (0, 1) and out.exists(), f"bench.load exited {generator.returncode}: {log}"
    report = json.loads(out.read_text())
    return report["points"][0] | {"echo_component": report["echo_component"], "exit": generator.returncode}


def given_up(*specs) -> int:
    """Stanzas the running members of ``specs`` sent over the bus and bounced (no answer, or no member)."""
    return sum(value for spec in specs
               for _, value in samples(scrape(spec.metrics_port), "xmpp_router_bus_failures_total"))


def accounted(point: dict, dead_streams: set[int], bounces_made: int) -> None:
    """Assert that only the streams in ``dead_streams`` died, that every stanza has a fate (two
    only as delivered and bounced), that nothing was lost, came twice or out of order, and that
    the ``bounces_made`` by the relay all arrived."""
    d, fates, component = point["delivery"], point["delivery"]["fates"], point["echo_component"]
    summary = json.dumps({k: d[k] for k in ("sent", "fates", "dead_streams", "samples")} |
                         {"component": {k: v for k, v in component.items() if k != "bounced_ids"},
                          "bounces made": bounces_made})
    assert point["handshakes"]["established"] == STREAMS, point["handshakes"]
    assert sum(fates.values()) == d["sent"] > RATE * DURATION / 2, summary
    assert (d["duplicated"], d["out_of_order"], d["misrouted"], d["error_stanzas"], d["unparseable"],
            d["stream_errors"]) == (0, 0, 0, 0, 0, 0), summary
    dead = {s["stream"]: s for s in d["dead_streams"]}
    assert set(dead) == dead_streams, summary
    # the streams that lived had every stanza echoed: what was not is the dead streams'
    assert fates["echoed"] == d["sent"] - sum(s["sent"] - s["echoed"] for s in dead.values()), summary
    # the kill came mid-run: some stanza was bounced, not taken, or (the ambiguity above) written by
    # the member that died before its answer came, and bounced on the timeout too
    assert fates["bounced"] + fates["echo_bounced"] + fates["not_taken"] + fates["more_than_one"] > 0, summary
    # every stanza the relay gave up on the bus came back as a bounce: none dropped silently
    assert len(set(component["bounced_ids"])) == len(component["bounced_ids"]), summary
    assert fates["bounced"] + len(component["bounced_ids"]) == bounces_made, summary
    acks = point["stream_management"]
    assert (acks["h_errors"], acks["unacknowledged_at_end"]) == (0, 0), acks
    # acknowledged and never delivered nor bounced; taken by a member and never written nor bounced
    assert (fates["lost"], component["unreturned"]) == (0, 0), summary


def assert_all_echoed(point: dict) -> None:
    d = point["delivery"]
    assert point["exit"] == 0 and d["fates"]["echoed"] == d["sent"] > 0, json.dumps(d)


def test_a_killed_worker_loses_nothing_and_its_restart_takes_streams_again(cluster, listen_port, tmp_path):
    n1, n2 = cluster("n1", workers=2), cluster("n2")
    with node(n1, tmp_path / "n1.toml") as node1, node(n2, tmp_path / "n2.toml"):
        with generating([n1, n2], n2, tmp_path / "run.json", listen_port) as generator:
            # the n1 worker holding more of the generator's streams (streams 0, 2, ... are n1's), once
            # it has carried echoes back; it dies with its streams
            def loaded():
                text = scrape(n1.metrics_port)
                held = per_worker(text, "xmpp_router_streams_open", direction="in")
                echoes = per_worker(text, "xmpp_router_bus_stanzas_total", direction="received")
                busiest = max(held, key=held.get, default=None)
                ready = sum(held.values()) == STREAMS // 2 and echoes.get(busiest, 0) >= ROUND_TRIPS_BEFORE_KILL
                return ready and (int(busiest), int(held[busiest]))

            victim, streams_held = eventually(loaded, "load through n1's workers", timeout=GENERATOR_TIMEOUT)
            killed = node1.workers()[victim]
            os.kill(killed, signal.SIGKILL)
            point = finished(generator, tmp_path / "run.json")
        dead = {s["stream"] for s in point["delivery"]["dead_streams"]}
        assert len(dead) == streams_held and all(index % 2 == 0 for index in dead), point["delivery"]["dead_streams"]
        accounted(point, dead, given_up(n1, n2))

        eventually(lambda: node1.workers()[victim] != killed, "the killed worker's restart")
        eventually(lambda: per_worker(scrape(n1.metrics_port), "xmpp_router_worker_up").get(str(victim)) == 1,
                   "the new worker in the node's metrics")
        with generating([n1], n2, tmp_path / "again.json", listen_port, streams=16, duration=1.0) as generator:
            assert_all_echoed(finished(generator, tmp_path / "again.json"))
        text = scrape(n1.metrics_port)  # a restarted worker's counters start from 0: these are the new run's
        authenticated = per_worker(text, "xmpp_router_negotiations_completed_total", direction="in")
        carried = per_worker(text, "xmpp_router_bus_stanzas_total", direction="received")
        assert authenticated.get(str(victim), 0) > 0 and carried.get(str(victim), 0) > 0, text


def test_a_killed_node_loses_nothing_and_the_others_serve_on(cluster, listen_port, tmp_path):
    n1, n2, n3 = cluster("n1", workers=2), cluster("n2"), cluster("n3")
    with ExitStack() as nodes:
        nodes.enter_context(node(n1, tmp_path / "n1.toml"))
        node2 = nodes.enter_context(node(n2, tmp_path / "n2.toml"))
        node3 = nodes.enter_context(node(n3, tmp_path / "n3.toml"))
        with generating([n1, n2, n3], n2, tmp_path / "run.json", listen_port) as generator:
            def echoes_through_n3():
                received = samples(scrape(n3.metrics_port), "xmpp_router_bus_stanzas_total", direction="received")
                return sum(value for _, value in received) >= ROUND_TRIPS_BEFORE_KILL

            eventually(echoes_through_n3, "load through n3", timeout=GENERATOR_TIMEOUT)
            node3.process.kill()  # one process (workers = 1): the whole node, with no goodbye
            point = finished(generator, tmp_path / "run.json")
        accounted(point, {index for index in range(STREAMS) if index % 3 == 2}, given_up(n1, n2))

        # once the others forgot n3 (a silent member's routes go after 3.5 s), its simulated servers
        # stream to n1 and n2 and lose nothing
        eventually(lambda: "member n3.0 went silent" in node2.text(), "n2 to forget n3")
        with generating([n1, n2], n2, tmp_path / "again.json", listen_port, duration=1.0) as generator:
            assert_all_echoed(finished(generator, tmp_path / "again.json"))
