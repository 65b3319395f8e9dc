"""Real Prosody 0.12 and ejabberd 23.01 S2S peers on loopback, for the interop tests.

Recipe: docs/interop.md. Each peer runs as a
subprocess from its own work directory, listens on its own 127.0.0.x address on free
ports, reaches other domains only through pinned routes (Prosody: our
mod_test_s2s_routes plugin; ejabberd: SRV records preloaded into Erlang's resolver
cache) and serves its whole domain as an XEP-0114 component, so a `ComponentClient`
can act as ``anything@domain``. A peer is ready when a component handshake completes.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

import uvloop
from lxml import etree

from router.trust import pki
from router.net.component_client import ComponentClient, ComponentError
from router.wire.namespaces import COMPONENT_NS

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
PROSODY_PLUGINS = HERE / "prosody-plugins"

ENABLE_HINT = "run `make peers` as root (apt-get installs prosody, ejabberd and lua-unbound)"
READY_TIMEOUT = 20.0  # ejabberd is ready in about 1 s; leave room for a loaded machine
STOP_GRACE = 5.0  # per signal: TERM, TERM again, then KILL
DELIVERY_TIMEOUT = 15.0  # first message on a new S2S link: < 0.3 s normally
LOG_TAIL_LINES = 200


def prosody_binary() -> str | None:
    return shutil.which("prosody")


def ejabberd_lib_root() -> Path | None:
    """The directory holding ``ejabberd-<version>`` (Debian: /usr/lib/<triplet>)."""
    found = sorted(glob.glob("/usr/lib/*/ejabberd-[0-9]*/ebin"))
    return Path(found[0]).parent.parent if found else None


def missing_peers() -> list[str]:
    """What is missing to run the interop tests (empty when both peers can run)."""
    missing = []
    if not prosody_binary():
        missing.append("prosody")
    if not (shutil.which("erl") and ejabberd_lib_root()):
        missing.append("ejabberd")
    return missing


_PICKED: set[int] = set()  # ports free_port gave this process


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port free on `ip` now and not given before by this process: the peer binds
    it a moment later, and two picks made before either binds could otherwise agree."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind((ip, 0))
            port = sock.getsockname()[1]
        if port not in _PICKED:
            _PICKED.add(port)
            return port
    raise RuntimeError(f"no free port on {ip} that was not given before")


def established_connections_to(ip: str, port: int) -> int:
    """Established IPv4 TCP connections accepted on the listener `ip:port`.

    Every loopback connection appears twice in /proc/net/tcp (once per end); only
    the accepting end has the listener's address as its local address, so this
    counts each connection once.
    """
    wanted = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "01":  # 01 = ESTABLISHED
                count += 1
    return count


# --- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    crt: Path
    key: Path
    pem: Path  # cert + key in one file (ejabberd's certfiles)


class Certificates:
    """A private CA every peer trusts, and a second CA nobody trusts.

    `issue(domain, trusted=False)` gives a leaf the peers cannot verify, which is how
    the dialback modes are set up (STARTTLS works, SASL EXTERNAL cannot).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.ca = pki.make_ca("Interop Test CA")
        self.untrusted_ca = pki.make_ca("Interop Untrusted CA")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem())

    def issue(self, domain: str, *, trusted: bool = True) -> CertPaths:
        """A leaf for `domain` with a DNS-ID and an SRV-ID, and no xmppAddr.

        ejabberd 23.01 crashes (badarg in xmpp_stream_pkix:get_cert_domains/1) while
        verifying a peer certificate that carries an id-on-xmppAddr otherName, and the
        SASL EXTERNAL attempt dies with the connection.
        """
        issuer = self.ca if trusted else self.untrusted_ca
        leaf = pki.make_leaf(issuer, domain, srv_ids=[domain])
        crt, key = leaf.write(self.directory, domain)
        pem = self.directory / f"{domain}.pem"
        pem.write_bytes(leaf.cert_pem() + leaf.key_pem())
        os.chmod(pem, 0o600)
        return CertPaths(crt, key, pem)


# --- modes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How peers authenticate each other (the README's auth matrix)."""

    name: str
    tls: bool  # STARTTLS offered and required
    trusted: bool  # leaf certs chain to the CA the peers trust

    @property
    def secure_auth(self) -> bool:
        return self.tls and self.trusted


SECURE = Mode("secure", tls=True, trusted=True)  # STARTTLS + SASL EXTERNAL
DIALBACK = Mode("dialback", tls=True, trusted=False)  # STARTTLS + dialback, certs untrusted
PLAINTEXT = Mode("plaintext", tls=False, trusted=True)  # no TLS, dialback
MODES = (SECURE, DIALBACK, PLAINTEXT)


# --- peers ----------------------------------------------------------------------------


class PeerFailed(RuntimeError):
    """A peer did not start or did not become ready; the message carries its log tail."""


_running: set["Peer"] = set()


@atexit.register
def stop_all_peers() -> None:
    """Last resort: nothing started here outlives the test run."""
    for peer in list(_running):
        peer.stop()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path.name} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    skipped = len(text) - lines
    head = [f"... ({skipped} earlier lines in {path})"] if skipped > 0 else []
    return "\n".join(head + text[-lines:])


class Peer:
    """One server process serving `domain` as a component; `start` / `stop`."""

    kind = "peer"
    log_names: tuple[str, ...] = ()

    def __init__(self, domain: str, ip: str, workdir: Path, certs: CertPaths, ca_file: Path, mode: Mode):
        self.domain = domain
        self.ip = ip
        self.workdir = workdir
        self.certs = certs
        self.ca_file = ca_file
        self.mode = mode
        self.secret = f"secret-{domain}-{uuid.uuid4().hex[:8]}"
        self.s2s_port = free_port(ip)
        self.component_port = free_port(ip)
        self.process: subprocess.Popen | None = None
        self.routes: dict[str, tuple[str, int]] = {}

    def __repr__(self) -> str:
        return f"<{self.kind} {self.domain} s2s={self.ip}:{self.s2s_port} component={self.component_port}>"

    # subclasses: write the config and return (argv, env)
    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, routes: dict[str, tuple[str, int]]) -> None:
        """Start with `routes` (domain -> (ip, port)) and wait for a component handshake."""
        self.routes = dict(routes)
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv, env = self._prepare()
        console = open(self.workdir / "console.log", "wb")
        try:
            self.process = subprocess.Popen(
                argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            console.close()
        _running.add(self)
        try:
            uvloop.run(self._wait_ready())
        except BaseException:
            self.stop()
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerFailed(f"{self!r} exited with {self.process.returncode}\n{self.logs()}")
            try:
                async with ComponentClient() as probe:
                    await probe.connect(self.ip, self.component_port, self.domain, self.secret, timeout=2.0)
                return
            except (OSError, ComponentError, TimeoutError) as exc:
                last_error = exc
                await asyncio.sleep(0.05)
        raise PeerFailed(f"{self!r} not ready after {READY_TIMEOUT} s: {last_error!r}\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM, SIGTERM again, then SIGKILL, each after `STOP_GRACE` seconds."""
        _running.discard(self)
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(STOP_GRACE)
                return
            except subprocess.TimeoutExpired:
                continue
        process.wait(STOP_GRACE)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> str:
        parts = [f"===== {self!r}: {name} =====\n{_tail(self.workdir / name)}" for name in self.log_names]
        return "\n".join(parts)

    def log_text(self) -> str:
        """The whole debug log, for assertions on how a session was authenticated.

        ejabberd's logger writes with a delay: read it after `stop()`.
        """
        path = self.workdir / self.log_names[0]
        return path.read_text(errors="replace") if path.exists() else ""

    async def component(self, timeout: float = 5.0) -> ComponentClient:
        """A connected component client acting for the whole domain."""
        client = ComponentClient()
        await client.connect(self.ip, self.component_port, self.domain, self.secret, timeout=timeout)
        return client

    def accepted_s2s_connections(self) -> int:
        return established_connections_to(self.ip, self.s2s_port)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ProsodyPeer(Peer):
    kind = "prosody"
    log_names = ("debug.log", "console.log")

    def __init__(self, *args, bidi: bool = True, smacks: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bidi = bidi
        self.smacks = smacks  # mod_smacks: XEP-0198, on S2S too (smacks_enabled_s2s defaults to true)

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "certs").mkdir(exist_ok=True)  # Prosody indexes it at startup; empty is fine
        extra_modules = ('"tls";' if self.mode.tls else "") + ('"s2s_bidi";' if self.bidi else "") \
            + ('"smacks";' if self.smacks else "")
        routes = "; ".join(
            f"[{_lua_string(domain)}] = {{ {_lua_string(ip)}, {port} }}" for domain, (ip, port) in self.routes.items()
        )
        config = Template((CONFIGS / "prosody.cfg.lua").read_text()).substitute(
            workdir=self.workdir, domain=self.domain, ip=self.ip, secret=self.secret,
            s2s_port=self.s2s_port, component_port=self.component_port,
            plugin_dir=PROSODY_PLUGINS, routes=routes, extra_modules=extra_modules,
            cafile=self.ca_file, certfile=self.certs.crt, keyfile=self.certs.key,
            require_encryption=str(self.mode.tls).lower(), secure_auth=str(self.mode.secure_auth).lower(),
        )
        path = self.workdir / "prosody.cfg.lua"
        path.write_text(config)
        return [prosody_binary(), "--config", str(path), "-F"], dict(os.environ)


class EjabberdPeer(Peer):
    """ejabberd run with `erl` directly: no epmd, no cookie, no node name."""

    kind = "ejabberd"
    log_names = ("log/ejabberd.log", "console.log")

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        (self.workdir / "spool").mkdir(exist_ok=True)
        (self.workdir / "log").mkdir(exist_ok=True)
        config = Template((CONFIGS / "ejabberd.yml").read_text()).substitute(
            domain=self.domain, ip=self.ip, secret=self.secret,
            s2s_port=self.s2s_port, component_port=self.component_port,
            pemfile=self.certs.pem, cafile=self.ca_file,
            starttls="required" if self.mode.tls else "false",
        )
        config_path = self.workdir / "ejabberd.yml"
        config_path.write_text(config)
        # inet_res asks a dead nameserver: anything not preloaded fails in ms, never real DNS
        inetrc = self.workdir / "inetrc"
        inetrc.write_text('{resolv_conf, ""}.\n{nameserver, {127,0,0,1}, 9}.\n')
        # the resolver's first configuration load clears its cache: load it, then add the pins
        records = "".join(
            f' inet_db:add_rr("_xmpp-server._tcp.{domain}", in, srv, 100000000, {{0,0,{port},"{ip}"}}),'
            for domain, (ip, port) in self.routes.items()
        )
        env = dict(
            os.environ, HOME=str(self.workdir), ERL_LIBS=str(ejabberd_lib_root()), ERL_INETRC=str(inetrc),
            EJABBERD_CONFIG_PATH=str(config_path), EJABBERD_LOG_PATH=str(self.workdir / "log" / "ejabberd.log"),
        )
        argv = [
            shutil.which("erl"), "-noinput", "-noshell", "+K", "true",
            "-mnesia", "dir", f'"{self.workdir / "spool"}"',
            "-eval", f"inet_db:res_update_conf(),{records} ok.",
            "-s", "ejabberd",
        ]
        return argv, env


def _toml(value) -> str:
    """A TOML value for the few types the relay config uses (JSON strings are TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def render_toml(sections: dict[str, dict]) -> str:
    """``{"server": {...}, "component": [{...}]}`` -> TOML text (lists of tables as ``[[name]]``)."""
    lines = []
    for name, body in sections.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines += [f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)


class RelayPeer(Peer):
    """The relay under test (`python -m router serve --config`), its whole domain a component.

    `options` overrides sections of the generated config, e.g. ``{"s2s": {"bidi": "always"}}``;
    `defaults=True` writes only what a deployment must name (domain, certificate, trust
    anchor, listeners, routes) so every other option takes the relay's default.
    """

    kind = "relay"
    log_names = ("console.log",)

    def __init__(self, *args, options: dict | None = None, defaults: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options or {}
        self.defaults = defaults

    def config_sections(self) -> dict[str, dict]:
        sections: dict[str, dict] = {
            "server": {"state_dir": str(self.workdir / "state")},
            "listen": {
                "s2s": f"{self.ip}:{self.s2s_port}",
                "component": f"{self.ip}:{self.component_port}",
                "metrics": False,
            },
            "tls": {
                "certificates": {self.domain: {"cert": str(self.certs.crt), "key": str(self.certs.key)}},
                "trust_anchors": [str(self.ca_file)],
            },
            "component": [{"domain": self.domain, "secret": self.secret}],
            "routes": {domain: f"{ip}:{port}" for domain, (ip, port) in self.routes.items()},
            "log": {"level": "DEBUG"},
        }
        if not self.defaults:
            sections["tls"].update(system_trust=False, required=self.mode.tls)
            sections["policy"] = {"require_encryption": self.mode.tls, "secure_auth": self.mode.secure_auth}
        for name, values in self.options.items():
            sections.setdefault(name, {}).update(values)
        return sections

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        path = self.workdir / "relay.toml"
        path.write_text(render_toml(self.config_sections()))
        argv = [sys.executable, "-m", "router", "serve", "--config", str(path)]
        return argv, dict(os.environ, PYTHONUNBUFFERED="1")

    def logs(self) -> str:
        config = self.workdir / "relay.toml"
        text = config.read_text() if config.exists() else "(not written)"
        return f"===== {self!r}: relay.toml =====\n{text}\n" + super().logs()


# --- a set of federating peers --------------------------------------------------------


class Federation:
    """Peers that know each other's S2S addresses, sharing one CA, in one `Mode`."""

    def __init__(self, workdir: Path, mode: Mode):
        self.workdir = workdir
        self.mode = mode
        self.certs = Certificates(workdir / "certs")
        self.peers: dict[str, Peer] = {}
        self.extra_routes: dict[str, tuple[str, int]] = {}

    def _add(self, cls, domain: str, ip: str, *, trusted: bool | None = None, **kwargs) -> Peer:
        certs = self.certs.issue(domain, trusted=self.mode.trusted if trusted is None else trusted)
        peer = cls(domain, ip, self.workdir / f"{cls.kind}-{domain}", certs, self.certs.ca_file, self.mode, **kwargs)
        self.peers[domain] = peer
        return peer

    def prosody(self, domain: str, ip: str, *, bidi: bool = True, smacks: bool = False) -> ProsodyPeer:
        return self._add(ProsodyPeer, domain, ip, bidi=bidi, smacks=smacks)

    def ejabberd(self, domain: str, ip: str) -> EjabberdPeer:
        return self._add(EjabberdPeer, domain, ip)

    def relay(self, domain: str = "r.test", ip: str = "127.0.0.10", *, trusted: bool | None = None,
              **kwargs) -> RelayPeer:
        """The relay under test; `trusted=False` gives it a certificate the peers cannot verify."""
        return self._add(RelayPeer, domain, ip, trusted=trusted, **kwargs)

    def route(self, domain: str, ip: str, port: int) -> None:
        """Pin a domain that is not one of our peers (e.g. the relay under test)."""
        self.extra_routes[domain] = (ip, port)

    def routes_for(self, peer: Peer) -> dict[str, tuple[str, int]]:
        routes = {d: (p.ip, p.s2s_port) for d, p in self.peers.items() if p is not peer}
        routes.update(self.extra_routes)
        return routes

    def start(self) -> None:
        for peer in self.peers.values():
            if not peer.running:
                peer.start(self.routes_for(peer))

    def stop(self) -> None:
        for peer in self.peers.values():
            peer.stop()

    def logs(self) -> str:
        return "\n".join(peer.logs() for peer in self.peers.values())


# --- stanza helpers -----------------------------------------------------------------


def message(sender: str, recipient: str, body: str, stanza_id: str | None = None) -> str:
    stanza_id = stanza_id or uuid.uuid4().hex
    return (
        f"<message xmlns='{COMPONENT_NS}' from='{sender}' to='{recipient}' id='{stanza_id}' type='chat'>"
        f"<body>{body}</body></message>"
    )


async def receive_stanza(client: ComponentClient, stanza_id: str, timeout: float = DELIVERY_TIMEOUT) -> etree._Element:
    """The stanza with id `stanza_id`; other stanzas arriving first (pings, disco) are skipped."""
    async with asyncio.timeout(timeout):
        for _ in range(100):
            element = await client.receive(timeout)
            if element.get("id") == stanza_id:
                return element
    raise AssertionError(f"stanza {stanza_id} not among the first 100 received")


async def deliver(sender: ComponentClient, sender_jid: str, receiver: ComponentClient, receiver_jid: str) -> etree._Element:
    """Send a message from `sender_jid` and return it as `receiver` got it."""
    stanza_id = uuid.uuid4().hex
    body = f"hello {receiver_jid} from {sender_jid} {stanza_id}"
    sender.send(message(sender_jid, receiver_jid, body, stanza_id))
    received = await receive_stanza(receiver, stanza_id)
    assert received.tag == f"{{{COMPONENT_NS}}}message", etree.tostring(received)
    assert received.get("from") == sender_jid
    assert received.get("to") == receiver_jid
    assert received.findtext(f"{{{COMPONENT_NS}}}body") == body
    return received


STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


@dataclass(frozen=True)
class Bounce:
    """An error reply to a stanza we sent."""

    error_type: str | None
    condition: str | None
    text: str | None


async def expect_bounce(client: ComponentClient, stanza_id: str, timeout: float = DELIVERY_TIMEOUT) -> Bounce:
    """The error reply to stanza `stanza_id` (fails if the reply is not an error)."""
    reply = await receive_stanza(client, stanza_id, timeout)
    assert reply.get("type") == "error", etree.tostring(reply)
    error = reply.find(f"{{{COMPONENT_NS}}}error")
    assert error is not None, etree.tostring(reply)
    conditions = [etree.QName(c).localname for c in error if etree.QName(c).namespace == STANZAS_NS]
    condition = next((c for c in conditions if c != "text"), None)
    return Bounce(error.get("type"), condition, error.findtext(f"{{{STANZAS_NS}}}text"))
