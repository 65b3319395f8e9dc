"""The node's supervisor when ``[cluster] workers`` > 1: it reserves the listening
ports, runs one relay process per worker on them, restarts a worker that dies,
forwards SIGHUP/SIGTERM/SIGINT, and serves the node's metrics.

Ports: the supervisor binds each enabled listener (s2s, s2s_direct_tls,
component) with SO_REUSEPORT and never listens on it, so the kernel routes no
connection to it but the port (port 0: the one the kernel picked) stays the
node's while a worker restarts. Each worker gets those addresses in
``XMPP_ROUTER_LISTEN`` (JSON ``{"s2s": ["127.0.0.1", 5269], ...}``) and listens on
them with SO_REUSEPORT; the kernel spreads new connections across the workers.

Metrics: each worker serves its own on 127.0.0.1, on a port it prints in its
banner; a scrape of the node's ``[listen] metrics`` fetches every worker's and
answers one text where each sample carries ``worker="I"``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Mapping

from router.config import Config, Endpoint, load_config
from router.metrics import CONTENT_TYPE, PREFIX, Registry, start_metrics_server
from router.notify import monotonic_usec, notify

log = logging.getLogger("router.cluster.supervisor")

LISTEN_ENV = "XMPP_ROUTER_LISTEN"
LISTENERS = ("s2s", "s2s_direct_tls", "component")  # the fields of [listen] the workers share
STARTUP_TIMEOUT = 60.0  # a worker that has not printed its banner by then is stuck: killed, restarted
STOP_GRACE = 5.0  # beyond s2s.close_timeout (a worker's own bound for closing its streams), then SIGKILL
FIRST_BACKOFF = 1.0  # before restarting a worker that exited; doubles while it keeps dying
MAX_BACKOFF = 30.0
STABLE_UPTIME = 60.0  # a worker up this long that exits is restarted after FIRST_BACKOFF again
SCRAPE_TIMEOUT = 5.0  # for one worker's /metrics; a worker that does not answer shows worker_up 0
MAX_WORKER_METRICS_BYTES = 16 << 20  # a worker's exposition is a few KiB; more is not a worker's answer
MAX_BANNER_LINE = 1 << 20  # "serving domains: ..." lists every local domain on one line
_WORKER_METRICS = re.compile(r"metrics: listening on 127\.0\.0\.1:(\d+)$")
_SAMPLE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{?)(.+)")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None)


# ---------------------------------------------------------------- the contract with a worker
def reserve(config: Config) -> dict[str, socket.socket]:
    """A bound, not listening, SO_REUSEPORT socket per enabled listener (a host
    name is resolved once, to its first address); raises OSError."""
    reserved: dict[str, socket.socket] = {}
    try:
        for name in LISTENERS:
            endpoint = getattr(config.listen, name)
            if endpoint is None:
                continue
            family, kind, proto, _, address = socket.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = reserved[name] = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio's listeners, or the workers could not join
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in reserved.values():
            sock.close()
        raise
    return reserved


def reserved_addresses() -> dict[str, tuple[str, int]]:
    """In a worker: the addresses its supervisor reserved (``XMPP_ROUTER_LISTEN``)."""
    return {name: (host, port) for name, (host, port) in json.loads(os.environ[LISTEN_ENV]).items()}


def as_worker(config: Config, addresses: Mapping[str, tuple[str, int]], workers: int) -> Config:
    """``config`` as worker processes run it: on the reserved addresses, with their
    own metrics on a loopback port of the kernel's choice (the node's are the
    supervisor's), and ``workers`` as the command line set it."""
    listen = replace(config.listen, metrics=Endpoint("127.0.0.1", 0) if config.listen.metrics else None,
                     **{name: Endpoint(*addresses[name]) if name in addresses else None for name in LISTENERS})
    return replace(config, listen=listen, cluster=replace(config.cluster, workers=workers))


def merge_metrics(texts: Mapping[int, str]) -> str:
    """Prometheus text of several workers as one: HELP and TYPE once per family,
    then every worker's samples of it, each with a ``worker="I"`` label."""
    headers: dict[str, dict[str, str]] = {}  # family -> {"HELP": line, "TYPE": line}, the first seen
    samples: dict[str, list[str]] = {}
    for worker, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                headers.setdefault(family, {}).setdefault(line[2:6], line)
            elif sample := _SAMPLE.fullmatch(line):
                name, brace, rest = sample.groups()
                label = f'worker="{worker}"'
                if brace:
                    labelled = f"{name}{{{label}{'' if rest.startswith('}') else ','}{rest}"
                else:
                    labelled = f"{name}{{{label}}}{rest}"
                samples.setdefault(family or name, []).append(labelled)
    lines = []
    for family in dict.fromkeys([*headers, *samples]):
        lines += [*headers.get(family, {}).values(), *samples.get(family, [])]
    return "".join(line + "\n" for line in lines)


async def _drain(stream: asyncio.StreamReader) -> None:
    """Read what a worker prints after its banner, so a full pipe never blocks it."""
    while await stream.read(65536):
        pass


def _describe(status: int) -> str:
    """An exit status as an operator reads it: "status 1", "signal SIGKILL"."""
    if status >= 0:
        return f"status {status}"
    try:
        return f"signal {signal.Signals(-status).name}"
    except ValueError:
        return f"signal {-status}"


def _stop_with_supervisor() -> None:
    """In the forked child: SIGTERM when the supervisor dies, so no worker outlives its node."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# ---------------------------------------------------------------- the supervisor
@dataclass
class Worker:
    """One worker slot of the node, and its current process."""

    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False  # printed its banner: its signal handlers are installed
    metrics_port: int | None = None
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF
    banner: list[str] = field(default_factory=list)  # the lines it printed up to "serving domains:"
    drain: asyncio.Task | None = None  # reads what the worker prints after its banner

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """The worker processes of one node, their ports and the node's metrics."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers = [Worker(i) for i in range(config.cluster.workers)]
        self.reserved = reserve(config)
        addresses = {name: sock.getsockname()[:2] for name, sock in self.reserved.items()}
        # the node, not each worker, is the service systemd watches
        self.environment = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | {
            LISTEN_ENV: json.dumps(addresses)}
        self.stopping = asyncio.Event()
        self.metrics_server: asyncio.Server | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.registry = Registry()
        self.worker_up = self.registry.gauge(PREFIX + "worker_up", "1 when the worker answered this scrape.",
                                             ("worker",))
        self.restarts = self.registry.counter(PREFIX + "worker_restarts_total",
                                              "Times the supervisor restarted the worker after it exited.",
                                              ("worker",))

    async def run(self) -> int:
        """Start every worker, then serve until SIGTERM/SIGINT; 1 if the node could not start."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        started = await self._start()
        keepers = [loop.create_task(self._keep_running(worker)) for worker in self.workers] if started else []
        if started:
            self._announce()
            notify("READY=1", f"STATUS=serving with {len(self.workers)} workers")
            await self.stopping.wait()
            notify("STOPPING=1")
            log.info("stopping %d workers", len(self.workers))
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        await self._stop_workers()
        return 0 if started or self.stopping.is_set() else 1

    async def _start(self) -> bool:
        """Every worker up, and the node's metrics listening; False (logged) if not."""
        starting = asyncio.ensure_future(asyncio.gather(*(self._spawn(worker) for worker in self.workers)))
        stopped = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not starting.done():  # SIGTERM while starting
            starting.cancel()
            return False
        failed = [str(worker.index) for worker, ready in zip(self.workers, starting.result()) if not ready]
        if failed:
            log.error("the node did not start: worker %s exited or hung before serving", ", ".join(failed))
            return False
        metrics = self.config.listen.metrics
        if metrics is not None:
            try:
                self.metrics_server = await start_metrics_server(self.node_metrics, metrics.host, metrics.port)
            except OSError as exc:
                log.error("cannot listen for the node's metrics on %s: %s", metrics, exc)
                return False
            self.metrics_address = self.metrics_server.sockets[0].getsockname()[:2]
            log.info("listening metrics on http://%s:%d/metrics (every worker's)", *self.metrics_address)
        return True

    async def _spawn(self, worker: Worker) -> bool:
        """Start ``worker``'s process and wait for its banner; False (logged) if it
        could not start, exited first or hung."""
        command = [sys.executable, "-m", "router", "serve", "--config", self.config.source,
                   "--workers", str(len(self.workers)), "--worker", str(worker.index)]
        worker.ready, worker.metrics_port = False, None
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *command, env=self.environment, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                limit=MAX_BANNER_LINE, preexec_fn=_stop_with_supervisor)
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.index, exc)
            worker.process = None
            return False
        worker.started_at = asyncio.get_running_loop().time()
        log.info("worker %d started, pid %d", worker.index, worker.process.pid)
        try:
            worker.ready = await asyncio.wait_for(self._read_banner(worker), STARTUP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("worker %d (pid %d) did not serve within %g s: killing it", worker.index,
                        worker.process.pid, STARTUP_TIMEOUT)
            worker.process.kill()
            return False
        worker.drain = asyncio.ensure_future(_drain(worker.process.stdout))
        return worker.ready

    @staticmethod
    async def _read_banner(worker: Worker) -> bool:
        """Read the worker's banner up to its "serving domains:" line (False: it exited first)."""
        worker.banner = []
        while line := (await worker.process.stdout.readline()).decode(errors="replace"):
            worker.banner.append(line)
            if match := _WORKER_METRICS.match(line.strip()):
                worker.metrics_port = int(match[1])
            if line.startswith("serving domains:"):
                return True
        return False

    def _announce(self) -> None:
        """The banner of one relay process, for the node: a worker's, whose listeners are
        the node's, with the node's metrics address in place of the worker's own."""
        for line in self.workers[0].banner:
            if _WORKER_METRICS.match(line.strip()):
                line = "metrics: listening on {}:{}\n".format(*self.metrics_address)
            print(line, end="", flush=True)

    async def _keep_running(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it exits, after a backoff, until the node stops."""
        loop = asyncio.get_running_loop()
        while True:
            status = await worker.process.wait() if worker.process is not None else None
            if loop.time() - worker.started_at >= STABLE_UPTIME:
                worker.backoff = FIRST_BACKOFF
            delay, worker.backoff = worker.backoff, min(worker.backoff * 2, MAX_BACKOFF)
            if status is not None:
                log.warning("worker %d (pid %d) exited with %s; restarting it in %g s", worker.index,
                            worker.process.pid, _describe(status), delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass
            self.restarts.inc(str(worker.index))
            await self._spawn(worker)

    def _reload(self) -> None:
        """SIGHUP: every worker reloads the file, as one relay process does. The
        supervisor reads it first, so new key material (a self-signed certificate)
        is created once, not raced for by the workers."""
        notify("RELOADING=1", monotonic_usec())
        try:
            config = load_config(self.config.source)
        except Exception as exc:  # each worker reports it too, and keeps its running configuration
            log.error("reload: cannot read %s: %s", self.config.source, exc)
            config = self.config
        if config.listen != self.config.listen:
            log.warning("the [listen] section changed: the supervisor binds the listeners at start, "
                        "restart the node to apply it")
        if config.cluster.workers != len(self.workers):
            log.warning("the file asks for %d workers, the node runs %d: restart the node (without --workers) "
                        "to apply it", config.cluster.workers, len(self.workers))
        for worker in self.workers:
            if worker.alive and worker.ready:  # one still starting reads the new file anyway
                worker.process.send_signal(signal.SIGHUP)
        notify("READY=1")

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker; SIGKILL to the ones still running after the bound."""
        if self.metrics_server is not None:
            self.metrics_server.close()
        running = [worker for worker in self.workers if worker.alive]
        for worker in running:
            worker.process.terminate()
        bound = self.config.s2s.close_timeout + STOP_GRACE
        if running:
            await asyncio.wait([asyncio.ensure_future(worker.process.wait()) for worker in running], timeout=bound)
        for worker in running:
            if worker.alive:
                log.warning("worker %d (pid %d) did not stop within %g s: killing it", worker.index,
                            worker.process.pid, bound)
                worker.process.kill()
                await worker.process.wait()
        for sock in self.reserved.values():
            sock.close()

    # ------------------------------------------------------------ the node's metrics
    async def _scrape(self, worker: Worker) -> str | None:
        """The worker's exposition, or None (logged) when it does not answer in time."""
        if worker.metrics_port is None or not worker.alive:
            return None
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                reader, writer = await asyncio.open_connection("127.0.0.1", worker.metrics_port)
                try:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    response = bytearray()
                    while chunk := await reader.read(65536):
                        response += chunk
                        if len(response) > MAX_WORKER_METRICS_BYTES:
                            raise ValueError(f"more than {MAX_WORKER_METRICS_BYTES} bytes")
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("worker %d did not answer the metrics scrape: %s", worker.index, exc or "timeout")
            return None
        head, _, body = bytes(response).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            log.warning("worker %d answered the metrics scrape with %r", worker.index, head[:40])
            return None
        return body.decode("utf-8", errors="replace")

    async def node_metrics(self, openmetrics: bool = False) -> tuple[str, bytes]:
        """(content type, every worker's samples and ours): Prometheus text 0.0.4 to
        every scraper, since it is merged from the workers' text."""
        texts = await asyncio.gather(*(self._scrape(worker) for worker in self.workers))
        for worker, text in zip(self.workers, texts):
            self.worker_up.set(0 if text is None else 1, str(worker.index))
        answered = {worker.index: text for worker, text in zip(self.workers, texts) if text is not None}
        return CONTENT_TYPE, merge_metrics(answered).encode() + self.registry.render()


def run(config: Config) -> int:
    """Supervise ``config.cluster.workers`` relay processes until SIGTERM/SIGINT (exit status 0)."""
    import uvloop

    async def supervise() -> int:
        try:
            supervisor = Supervisor(config)
        except OSError as exc:  # e.g. a port in use by a process that is not a worker of this node
            log.error("cannot reserve the listening ports: %s", exc)
            return 1
        return await supervisor.run()

    return uvloop.run(supervise())
