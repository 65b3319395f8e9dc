"""Summaries of a py-spy profile (`py-spy record --format raw`: one collapsed stack per line)."""

from __future__ import annotations

import re
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
