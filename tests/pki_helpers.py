"""Test-only companions of router/trust/pki.py (the relay itself never reads a credential back)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from router.trust.pki import Credential


def load_credential(cert_path: str | os.PathLike, key_path: str | os.PathLike) -> Credential:
    """Read back a credential written by `Credential.write` (leaf = first certificate)."""
    cert = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    return Credential(cert, key)
