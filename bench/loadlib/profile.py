"""py-spy on the target for one measurement window, and the summary of its profile
(`py-spy record --format raw`: one collapsed stack per line)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(text: str) -> str:
    """'route (router/server.py:287)' -> 'route (router/server.py)': lines of one function add up."""
    return _LINE.sub(")", text.strip())


def summarize(path: Path, top: int = 15) -> dict:
    """Share of samples per function: where the time is spent (self) and under which calls (inclusive)."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            under[frame] += n
    share = lambda c: [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)] if total else []
    return {"samples": total, "self_percent": share(own), "inclusive_percent": share(under)}


async def start_py_spy(cfg):
    """py-spy attached to the target (a LoadConfig's ``profile_pid``) for exactly the measurement
    window (not the handshakes); None when the point is not profiled."""
    if cfg.profile_pid is None or cfg.profile_prefix is None:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = f"{cfg.profile_prefix}-{cfg.streams}.txt"
    return out, await asyncio.create_subprocess_exec(
        py_spy, "record", "--nonblocking", "--rate", "200", "--format", "raw", "--duration", str(max(1, round(cfg.duration))),
        "--pid", str(cfg.profile_pid), "--output", out, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def finish_py_spy(profiler, duration: float) -> dict:
    out, proc = profiler
    try:
        _, err = await asyncio.wait_for(proc.communicate(), duration + 30)
    except asyncio.TimeoutError:
        proc.kill()
        return {"file": out, "error": "py-spy did not finish"}
    if proc.returncode != 0 or not Path(out).exists():
        return {"file": out, "error": err.decode(errors="replace")[-500:]}
    return {"file": out} | summarize(Path(out))
