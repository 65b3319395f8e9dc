"""A real ``nats-server`` (the Debian package, installed by ``make peers``) on a free
loopback port, for the cluster tests; stopped when the test is done with it.

Without the binary the tests that need it skip, except under CI=true, where a
missing bus is a failure of the set-up, like a missing interop peer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.interop.harness import free_port

READY_TIMEOUT = 10.0
RUNNING: dict[int, subprocess.Popen] = {}  # port -> the server this module started there


def stop(port: int) -> None:
    """Stop the server on ``port`` now (a test of the bus going away); its context
    manager then finds it stopped."""
    process = RUNNING.get(port)
    if process is not None and process.poll() is None:
        process.terminate()
        process.wait(timeout=5)


def nats_binary() -> str:
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
    if found is None:
        message = "nats-server is not installed: run 'make peers' as root (apt-get install nats-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextmanager
def nats_server(log_dir: Path, port: int | None = None, options: tuple[str, ...] = ()):
    """Yields the server's ``nats://127.0.0.1:PORT`` URL; ``port`` reuses one (a restart);
    ``options`` are more of nats-server's (``--user``, ``--tls``...)."""
    port = port or free_port()
    log = open(log_dir / f"nats-{port}.log", "a")
    process = RUNNING[port] = subprocess.Popen([nats_binary(), "-a", "127.0.0.1", "-p", str(port), *options],
                                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nats-server did not start: {(log_dir / f'nats-{port}.log').read_text()}")
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        RUNNING.pop(port, None)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
