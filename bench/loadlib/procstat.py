"""CPU and memory of a process from /proc (Linux), and kernel TCP memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    cpu_s: float  # user + system CPU seconds so far (threads included)
    rss_bytes: int


def sample(pid: int) -> Sample | None:
    """None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return Sample((utime + stime) / CLOCK_TICKS, int(statm[1]) * PAGE)


def tcp_kernel_bytes() -> int:
    """System-wide TCP socket buffer memory (/proc/net/sockstat `TCP: ... mem` pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * PAGE
    return 0


def cpu_percent(before: Sample | None, after: Sample | None, wall_s: float) -> float | None:
    """Share of one core used between two samples, in percent."""
    if before is None or after is None or wall_s <= 0:
        return None
    return round(100 * (after.cpu_s - before.cpu_s) / wall_s, 1)


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (thousands of streams need it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
