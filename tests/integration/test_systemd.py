"""The relay under systemd's readiness protocol (``Type=notify``): READY=1 once it
listens, RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM;
the datagrams read from a socket the test binds as $NOTIFY_SOCKET. The unit file
in contrib/ is checked with ``systemd-analyze verify`` where it exists."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from .conftest import ROOT, relay_process


def datagrams(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    """Every state line received until one equal to ``until``."""
    sock.settimeout(timeout)
    lines: list[str] = []
    while until not in lines:
        lines += sock.recv(4096).decode().split("\n")
    return lines


def test_ready_reloading_and_stopping_reach_the_notify_socket(relay_spec, tmp_path):
    name = f"router-test-{os.getpid()}-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # "@name" in $NOTIFY_SOCKET: an abstract socket, as systemd may give
        with relay_process(relay_spec("relay", domains=("relay.test",)), tmp_path / "relay.toml",
                           env={"NOTIFY_SOCKET": "@" + name}) as process:
            ready = datagrams(sock, "READY=1")
            assert any(line.startswith("STATUS=serving") for line in ready)
            process.send_signal(signal.SIGHUP)
            reload = datagrams(sock, "READY=1")
            assert reload[0] == "RELOADING=1" and reload[1].startswith("MONOTONIC_USEC=")
            process.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in datagrams(sock, "STOPPING=1")
            assert process.wait(timeout=20) == 0


def test_without_notify_socket_nothing_is_sent_and_the_relay_serves(relay_spec, tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with relay_process(relay_spec("relay", domains=("relay.test",)), tmp_path / "relay.toml") as process:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_unit_file_verifies(tmp_path):
    unit = (ROOT / "contrib" / "xmpp-router.service").read_text()
    unit = unit.replace("/opt/xmpp-router/.venv/bin/python", sys.executable).replace(
        "WorkingDirectory=/opt/xmpp-router", f"WorkingDirectory={ROOT}")
    path = tmp_path / "xmpp-router.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
