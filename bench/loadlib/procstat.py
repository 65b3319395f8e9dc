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


def cpu_busy_s() -> dict[str, float]:
    """Busy seconds so far of each CPU ("cpu0", ...), whoever ran there, and "softirq": interrupt
    time of all CPUs, where loopback TCP is processed (/proc/stat)."""
    out = {"softirq": 0.0}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
                out[name] = (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
                out["softirq"] += (irq + softirq) / CLOCK_TICKS
    return out


def busy_percent(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Per CPU: percent of the window it was busy (with anything: other jobs on a shared machine too)."""
    return {name: round(100 * (after[name] - before[name]) / wall_s, 1) for name in after if name in before}


def tcp_kernel_bytes() -> int:
    """System-wide TCP socket buffer memory (/proc/net/sockstat `TCP: ... mem` pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * PAGE
    return 0


def tcp_slab_bytes() -> int | None:
    """Kernel memory of the TCP socket structures themselves (slab caches TCP and sock_inode_cache),
    None when /proc/slabinfo is not readable."""
    try:
        with open("/proc/slabinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in ("TCP", "sock_inode_cache"):
            total += int(parts[1]) * int(parts[3])  # active objects x object size
    return total


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
