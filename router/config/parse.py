"""Parsing a configuration: TOML text -> a validated ``Config``, and the embedded default."""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path

from router.config.defaults import (
    BIDI_MODES,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_BIDI,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_COMPONENT_LISTEN,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_DOMAIN,
    DEFAULT_ECHO_DOMAIN,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_LOG_RAW_XML,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_OUTBOUND_QUEUES,
    DEFAULT_MAX_PENDING_VERIFICATIONS,
    DEFAULT_MAX_PENDING_VERIFICATIONS_PER_IP,
    DEFAULT_MAX_PAIRS_PER_STREAM,
    DEFAULT_MAX_PENDING_VERIFICATIONS_PER_STREAM,
    DEFAULT_MAX_PRE_AUTH_CONNECTIONS,
    DEFAULT_MAX_VERIFY_CONNECTIONS_PER_TARGET,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_NEGOTIATION_TIMEOUT,
    DEFAULT_QUEUE_MAX_AGE,
    DEFAULT_QUEUE_MAX_STANZAS,
    DEFAULT_REQUIRED_FLAGS,
    DEFAULT_S2S_DIRECT_TLS_LISTEN,
    DEFAULT_S2S_LISTEN,
    DEFAULT_SINK_DOMAIN,
    DEFAULT_STATE_DIR,
    DEFAULT_WRITE_HIGH_WATER,
    DEFAULT_WRITE_LOW_WATER,
    DEFAULT_WRITE_QUEUE_MAX,
    DEFAULT_WRITE_STALL_TIMEOUT,
    DEFAULT_TCP_KEEPALIVE,
    DEFAULT_ADVERTISE_LIMITS,
    DEFAULT_CONNECT_BLOCKLIST,
    DEFAULT_HAPPY_EYEBALLS_DELAY,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_PROXY_TRUSTED,
    DEFAULT_SM_ACK_EVERY,
    DEFAULT_SM_RESEND,
    DEFAULT_SM_ACK_INTERVAL,
    DEFAULT_SM_ACK_TIMEOUT,
    DEFAULT_SM_MAX_UNACKED,
    DEFAULT_STREAM_MANAGEMENT,
    LOG_FORMATS,
    LOG_LEVELS,
)
from router.config.model import (
    Config,
    ConfigError,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    Problem,
    S2SConfig,
    ServerConfig,
    ServicesConfig,
)
from router.config.reader import Reader
from router.config.sections import (
    check_ownership,
    parse_cluster,
    parse_components,
    parse_policy,
    parse_routes,
    parse_tls,
)
from router.config.state import ensure_dialback_secret, read_dialback_secret, with_self_signed


# listeners that may sit behind a load balancer speaking the PROXY protocol
PROXY_LISTENERS = ("s2s", "s2s_direct_tls")

_SECTIONS = {"server", "listen", "tls", "s2s", "limits", "policy", "component", "services", "routes", "log", "cluster"}


def parse_config(text: str, base_dir: str | os.PathLike[str] = ".", *, source: str = "<string>",
                 create_state: bool = True) -> Config:
    """Parse and validate TOML text; relative paths are relative to ``base_dir``.

    Side effect (only with ``tls.self_signed`` or without a configured
    dialback secret): key material is created once in ``server.state_dir``.
    With ``create_state`` false nothing is written (``check-config``): missing
    self-signed certificates stay missing and a missing secret is "".
    """
    base = Path(base_dir).resolve()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("", f"not valid TOML: {exc}")]) from None
    r = Reader(base)
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
    r.known_keys(listen_t, "listen", {"s2s", "s2s_direct_tls", "component", "metrics", "control", "proxy_protocol",
                                      "proxy_trusted"})
    proxied = r.get(listen_t, "listen", "proxy_protocol", list, [])
    for i, name in enumerate(proxied):
        if name not in PROXY_LISTENERS:
            r.problem(f"listen.proxy_protocol[{i}]", f"must be one of {', '.join(PROXY_LISTENERS)}, got {name!r}")
    trusted = _networks(r, listen_t, "listen", "proxy_trusted", DEFAULT_PROXY_TRUSTED)
    listen = ListenConfig(
        s2s=r.endpoint(listen_t, "listen", "s2s", DEFAULT_S2S_LISTEN),
        s2s_direct_tls=r.endpoint(listen_t, "listen", "s2s_direct_tls", DEFAULT_S2S_DIRECT_TLS_LISTEN),
        component=r.endpoint(listen_t, "listen", "component", DEFAULT_COMPONENT_LISTEN),
        metrics=r.endpoint(listen_t, "listen", "metrics", DEFAULT_METRICS_LISTEN),
        control=_control_socket(r, listen_t, state_dir),
        proxy_protocol=frozenset(n for n in proxied if n in PROXY_LISTENERS),
        proxy_trusted=trusted,
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
        tcp_keepalive=r.get(s, "s2s", "tcp_keepalive", float, DEFAULT_TCP_KEEPALIVE),
        happy_eyeballs_delay=r.positive(s, "s2s", "happy_eyeballs_delay", float, DEFAULT_HAPPY_EYEBALLS_DELAY),
        stream_management=r.get(s, "s2s", "stream_management", bool, DEFAULT_STREAM_MANAGEMENT),
        sm_resend=r.get(s, "s2s", "sm_resend", bool, DEFAULT_SM_RESEND),
        sm_ack_every=r.positive(s, "s2s", "sm_ack_every", int, DEFAULT_SM_ACK_EVERY),
        sm_ack_interval=r.positive(s, "s2s", "sm_ack_interval", float, DEFAULT_SM_ACK_INTERVAL),
        sm_ack_timeout=r.positive(s, "s2s", "sm_ack_timeout", float, DEFAULT_SM_ACK_TIMEOUT),
        sm_max_unacked=r.positive(s, "s2s", "sm_max_unacked", int, DEFAULT_SM_MAX_UNACKED),
        advertise_limits=r.get(s, "s2s", "advertise_limits", bool, DEFAULT_ADVERTISE_LIMITS),
        ping_interval=r.get(s, "s2s", "ping_interval", float, DEFAULT_PING_INTERVAL),
        ping_timeout=r.positive(s, "s2s", "ping_timeout", float, DEFAULT_PING_TIMEOUT),
        connect_blocklist=_networks(r, s, "s2s", "connect_blocklist", DEFAULT_CONNECT_BLOCKLIST),
    )
    if s2s.ping_interval < 0:
        r.problem("s2s.ping_interval", f"must be 0 (off) or a number of seconds, got {s2s.ping_interval}")
    if s2s.sm_max_unacked < s2s.sm_ack_every:
        r.problem("s2s.sm_max_unacked", f"must be at least sm_ack_every ({s2s.sm_ack_every})")
    if s2s.tcp_keepalive < 0:
        r.problem("s2s.tcp_keepalive", f"must be 0 (off) or a number of seconds, got {s2s.tcp_keepalive}")
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
        ("max_pairs_per_stream", DEFAULT_MAX_PAIRS_PER_STREAM),
        ("max_verify_connections_per_target", DEFAULT_MAX_VERIFY_CONNECTIONS_PER_TARGET),
    )})
    if s2s.backoff_base > s2s.backoff_max:
        r.problem("s2s.backoff_base", f"must not exceed backoff_max ({s2s.backoff_max})")

    # [policy]
    policy = parse_policy(r, r.table(data, "policy"))

    # [[component]]
    components = parse_components(r, data.get("component", []))

    # [services]
    sv = r.table(data, "services")
    r.known_keys(sv, "services", {"echo", "sink"})
    services = ServicesConfig(echo=r.domains(sv, "services", "echo", ()), sink=r.domains(sv, "services", "sink", ()))

    # [routes]
    routes = parse_routes(r, r.table(data, "routes"))

    # [log]
    lg = r.table(data, "log")
    r.known_keys(lg, "log", {"level", "raw_xml", "format"})
    log = LogConfig(
        level=r.choice(lg, "log", "level", LOG_LEVELS, DEFAULT_LOG_LEVEL, upper=True),
        raw_xml=r.get(lg, "log", "raw_xml", bool, DEFAULT_LOG_RAW_XML),
        format=r.choice(lg, "log", "format", LOG_FORMATS, DEFAULT_LOG_FORMAT),
    )

    # [cluster]
    cluster = parse_cluster(r, r.table(data, "cluster"))

    # cross-section checks
    check_ownership(r, domains, services, components)
    service_and_components = set(domains) | set(services.echo) | set(services.sink) | {c.domain for c in components}
    for domain in routes:
        if domain in service_and_components:
            r.problem(f"routes.{domain}", "is a local domain; a static route would send its traffic away")
    if not service_and_components:
        r.problem("server.domains", "no local domain: list at least one in server.domains, services or [[component]]")

    # [tls]
    tls = parse_tls(r, r.table(data, "tls"))

    if r.problems:
        raise ConfigError(r.problems)

    local = service_and_components
    if tls.self_signed:
        if create_state:
            tls = with_self_signed(tls, state_dir, sorted(local - set(tls.certificates)))
    elif tls.required:
        missing = sorted(local - set(tls.certificates))
        if missing:
            raise ConfigError(
                [Problem("tls.certificates", f"tls.required is true but no certificate for {', '.join(missing)}")]
            )
    if secret is None:
        secret = ensure_dialback_secret(state_dir) if create_state else read_dialback_secret(state_dir)

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
        cluster=cluster,
        source=source,
    )



def _networks(r: Reader, table: dict, section: str, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of addresses or networks (``10.0.0.0/8``), each checked."""
    networks = r.get(table, section, key, list, list(default))
    for i, network in enumerate(networks):
        try:
            ipaddress.ip_network(network)
        except (TypeError, ValueError) as exc:
            r.problem(f"{section}.{key}[{i}]", f"must be an address or network like '10.0.0.0/8': {exc}")
    return tuple(str(n) for n in networks)


def _control_socket(r: Reader, listen: dict, state_dir: Path) -> Path | None:
    """``[listen] control``: a socket path (relative to the config file), ``false``
    for none; ``<state_dir>/control.sock`` when not given."""
    value = r.get(listen, "listen", "control", (str, bool), None)
    if value is None:
        return state_dir / DEFAULT_CONTROL_SOCKET
    if value is False:
        return None
    if value is True or not value:
        r.problem("listen.control", "use a Unix socket path to enable, false to disable")
        return None
    return (r.base_dir / Path(value).expanduser()).resolve()


def load_config(path: str | os.PathLike[str], *, create_state: bool = True) -> Config:
    """Read a TOML file; relative paths in it are relative to the file's directory."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {file}: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", f"{file} is not UTF-8: {exc}")]) from None
    return parse_config(text, file.resolve().parent, source=str(file), create_state=create_state)


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
