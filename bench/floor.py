"""The raw-relay floor: what a byte relay on uvloop does with the relay's topology
and nothing else (no XML, no authorization), so the relay's figures can be read as
a share of it.

N generator streams -> relay -> one echo connection -> relay -> back to the stream
that sent it. Records are length-prefixed (4 bytes big-endian), carry the stream's
index, a sequence number and the send time, and have the load generator's size
mix. The relay forwards each record as a view of its receive buffer (swapped, not
overwritten, while views are queued) and writes every destination's records with
one ``writelines`` per event-loop iteration, as the relay does. The echo sends its
reads back as they are. The generator keeps ``window`` records in flight per
stream and checks each stream's sequence.

    python -m bench.floor --streams 10,1000 --duration 5     # or: python -m bench.compare (--floor)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import uvloop

from bench.loadlib import procstat
from bench.loadlib.targets import taskset
from bench.loadlib.tracker import percentiles

HOST = "127.0.0.1"
HEADER = 4 + 4 + 8 + 8  # length, stream index, sequence, send time (us)
READ = 65536
ECHO_CONNECT_S = 15.0  # the echo process starts and connects within this


class Hub:
    """The floor relay's routing and gathered writes."""

    def __init__(self, loop):
        self.loop = loop
        self.streams: dict[int, Link] = {}
        self.echo: Link | None = None
        self.dirty: list[Link] = []

    def queue(self, dest: Link, chunk) -> None:
        if dest.out is None:
            dest.out = [chunk]
            if not self.dirty:
                self.loop.call_soon(self.flush)
            self.dirty.append(dest)
        else:
            dest.out.append(chunk)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for dest in dirty:
            out, dest.out = dest.out, None
            if dest.transport is not None and not dest.transport.is_closing():
                dest.transport.writelines(out)


class Link(asyncio.BufferedProtocol):
    """One connection of the floor relay: records in, views of them out."""

    def __init__(self, hub: Hub, is_echo: bool):
        self.hub, self.is_echo = hub, is_echo
        self.buf, self.start, self.fill, self.pinned = bytearray(READ), 0, 0, False
        self.out = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        if self.is_echo:
            self.hub.echo = self
            print("echo connected", flush=True)  # the sweep starts sending after this line

    def get_buffer(self, sizehint):
        if len(self.buf) - self.fill < 4096:
            tail = self.buf[self.start:self.fill]
            if self.pinned:  # queued views still point into the old buffer
                self.buf, self.pinned = bytearray(max(READ, 2 * len(tail))), False
            self.buf[:len(tail)] = tail
            self.start, self.fill = 0, len(tail)
        return memoryview(self.buf)[self.fill:]

    def buffer_updated(self, nbytes):
        self.fill += nbytes
        buf, start, fill, hub = self.buf, self.start, self.fill, self.hub
        view = memoryview(buf)
        while fill - start >= 4:
            end = start + 4 + int.from_bytes(buf[start:start + 4], "big")
            if end > fill:
                break
            if self.is_echo:
                dest = hub.streams.get(int.from_bytes(buf[start + 4:start + 8], "big"))
            else:
                dest = hub.echo
                hub.streams.setdefault(int.from_bytes(buf[start + 4:start + 8], "big"), self)
            if dest is not None:
                hub.queue(dest, view[start:end])
                self.pinned = True
            start = end
        if start == fill and not self.pinned:
            start = self.fill = 0
        self.start = start


async def serve_relay() -> None:
    loop = asyncio.get_running_loop()
    hub = Hub(loop)
    remote = await loop.create_server(lambda: Link(hub, False), HOST, 0)
    echo = await loop.create_server(lambda: Link(hub, True), HOST, 0)
    print(remote.sockets[0].getsockname()[1], echo.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def serve_echo(port: int) -> None:
    await asyncio.get_running_loop().create_connection(Echo, HOST, port)
    await asyncio.Event().wait()


class Stream(asyncio.Protocol):
    """One generator stream: ``window`` records in flight, each answer checked and timed."""

    def __init__(self, gen: Generator, index: int):
        self.gen, self.index = gen, index
        self.sent = self.expected = 0
        self.pending = b""

    def connection_made(self, transport):
        self.transport = transport

    def send(self, count: int) -> None:
        now, out = time.monotonic_ns() // 1000, []
        for _ in range(count):
            size = self.gen.sizes[self.sent % len(self.gen.sizes)]
            out.append((size - 4).to_bytes(4, "big") + self.index.to_bytes(4, "big") + self.sent.to_bytes(8, "big")
                       + now.to_bytes(8, "big") + b"x" * (size - HEADER))
            self.sent += 1
        self.transport.write(b"".join(out))

    def data_received(self, data):
        data = self.pending + data if self.pending else data
        pos, n, gen, got = 0, len(data), self.gen, 0
        now = time.monotonic_ns() // 1000
        while n - pos >= HEADER:
            end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
            if end > n:
                break
            index = int.from_bytes(data[pos + 4:pos + 8], "big")
            seq = int.from_bytes(data[pos + 8:pos + 16], "big")
            if index != self.index:
                gen.misrouted += 1
            elif seq != self.expected:
                gen.lost += max(0, seq - self.expected)
            self.expected = seq + 1
            if gen.counting:
                gen.delivered += 1
                if gen.delivered % 7 == 0:
                    gen.latencies.append(now - int.from_bytes(data[pos + 16:pos + 24], "big"))
            pos, got = end, got + 1
        self.pending = data[pos:]
        if got and gen.running:
            self.send(got)


class Generator:
    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.delivered = self.lost = self.misrouted = 0
        self.latencies: list[int] = []
        self.counting = False
        self.running = True


def size_mix(text: str) -> list[int]:
    """"200:0.9,2000:0.1" -> a shuffled list of 100 sizes in those shares (the generator's mix)."""
    sizes = []
    for part in text.split(","):
        size, share = part.split(":")
        sizes += [int(size)] * round(float(share) * 100)
    random.Random(1).shuffle(sizes)
    return sizes


async def measure(port: int, streams: int, window: int, sizes: str, duration: float, ramp_up: float,
                  pids: dict[str, int]) -> dict:
    loop = asyncio.get_running_loop()
    gen = Generator(size_mix(sizes))
    links = []
    for index in range(streams):
        _, stream = await loop.create_connection(lambda i=index: Stream(gen, i), HOST, port)
        links.append(stream)
    for stream in links:
        stream.send(window)
    await asyncio.sleep(ramp_up)
    before = {name: procstat.sample(pid) for name, pid in pids.items()}
    busy0, t0 = procstat.cpu_busy_s(), time.monotonic()
    gen.counting = True
    await asyncio.sleep(duration)
    gen.counting = False
    wall = time.monotonic() - t0
    after = {name: procstat.sample(pid) for name, pid in pids.items()}
    busy = procstat.busy_percent(busy0, procstat.cpu_busy_s(), wall)
    gen.running = False
    for stream in links:
        stream.transport.close()
    cpu = {name: procstat.cpu_percent(before[name], after[name], wall) for name in pids}
    accounted = sum(v for v in cpu.values() if v is not None)
    return {
        "config": {"streams": streams, "window": window, "sizes": sizes, "duration_s": duration},
        "throughput": {"offered_per_s": "saturate", "delivered_per_s": round(gen.delivered / wall, 1)},
        "latency_ms": percentiles(gen.latencies),
        "handshakes": {},
        "cpu_percent": cpu,
        "cpu_us_per_message": {name: round(10_000 * v / (gen.delivered / wall), 2) if v and gen.delivered else None
                               for name, v in cpu.items()},
        "machine_busy_percent": {**busy, "others": round(sum(v for k, v in busy.items() if k.startswith("cpu"))
                                                         - accounted, 1)},
        "delivery": {"lost": gen.lost, "duplicated": 0, "misrouted": gen.misrouted, "error_stanzas": 0},
    }


def run(counts: list[int], *, window: int = 8, sizes: str = "200:0.9,2000:0.1", duration: float = 5.0,
        ramp_up: float = 1.0, target_cpu: str | None = "0", generator_cpu: str | None = "1") -> dict:
    """The floor's saturation sweep; one relay and one echo process per point, stopped after it."""
    points = []
    root = Path(__file__).resolve().parents[1]
    for streams in counts:
        relay = subprocess.Popen(taskset(target_cpu) + [sys.executable, "-m", "bench.floor", "relay"],
                                 stdout=subprocess.PIPE, text=True, cwd=root)
        echo = None
        try:
            remote_port, echo_port = (int(p) for p in relay.stdout.readline().split())
            echo = subprocess.Popen(taskset(generator_cpu) + [sys.executable, "-m", "bench.floor", "echo",
                                                              str(echo_port)], cwd=root)
            # records sent before the echo connects would have nowhere to go
            if not select.select([relay.stdout], [], [], ECHO_CONNECT_S)[0] or not relay.stdout.readline():
                raise RuntimeError(f"the floor's echo did not connect within {ECHO_CONNECT_S:g} s")
            pids = {"floor": relay.pid, "generator": os.getpid(), "echo": echo.pid}
            points.append(uvloop.run(measure(remote_port, streams, window, sizes, duration, ramp_up, pids)))
        finally:
            for process in (echo, relay):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=10)
    return {"target": "floor", "points": points}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("role", nargs="?", choices=("sweep", "relay", "echo"), default="sweep")
    p.add_argument("port", nargs="?", type=int, help="echo: the relay's echo port")
    p.add_argument("--streams", default="10,1000")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--sizes", default="200:0.9,2000:0.1")
    opts = p.parse_args(argv)
    if opts.role == "relay":
        uvloop.run(serve_relay())
    elif opts.role == "echo":
        uvloop.run(serve_echo(opts.port))
    else:
        procstat.raise_fd_limit()
        os.sched_setaffinity(0, {1})
        counts = [int(n) for n in opts.streams.split(",")]
        print(json.dumps(run(counts, window=opts.window, sizes=opts.sizes, duration=opts.duration), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
