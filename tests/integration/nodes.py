"""Relay nodes as ``python -m router serve`` processes, for the cluster tests: started
from a spec, their workers found in the log, their metrics scraped and read, and
every process killed if the test did not stop it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .conftest import ROOT, arun

NODE_TIMEOUT = 30.0  # for the node to start, a worker to restart, every worker to stop


def eventually(check, what: str, timeout: float = NODE_TIMEOUT):
    """``check()``'s first true value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Node:
    """The supervisor process and what it and its workers wrote (one log file)."""

    def __init__(self, process: subprocess.Popen, log: Path):
        self.process = process
        self.log = log

    def text(self) -> str:
        return self.log.read_text()

    def workers(self) -> dict[int, int]:
        """Worker index -> pid of its latest process, from the supervisor's log."""
        return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started, pid (\d+)", self.text())}

    def all_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"worker \d+ started, pid (\d+)", self.text())}

    def metrics_port(self) -> int:
        return int(re.search(r"^metrics: listening on 127\.0\.0\.1:(\d+)$", self.text(), re.M)[1])


@contextmanager
def node(spec, path: Path, *args: str, env: dict | None = None):
    """``python -m router serve --config FILE`` for ``spec``; after its banner. Every
    process it started is killed if the test did not stop it. ``env`` is added to
    the environment."""
    spec.config()  # validate before the process sees it
    path.write_text(spec.toml())
    log = path.with_suffix(".log")
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "router", "serve", "--config", str(path), *args],
                                   cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    running = Node(process, log)
    try:
        eventually(lambda: "serving domains:" in running.text() or process.poll() is not None, "the banner")
        assert process.poll() is None, f"the node exited with {process.returncode}: {running.text()}"
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pid in running.all_pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def scrape(port: int) -> str:
    async def get() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await reader.read()
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        return body.decode()

    return arun(get(), timeout=10)


def samples(text: str, family: str, **match: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``family`` whose labels include ``match``, with all their labels."""
    found = []
    for labels, value in re.findall(rf"^{family}(?:{{(.*)}})? (\S+)$", text, re.M):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if all(named.get(key) == wanted for key, wanted in match.items()):
            found.append((named, float(value)))
    return found


def per_worker(text: str, family: str, **match: str) -> dict[str, float]:
    """The samples of ``family`` whose labels include ``match``, summed by worker."""
    totals: dict[str, float] = {}
    for labels, value in samples(text, family, **match):
        totals[labels["worker"]] = totals.get(labels["worker"], 0) + value
    return totals
