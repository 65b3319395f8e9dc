"""One load point end to end: connect N simulated servers, load, drain, account.

Phases: `connect` (ramped, bounded concurrency) -> `warmup` -> `measure`
(the window whose deliveries and latencies count) -> `drain` (stop sending,
wait for the echoes and bounces still in flight) -> `acks` (with XEP-0198: one
last ack request per stream, every answer awaited) -> `close`. The streams are
spread round-robin over the target addresses; the bounces the echo component
received are read from its stats file while the point drains.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from dataclasses import asdict, dataclass, field

from . import echo, procstat, profile, sm, wire
from ._fastload import Intake
from .progress import Progress
from .streams import InboundStream, OutboundStream, bare_domain
from .tracker import Tracker, handshake_stats, percentiles

TICK_S = 0.002  # rate scheduler period
DRAIN_MAX_S = 60.0  # a saturated target's backlog drains within this, or counts as lost


@dataclass(frozen=True)
class LoadConfig:
    """Everything one run needs; `streams` is the stream count of this point."""

    target_host: str = "127.0.0.1"
    target_port: int = 5269
    targets: tuple[tuple[str, int], ...] = ()  # several (host, port): the streams spread over them round-robin
    target_domain: str = "bench.test"
    listen_host: str = "127.0.0.1"
    listen_port: int = 15269
    streams: int = 50
    rate: float = 1000.0  # stanzas/s over all streams; 0 = idle (hold the streams only)
    saturate: bool = False  # closed loop: keep `window` stanzas in flight per stream
    window: int = 16
    sizes: str = "200:1"
    duration: float = 10.0
    warmup: float = 1.0
    ramp_up: float = 0.0
    connect_concurrency: int = 200
    handshake_timeout: float = 60.0
    drain: float = 5.0  # stop waiting for echoes after this long without one
    tls: bool = False
    mechanism: str = "dialback"  # or "external"
    bidi: bool = True
    echo: bool = True  # False: the target sinks; only sending is measured
    secret: str = "load-generator-dialback-secret"
    ca_file: str | None = None  # CA that signed the target's certificate
    cert_file: str | None = None  # the simulated servers' certificate (*.load.test)
    key_file: str | None = None
    target_pids: dict[str, int] = field(default_factory=dict)  # label -> pid to sample
    profile_pid: int | None = None  # py-spy this process during the measurement window
    profile_prefix: str | None = None  # ... into <prefix>-<streams>.txt (collapsed stacks)
    progress: bool = True
    sm: bool = True  # XEP-0198 acks where the target offers them (and offered to its streams to us)
    sm_ack_every: int = 1000  # ask for an ack after this many stanzas sent unasked
    echo_stats: str | None = None  # the echo component's --stats file: the bounces it received

    def addresses(self) -> tuple[tuple[str, int], ...]:
        return self.targets or ((self.target_host, self.target_port),)


class LoadContext(Intake):
    """State shared by all streams of one point: accounting, scheduling, TLS (each read's echoes: `Intake`)."""

    def __init__(self, cfg: LoadConfig):
        super().__init__(Tracker(cfg.streams), cfg.saturate, asyncio.get_running_loop())
        self.cfg = cfg
        self.target_domain = cfg.target_domain
        self.any_load_domain = wire.load_domain(0)
        self.tls, self.mechanism, self.bidi, self.secret = cfg.tls, cfg.mechanism, cfg.bidi, cfg.secret
        self.size_cycle = wire.size_cycle(wire.parse_size_mix(cfg.sizes))
        self.echo_bounces = echo.Bounces(cfg.echo_stats, self.tracker.echo_bounced)
        self.acks = sm.AckTotals()
        self.streams: list[OutboundStream | None] = [None] * cfg.streams
        self.inbound: set[InboundStream] = set()  # connections the target opened to us, closed with the point
        self.failures: dict[str, int] = {}
        self.failure_samples: list[str] = []
        self.verifies = 0
        self.stopping = False
        self.sender = SenderStats()
        self.client_ssl, self.server_ssl = self.ssl_contexts(cfg)

    @staticmethod
    def ssl_contexts(cfg: LoadConfig):
        if not (cfg.tls or cfg.mechanism == "external"):
            return None, None
        client = ssl.create_default_context(cafile=cfg.ca_file)
        client.load_cert_chain(cfg.cert_file, cfg.key_file)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cfg.cert_file, cfg.key_file)
        if cfg.ca_file:
            server.load_verify_locations(cfg.ca_file)
            server.verify_mode = ssl.CERT_OPTIONAL
        return client, server

    def failure(self, reason: str):
        key = reason.split(":")[0][:80] if ": " in reason else reason[:80]
        key = " ".join(w for w in key.split() if wire.LOAD_SUFFIX not in w)  # one entry per reason, not per domain
        self.failures[key] = self.failures.get(key, 0) + 1
        if len(self.failure_samples) < 5:
            self.failure_samples.append(reason[:500])

    def jid_index(self, jid: str | None) -> int:
        """The simulated server a JID not seen before belongs to (-1: none); the first few are kept."""
        index = wire.domain_index(bare_domain(jid) or "")
        if index is None:
            return -1
        if len(self.index_of_jid) < 4 * self.cfg.streams:
            self.index_of_jid[jid] = index
        return index

    def from_target(self, jid: str | None) -> bool:
        """Whether an echo's sender not seen before is the target's; the first few are kept."""
        if bare_domain(jid) != self.target_domain:
            return False
        if len(self.target_jids) < 16:
            self.target_jids.add(jid)
        return True

    def died(self, stream: OutboundStream):
        """``stream`` died mid-run: what its peer had not acknowledged, it may never have taken."""
        self.tracker.died(stream.index, stream.acks.acked if stream.acks is not None else 0)

    def resumed(self, stream):
        if isinstance(stream, OutboundStream):
            self.refill_soon(stream.index)

    def refill(self):
        """Saturation mode: top every dirty stream up to `window` stanzas in flight."""
        self.flush_scheduled = False
        if not self.sending:
            self.dirty.clear()
            return
        now = self.now_us()
        window, tracker, streams = self.cfg.window, self.tracker, self.streams
        for index in self.dirty:
            stream = streams[index]
            if stream is None or not stream.ready or stream.paused or stream.closed:
                continue
            missing = window - tracker.outstanding(index)
            if missing > 0:
                stream.send(missing, now)
        self.dirty.clear()

    def ready_streams(self) -> list[OutboundStream]:
        return [s for s in self.streams if s is not None and s.ready and not s.closed]


async def _connect_all(ctx: LoadContext, loop) -> tuple[list[float], float]:
    cfg = ctx.cfg
    gate = asyncio.Semaphore(cfg.connect_concurrency)
    durations: list[float] = []
    start = time.perf_counter()
    addresses = cfg.addresses()

    async def one(index: int):
        delay = cfg.ramp_up * index / max(1, cfg.streams)
        if delay:
            await asyncio.sleep(delay - (time.perf_counter() - start))
        host, port = addresses[index % len(addresses)]
        async with gate:
            try:
                _, proto = await loop.create_connection(lambda: OutboundStream(ctx, index), host, port)
            except OSError as exc:
                ctx.failure(f"connect to {host}:{port} failed: {exc!r}")
                return
            ctx.streams[index] = proto
            try:
                durations.append(await asyncio.wait_for(asyncio.shield(proto.done), cfg.handshake_timeout))
            except asyncio.TimeoutError:
                ctx.failure(f"handshake of {proto.domain} timed out in phase {proto.phase}")
                proto.close()
            except ConnectionError:
                pass  # counted by the stream itself

    await asyncio.gather(*(one(i) for i in range(cfg.streams)))
    return durations, time.perf_counter() - start


def _samples(cfg: LoadConfig) -> dict[str, procstat.Sample | None]:
    out = {label: procstat.sample(pid) for label, pid in cfg.target_pids.items()}
    out["generator"] = procstat.sample(os.getpid())
    return out


async def run_point(cfg: LoadConfig, label: str = "load") -> dict:
    """Run one load point and return its result (JSON-ready)."""
    loop = asyncio.get_running_loop()
    procstat.raise_fd_limit()
    ctx = LoadContext(cfg)
    server = await loop.create_server(lambda: InboundStream(ctx), cfg.listen_host, cfg.listen_port,
                                      reuse_address=True, backlog=4096)
    progress = Progress(ctx, label)
    empty = _samples(cfg)
    kernel_before, slab_before = procstat.tcp_kernel_bytes(), procstat.tcp_slab_bytes()
    result: dict = {"label": label, "config": asdict(cfg)}
    try:
        durations, connect_s = await _connect_all(ctx, loop)
        ready = ctx.ready_streams()
        result["handshakes"] = handshake_stats(durations) | {
            "established": len(ready),
            "failed": cfg.streams - len(ready),
            "phase_s": round(connect_s, 3),
            "per_s": round(len(durations) / connect_s, 1) if connect_s > 0 else None,
            "bidi": sum(1 for s in ready if s.bidi),
            "verifies_answered": ctx.verifies,
        }
        await asyncio.sleep(0.2 if cfg.streams < 1000 else 1.0)  # let the target settle before the memory sample
        held = _samples(cfg)
        kernel_held, slab_held = procstat.tcp_kernel_bytes(), procstat.tcp_slab_bytes()
        result["memory"] = {}
        for name, sample in held.items():
            if sample and empty.get(name) and ready:
                result["memory"][name] = {
                    "rss_empty_mib": round(empty[name].rss_bytes / 2**20, 2),
                    "rss_held_mib": round(sample.rss_bytes / 2**20, 2),
                    "bytes_per_stream": round((sample.rss_bytes - empty[name].rss_bytes) / len(ready)),
                }
        result["memory"]["kernel_tcp"] = {
            "before_mib": round(kernel_before / 2**20, 2), "held_mib": round(kernel_held / 2**20, 2),
            "bytes_per_stream_both_ends": round((kernel_held - kernel_before) / max(1, len(ready))),
            "slab_bytes_per_stream_both_ends": round((slab_held - slab_before) / max(1, len(ready)))
            if slab_held is not None and slab_before is not None else None,
        }
        await _load(ctx, progress, result)
        if cfg.sm:
            progress.phase = "acks"
            result["stream_management"] = await sm.settle(ctx.streams, ctx.acks)
    finally:
        progress.phase = "close"
        ctx.stopping = True
        ctx.sending = False
        for stream in ctx.streams:
            if stream is not None:
                stream.close()
        # The target's connections to our listener end with the point too: one left open would carry
        # the next point's echoes for a reused domain into this point's ledger (they would count as lost).
        for stream in list(ctx.inbound):
            stream.close()
        server.close()
        await asyncio.sleep(0.2)
        progress.stop()
    ctx.echo_bounces.poll()
    result["errors"] = {"failures": ctx.failures, "failure_samples": ctx.failure_samples}
    result["delivery"] = ctx.tracker.totals() | {"echo_bounces_read": ctx.echo_bounces.read}
    if not cfg.echo:
        result["delivery"]["note"] = "sink mode: the target keeps the stanzas; nothing comes back to count"
    return result


async def _load(ctx: LoadContext, progress: Progress, result: dict):
    cfg = ctx.cfg
    streams = ctx.ready_streams()
    if not streams:
        return
    ctx.sending = cfg.rate > 0 or cfg.saturate
    progress.phase = "warmup"
    start_us = ctx.now_us()
    window = (start_us + int(cfg.warmup * 1e6), start_us + int((cfg.warmup + cfg.duration) * 1e6))
    ctx.tracker.window = window
    sender = asyncio.ensure_future(_send(ctx, streams, window[1]))
    await asyncio.sleep(cfg.warmup)
    progress.phase = "measure"
    profiler = await profile.start_py_spy(cfg)
    before, busy0, t0 = _samples(cfg), procstat.cpu_busy_s(), time.perf_counter()
    sent0 = sum(l.sent for l in ctx.tracker.ledgers)
    await asyncio.sleep(cfg.duration)
    after, busy1, t1 = _samples(cfg), procstat.cpu_busy_s(), time.perf_counter()
    sent1 = sum(l.sent for l in ctx.tracker.ledgers)
    ctx.sending = False
    await sender
    sm.request_all(streams, ctx.acks)  # XEP-0198: what the window sent, acknowledged during the drain
    if profiler is not None:
        result["profile"] = await profile.finish_py_spy(profiler, cfg.duration)
    progress.phase = "drain"
    tracker = ctx.tracker
    hard_stop = time.perf_counter() + DRAIN_MAX_S
    last_progress, last_awaited = time.perf_counter(), -1
    while cfg.echo and time.perf_counter() < min(hard_stop, last_progress + cfg.drain):
        ctx.echo_bounces.poll()
        awaited = tracker.awaited()
        if not awaited:
            break
        if awaited != last_awaited:
            last_progress, last_awaited = time.perf_counter(), awaited
        await asyncio.sleep(0.05)
    wall = t1 - t0
    result["throughput"] = {
        "window_s": round(wall, 3),
        "sent_per_s": round((sent1 - sent0) / wall, 1),
        "delivered_per_s": round(tracker.delivered_in_window / wall, 1) if cfg.echo else None,
        "offered_per_s": "saturate" if cfg.saturate else cfg.rate,
    }
    result["latency_ms"] = percentiles(tracker.latencies_us)
    result["cpu_percent"] = {name: procstat.cpu_percent(before[name], after[name], wall) for name in before}
    # what the machine did meanwhile: CPU time outside the measured processes is other jobs (interrupt
    # time, loopback TCP included, is charged to the process it interrupts on this kernel: not subtracted)
    busy = procstat.busy_percent(busy0, busy1, wall)
    cpus = sum(v for k, v in busy.items() if k != "softirq")
    result["machine_busy_percent"] = busy | {
        "others": round(cpus - sum(v or 0 for v in result["cpu_percent"].values()), 1)}
    result["rss_mib_end"] = {name: round(s.rss_bytes / 2**20, 2) for name, s in after.items() if s}
    if cfg.rate > 0 and not cfg.saturate:
        result["sender"] = ctx.sender.report()


async def _send(ctx: LoadContext, streams: list[OutboundStream], stop_us: int):
    """Open-loop (rate) or closed-loop (saturate) stanza source until `stop_us`."""
    cfg = ctx.cfg
    if cfg.saturate:
        ctx.dirty.update(s.index for s in streams)
        ctx.refill()
        while ctx.sending and ctx.now_us() < stop_us:
            await asyncio.sleep(0.05)
            ctx.dirty.update(s.index for s in streams)  # restart any stream whose echoes stalled
            ctx.schedule_flush()
        return
    if cfg.rate <= 0:
        return
    n, issued, rr = len(streams), 0, 0
    sender = ctx.sender
    t0 = last = time.perf_counter()
    while ctx.sending and ctx.now_us() < stop_us:
        await asyncio.sleep(TICK_S)
        now_s = time.perf_counter()
        sender.tick(now_s - last)
        last = now_s
        due = int(cfg.rate * (now_s - t0)) - issued
        if due <= 0:
            continue
        issued += due
        base, extra = divmod(due, n)
        now = ctx.now_us()
        for k in (range(n) if base else range(rr, rr + extra)):
            stream = streams[k % n]
            count = base + (1 if (k - rr) % n < extra else 0)
            if count and stream.ready and not stream.closed:
                # open loop: a paused transport still takes the stanzas (they wait in its buffer and
                # their latency counts from now), so a slow target cannot lower the offered rate
                sender.writes_while_paused += stream.paused
                stream.send(count, now)
        rr = (rr + extra) % n


class SenderStats:
    """Is the fixed-rate sender itself on time? Tick gaps and writes into paused transports."""

    def __init__(self):
        self.gaps_us: list[int] = []
        self.writes_while_paused = 0

    def tick(self, gap_s: float) -> None:
        self.gaps_us.append(int(gap_s * 1e6))

    def report(self) -> dict:
        return {"ticks": len(self.gaps_us), "tick_s": TICK_S, "tick_gap_ms": percentiles(self.gaps_us),
                "writes_while_paused": self.writes_while_paused}


async def run_sweep(base: LoadConfig, counts: list[int], pause_s: float = 1.0) -> list[dict]:
    points = []
    for count in counts:
        cfg = LoadConfig(**(asdict(base) | {"streams": count}))
        points.append(await run_point(cfg, label=f"{count} streams"))
        await asyncio.sleep(pause_s)
    return points
