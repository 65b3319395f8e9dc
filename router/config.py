"""Relay configuration: one TOML file -> frozen dataclasses, validated.

Everything the runtime needs is resolved here, once, at start: secrets are read
from their files, certificate paths exist, listeners are parsed into
``Endpoint`` objects. A bad file raises ``ConfigError`` listing *every* problem
with its path (``policy.deny[2]``) and reason, so an operator fixes the file in
one pass instead of one error per restart.

Every default is a named module constant with the reason for its value.
``docs/config.md`` documents each option.
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from router import policy as policy_module
from router.jid import normalize_domain
from router.policy import Policy

# --------------------------------------------------------------------------- defaults

# The embedded default serves only this domain: it needs no DNS and no real
# certificate, and every XMPP server resolves it to loopback.
DEFAULT_DOMAIN = "localhost"
# Relative to the working directory, so `make run` keeps its key material
# beside the checkout and reuses it on the next run.
DEFAULT_STATE_DIR = "state"
# Name of the generated dialback secret inside the state directory; a file (not
# a random value per process) so every worker on the machine shares it (T-10).
DIALBACK_SECRET_FILENAME = "dialback_secret"
# 32 random bytes (hex) = 256 bits, the HMAC-SHA256 key size of XEP-0185.
DIALBACK_SECRET_BYTES = 32
# Generated self-signed certificates live here, one `<domain>.crt/.key` pair each.
CERT_SUBDIR = "certs"

# IANA port for xmpp-server (RFC 6120 §3.2.2); loopback so a default start
# never exposes the relay to the network by accident.
DEFAULT_S2S_LISTEN = "127.0.0.1:5269"
# XEP-0114's customary component port (Prosody, ejabberd); loopback because the
# component handshake is a plain shared secret without TLS.
DEFAULT_COMPONENT_LISTEN = "127.0.0.1:5347"
# Prometheus exporter port range (9100-9999); loopback, scrape locally or proxy.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9105"
# XEP-0368 suggests 5270 for xmpps-server; off unless configured.
DEFAULT_S2S_DIRECT_TLS_LISTEN = None

# Offer STARTTLS but accept dialback over plain TCP too: the embedded default
# talks to self-signed local peers; production configs set required = true.
DEFAULT_TLS_REQUIRED = False
# Use the system CA store in addition to configured trust anchors, so real
# peers with public certificates authenticate via SASL EXTERNAL.
DEFAULT_TLS_SYSTEM_TRUST = True
# Only the embedded default creates certificates by itself; a config file
# names its certificates so a missing one is an error, not a silent fallback.
DEFAULT_TLS_SELF_SIGNED = False

BIDI_MODES = ("encrypted", "always", "off")
# XEP-0288 saves one TCP connection per peer; only over TLS by default because
# XEP-0288 §2.1 requires STARTTLS to complete first when TLS is used.
DEFAULT_BIDI = "encrypted"
# XEP-0192 <required/> on every feature that is mandatory at that stage: the
# project's brief (seed XEP-0192), so on by default; Prosody 0.12 and ejabberd
# 23.01 ignore unknown feature children. Turn off for a peer that chokes on them
# (RFC 6120 itself defines <required/> only inside <starttls/>, which stays).
DEFAULT_REQUIRED_FLAGS = True
# TCP connect to one address; RFC 6120 gives no number, 10 s tolerates slow
# links while moving on to the next SRV target quickly.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Close an idle S2S stream after this long without traffic; RFC 6120 §4.6.3
# asks to be liberal, Prosody and ejabberd use about 10 minutes.
DEFAULT_IDLE_TIMEOUT = 600.0
# Whitespace keepalive interval; checks "not more than once every 5 minutes"
# (RFC 6120 §4.6.4), so 300 s.
DEFAULT_KEEPALIVE_INTERVAL = 300.0
# Bound on the time a stream may stay unauthenticated (T-19; Prosody's connect
# timeout is 60 s).
DEFAULT_NEGOTIATION_TIMEOUT = 60.0
# After sending </stream:stream>, wait this long for the peer's close (RFC 6120 §4.4).
DEFAULT_CLOSE_TIMEOUT = 10.0
# Stanzas held per remote domain while its outbound stream is negotiated;
# bounded so a dead peer cannot eat memory (bounced beyond this).
DEFAULT_QUEUE_MAX_STANZAS = 1000
# Queued stanzas older than this are bounced with <remote-server-timeout/>.
DEFAULT_QUEUE_MAX_AGE = 60.0
# Remote domain pairs waiting for a stream at once: each is a DNS look-up and a
# connection attempt; far above any component's legitimate fan-out, low enough
# that a gateway tricked into addressing every domain cannot exhaust the relay.
DEFAULT_MAX_OUTBOUND_QUEUES = 10000
# Reconnect back-off: RFC 6120 §3.3 asks for a random wait and exponential
# back-off; start at 1 s, cap at 60 s (the RFC's 0-60 s window).
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_MAX = 60.0
# Transport write buffer marks: stop reading from the sources feeding a stream
# above the high mark, resume below the low mark (asyncio defaults are 64 KiB).
DEFAULT_WRITE_HIGH_WATER = 1024 * 1024
DEFAULT_WRITE_LOW_WATER = 256 * 1024
# Bytes one stream may have waiting to be written (transport buffer plus the
# iteration's queue): four high-water marks leave room for bursts of the largest
# stanzas; past it the destination is not slow but not reading, and stanzas to
# it bounce with <resource-constraint/> instead of queueing.
DEFAULT_WRITE_QUEUE_MAX = 4 * 1024 * 1024
# A stream that stays above its high-water mark this long after hitting its
# queue limit is closed with <resource-constraint/>: between ejabberd's
# send_timeout (15 s) and Prosody's (180 s, net.server_epoll).
DEFAULT_WRITE_STALL_TIMEOUT = 60.0

# [limits]: work a peer can start before it has proven anything.
# Inbound S2S connections at once; above the 10,000 idle streams the relay is
# benchmarked with, and lowered at start to what the process's file-descriptor
# limit allows (so the relay refuses with a stream error, never by failing accept()).
DEFAULT_MAX_CONNECTIONS = 16384
# Per remote IP: a server hosting many domains without multiplexing opens one
# stream per domain pair (ejabberd's max_s2s_connections_number is 1 per pair),
# so a few hundred; one address cannot take every slot.
DEFAULT_MAX_CONNECTIONS_PER_IP = 256
# Streams not yet authenticated, overall: each costs a TLS handshake and a
# negotiation; legitimate ones finish in well under negotiation_timeout.
DEFAULT_MAX_PRE_AUTH_CONNECTIONS = 1000
# Dialback verifications in flight (each a DNS look-up and possibly an outbound
# connection), overall, per remote IP and per stream. A peer multiplexing many
# domains over one stream asks for a few at once, not thousands.
DEFAULT_MAX_PENDING_VERIFICATIONS = 1000
DEFAULT_MAX_PENDING_VERIFICATIONS_PER_IP = 64
DEFAULT_MAX_PENDING_VERIFICATIONS_PER_STREAM = 16
# Verify-only connections open at once to one authoritative server address;
# more verifications wait for a free one.
DEFAULT_MAX_VERIFY_CONNECTIONS_PER_TARGET = 4

# RFC 6120 §13.12: a stanza size limit MUST NOT be below 10000 bytes.
MIN_STANZA_BYTES = 10000
# 512 KiB, as Prosody (router.policy's default, the tokenizer's too).
DEFAULT_MAX_STANZA_BYTES = policy_module.DEFAULT_MAX_STANZA_BYTES
# Before authentication a peer sends only small negotiation elements (router.policy's default).
DEFAULT_PRE_AUTH_MAX_STANZA_BYTES = policy_module.DEFAULT_PRE_AUTH_MAX_STANZA_BYTES
# RFC 7590 and Prosody's default: no authentication over plain TCP. Self-signed
# peers still federate: dialback runs fine inside an unverified TLS session.
DEFAULT_REQUIRE_ENCRYPTION = True
# Accept dialback when the certificate does not verify (XEP-0344 style); true
# demands SASL EXTERNAL with a valid certificate from every peer.
DEFAULT_SECURE_AUTH = False
AUTH_MODES = (policy_module.AUTH_SECURE, policy_module.AUTH_DIALBACK)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"
# Raw XML per stream is a debugging aid that leaks message contents; off.
DEFAULT_LOG_RAW_XML = False

# Built-in service subdomains of the embedded default.
DEFAULT_ECHO_DOMAIN = "echo.localhost"
DEFAULT_SINK_DOMAIN = "sink.localhost"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where (``policy.deny[2]``) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(Exception):
    """A configuration was rejected; ``problems`` lists every reason found."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Endpoint:
    """A listening or connecting address (IPv6 hosts without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    domains: tuple[str, ...]  # domains the relay itself serves (built-in ping/disco)
    state_dir: Path
    dialback_secret: str  # shared by every worker (T-10)


@dataclass(frozen=True)
class ListenConfig:
    s2s: Endpoint | None
    s2s_direct_tls: Endpoint | None  # XEP-0368
    component: Endpoint | None  # XEP-0114
    metrics: Endpoint | None  # Prometheus HTTP


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path  # PEM chain, leaf first
    key: Path  # PEM private key


@dataclass(frozen=True)
class TlsConfig:
    certificates: Mapping[str, CertificateFiles]  # local domain -> files
    trust_anchors: tuple[Path, ...]  # extra CA files (PEM)
    # remote domain -> the only CA files its certificates may chain to (RFC 6120 §13.6)
    peer_trust_anchors: Mapping[str, tuple[Path, ...]]
    system_trust: bool
    required: bool
    self_signed: bool


@dataclass(frozen=True)
class S2SConfig:
    bidi: str  # one of BIDI_MODES
    required_flags: bool
    connect_timeout: float
    idle_timeout: float
    keepalive_interval: float
    negotiation_timeout: float
    close_timeout: float
    queue_max_stanzas: int
    queue_max_age: float
    max_outbound_queues: int
    backoff_base: float
    backoff_max: float
    write_high_water: int
    write_low_water: int
    write_queue_max: int
    write_stall_timeout: float


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on work peers can start before proving anything (router.limits)."""

    max_connections: int
    max_connections_per_ip: int
    max_pre_auth_connections: int
    max_pending_verifications: int
    max_pending_verifications_per_ip: int
    max_pending_verifications_per_stream: int
    max_verify_connections_per_target: int


@dataclass(frozen=True)
class ComponentConfig:
    domain: str
    secret: str


@dataclass(frozen=True)
class ServicesConfig:
    echo: tuple[str, ...]  # domains answered by the echo service
    sink: tuple[str, ...]  # domains whose messages are counted and dropped


@dataclass(frozen=True)
class StaticRoute:
    host: str
    port: int
    direct_tls: bool = False


@dataclass(frozen=True)
class LogConfig:
    level: str  # one of LOG_LEVELS
    raw_xml: bool


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    listen: ListenConfig
    tls: TlsConfig
    s2s: S2SConfig
    limits: LimitsConfig
    policy: Policy  # router.policy.Policy, built from [policy]
    components: tuple[ComponentConfig, ...]
    services: ServicesConfig
    routes: Mapping[str, StaticRoute]
    log: LogConfig
    source: str = field(default="<embedded default>", compare=False)

    @property
    def service_domains(self) -> frozenset[str]:
        """Domains answered by built-in services (ping and disco on all of them)."""
        return frozenset(self.server.domains) | frozenset(self.services.echo) | frozenset(self.services.sink)

    @property
    def local_domains(self) -> frozenset[str]:
        """Every domain the relay accepts S2S traffic for."""
        return self.service_domains | {c.domain for c in self.components}


# --------------------------------------------------------------------------- parsing


def parse_endpoint(value: str, *, listening: bool = False) -> Endpoint:
    """``host:port`` or ``[v6]:port`` -> Endpoint; raises ValueError.

    A listener may use port 0 (the kernel picks one; tests read it back)."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [address]:port, got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected host:port, got {value!r}")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    lowest = 0 if listening else 1
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise ValueError(f"port must be {lowest}-65535, got {port_text!r}")
    return Endpoint(host, int(port_text))


class _Reader:
    """Walks the TOML tree, collecting every problem with its dotted path."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path, reason))

    def table(self, data: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any]:
        value = data.get(key, {})
        where = f"{path}.{key}" if path else key
        if not isinstance(value, dict):
            self.problem(where, f"must be a table, got {_kind(value)}")
            return {}
        return value

    def known_keys(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                where = f"{path}.{key}" if path else key
                self.problem(where, f"unknown option (known: {', '.join(sorted(allowed))})")

    def get(self, data: Mapping[str, Any], path: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in data:
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML `true` is never a number here
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            self.problem(f"{path}.{key}", f"must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, got {_kind(value)}")
            return default
        return value

    def positive(self, data, path, key, kind, default):
        value = self.get(data, path, key, kind, default)
        if value <= 0:
            self.problem(f"{path}.{key}", f"must be greater than 0, got {value}")
            return default
        return value

    def choice(self, data, path, key, choices, default, *, upper=False):
        value = self.get(data, path, key, str, default)
        folded = value.upper() if upper else value
        if folded not in choices:
            self.problem(f"{path}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return folded

    def domain(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.problem(path, f"must be a domain string, got {_kind(value)}")
            return None
        try:
            return normalize_domain(value)
        except ValueError as exc:
            self.problem(path, f"{value!r}: {exc}")
            return None

    def domains(self, data, path, key, default: tuple[str, ...]) -> tuple[str, ...]:
        values = self.get(data, path, key, list, None)
        if values is None:
            return default
        found = []
        for i, value in enumerate(values):
            domain = self.domain(value, f"{path}.{key}[{i}]")
            if domain is not None and domain not in found:
                found.append(domain)
        return tuple(found)

    def pattern(self, value: Any, path: str) -> str | None:
        """An allow/deny entry: an exact domain or ``*.suffix``."""
        if isinstance(value, str) and value.startswith("*."):
            try:
                return "*." + normalize_domain(value[2:])
            except ValueError as exc:
                self.problem(path, f"{value!r}: {exc}")
                return None
        return self.domain(value, path)

    def endpoint(self, data, path, key, default: str | None) -> Endpoint | None:
        value = self.get(data, path, key, (str, bool), default)
        if value is False or value == "" or value is None:
            return None
        if value is True:
            self.problem(f"{path}.{key}", "use an address 'host:port' to enable, false to disable")
            return None
        try:
            return parse_endpoint(value, listening=True)
        except ValueError as exc:
            self.problem(f"{path}.{key}", str(exc))
            return None

    def path(self, value: Any, where: str, *, must_exist: bool = True) -> Path | None:
        if not isinstance(value, str) or not value:
            self.problem(where, f"must be a file path, got {_kind(value)}")
            return None
        resolved = (self.base_dir / Path(value).expanduser()).resolve()
        if must_exist and not resolved.is_file():
            self.problem(where, f"file not found: {resolved}")
            return None
        return resolved


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list", dict: "a table"}


def _kind(value: Any) -> str:
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a table"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


_SECTIONS = {"server", "listen", "tls", "s2s", "limits", "policy", "component", "services", "routes", "log"}


def parse_config(text: str, base_dir: str | os.PathLike[str] = ".", *, source: str = "<string>") -> Config:
    """Parse and validate TOML text; relative paths are relative to ``base_dir``.

    Side effect (only with ``tls.self_signed`` or without a configured
    dialback secret): key material is created once in ``server.state_dir``.
    """
    base = Path(base_dir).resolve()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("", f"not valid TOML: {exc}")]) from None
    r = _Reader(base)
    r.known_keys(data, "", _SECTIONS)

    # [server]
    server = r.table(data, "server")
    r.known_keys(server, "server", {"domains", "state_dir", "dialback_secret", "dialback_secret_file"})
    domains = r.domains(server, "server", "domains", ())
    state_dir_text = r.get(server, "server", "state_dir", str, DEFAULT_STATE_DIR)
    state_dir = (base / Path(state_dir_text).expanduser()).resolve()
    secret = r.get(server, "server", "dialback_secret", str, None)
    secret_file = server.get("dialback_secret_file")
    if secret is not None and secret_file is not None:
        r.problem("server.dialback_secret_file", "give dialback_secret or dialback_secret_file, not both")
    elif secret is not None and len(secret) < 16:
        r.problem("server.dialback_secret", "must be at least 16 characters (it keys an HMAC, XEP-0185)")
    elif secret_file is not None:
        secret_path = r.path(secret_file, "server.dialback_secret_file")
        if secret_path is not None:
            secret = secret_path.read_text().strip()
            if len(secret) < 16:
                r.problem("server.dialback_secret_file", f"{secret_path} must hold at least 16 characters")

    # [listen]
    listen_t = r.table(data, "listen")
    r.known_keys(listen_t, "listen", {"s2s", "s2s_direct_tls", "component", "metrics"})
    listen = ListenConfig(
        s2s=r.endpoint(listen_t, "listen", "s2s", DEFAULT_S2S_LISTEN),
        s2s_direct_tls=r.endpoint(listen_t, "listen", "s2s_direct_tls", DEFAULT_S2S_DIRECT_TLS_LISTEN),
        component=r.endpoint(listen_t, "listen", "component", DEFAULT_COMPONENT_LISTEN),
        metrics=r.endpoint(listen_t, "listen", "metrics", DEFAULT_METRICS_LISTEN),
    )

    # [s2s]
    s = r.table(data, "s2s")
    r.known_keys(s, "s2s", set(S2SConfig.__dataclass_fields__))
    s2s = S2SConfig(
        bidi=r.choice(s, "s2s", "bidi", BIDI_MODES, DEFAULT_BIDI),
        required_flags=r.get(s, "s2s", "required_flags", bool, DEFAULT_REQUIRED_FLAGS),
        connect_timeout=r.positive(s, "s2s", "connect_timeout", float, DEFAULT_CONNECT_TIMEOUT),
        idle_timeout=r.positive(s, "s2s", "idle_timeout", float, DEFAULT_IDLE_TIMEOUT),
        keepalive_interval=r.positive(s, "s2s", "keepalive_interval", float, DEFAULT_KEEPALIVE_INTERVAL),
        negotiation_timeout=r.positive(s, "s2s", "negotiation_timeout", float, DEFAULT_NEGOTIATION_TIMEOUT),
        close_timeout=r.positive(s, "s2s", "close_timeout", float, DEFAULT_CLOSE_TIMEOUT),
        queue_max_stanzas=r.positive(s, "s2s", "queue_max_stanzas", int, DEFAULT_QUEUE_MAX_STANZAS),
        queue_max_age=r.positive(s, "s2s", "queue_max_age", float, DEFAULT_QUEUE_MAX_AGE),
        max_outbound_queues=r.positive(s, "s2s", "max_outbound_queues", int, DEFAULT_MAX_OUTBOUND_QUEUES),
        backoff_base=r.positive(s, "s2s", "backoff_base", float, DEFAULT_BACKOFF_BASE),
        backoff_max=r.positive(s, "s2s", "backoff_max", float, DEFAULT_BACKOFF_MAX),
        write_high_water=r.positive(s, "s2s", "write_high_water", int, DEFAULT_WRITE_HIGH_WATER),
        write_low_water=r.positive(s, "s2s", "write_low_water", int, DEFAULT_WRITE_LOW_WATER),
        write_queue_max=r.positive(s, "s2s", "write_queue_max", int, DEFAULT_WRITE_QUEUE_MAX),
        write_stall_timeout=r.positive(s, "s2s", "write_stall_timeout", float, DEFAULT_WRITE_STALL_TIMEOUT),
    )
    if s2s.write_low_water >= s2s.write_high_water:
        r.problem("s2s.write_low_water", f"must be below write_high_water ({s2s.write_high_water})")
    if s2s.write_queue_max <= s2s.write_high_water:
        r.problem("s2s.write_queue_max", f"must be above write_high_water ({s2s.write_high_water})")

    # [limits]
    lt = r.table(data, "limits")
    r.known_keys(lt, "limits", set(LimitsConfig.__dataclass_fields__))
    limits = LimitsConfig(**{name: r.positive(lt, "limits", name, int, default) for name, default in (
        ("max_connections", DEFAULT_MAX_CONNECTIONS),
        ("max_connections_per_ip", DEFAULT_MAX_CONNECTIONS_PER_IP),
        ("max_pre_auth_connections", DEFAULT_MAX_PRE_AUTH_CONNECTIONS),
        ("max_pending_verifications", DEFAULT_MAX_PENDING_VERIFICATIONS),
        ("max_pending_verifications_per_ip", DEFAULT_MAX_PENDING_VERIFICATIONS_PER_IP),
        ("max_pending_verifications_per_stream", DEFAULT_MAX_PENDING_VERIFICATIONS_PER_STREAM),
        ("max_verify_connections_per_target", DEFAULT_MAX_VERIFY_CONNECTIONS_PER_TARGET),
    )})
    if s2s.backoff_base > s2s.backoff_max:
        r.problem("s2s.backoff_base", f"must not exceed backoff_max ({s2s.backoff_max})")

    # [policy]
    policy = _parse_policy(r, r.table(data, "policy"))

    # [[component]]
    components = _parse_components(r, data.get("component", []))

    # [services]
    sv = r.table(data, "services")
    r.known_keys(sv, "services", {"echo", "sink"})
    services = ServicesConfig(echo=r.domains(sv, "services", "echo", ()), sink=r.domains(sv, "services", "sink", ()))

    # [routes]
    routes = _parse_routes(r, r.table(data, "routes"))

    # [log]
    lg = r.table(data, "log")
    r.known_keys(lg, "log", {"level", "raw_xml"})
    log = LogConfig(
        level=r.choice(lg, "log", "level", LOG_LEVELS, DEFAULT_LOG_LEVEL, upper=True),
        raw_xml=r.get(lg, "log", "raw_xml", bool, DEFAULT_LOG_RAW_XML),
    )

    # cross-section checks
    _check_ownership(r, domains, services, components)
    service_and_components = set(domains) | set(services.echo) | set(services.sink) | {c.domain for c in components}
    for domain in routes:
        if domain in service_and_components:
            r.problem(f"routes.{domain}", "is a local domain; a static route would send its traffic away")
    if not service_and_components:
        r.problem("server.domains", "no local domain: list at least one in server.domains, services or [[component]]")

    # [tls]
    tls = _parse_tls(r, r.table(data, "tls"))

    if r.problems:
        raise ConfigError(r.problems)

    local = service_and_components
    if tls.self_signed:
        missing = sorted(local - set(tls.certificates))
        tls = _with_self_signed(tls, state_dir, missing)
    elif tls.required:
        missing = sorted(local - set(tls.certificates))
        if missing:
            raise ConfigError(
                [Problem("tls.certificates", f"tls.required is true but no certificate for {', '.join(missing)}")]
            )
    if secret is None:
        secret = ensure_dialback_secret(state_dir)

    return Config(
        server=ServerConfig(domains=domains, state_dir=state_dir, dialback_secret=secret),
        listen=listen,
        tls=tls,
        s2s=s2s,
        limits=limits,
        policy=policy,
        components=components,
        services=services,
        routes=routes,
        log=log,
        source=source,
    )


def _parse_policy(r: _Reader, p: Mapping[str, Any]) -> Policy:
    r.known_keys(
        p,
        "policy",
        {"allow", "deny", "require_encryption", "secure_auth", "max_stanza_bytes", "pre_auth_max_stanza_bytes", "auth"},
    )
    lists = {}
    for key in ("allow", "deny"):
        entries = r.get(p, "policy", key, list, [])
        lists[key] = tuple(
            pat for i, v in enumerate(entries) if (pat := r.pattern(v, f"policy.{key}[{i}]")) is not None
        )
    max_bytes = _stanza_limit(r, p, "policy", "max_stanza_bytes", DEFAULT_MAX_STANZA_BYTES)
    pre_auth = _stanza_limit(r, p, "policy", "pre_auth_max_stanza_bytes", DEFAULT_PRE_AUTH_MAX_STANZA_BYTES)
    if pre_auth > max_bytes:
        r.problem("policy.pre_auth_max_stanza_bytes", f"must not exceed max_stanza_bytes ({max_bytes})")
    overrides = {}
    for name, mode in r.table(p, "auth", "policy").items():
        where = f"policy.auth.{name}"
        pattern = r.pattern(name, where)
        if mode not in AUTH_MODES:
            r.problem(where, f"must be one of {', '.join(AUTH_MODES)}, got {mode!r}")
        elif pattern is not None:
            overrides[pattern] = mode
    return Policy(
        allow=lists["allow"],
        deny=lists["deny"],
        require_encryption=r.get(p, "policy", "require_encryption", bool, DEFAULT_REQUIRE_ENCRYPTION),
        secure_auth=r.get(p, "policy", "secure_auth", bool, DEFAULT_SECURE_AUTH),
        auth_overrides=overrides,
        max_stanza_bytes=max_bytes,
        pre_auth_max_stanza_bytes=pre_auth,
    )


def _stanza_limit(r: _Reader, data, path, key, default):
    value = r.get(data, path, key, int, default)
    if value is not None and value < MIN_STANZA_BYTES:
        r.problem(f"{path}.{key}", f"must be at least {MIN_STANZA_BYTES} bytes (RFC 6120 §13.12), got {value}")
        return default
    return value


def _parse_components(r: _Reader, entries: Any) -> tuple[ComponentConfig, ...]:
    if not isinstance(entries, list):
        r.problem("component", "must be an array of tables: [[component]]")
        return ()
    found: dict[str, ComponentConfig] = {}
    for i, entry in enumerate(entries):
        where = f"component[{i}]"
        if not isinstance(entry, dict):
            r.problem(where, f"must be a table, got {_kind(entry)}")
            continue
        r.known_keys(entry, where, {"domain", "secret"})
        domain = r.domain(entry.get("domain"), f"{where}.domain")
        secret = r.get(entry, where, "secret", str, "")
        if not secret:
            r.problem(f"{where}.secret", "a non-empty shared secret is required (XEP-0114 handshake)")
        if domain is not None and domain in found:
            r.problem(f"{where}.domain", f"{domain} is already configured as a component")
        elif domain is not None:  # kept with a bad secret too, for the ownership checks
            found[domain] = ComponentConfig(domain, secret)
    return tuple(found.values())


def _parse_routes(r: _Reader, t: Mapping[str, Any]) -> Mapping[str, StaticRoute]:
    routes: dict[str, StaticRoute] = {}
    for name, value in t.items():
        where = f"routes.{name}"
        domain = r.domain(name, where)
        direct_tls = False
        if isinstance(value, dict):
            r.known_keys(value, where, {"address", "direct_tls"})
            direct_tls = r.get(value, where, "direct_tls", bool, False)
            value = value.get("address")
            if value is None:
                r.problem(f"{where}.address", "missing 'host:port'")
                continue
        if not isinstance(value, str):
            r.problem(where, f"must be 'host:port' or {{ address = 'host:port', direct_tls = true }}, got {_kind(value)}")
            continue
        try:
            endpoint = parse_endpoint(value)
        except ValueError as exc:
            r.problem(where, str(exc))
            continue
        if domain is not None:
            routes[domain] = StaticRoute(endpoint.host, endpoint.port, direct_tls)
    return MappingProxyType(routes)


def _parse_tls(r: _Reader, t: Mapping[str, Any]) -> TlsConfig:
    r.known_keys(t, "tls", {"certificates", "trust_anchors", "peer_trust_anchors", "system_trust", "required",
                            "self_signed"})
    certificates = {}
    for name, entry in r.table(t, "certificates", "tls").items():
        where = f"tls.certificates.{name}"
        domain = r.domain(name, where)
        if not isinstance(entry, dict):
            r.problem(where, "must be a table { cert = 'file.pem', key = 'file.key' }")
            continue
        r.known_keys(entry, where, {"cert", "key"})
        cert = r.path(entry.get("cert"), f"{where}.cert")
        key = r.path(entry.get("key"), f"{where}.key")
        if domain is not None and cert is not None and key is not None:
            certificates[domain] = CertificateFiles(cert, key)
    anchors = []
    for i, value in enumerate(r.get(t, "tls", "trust_anchors", list, [])):
        anchor = r.path(value, f"tls.trust_anchors[{i}]")
        if anchor is not None:
            anchors.append(anchor)
    peer_anchors = {}
    for name, files in r.table(t, "peer_trust_anchors", "tls").items():
        where = f"tls.peer_trust_anchors.{name}"
        domain = r.domain(name, where)
        if not isinstance(files, list) or not files:
            r.problem(where, "must be a non-empty list of CA files (PEM)")
            continue
        paths = [r.path(value, f"{where}[{i}]") for i, value in enumerate(files)]
        if domain is not None and None not in paths:
            peer_anchors[domain] = tuple(paths)
    return TlsConfig(
        certificates=MappingProxyType(certificates),
        trust_anchors=tuple(anchors),
        peer_trust_anchors=MappingProxyType(peer_anchors),
        system_trust=r.get(t, "tls", "system_trust", bool, DEFAULT_TLS_SYSTEM_TRUST),
        required=r.get(t, "tls", "required", bool, DEFAULT_TLS_REQUIRED),
        self_signed=r.get(t, "tls", "self_signed", bool, DEFAULT_TLS_SELF_SIGNED),
    )


def _check_ownership(r: _Reader, domains, services: ServicesConfig, components) -> None:
    """A domain has one owner: the relay's services or one component."""
    owners: dict[str, str] = {}
    claims = [(d, f"server.domains[{i}]") for i, d in enumerate(domains)]
    claims += [(d, f"services.echo[{i}]") for i, d in enumerate(services.echo)]
    claims += [(d, f"services.sink[{i}]") for i, d in enumerate(services.sink)]
    claims += [(c.domain, f"component[{i}].domain") for i, c in enumerate(components)]
    for domain, where in claims:
        if domain in owners:
            r.problem(where, f"{domain} is already served by {owners[domain]}")
        else:
            owners[domain] = where


# --------------------------------------------------------------------------- state


def ensure_dialback_secret(state_dir: Path) -> str:
    """Read the state directory's dialback secret, creating it (mode 0600) once."""
    path = state_dir / DIALBACK_SECRET_FILENAME
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(DIALBACK_SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def _with_self_signed(tls: TlsConfig, state_dir: Path, domains: list[str]) -> TlsConfig:
    if not domains:
        return tls
    from router.pki import ensure_self_signed  # cryptography is imported only when needed

    certificates = dict(tls.certificates)
    for domain in domains:
        cert, key = ensure_self_signed(state_dir / CERT_SUBDIR, domain)
        certificates[domain] = CertificateFiles(cert, key)
    return TlsConfig(
        certificates=MappingProxyType(certificates),
        trust_anchors=tls.trust_anchors,
        peer_trust_anchors=tls.peer_trust_anchors,
        system_trust=tls.system_trust,
        required=tls.required,
        self_signed=tls.self_signed,
    )


# --------------------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a TOML file; relative paths in it are relative to the file's directory."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {file}: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", f"{file} is not UTF-8: {exc}")]) from None
    return parse_config(text, file.resolve().parent, source=str(file))


def default_config_text(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> str:
    """The embedded default as TOML (what ``serve`` runs without --config)."""
    return f"""\
[server]
domains = ["{DEFAULT_DOMAIN}"]
state_dir = {json.dumps(str(Path(state_dir)))}

[tls]
self_signed = true

[services]
echo = ["{DEFAULT_ECHO_DOMAIN}"]
sink = ["{DEFAULT_SINK_DOMAIN}"]
"""


def default_config(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> Config:
    """The embedded default: loopback listeners, domain ``localhost`` with the
    built-in services, self-signed certificates and a dialback secret created
    in ``state_dir`` on first run and reused after."""
    return parse_config(default_config_text(state_dir), Path.cwd(), source="<embedded default>")
