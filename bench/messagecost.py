"""What one message costs a process, apart from its bytes: a request and its answer
over NATS with nats-py (the cluster bus's client), over NATS with the bus's own data
connection (``wire``: ``router.cluster.dataline``, the NATS text protocol on a
plain asyncio protocol, no tasks or queues per message), and over a bare uvloop
TCP connection.
Every process (requester, responder, nats-server) is pinned to one CPU, as the
relay's processes are in ``bench.compare``; one request is in flight at a time, so
every message is a wake-up of its own.

    python -m bench.messagecost --count 20000 --size 100,8000 --cpu 0

Prints CPU microseconds per round trip for each process (user + system, from /proc):
the bus's cost per batch, which its batches and answers amortize over their stanzas,
and how much of it is nats-py's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from urllib.parse import urlparse

import nats
import uvloop

from bench.loadlib import procstat
from bench.loadlib.targets import taskset
from router.cluster.dataline import DataLine, open_line
from tests.interop.harness import free_port

HOST = "127.0.0.1"
SUBJECT = "messagecost.member"
SETTLE = 0.5  # seconds for a started process to listen or subscribe


async def nats_responder(url: str) -> None:
    nc = await nats.connect(url)

    async def answer(msg) -> None:
        await msg.respond(b"taken")

    await nc.subscribe(SUBJECT, cb=answer)
    await nc.flush()
    await asyncio.Event().wait()


async def nats_requester(url: str, size: int, count: int) -> None:
    nc = await nats.connect(url)
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future] = []

    async def answered(msg) -> None:
        waiting.pop().set_result(None)

    await nc.subscribe("messagecost.answer.*", cb=answered)
    payload = b"x" * size
    start = time.process_time()
    for sequence in range(count):
        waiting.append(loop.create_future())
        await nc.publish(SUBJECT, payload, reply=f"messagecost.answer.{sequence}")
        await waiting[0]
    print(time.process_time() - start)
    await nc.close()


async def wire_connect(url: str, subject: str, on_msg) -> DataLine:
    return await open_line(urlparse(url), None, "messagecost", {subject: on_msg}, print, SETTLE * 10)


async def wire_responder(url: str) -> None:
    line = await wire_connect(url, SUBJECT, lambda msg: line.publish(msg.reply, b"taken"))
    await asyncio.Event().wait()


async def wire_requester(url: str, size: int, count: int) -> None:
    waiting: list[asyncio.Future] = []
    line = await wire_connect(url, "messagecost.answer.*", lambda msg: waiting.pop().set_result(None))
    loop = asyncio.get_running_loop()
    payload = b"x" * size
    start = time.process_time()
    for sequence in range(count):
        waiting.append(loop.create_future())
        line.publish(SUBJECT, payload, f"messagecost.answer.{sequence}")
        await waiting[0]
    print(time.process_time() - start)
    line.close()


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def tcp_responder(port: int) -> None:
    await asyncio.get_running_loop().create_server(Echo, HOST, port)
    await asyncio.Event().wait()


class Requester(asyncio.Protocol):
    def __init__(self, size: int) -> None:
        self.size, self.received, self.answered = size, 0, None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.size:
            self.received -= self.size
            self.answered.set_result(None)


async def tcp_requester(port: int, size: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(lambda: Requester(size), HOST, port)
    payload = b"x" * size
    start = time.process_time()
    for _ in range(count):
        protocol.answered = loop.create_future()
        transport.write(payload)
        await protocol.answered
    print(time.process_time() - start)
    transport.close()


def measure(kind: str, size: int, count: int, cpu: str) -> dict[str, float]:
    """CPU µs per round trip of each process taking part."""
    port = free_port(HOST)
    others: dict[str, subprocess.Popen] = {}
    try:
        if kind in ("nats", "wire"):
            binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
            others["nats-server"] = subprocess.Popen(taskset(cpu) + [binary, "-a", HOST, "-p", str(port)],
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                     env=dict(os.environ, GOMAXPROCS=str(len(cpu.split(",")))))
            time.sleep(SETTLE)
            address = f"nats://{HOST}:{port}"
        else:
            address = str(port)
        others["responder"] = subprocess.Popen(taskset(cpu) + [sys.executable, "-m", "bench.messagecost",
                                                               "--role", f"{kind}-responder", "--address", address])
        time.sleep(SETTLE * 2)
        requester = subprocess.Popen(taskset(cpu) + [sys.executable, "-m", "bench.messagecost", "--role",
                                                     f"{kind}-requester", "--address", address, "--size", str(size),
                                                     "--count", str(count)], stdout=subprocess.PIPE)
        before = {name: procstat.sample(p.pid) for name, p in others.items()}
        start = time.monotonic()
        requester_cpu_s = float(requester.communicate()[0])  # its own, around the loop: no start-up
        wall = time.monotonic() - start
        after = {name: procstat.sample(p.pid) for name, p in others.items()}
        result = {name: (after[name].cpu_s - before[name].cpu_s) * 1e6 / count for name in others}
        result["requester"] = requester_cpu_s * 1e6 / count
        result["wall"] = wall * 1e6 / count  # start-up included
        return result
    finally:
        for process in reversed(others.values()):  # the responder first: no EOF noise from its client
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="round trips per measurement")
    p.add_argument("--size", default="100,8000", help="request sizes in bytes, comma-separated")
    p.add_argument("--cpu", default="0", help="the CPU every process is pinned to")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    uvloop.install()
    if opts.role == "nats-responder":
        asyncio.run(nats_responder(opts.address))
    elif opts.role == "tcp-responder":
        asyncio.run(tcp_responder(int(opts.address)))
    elif opts.role == "nats-requester":
        asyncio.run(nats_requester(opts.address, int(opts.size), opts.count))
    elif opts.role == "tcp-requester":
        asyncio.run(tcp_requester(int(opts.address), int(opts.size), opts.count))
    elif opts.role == "wire-responder":
        asyncio.run(wire_responder(opts.address))
    elif opts.role == "wire-requester":
        asyncio.run(wire_requester(opts.address, int(opts.size), opts.count))
    else:
        for size in (int(s) for s in opts.size.split(",")):
            for kind in ("tcp", "wire", "nats"):
                r = measure(kind, size, opts.count, opts.cpu)
                parts = ", ".join(f"{name} {r[name]:.1f}" for name in ("requester", "responder", "nats-server")
                                  if name in r)
                print(f"{kind:4} {size:5d} bytes: CPU µs per round trip: {parts}; wall {r['wall']:.1f}")


if __name__ == "__main__":
    main()
