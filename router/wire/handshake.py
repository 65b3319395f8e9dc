"""The XEP-0114 component handshake digest, computed by both sides of a component stream."""

from __future__ import annotations

import hashlib


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 §3: lowercase hex SHA-1 of the stream id followed by the shared secret."""
    return hashlib.sha1((stream_id + secret).encode("utf-8")).hexdigest()
