"""The load generator's live status line: phase, streams ready, stanzas sent and received, target RSS."""

from __future__ import annotations

import asyncio
import sys
import time

from . import procstat

STATUS_S = 0.5  # progress line period


class Progress:
    """A refreshing one-line status on stderr."""

    def __init__(self, ctx, label: str):
        self.ctx, self.label, self.phase = ctx, label, "connect"
        self.last = (time.perf_counter(), 0)
        self.task = asyncio.ensure_future(self.run()) if ctx.cfg.progress else None

    async def run(self):
        while True:
            await asyncio.sleep(STATUS_S)
            self.show()

    def show(self):
        ctx = self.ctx
        totals = sum(l.received for l in ctx.tracker.ledgers)
        sent = sum(l.sent for l in ctx.tracker.ledgers)
        now = time.perf_counter()
        rate = (totals - self.last[1]) / max(1e-6, now - self.last[0])
        self.last = (now, totals)
        target = ""
        for label, pid in ctx.cfg.target_pids.items():
            s = procstat.sample(pid)
            if s:
                target += f" | {label} rss {s.rss_bytes / 2**20:.1f}MiB"
        ready = sum(1 for s in ctx.streams if s is not None and s.ready)
        line = (f"[{self.label} {self.phase}] ready {ready}/{ctx.cfg.streams} fail {sum(ctx.failures.values())}"
                f" | sent {sent} recv {totals} | {rate:,.0f}/s{target}")
        sys.stderr.write("\r" + line[:160].ljust(160))
        sys.stderr.flush()

    def stop(self):
        if self.task:
            self.task.cancel()
            self.show()
            sys.stderr.write("\n")
