"""The validated configuration: frozen dataclasses, and the error listing every problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping
from pathlib import Path

from router.trust.policy import Policy

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
    dialback_secret: str  # shared by every worker (XEP-0220 §1.3)


@dataclass(frozen=True)
class ListenConfig:
    s2s: Endpoint | None
    s2s_direct_tls: Endpoint | None  # XEP-0368
    component: Endpoint | None  # XEP-0114
    metrics: Endpoint | None  # Prometheus HTTP
    control: Path | None  # the Unix socket of ``python -m router ctl`` (router.admin)
    proxy_protocol: frozenset[str] = frozenset()  # listener names ("s2s", "s2s_direct_tls") that expect a PROXY header
    proxy_trusted: tuple[str, ...] = ()  # networks allowed to send the PROXY header (the load balancer)


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
    dane: bool = False  # RFC 7673 TLSA checks when DNSSEC validated the records
    dane_exempt: tuple[str, ...] = ()  # remote domain patterns DANE is not used for
    nameservers: tuple[str, ...] = ()  # the validating resolver(s): "ip" or "ip:port"; empty: the system's


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
    tcp_keepalive: float  # seconds of silence before the kernel probes the peer; 0: off
    happy_eyeballs_delay: float  # RFC 8305: seconds between starting attempts to a target's next address
    stream_management: bool  # XEP-0198 acks (no resumption) on S2S streams
    sm_resend: bool  # unacknowledged stanzas of a dead stream: re-sent (true) or bounced
    sm_ack_every: int  # request an ack after this many unacknowledged stanzas
    sm_ack_interval: float  # ... or this long after the first unacknowledged one
    sm_ack_timeout: float  # an ack request unanswered this long closes the stream as dead
    sm_max_unacked: int  # unacknowledged stanzas kept for re-sending, per stream
    advertise_limits: bool  # XEP-0478 stream limits in our features
    ping_interval: float  # XEP-0199 ping after this long without input on an authenticated stream; 0: off
    ping_timeout: float  # no answer this long after a ping: the stream is dead
    connect_blocklist: tuple[str, ...]  # networks never connected to when DNS names them ([routes] are not checked)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on work peers can start before proving anything (router.routing.limits)."""

    max_connections: int
    max_connections_per_ip: int
    max_pre_auth_connections: int
    max_pending_verifications: int
    max_pending_verifications_per_ip: int
    max_pending_verifications_per_stream: int
    max_pairs_per_stream: int
    max_verify_connections_per_target: int


@dataclass(frozen=True)
class ClusterConfig:
    """Worker processes on this node and the NATS bus between relays (router.cluster)."""

    workers: int  # relay processes sharing the listening ports (SO_REUSEPORT)
    node: str  # this node's name in the cluster: letters, digits, '-' and '_'
    nats: tuple[str, ...]  # NATS server URLs; empty: no bus (one worker, today's single process)
    subject_prefix: str  # first token of every NATS subject, so clusters can share a NATS
    streams_per_domain: int  # outbound S2S streams one node opens per remote domain, at most
    bus_timeout: float  # seconds a stanza sent over the bus waits for its delivery answer, then bounces
    max_bus_in_flight: int  # stanzas sent over the bus and not yet answered, per worker

    @property
    def bus(self) -> bool:
        return bool(self.nats)


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
    format: str  # one of LOG_FORMATS


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    listen: ListenConfig
    tls: TlsConfig
    s2s: S2SConfig
    limits: LimitsConfig
    policy: Policy  # router.trust.policy.Policy, built from [policy]
    components: tuple[ComponentConfig, ...]
    services: ServicesConfig
    routes: Mapping[str, StaticRoute]
    log: LogConfig
    cluster: ClusterConfig
    source: str = field(default="<embedded default>", compare=False)

    @property
    def service_domains(self) -> frozenset[str]:
        """Domains answered by built-in services (ping and disco on all of them)."""
        return frozenset(self.server.domains) | frozenset(self.services.echo) | frozenset(self.services.sink)

    @property
    def local_domains(self) -> frozenset[str]:
        """Every domain the relay accepts S2S traffic for."""
        return self.service_domains | {c.domain for c in self.components}


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
