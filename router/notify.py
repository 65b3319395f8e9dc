"""systemd's readiness protocol (sd_notify): one datagram of ``KEY=value`` lines to
``$NOTIFY_SOCKET``, which systemd sets for a ``Type=notify`` service; nothing
without it."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("router.notify")


def notify(*states: str) -> None:
    """Tell systemd ``states`` ("READY=1", "STOPPING=1", ...) when it asked."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # "@": an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc)


def monotonic_usec() -> str:
    """The line systemd wants beside RELOADING=1 (CLOCK_MONOTONIC, microseconds)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
