"""Integration fixtures: relays started in-process on 127.0.0.1 with free ports,
certificates generated per test session, and small async helpers.

Tests are plain functions that run one scenario coroutine under uvloop with a
hard time bound (``arun``); every relay a scenario starts is stopped by the
``running`` context manager, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from router.config import parse_config
from router.trust.pki import make_ca, make_leaf
from tests.interop.harness import free_port

SCENARIO_TIMEOUT = 40.0
TEARDOWN_TIMEOUT = 10.0  # cancelled tasks end within this after a scenario


def arun(coro, timeout: float = SCENARIO_TIMEOUT):
    """Run one scenario on a fresh uvloop event loop, bounded in time, its teardown too.

    Tasks still running at the end are cancelled as ``asyncio.run`` does, but waited
    for at most ``TEARDOWN_TIMEOUT``: one that ignores its cancellation (nats-py's
    reconnection task did, until ``router.cluster.control`` ended it for good) is
    reported as a warning with its stack instead of hanging the whole run."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        left = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in left:
            task.cancel()
        if left:
            _, stuck = loop.run_until_complete(asyncio.wait(left, timeout=TEARDOWN_TIMEOUT))
            if stuck:
                warnings.warn(f"{len(stuck)} task(s) ignored their cancellation for {TEARDOWN_TIMEOUT:g} s: "
                              + "; ".join(f"{task!r} at {task.get_stack(limit=3)}" for task in stuck))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def settled(condition, within: float = 8.0, every: float = 0.05) -> bool:
    """Whether ``condition()`` holds within ``within`` seconds (polled every ``every``)."""
    for _ in range(int(within / every)):
        if condition():
            return True
        await asyncio.sleep(every)
    return bool(condition())


@asynccontextmanager
async def running(config):
    """A relay serving ``config`` in this event loop; stopped on exit."""
    from router.server import Relay

    relay = Relay(config)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop(timeout=2.0)


ROOT = Path(__file__).resolve().parents[2]
RUN_RELAY = ("import logging, sys; from router.config import load_config; from router.process import run; "
             "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s'); "
             "sys.exit(run(load_config(sys.argv[1])))")


def start_process(config_path: Path, env: dict | None = None) -> subprocess.Popen:
    """``router.process.run`` in a child process whose output goes to a file beside
    the config (a pipe nobody reads would block it); returns after its banner.
    ``env``: variables added to this process's environment for it."""
    output = config_path.with_suffix(".log")
    with open(output, "w") as sink:
        process = subprocess.Popen([sys.executable, "-c", RUN_RELAY, str(config_path)], cwd=ROOT,
                                   stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    for _ in range(200):  # up to 20 s; the banner ends with the domains line
        if "serving domains:" in output.read_text():
            return process
        if process.poll() is not None:
            raise AssertionError(f"relay exited with {process.returncode}: {output.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no start banner: {output.read_text()}")


@contextmanager
def relay_process(spec, path: Path, env: dict | None = None):
    """The relay for ``spec`` as a child process; killed if the test did not stop it."""
    spec.config()  # validate before the process sees it
    path.write_text(spec.toml())
    process = start_process(path, env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@dataclass
class Pki:
    """A test CA and where its certificates are written."""

    directory: Path
    ca_path: Path
    ca: object
    issued: dict = field(default_factory=dict)

    def credential(self, domain: str, *, trusted: bool = True) -> tuple[Path, Path]:
        """Certificate files for ``domain``: CA-signed, or self-signed (untrusted)."""
        key = (domain, trusted)
        if key not in self.issued:
            leaf = make_leaf(self.ca if trusted else None, domain, srv_ids=[domain], xmpp_addrs=[domain])
            name = domain if trusted else f"{domain}.selfsigned"
            self.issued[key] = leaf.write(self.directory, name)
        return self.issued[key]


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca("router integration test CA")
    ca_path, _ = ca.write(directory, "ca")
    return Pki(directory, ca_path, ca)


@pytest.fixture(scope="session")
def peers_cert(tmp_path_factory, pki) -> tuple[Path, Path]:
    """One CA-signed wildcard certificate for every ``*.peers.test`` test peer."""
    leaf = make_leaf(pki.ca, "peers.test", dns_ids=["*.peers.test"])
    return leaf.write(tmp_path_factory.mktemp("peers"), "wildcard.peers.test")


@dataclass
class RelaySpec:
    """What a test relay serves; ``config()`` renders and validates it."""

    name: str
    base: Path
    pki: Pki
    domains: tuple[str, ...] = ()
    components: dict = field(default_factory=dict)  # domain -> secret
    echo: tuple[str, ...] = ()
    sink: tuple[str, ...] = ()
    routes: dict = field(default_factory=dict)  # domain -> port on 127.0.0.1, "host:port", or {port, direct_tls}
    s2s: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    peer_trust_anchors: dict = field(default_factory=dict)  # remote domain -> CA file path
    trusted: bool = True  # certificates signed by the test CA (else self-signed)
    tls: bool = True
    secret: str = "integration-dialback-secret"
    s2s_port: int = field(default_factory=free_port)
    component_port: int = field(default_factory=free_port)
    raw_xml: bool = False
    metrics_port: int | None = None
    direct_tls_port: int | None = None  # XEP-0368 listener
    cluster: dict = field(default_factory=dict)  # [cluster] keys: workers, node, nats, ...

    def config(self):
        return parse_config(self.toml(), self.base, source=f"<test relay {self.name}>")

    def toml(self) -> str:
        lines = [
            "[server]",
            f"domains = {json.dumps(list(self.domains))}",
            f"state_dir = {json.dumps(str(self.base / self.name))}",
            f"dialback_secret = {json.dumps(self.secret)}",
            "[listen]",
            f"s2s = '127.0.0.1:{self.s2s_port}'",
            f"component = '127.0.0.1:{self.component_port}'",
            f"s2s_direct_tls = '127.0.0.1:{self.direct_tls_port}'" if self.direct_tls_port else "s2s_direct_tls = false",
            f"metrics = '127.0.0.1:{self.metrics_port}'" if self.metrics_port else "metrics = false",
            "[tls]",
            "system_trust = false",
            f"trust_anchors = [{json.dumps(str(self.pki.ca_path))}]",
        ]
        if self.peer_trust_anchors:
            lines.append("[tls.peer_trust_anchors]")
            lines += [f'"{domain}" = [{json.dumps(str(path))}]' for domain, path in self.peer_trust_anchors.items()]
        local = list(self.domains) + list(self.components) + list(self.echo) + list(self.sink)
        if self.tls:
            for domain in local:
                cert, key = self.pki.credential(domain, trusted=self.trusted)
                lines += [f'[tls.certificates."{domain}"]', f"cert = {json.dumps(str(cert))}",
                          f"key = {json.dumps(str(key))}"]
        lines.append("[s2s]")
        # the tests' peers are on loopback, which the default blocklist keeps DNS from naming
        lines += [f"{k} = {json.dumps(v)}" for k, v in ({"connect_blocklist": []} | self.s2s).items()]
        lines.append("[limits]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.limits.items()]
        lines.append("[policy]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.policy.items()]
        for domain, secret in self.components.items():
            lines += ["[[component]]", f"domain = {json.dumps(domain)}", f"secret = {json.dumps(secret)}"]
        lines += ["[services]", f"echo = {json.dumps(list(self.echo))}", f"sink = {json.dumps(list(self.sink))}"]
        lines.append("[routes]")
        for domain, to in self.routes.items():
            if isinstance(to, dict):  # {"port": n, "direct_tls": true}
                lines.append(f'"{domain}" = {{ address = "127.0.0.1:{to["port"]}", '
                             f'direct_tls = {"true" if to["direct_tls"] else "false"} }}')
            else:
                lines.append(f'"{domain}" = "{to if isinstance(to, str) else f"127.0.0.1:{to}"}"')
        lines.append("[cluster]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.cluster.items()]
        lines += ["[log]", f"raw_xml = {'true' if self.raw_xml else 'false'}"]
        return "\n".join(lines) + "\n"


@pytest.fixture
def relay_spec(tmp_path, pki):
    """Factory: ``relay_spec('name', domains=..., components=..., ...)``."""

    def make(name: str, **kwargs) -> RelaySpec:
        return RelaySpec(name, tmp_path, pki, **kwargs)

    return make


@pytest.fixture
def nats_url(tmp_path):
    """A nats-server of this test's own on a free loopback port."""
    from .natsd import nats_server

    with nats_server(tmp_path) as url:
        yield url


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="router")
