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

from router.config.defaults import DEFAULT_STATE_DIR
from router.config.model import (
    CertificateFiles,
    ClusterConfig,
    ComponentConfig,
    Config,
    ConfigError,
    Endpoint,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    Problem,
    S2SConfig,
    ServerConfig,
    ServicesConfig,
    StaticRoute,
    TlsConfig,
    parse_endpoint,
)
from router.config.parse import default_config, default_config_text, load_config, parse_config
from router.config.state import ensure_dialback_secret

__all__ = [
    "DEFAULT_STATE_DIR", "CertificateFiles", "ClusterConfig", "ComponentConfig", "Config", "ConfigError", "Endpoint", "LimitsConfig",
    "ListenConfig", "LogConfig", "Problem", "S2SConfig", "ServerConfig", "ServicesConfig", "StaticRoute", "TlsConfig",
    "default_config", "default_config_text", "ensure_dialback_secret", "load_config", "parse_config", "parse_endpoint",
]
