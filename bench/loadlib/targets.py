"""The servers under test, each serving one domain through the echo component.

Prosody and ejabberd are started with the interop harness's peer classes
(tests/interop/harness.py), with logging lowered to warnings so a debug log is
not what gets measured; the relay is started from a TOML config written here.
Each target routes every simulated server's domain (`gNNNN.load.test`) to the
generator's listener and can be pinned to a CPU. The relay's config can be
changed per run with `SECTION.KEY=VALUE` options (`relay_options`), e.g.
`s2s.stream_management=false` to measure it without XEP-0198.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from router.trust import pki
from tests.interop import harness

from . import echo, wire

BENCH_DOMAIN = "bench.test"
RELAY_READY_TIMEOUT = 20.0
# the checkout whose relay runs (``python -m router`` there): this one, or another build
# measured with this checkout's generator (``bench.pairs --same-generator``)
RELAY_ROOT = Path(os.environ.get("BENCH_RELAY_ROOT") or Path(__file__).resolve().parents[2])


def end(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if ``proc`` is still running after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def taskset(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu is not None else []


def load_routes(count: int, host: str, port: int) -> dict[str, tuple[str, int]]:
    return {wire.load_domain(i): (host, port) for i in range(count)}


def relay_option(text: str) -> tuple[str, str, str]:
    """'s2s.stream_management=false' -> ('s2s', 'stream_management', 'false'): a TOML value, or a bare word quoted."""
    path, equals, value = text.partition("=")
    section, dot, key = path.strip().rpartition(".")
    if not equals or not dot or not section or not key:
        raise ValueError(f"a relay option is SECTION.KEY=VALUE, got {text!r}")
    value = value.strip()
    try:
        tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        value = json.dumps(value)  # a JSON string is a TOML basic string
    return section, key, value


def with_options(config: str, options: list[str]) -> str:
    """``config`` (TOML text) with each option set: replaced in its section, added to it, or a new section."""
    config = "\n" + config  # every section header follows a newline, the first one too
    for section, key, value in map(relay_option, options):
        header = f"\n[{section}]\n"
        if header not in config:
            config += f"{header}{key} = {value}\n"
            continue
        head, body = config.split(header, 1)
        block, next_header, rest = body.partition("\n[")
        lines = [line for line in block.split("\n") if not re.match(rf"{re.escape(key)}\s*=", line)]
        config = head + header + "\n".join([f"{key} = {value}"] + lines) + next_header + rest
    return config[1:]


def start_echo(component: tuple[str, int], domain: str, secret: str, stats: Path, sink: bool = False,
               cpu: str | None = None) -> subprocess.Popen:
    """The echo/sink component as its own process (pinned beside the generator), once it is connected
    to ``component`` (host, port) for ``domain``."""
    cmd = taskset(cpu) + [sys.executable, "-m", "bench.loadlib.echo", "--host", component[0],
                          "--port", str(component[1]), "--domain", domain, "--secret", secret,
                          "--stats", str(stats)] + (["--sink"] if sink else [])
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    line = process.stdout.readline()
    if line.strip() != "ready":
        end(process, 5)
        raise RuntimeError(f"echo component for {domain} at {component[0]}:{component[1]} did not start (said {line!r})")
    return process


class Pki:
    """The run's CA, the target's certificate and the simulated servers' wildcard one."""

    def __init__(self, directory: Path):
        self.certs = harness.Certificates(directory)
        self.directory = directory
        self.ca_file = self.certs.ca_file
        self.target = self.certs.issue(BENCH_DOMAIN)
        leaf = pki.make_leaf(self.certs.ca, wire.LOAD_SUFFIX, dns_ids=[f"*.{wire.LOAD_SUFFIX}", wire.LOAD_SUFFIX])
        self.load_cert, self.load_key = leaf.write(directory, "load")


class _Quiet:
    """Mixin: pin to a CPU and log warnings only."""

    cpu: str | None = None

    def _prepare(self):
        argv, env = super()._prepare()
        self.quieten()
        return taskset(self.cpu) + argv, env


class BenchProsody(_Quiet, harness.ProsodyPeer):
    log_names = ("warn.log", "console.log")

    def quieten(self):
        path = self.workdir / "prosody.cfg.lua"
        text = re.sub(r"\nlog = \{.*?\n\}\n",
                      '\nlog = { { levels = { min = "warn" }, to = "file", filename = base .. "/warn.log" } }\n',
                      path.read_text(), flags=re.S)
        path.write_text(text)


class BenchEjabberd(_Quiet, harness.EjabberdPeer):
    def quieten(self):
        path = self.workdir / "ejabberd.yml"
        path.write_text(path.read_text().replace("loglevel: debug", "loglevel: warning"))
        # inet_db keeps 100 records by default: one SRV pin per simulated domain needs more
        with open(self.workdir / "inetrc", "a") as f:
            f.write(f"{{cache_size, {len(self.routes) + 100}}}.\n")


class Target:
    """Common surface: `start()`, `s2s` (host, port), `pid`, `component_*`, `stop()`."""

    name = "target"
    domain = BENCH_DOMAIN
    bidi = True
    pid: int | None = None
    echo_process: subprocess.Popen | None = None

    def start_echo(self, sink: bool, cpu: str | None, stats: Path) -> None:
        self.echo_process = start_echo(self.component, self.domain, self.secret, stats, sink, cpu)

    def stop_echo(self) -> None:
        proc, self.echo_process = self.echo_process, None
        if proc is not None:
            end(proc, 5)


class PeerTarget(Target):
    """Prosody or ejabberd via the interop harness."""

    def __init__(self, cls, name: str, workdir: Path, pki_: Pki, tls: bool, cpu: str | None, bidi: bool):
        self.name = name
        mode = harness.SECURE if tls else harness.PLAINTEXT
        kwargs = {"bidi": bidi} if cls is BenchProsody else {}
        self.peer = cls(BENCH_DOMAIN, "127.0.0.1", workdir, pki_.target, pki_.ca_file, mode, **kwargs)
        self.peer.cpu = cpu
        self.bidi = bidi and cls is BenchProsody

    def start(self, routes: dict[str, tuple[str, int]]) -> None:
        self.peer.start(routes)
        self.pid = self.peer.process.pid
        self.s2s = (self.peer.ip, self.peer.s2s_port)
        self.component = (self.peer.ip, self.peer.component_port)
        self.secret = self.peer.secret

    def stop(self) -> None:
        self.stop_echo()
        self.peer.stop()

    def logs(self) -> str:
        return self.peer.logs()


class RelayTarget(Target):
    """`python -m router serve --config FILE`, optionally under cProfile (py-spy attaches per load point)."""

    name = "relay"

    def __init__(self, workdir: Path, pki_: Pki, tls: bool, cpu: str | None, profile: str | None = None,
                 secret_dialback: str = "relay-bench-dialback-secret-0123456789", options: list[str] = ()):
        self.workdir, self.pki, self.tls, self.cpu, self.profile = workdir, pki_, tls, cpu, profile
        self.options = list(options)  # SECTION.KEY=VALUE settings over the config written here
        for option in self.options:
            relay_option(option)  # a malformed one fails here, before anything starts
        self.dialback_secret = secret_dialback
        self.secret = "relay-bench-component-secret"
        self.process: subprocess.Popen | None = None
        self.profile_path: Path | None = None
        self.env: dict[str, str] | None = None  # the relay processes' environment (None: ours)

    def config_text(self, routes: dict[str, tuple[str, int]]) -> str:
        route_lines = "\n".join(f'"{d}" = "{h}:{p}"' for d, (h, p) in routes.items())
        return f"""# written by bench/loadlib/targets.py
[server]
state_dir = "{self.workdir / 'state'}"
dialback_secret = "{self.dialback_secret}"

[listen]
s2s = "{self.s2s[0]}:{self.s2s[1]}"
component = "{self.component[0]}:{self.component[1]}"
metrics = false

[s2s]
bidi = "always"

[limits]
# the load generator is one address standing in for thousands of servers
max_connections_per_ip = 100000
max_pre_auth_connections = 100000
max_pending_verifications = 100000
max_pending_verifications_per_ip = 100000

[policy]
require_encryption = {str(self.tls).lower()}
secure_auth = {str(self.tls).lower()}

[tls]
required = {str(self.tls).lower()}
system_trust = false
trust_anchors = ["{self.pki.ca_file}"]

[tls.certificates."{BENCH_DOMAIN}"]
cert = "{self.pki.target.crt}"
key = "{self.pki.target.key}"

[[component]]
domain = "{BENCH_DOMAIN}"
secret = "{self.secret}"

[log]
level = "WARNING"

[routes]
{route_lines}
"""

    def command(self, config: Path) -> list[str]:
        serve = ["-m", "router", "serve", "--config", str(config)]
        if self.profile == "cprofile":
            self.profile_path = self.workdir / "relay.cprofile"
            return taskset(self.cpu) + [sys.executable, "-m", "cProfile", "-o", str(self.profile_path)] + serve
        return taskset(self.cpu) + [sys.executable] + serve

    def start(self, routes: dict[str, tuple[str, int]]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s2s = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.component = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.process = self._spawn("relay", self.config_text(routes))
        self._ready()

    def _spawn(self, name: str, config_text: str) -> subprocess.Popen:
        """The relay serving ``config_text`` (written to ``<name>.toml``), its output in console.log."""
        config = self.workdir / f"{name}.toml"
        config.write_text(with_options(config_text, self.options))
        with open(self.workdir / "console.log", "ab") as console:
            return subprocess.Popen(self.command(config), stdin=subprocess.DEVNULL, stdout=console,
                                    stderr=subprocess.STDOUT, cwd=RELAY_ROOT, start_new_session=True, env=self.env)

    def _ready(self) -> None:
        try:
            asyncio.run(self._wait_ready())
        except BaseException:
            self.stop()
            raise
        self.pid = self.process.pid

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + RELAY_READY_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited with {self.process.returncode}:\n{self.logs()}")
            try:
                probe = await echo.connect(*self.component, self.domain, self.secret, sink=True, timeout=2)
                probe.transport.write(b"</stream:stream>")
                probe.transport.close()
                await asyncio.sleep(0.1)
                return
            except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.1)
        raise RuntimeError(f"relay not ready after {RELAY_READY_TIMEOUT} s: {last!r}\n{self.logs()}")

    def stop(self) -> None:
        self.stop_echo()
        proc = self.process
        if proc is not None:
            end(proc, 10)

    def logs(self) -> str:
        path = self.workdir / "console.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class HopTarget(RelayTarget):
    """Two relay nodes on one nats-server: the generator's streams reach n1 and the
    echo component is connected to n2, so every stanza crosses the cluster bus
    twice (to the component, and its echo back to n1's bidi stream). Its CPU is
    n1's (the target's row), plus n2's and nats-server's (``extra_pids``). With
    ``bus_tls`` the members reach nats-server over TLS (its certificate from the
    run's CA, which the relays trust through ``SSL_CERT_FILE``)."""

    name = "relay-hop"

    def __init__(self, *args, bus_tls: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bus_tls = bus_tls
        if bus_tls:
            self.env = dict(os.environ, SSL_CERT_FILE=str(self.pki.ca_file))
        self.extra_pids: dict[str, int] = {}
        self.others: list[subprocess.Popen] = []  # n2, then nats-server
        self.metrics_ports: dict[str, int] = {}  # node -> its metrics port; scraped into the workdir at stop

    def start(self, routes: dict[str, tuple[str, int]]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        nats_url = self._start_nats()
        nats = self.others[-1]
        cluster = f'\n[cluster]\nnats = ["{nats_url}"]\nnode = "{{node}}"\n'
        # n2 first: it serves the component; its S2S port only answers dialback verifications
        self.s2s = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.component = ("127.0.0.1", harness.free_port("127.0.0.1"))
        n2 = self._spawn("n2", self.config_text(routes) + cluster.format(node="n2"))
        self.others.insert(0, n2)
        component = self.component
        self.s2s = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.component = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.process = self._spawn("n1", self.config_text(routes) + cluster.format(node="n1"))
        self.component = component  # the echo component connects to n2
        self._ready()
        self.extra_pids = {"relay-hop:n2": n2.pid, "nats": nats.pid}

    def _start_nats(self) -> str:
        """A nats-server on a free port, beside the relay on its CPUs; returns its URL."""
        port = harness.free_port("127.0.0.1")
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        tls: list[str] = []
        if self.bus_tls:
            cert, key = pki.make_leaf(self.pki.certs.ca, "localhost", dns_ids=["localhost"]).write(self.workdir, "nats")
            tls = ["--tls", "--tlscert", str(cert), "--tlskey", str(key)]
        # pinned to the target's CPU, the Go runtime gets as many threads as it has CPUs there
        env = dict(os.environ, GOMAXPROCS=str(len(self.cpu.split(",")))) if self.cpu else None
        self.others.append(subprocess.Popen(taskset(self.cpu) + [binary, "-a", "127.0.0.1", "-p", str(port)] + tls,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True, env=env))
        return f"tls://localhost:{port}" if self.bus_tls else f"nats://127.0.0.1:{port}"

    def _spawn(self, name: str, config_text: str) -> subprocess.Popen:
        port = self.metrics_ports[name] = harness.free_port("127.0.0.1")
        return super()._spawn(name, config_text.replace(f"{self.workdir / 'state'}", f"{self.workdir / name}")
                              .replace("metrics = false", f'metrics = "127.0.0.1:{port}"'))

    def stop(self) -> None:
        for node, port in self.metrics_ports.items():  # bus batches and stanzas, for the record
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                    (self.workdir / f"metrics-{node}.txt").write_bytes(answer.read())
            except OSError:
                pass
        super().stop()
        for proc in self.others:
            end(proc, 10)


class WorkersTarget(HopTarget):
    """One node of two workers (``[cluster] workers = 2``) on a nats-server: the
    kernel spreads the generator's streams over the workers, and a stanza whose
    component is connected to the other worker crosses the bus. Its CPU is the
    supervisor's (the target's row), plus each worker's and nats-server's."""

    name = "relay-w2"
    workers = 2

    def start(self, routes: dict[str, tuple[str, int]]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        nats_url = self._start_nats()
        self.s2s = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.component = ("127.0.0.1", harness.free_port("127.0.0.1"))
        self.process = self._spawn("node", self.config_text(routes) + f'\n[cluster]\nworkers = {self.workers}\n'
                                   f'nats = ["{nats_url}"]\nnode = "n1"\n')
        self._ready()
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        self.extra_pids = {f"relay-w2:worker{i}": int(pid) for i, pid in enumerate(children)}
        self.extra_pids["nats"] = self.others[-1].pid


def make_target(kind: str, workdir: Path, pki_: Pki, tls: bool, cpu: str | None, profile: str | None = None,
                relay_options: list[str] = (), bus_tls: bool = False) -> Target:
    relays = {"relay": RelayTarget, "relay-hop": HopTarget, "relay-w2": WorkersTarget}
    if kind in relays:
        bus = {} if kind == "relay" else {"bus_tls": bus_tls}  # the relay alone has no bus
        return relays[kind](workdir / kind, pki_, tls, cpu, profile, options=relay_options, **bus)
    if relay_options:
        raise ValueError(f"relay options apply to the relay targets only, not {kind!r}")
    if kind == "prosody":
        return PeerTarget(BenchProsody, "prosody", workdir / "prosody", pki_, tls, cpu, bidi=True)
    if kind == "ejabberd":
        return PeerTarget(BenchEjabberd, "ejabberd", workdir / "ejabberd", pki_, tls, cpu, bidi=False)
    raise ValueError(f"unknown target {kind!r}")
