"""The control socket's contract, shared by the relay and ``ctl``: where the socket
is, and one JSON object per line each way.

A request is ``{"command": "...", ...arguments}``; its answer is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "why"}``. Both end
with a newline and hold no other (JSON escapes newlines inside strings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from router.config import Config

# A request is a command name and a few arguments: far below this. The bound keeps
# a client that never sends a newline from growing the relay's buffer.
MAX_REQUEST_BYTES = 64 * 1024
# A connection that sends no complete request for this long is closed (a stuck
# script must not hold the relay's resources).
REQUEST_TIMEOUT = 10.0


def socket_path(config: Config, worker: int = 0) -> Path | None:
    """Where the relay process ``worker`` serves its control socket (None: disabled).
    With ``[cluster] workers`` above 1 each worker has its own: ``<path>.<worker>``."""
    path = config.listen.control
    if path is None or config.cluster.workers <= 1:
        return path
    return path.with_name(f"{path.name}.{worker}")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def answer(result: Any) -> bytes:
    return encode({"ok": True, "result": result})


def refusal(error: str) -> bytes:
    return encode({"ok": False, "error": error})
