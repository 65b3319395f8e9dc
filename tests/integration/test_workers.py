"""A node of worker processes (``[cluster] workers = 2``), run as ``python -m router
serve``: the workers share the S2S and component ports, one scrape sees them all,
a worker that dies is restarted, SIGHUP and SIGTERM reach every worker, and
``workers = 1`` stays one process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path

from router.wire.namespaces import STREAM_NS

from .conftest import arun, free_port
from .nodes import NODE_TIMEOUT, eventually, node, per_worker, pid_alive, scrape
from .rawstream import RawComponent

S2S_HEADER = (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='{STREAM_NS}' "
              f"to='n1.test' version='1.0'>").encode()
COMPONENTS = {f"c{i}.n1.test": f"secret-{i}" for i in range(16)}


async def hold_s2s(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` inbound S2S streams that sent their header and got the relay's."""
    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(S2S_HEADER)
        assert b"<stream:stream" in await reader.read(4096)
        return writer

    return list(await asyncio.gather(*(one() for _ in range(count))))


def cluster_spec(relay_spec, nats_url: str, **kwargs):
    return relay_spec("n1", domains=("n1.test",), metrics_port=free_port(), s2s={"close_timeout": 2.0},
                      cluster={"workers": 2, "nats": [nats_url], "node": "n1"}, **kwargs)


def test_workers_share_the_s2s_and_component_ports_and_one_scrape_sees_both(relay_spec, nats_url, tmp_path):
    spec = cluster_spec(relay_spec, nats_url, components=COMPONENTS)
    with node(spec, tmp_path / "n1.toml") as n1:
        assert len(n1.workers()) == 2 and n1.process.pid not in n1.workers().values()

        async def scenario():
            streams = await hold_s2s(spec.s2s_port, 40)
            components = [await RawComponent.connect(spec.component_port, domain, secret)
                          for domain, secret in COMPONENTS.items()]
            text = await asyncio.to_thread(scrape, n1.metrics_port())
            for writer in streams + [component.writer for component in components]:
                writer.close()
            return text

        text = arun(scenario())
        pre_auth = per_worker(text, "xmpp_router_pre_auth_streams")
        connected = per_worker(text, "xmpp_router_components_connected")
        assert set(pre_auth) == set(connected) == {"0", "1"}, text
        assert sum(pre_auth.values()) == 40 and min(pre_auth.values()) > 0, pre_auth
        assert sum(connected.values()) == len(COMPONENTS) and min(connected.values()) > 0, connected
        assert text.count("# TYPE xmpp_router_pre_auth_streams gauge") == 1
        assert per_worker(text, "xmpp_router_worker_up") == {"0": 1, "1": 1}


def test_a_killed_worker_is_restarted_and_the_port_keeps_accepting(relay_spec, nats_url, tmp_path):
    spec = cluster_spec(relay_spec, nats_url)
    with node(spec, tmp_path / "n1.toml") as n1:
        killed = n1.workers()[1]
        os.kill(killed, signal.SIGKILL)
        eventually(lambda: f"worker 1 (pid {killed}) exited with signal SIGKILL; restarting it in 1 s" in n1.text(),
                   "the restart warning")
        restarted = eventually(lambda: n1.workers()[1] != killed and n1.workers()[1], "a new worker 1")
        assert pid_alive(restarted) and pid_alive(n1.workers()[0])
        text = eventually(lambda: (t := scrape(n1.metrics_port())) and 'worker_up{worker="1"} 1' in t and t,
                          "the new worker 1 in the node's metrics")
        assert per_worker(text, "xmpp_router_worker_restarts_total") == {"1": 1}

        async def scenario():
            streams = await hold_s2s(spec.s2s_port, 40)
            text = await asyncio.to_thread(scrape, n1.metrics_port())
            for writer in streams:
                writer.close()
            return text

        pre_auth = per_worker(arun(scenario()), "xmpp_router_pre_auth_streams")
        assert sum(pre_auth.values()) == 40 and min(pre_auth.values()) > 0, pre_auth


def test_sighup_reaches_every_worker_and_sigterm_stops_them_all(relay_spec, nats_url, tmp_path):
    spec = cluster_spec(relay_spec, nats_url)
    with node(spec, tmp_path / "n1.toml") as n1:
        workers = n1.workers()
        n1.process.send_signal(signal.SIGHUP)
        for index in workers:
            eventually(lambda: re.search(rf"worker={index} router\.server: configuration reloaded from", n1.text()),
                       f"worker {index}'s reload")
        assert n1.workers() == workers  # a reload restarts nothing
        n1.process.send_signal(signal.SIGTERM)
        assert n1.process.wait(timeout=NODE_TIMEOUT) == 0
        assert not any(pid_alive(pid) for pid in workers.values())
        assert "stopping 2 workers" in n1.text() and "restarting" not in n1.text()


def test_no_worker_outlives_its_supervisor(relay_spec, nats_url, tmp_path):
    spec = cluster_spec(relay_spec, nats_url)
    with node(spec, tmp_path / "n1.toml") as n1:
        n1.process.kill()
        n1.process.wait()
        for pid in n1.workers().values():
            eventually(lambda: not pid_alive(pid), f"worker pid {pid} to stop")


def test_one_worker_is_one_process_without_a_supervisor(relay_spec, nats_url, tmp_path):
    """``serve --workers 1`` over a file that asks for 2: today's single process."""
    spec = cluster_spec(relay_spec, nats_url)
    with node(spec, tmp_path / "n1.toml", "--workers", "1") as n1:
        children = Path(f"/proc/{n1.process.pid}/task/{n1.process.pid}/children").read_text().split()
        assert children == [] and n1.workers() == {}
        assert re.search(rf"^s2s: listening on 127\.0\.0\.1:{spec.s2s_port}$", n1.text(), re.M)
        assert "worker=" not in n1.text()
        assert "# TYPE xmpp_router_streams_open gauge" in scrape(spec.metrics_port)
        n1.process.send_signal(signal.SIGTERM)
        assert n1.process.wait(timeout=NODE_TIMEOUT) == 0


def test_the_supervisor_alone_speaks_to_systemd_for_the_node(relay_spec, nats_url, tmp_path):
    """READY=1 once every worker serves, RELOADING=1 / READY=1 around SIGHUP,
    STOPPING=1 on SIGTERM; the workers (which would say READY=1 each) say nothing."""
    name = f"router-node-{os.getpid()}-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(NODE_TIMEOUT)
        with node(cluster_spec(relay_spec, nats_url), tmp_path / "n1.toml", env={"NOTIFY_SOCKET": "@" + name}) as n1:
            assert sock.recv(4096).decode().split("\n") == ["READY=1", "STATUS=serving with 2 workers"]
            n1.process.send_signal(signal.SIGHUP)
            assert sock.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert sock.recv(4096) == b"READY=1"
            n1.process.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            assert n1.process.wait(NODE_TIMEOUT) == 0
            sock.settimeout(0.5)
            try:
                extra = sock.recv(4096)
            except TimeoutError:
                extra = None
            assert extra is None, f"a worker spoke to systemd: {extra!r}"


def test_stanzas_between_workers_cross_the_bus_and_a_killed_workers_share_bounces(relay_spec, nats_url, tmp_path):
    """a.n1.test and b.n1.test connect to different workers: a's stanzas reach b over
    the bus, in order; b's worker is killed, and every stanza a sends then comes
    back bounced (none vanishes); b, connected again, gets a's stanzas again."""
    from router.admin.ctl import request
    from router.admin.protocol import socket_path
    from router.config import parse_config
    from router.net.component_client import ComponentClient

    secrets = {"a.n1.test": "secret-a", "b.n1.test": "secret-b"}
    spec = cluster_spec(relay_spec, nats_url, components=secrets)
    sockets = [socket_path(parse_config(spec.toml(), spec.base), index) for index in (0, 1)]

    async def worker_of(domain: str) -> int | None:
        for index, path in enumerate(sockets):
            listing = await asyncio.to_thread(request, path, "streams", 5.0)
            if any(domain in s["local_domains"] for s in listing["streams"] if s["kind"] == "component"):
                return index
        return None

    async def connect(domain: str) -> ComponentClient:
        client = ComponentClient()
        await client.connect("127.0.0.1", spec.component_port, domain, secrets[domain])
        return client

    def message(name: str) -> str:
        return f"<message from='x@a.n1.test' to='y@b.n1.test' id='{name}'><body>{name}</body></message>"

    async def reachable(a, b) -> None:
        """Until a stanza from a reaches b (the workers hear each other within seconds)."""
        for attempt in range(int(NODE_TIMEOUT)):
            a.send(message(f"probe{attempt}"))
            try:
                if (await b.receive(timeout=1)).get("id", "").startswith("probe"):
                    return
            except TimeoutError:
                await a.receive(timeout=5)  # the probe bounced: not heard yet
        raise AssertionError("b.n1.test never became reachable from a.n1.test")

    with node(spec, tmp_path / "n1.toml") as n1:
        async def scenario():
            a = await connect("a.n1.test")
            for _ in range(20):  # the kernel picks the worker: connect b until it lands on the other one
                b = await connect("b.n1.test")
                if await worker_of("b.n1.test") != await worker_of("a.n1.test"):
                    break
                await b.close()
            else:
                raise AssertionError("b.n1.test never landed on the other worker")
            await reachable(a, b)
            for i in range(50):
                a.send(message(f"m{i}"))
            assert [(await b.receive(timeout=10)).get("id") for _ in range(50)] == [f"m{i}" for i in range(50)]
            os.kill(n1.workers()[await worker_of("b.n1.test")], signal.SIGKILL)
            for i in range(20):
                a.send(message(f"k{i}"))
            bounces = [await a.receive(timeout=15) for _ in range(20)]
            assert sorted(int(m.get("id")[1:]) for m in bounces) == list(range(20))
            assert all(m.get("type") == "error" for m in bounces)
            eventually(lambda: len(n1.all_pids()) == 3, "the killed worker's restart")
            b = await connect("b.n1.test")
            await reachable(a, b)
            await a.close()
            await b.close()

        arun(scenario(), timeout=NODE_TIMEOUT * 3)
