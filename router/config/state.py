"""Key material the configuration creates once in the state directory: the
dialback secret (shared by every worker) and self-signed certificates."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from types import MappingProxyType

from router.config.defaults import (
    CERT_SUBDIR,
    DIALBACK_SECRET_BYTES,
    DIALBACK_SECRET_FILENAME,
)
from router.config.model import (
    CertificateFiles,
    TlsConfig,
)


def read_dialback_secret(state_dir: Path) -> str:
    """The state directory's dialback secret, or "" when there is none yet."""
    try:
        return (state_dir / DIALBACK_SECRET_FILENAME).read_text().strip()
    except FileNotFoundError:
        return ""


def ensure_dialback_secret(state_dir: Path) -> str:
    """Read the state directory's dialback secret, creating it (mode 0600) once."""
    existing = read_dialback_secret(state_dir)
    if existing:
        return existing
    path = state_dir / DIALBACK_SECRET_FILENAME
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(DIALBACK_SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def with_self_signed(tls: TlsConfig, state_dir: Path, domains: list[str]) -> TlsConfig:
    if not domains:
        return tls
    from router.trust.pki import ensure_self_signed  # cryptography is imported only when needed

    certificates = dict(tls.certificates)
    for domain in domains:
        cert, key = ensure_self_signed(state_dir / CERT_SUBDIR, domain)
        certificates[domain] = CertificateFiles(cert, key)
    return dataclasses.replace(tls, certificates=MappingProxyType(certificates))
