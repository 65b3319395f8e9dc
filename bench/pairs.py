"""Before and after, back to back: one ``bench.compare`` command (or, with ``--load``,
one ``bench.load`` command) run alternately on an earlier revision (a git worktree)
and on this checkout, and the medians.

This machine's speed drifts by 1.5x within minutes, so one run of each build
says little about a change; alternating several pairs and reading medians does
(docs/benchmarks.md). The worktree reuses this checkout's compiled extensions
when the revision's Cython sources are the same, else builds its own. Each
side runs its own load generator unless ``--same-generator``: then this
checkout's generator measures both relays (``BENCH_RELAY_ROOT``).

    python -m bench.pairs --before 94dae51 --rounds 3 -- --targets relay,relay-hop --streams 10,100 \\
        --rate-points '' --idle-streams 0 --no-floor --profile none --hop-rate 0
    python -m bench.pairs --before 4bf66dd --same-generator --load -- --start relay --streams 1000 \\
        --rate 40000 --duration 8 --sizes 200:0.9,2000:0.1 --target-cpu 0 --generator-cpu 1

Prints, per target and stream count, delivered stanzas/s, latency (p50, p99)
and the target's CPU µs per delivered stanza (generator and echo component
excluded), and where the command measures them, one cluster hop against a
local delivery and the relay against the raw-relay floor per core: every
run's value, the medians, and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.compare import MEMBERS, cpu_us_per_stanza, delivered, floor_share, hop_share, paired

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_DIRS = ("router", "bench/loadlib")  # where setup.py builds the Cython extensions in place
COMPILED = [f"{d}/*.{ext}" for d in EXTENSION_DIRS for ext in ("pyx", "pxd", "h")] + ["setup.py"]
NOT_THE_TARGET = ("generator", "echo")


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def worktree(revision: str, where: Path) -> Path:
    """A detached worktree of ``revision`` with its extensions built."""
    git("worktree", "add", "--detach", str(where), revision)
    if subprocess.run(["git", "diff", "--quiet", revision, "HEAD", "--", *COMPILED], cwd=ROOT).returncode == 0:
        for directory in EXTENSION_DIRS:
            for built in (ROOT / directory).glob("*.so"):
                shutil.copy2(built, where / directory)
    else:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=where, check=True,
                       stdout=subprocess.DEVNULL)
    return where


def run(directory: Path, relay: Path, args: list[str], workdir: Path, load_only: bool) -> dict:
    """One ``bench.compare`` (or ``bench.load``) of the checkout ``directory`` against the
    relay of ``relay``: its results, by target."""
    log = workdir.with_suffix(".log")
    output = workdir / "load.json"
    tool = ["bench.load", *args, "--workdir", str(workdir), "--output", str(output)] if load_only else \
        ["bench.compare", *args, "--no-doc", "--workdir", str(workdir)]
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", *tool], cwd=directory, stdout=out, stderr=subprocess.STDOUT,
                              env=dict(os.environ, BENCH_RELAY_ROOT=str(relay)))
    if done.returncode:  # bench.load also fails a run that lost, duplicated or misrouted a stanza
        raise SystemExit(f"{tool[0]} in {directory} failed ({done.returncode}); see {log}")
    if load_only:
        report = json.loads(output.read_text())
        return {report["target"]: report}
    found = [line.split(": ", 1)[1] for line in log.read_text().splitlines() if line.startswith("results: ")]
    if not found:
        raise SystemExit(f"bench.compare in {directory} wrote no results; see {log}")
    return json.loads(Path(found[-1]).read_text())["results"]


def figures(results: dict) -> dict[str, float]:
    """The comparable numbers of one run, by name."""
    out: dict[str, float] = {}
    for kind, result in results.items():
        for point in result.get("points", []):
            streams = point["config"]["streams"]
            out[f"{kind} {streams}: delivered/s"] = delivered(point)
            labels = [k for k in (point.get("cpu_percent") or {}) if k not in NOT_THE_TARGET]
            us = cpu_us_per_stanza(point, labels)
            if us is not None:
                out[f"{kind} {streams}: target µs/stanza"] = us
            for percentile in ("p50", "p99"):
                if (point.get("latency_ms") or {}).get(percentile) is not None:
                    out[f"{kind} {streams}: latency {percentile} ms"] = point["latency_ms"][percentile]
    for local, across in paired(results, "relay", "relay-hop"):
        share, members = hop_share(local, across)[2], hop_share(local, across, MEMBERS)[2]
        if share is not None:
            out[f"one hop {local['config']['streams']}: % of a local delivery"] = 100 * share
        if members is not None:
            out[f"one hop {local['config']['streams']}: % of a local delivery, relay processes alone"] = 100 * members
    for relay, floor in paired(results, "relay", "floor"):
        share = floor_share(relay, floor)[2]
        if share is not None:
            out[f"relay / floor {relay['config']['streams']}: per core, %"] = 100 * share
    return out


def table(before: list[dict[str, float]], after: list[dict[str, float]]) -> str:
    rows = ["| figure | before, each run | after, each run | before, median | after, median | after / before |",
            "|---|---|---|---:|---:|---:|"]
    for name in sorted({n for run_ in before + after for n in run_}):
        b = [r[name] for r in before if name in r]
        a = [r[name] for r in after if name in r]
        if not a or not b:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        rows.append(f"| {name} | {', '.join(f'{v:,.1f}' for v in b)} | {', '.join(f'{v:,.1f}' for v in a)} | "
                    f"{mb:,.1f} | {ma:,.1f} | {ma / mb if mb else float('nan'):.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier git revision")
    p.add_argument("--rounds", type=int, default=3, help="pairs, each before then after")
    p.add_argument("--same-generator", action="store_true",
                   help="measure the earlier relay with this checkout's load generator (its config must suit it)")
    p.add_argument("--workdir", type=Path, help="worktree, logs and target workdirs (default: a new temporary one)")
    p.add_argument("--load", action="store_true",
                   help="run bench.load instead of bench.compare: one target, e.g. at a fixed offered rate")
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="-- then the bench.compare (or bench.load) options")
    opts = p.parse_args(argv)
    tool_args = opts.tool_args[1:] if opts.tool_args[:1] == ["--"] else opts.tool_args
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="bench-pairs-"))
    earlier = worktree(opts.before, workdir / "before")
    try:
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for round_ in range(1, opts.rounds + 1):
            for side, relay in (("before", earlier), ("after", ROOT)):
                print(f"== round {round_}: {side}", file=sys.stderr)
                bench = ROOT if opts.same_generator else relay
                runs[side].append(figures(run(bench, relay, tool_args, workdir / f"{side}-{round_}", opts.load)))
        print(f"before: {opts.before}; after: {git('rev-parse', '--short', 'HEAD').strip()} (this checkout"
              f"{', with changes' if git('status', '--porcelain', '--untracked-files=no') else ''}); "
              f"{opts.rounds} pairs of: python -m bench.{'load' if opts.load else 'compare'} {shlex.join(tool_args)}\n")
        print(table(runs["before"], runs["after"]))
    finally:
        git("worktree", "remove", "--force", str(earlier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
