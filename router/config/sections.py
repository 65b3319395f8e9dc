"""The parsers of the [policy], [[component]], [routes], [tls] and [cluster]
sections, and the check that every local domain has one owner."""

from __future__ import annotations

import ipaddress
import re
import socket
from types import MappingProxyType
from typing import Any, Mapping

from router.config.defaults import (
    AUTH_MODES,
    DEFAULT_BUS_TIMEOUT,
    DEFAULT_MAX_BUS_IN_FLIGHT,
    DEFAULT_STREAMS_PER_DOMAIN,
    DEFAULT_SUBJECT_PREFIX,
    DEFAULT_WORKERS,
    MAX_WORKERS,
    DEFAULT_MAX_STANZA_BYTES,
    DEFAULT_PRE_AUTH_MAX_STANZA_BYTES,
    DEFAULT_REQUIRE_ENCRYPTION,
    DEFAULT_SECURE_AUTH,
    DEFAULT_TLS_REQUIRED,
    DEFAULT_TLS_SELF_SIGNED,
    DEFAULT_TLS_SYSTEM_TRUST,
    DEFAULT_DANE,
    MIN_STANZA_BYTES,
)
from router.config.model import (
    CertificateFiles,
    ClusterConfig,
    ComponentConfig,
    ServicesConfig,
    StaticRoute,
    TlsConfig,
    parse_endpoint,
)
from router.config.reader import Reader, kind_of
from router.trust.policy import Policy


def parse_policy(r: Reader, p: Mapping[str, Any]) -> Policy:
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


def _stanza_limit(r: Reader, data, path, key, default):
    value = r.get(data, path, key, int, default)
    if value is not None and value < MIN_STANZA_BYTES:
        r.problem(f"{path}.{key}", f"must be at least {MIN_STANZA_BYTES} bytes (RFC 6120 §13.12), got {value}")
        return default
    return value


def parse_components(r: Reader, entries: Any) -> tuple[ComponentConfig, ...]:
    if not isinstance(entries, list):
        r.problem("component", "must be an array of tables: [[component]]")
        return ()
    found: dict[str, ComponentConfig] = {}
    for i, entry in enumerate(entries):
        where = f"component[{i}]"
        if not isinstance(entry, dict):
            r.problem(where, f"must be a table, got {kind_of(entry)}")
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


def parse_routes(r: Reader, t: Mapping[str, Any]) -> Mapping[str, StaticRoute]:
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
            r.problem(where, f"must be 'host:port' or {{ address = 'host:port', direct_tls = true }}, got {kind_of(value)}")
            continue
        try:
            endpoint = parse_endpoint(value)
        except ValueError as exc:
            r.problem(where, str(exc))
            continue
        if domain is not None:
            routes[domain] = StaticRoute(endpoint.host, endpoint.port, direct_tls)
    return MappingProxyType(routes)


def parse_tls(r: Reader, t: Mapping[str, Any]) -> TlsConfig:
    r.known_keys(t, "tls", {"certificates", "trust_anchors", "peer_trust_anchors", "system_trust", "required",
                            "self_signed", "dane", "dane_exempt", "nameservers"})
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
        dane=r.get(t, "tls", "dane", bool, DEFAULT_DANE),
        dane_exempt=tuple(pat for i, v in enumerate(r.get(t, "tls", "dane_exempt", list, []))
                          if (pat := r.pattern(v, f"tls.dane_exempt[{i}]")) is not None),
        nameservers=_nameservers(r, r.get(t, "tls", "nameservers", list, [])),
    )


def _nameservers(r: Reader, values: list) -> tuple[str, ...]:
    """``[tls] nameservers``: "ip" or "ip:port" / "[v6]:port" of the validating resolver."""
    found = []
    for i, value in enumerate(values):
        text = value if isinstance(value, str) else ""
        host = text[1:].partition("]")[0] if text.startswith("[") else text.rpartition(":")[0] if text.count(":") == 1 else text
        try:
            ipaddress.ip_address(host)
        except ValueError:
            r.problem(f"tls.nameservers[{i}]", f"must be an IP address with an optional port, got {value!r}")
            continue
        found.append(text)
    return tuple(found)


def check_ownership(r: Reader, domains, services: ServicesConfig, components) -> None:
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


_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # safe inside a NATS subject (no '.', '*', '>', spaces)


def parse_cluster(r: Reader, c: Mapping[str, Any]) -> ClusterConfig:
    r.known_keys(c, "cluster", set(ClusterConfig.__dataclass_fields__))
    workers = r.positive(c, "cluster", "workers", int, DEFAULT_WORKERS)
    if workers > MAX_WORKERS:
        r.problem("cluster.workers", f"must be at most {MAX_WORKERS}, got {workers}")
    nats = tuple(r.get(c, "cluster", "nats", list, []))
    for i, url in enumerate(nats):
        if not isinstance(url, str) or not url.startswith(("nats://", "tls://")):
            r.problem(f"cluster.nats[{i}]", f"must be a nats:// or tls:// URL, got {url!r}")
    if workers > 1 and not nats:
        r.problem("cluster.workers", "more than one worker needs cluster.nats: stanzas between workers go over NATS")
    default_node = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "node"
    node = r.get(c, "cluster", "node", str, default_node)
    prefix = r.get(c, "cluster", "subject_prefix", str, DEFAULT_SUBJECT_PREFIX)
    for key, value in (("node", node), ("subject_prefix", prefix)):
        if not _SUBJECT_TOKEN.fullmatch(value):
            r.problem(f"cluster.{key}", f"must be 1-64 letters, digits, '-' or '_' (it names NATS subjects), got {value!r}")
    return ClusterConfig(
        workers=workers,
        node=node,
        nats=tuple(u for u in nats if isinstance(u, str)),
        subject_prefix=prefix,
        streams_per_domain=r.positive(c, "cluster", "streams_per_domain", int, DEFAULT_STREAMS_PER_DOMAIN),
        bus_timeout=r.positive(c, "cluster", "bus_timeout", float, DEFAULT_BUS_TIMEOUT),
        max_bus_in_flight=r.positive(c, "cluster", "max_bus_in_flight", int, DEFAULT_MAX_BUS_IN_FLIGHT),
    )
