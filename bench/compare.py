"""Side by side: the same S2S load against the relay, Prosody and ejabberd.

One run, one machine: each target serves `bench.test` through the same echo
component (XEP-0114, its own process), is pinned to CPU 0 while the generator
and the component share CPU 1 (--echo-cpu moves the component), and gets the
same stream-count sweep in saturation (a fixed window of stanzas in flight per
stream) with the same TLS setting. The relay then gets more points: fixed rates at fractions of its own
saturation rate (for p99; the goal is at 80%), on the stream count where it
saturated and, with --rate-streams, on other counts of the sweep against that
count's own saturation; and N idle authenticated bidi streams (for memory).
Results go to results/compare-<time>.json and into the "Side by side" section
of docs/benchmarks.md, with a plot beside it.

    python -m bench.compare                      # make bench-compare
    python -m bench.compare --targets relay --streams 10,100 --duration 5 --idle-streams 1000
    python -m bench.compare --targets relay --sm-off --no-floor --idle-streams 0 --rate-points '' --no-doc
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import floor, load
from bench.loadlib import plot, procstat, targets

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks-side-by-side.png"
BEGIN, END = "<!-- side-by-side:begin -->", "<!-- side-by-side:end -->"
GOALS = {"prosody": 25.0, "ejabberd": 10.0}  # relay saturation / theirs, at least
P99_GOAL_MS = 50.0
FLOOR_GOAL = 0.8  # relay messages per core / the raw-relay floor's
IDLE_GOAL_BYTES = 4096
SM_OFF = "relay sm-off"  # the relay's sweep again with [s2s] stream_management = false
# the saturation sweeps (plotted); other results are single points
SWEPT = ("relay", "prosody", "ejabberd", "floor", "relay-hop", SM_OFF)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="relay,prosody,ejabberd")
    p.add_argument("--streams", default="10,100,1000", help="sweep of stream counts (saturation)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--window", type=int, default=8, help="stanzas in flight per stream when saturating")
    p.add_argument("--sizes", default="200:0.9,2000:0.1")
    p.add_argument("--tls", action="store_true", help="STARTTLS + SASL EXTERNAL instead of plaintext dialback")
    p.add_argument("--bus-tls", action="store_true", help="relay-hop and relay-w2: the members reach nats-server "
                                                          "over TLS")
    p.add_argument("--rate-points", default="0.5,0.8",
                   help="relay open-loop points, as fractions of its saturation (the p99 goal is at 0.8)")
    p.add_argument("--rate-streams", default="",
                   help="also run the rate points on these stream counts of the sweep, each against its own "
                        "saturation (e.g. 1000: many streams, one stanza per read)")
    p.add_argument("--idle-streams", type=int, default=10000, help="relay memory point (0 = skip)")
    p.add_argument("--hop-rate", type=float, default=5000.0,
                   help="with the relay-hop target: an open-loop point at this rate for relay and relay-hop, "
                        "for the latency a cluster hop adds (0 = skip)")
    p.add_argument("--hop-streams", type=int, default=100, help="streams of that point")
    p.add_argument("--sm-off", action="store_true",
                   help="right after the relay's sweep, the same sweep with [s2s] stream_management = false: "
                        "what XEP-0198 costs per delivered stanza")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the raw-relay floor (bench.floor) on the sweep's stream counts")
    p.add_argument("--profile", choices=("py-spy", "none"), default="py-spy",
                   help="py-spy the relay during each measurement window (its figures then carry the sampler's cost)")
    p.add_argument("--target-cpu", default="0")
    p.add_argument("--generator-cpu", default="1")
    p.add_argument("--echo-cpu", help="the echo component's CPU (default: the generator's); the floor's echo "
                                      "stays beside its generator")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--merge", type=Path, metavar="RESULTS_JSON",
                   help="start from an earlier run's results and add (or replace) this run's points, e.g. "
                        "the idle point measured later on its own: --targets '' --rate-points '' --merge FILE")
    return p


def load_args(opts, **over) -> argparse.Namespace:
    """The bench.load options every target gets (one place, so all targets see the same load)."""
    argv = ["--saturate", "--window", str(opts.window), "--sizes", opts.sizes, "--duration", str(opts.duration),
            "--streams", opts.streams, "--quiet", "--target-cpu", opts.target_cpu,
            "--generator-cpu", opts.generator_cpu, "--ramp-up", "1", "--listen-port", "15269"]
    if opts.echo_cpu is not None:
        argv += ["--echo-cpu", opts.echo_cpu]
    if opts.tls:
        argv += ["--tls", "--mechanism", "external"]
    args = load.parser().parse_args(argv)
    for key, value in over.items():
        setattr(args, key, value)
    return args


def run_target(kind: str, opts, workdir: Path, bundle: targets.Pki, **over) -> dict:
    args = load_args(opts, **over)
    counts = load.stream_counts(args.streams)
    pki_files = (str(bundle.ca_file), str(bundle.load_cert), str(bundle.load_key))
    profile = over.pop("profile", None)
    target = targets.make_target(kind, workdir / over.get("tag", kind), bundle, opts.tls, opts.target_cpu, profile,
                                 args.relay_option, opts.bus_tls)
    try:
        return load.run_on(target, args, counts, pki_files, workdir)
    except Exception as exc:  # one target failing must not lose the others' figures
        traceback.print_exc()
        return {"target": kind, "points": [], "error": f"{exc!r}"[:2000]}


def profiled(kind: str, opts) -> dict:
    return {"profile": opts.profile} if kind == "relay" and opts.profile != "none" else {}


def delivered(point: dict) -> float:
    return (point.get("throughput") or {}).get("delivered_per_s") or 0


def saturation(result: dict) -> tuple[float, dict | None]:
    best, where = 0.0, None
    for p in result.get("points", []):
        if delivered(p) > best:
            best, where = delivered(p), p
    return best, where


def rate_label(fraction: float, streams: int, best_streams: int) -> str:
    """relay@80% on the saturation's own stream count, relay@80%/1000 on another one."""
    return f"relay@{fraction:.0%}" + ("" if streams == best_streams else f"/{streams}")


def main(argv=None) -> int:
    opts = parser().parse_args(argv)
    os.sched_setaffinity(0, {int(opts.generator_cpu)})
    procstat.raise_fd_limit()  # before the targets start: they inherit it (10,000 streams need it)
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="bench-compare-"))
    bundle = targets.Pki(workdir / "certs")
    report = {"command": "python -m bench.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": load.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "options": {k: str(v) for k, v in vars(opts).items()}, "workdir": str(workdir), "results": {}}
    if opts.merge:
        earlier = json.loads(opts.merge.read_text())
        report = earlier | {"command": f"{earlier['command']}, then {report['command']}",
                            "started": f"{earlier['started']} (then {report['started']})",
                            "results": earlier["results"]}
    kinds = [k for k in opts.targets.split(",") if k]
    for kind in kinds:
        print(f"== {kind}: saturation sweep {opts.streams}", file=sys.stderr)
        report["results"][kind] = run_target(kind, opts, workdir, bundle, **profiled(kind, opts))
        if kind == "relay" and opts.sm_off:  # back to back, so both sweeps see the same machine
            print(f"== {SM_OFF}: saturation sweep {opts.streams} without XEP-0198", file=sys.stderr)
            report["results"][SM_OFF] = run_target("relay", opts, workdir, bundle, tag="relay-sm-off",
                                                   relay_option=["s2s.stream_management=false"],
                                                   **profiled("relay", opts))
    if opts.floor and "relay" in kinds:
        print(f"== floor: raw byte relay, saturation sweep {opts.streams}", file=sys.stderr)
        report["results"]["floor"] = floor.run(load.stream_counts(opts.streams), window=opts.window,
                                               sizes=opts.sizes, duration=opts.duration,
                                               target_cpu=opts.target_cpu, generator_cpu=opts.generator_cpu)
    if "relay-hop" in kinds and "relay" in kinds and opts.hop_rate:
        for kind in ("relay", "relay-hop"):
            label = f"{kind}@{opts.hop_rate:g}/s"
            print(f"== {label} on {opts.hop_streams} streams (open loop)", file=sys.stderr)
            report["results"][label] = run_target(kind, opts, workdir, bundle, tag=label.replace("@", "-").replace("/", "-"),
                                                  saturate=False, rate=opts.hop_rate, streams=str(opts.hop_streams))
    relay = report["results"].get("relay")
    _, best = saturation(relay) if relay else (0.0, None)
    if best:
        swept = {p["config"]["streams"]: delivered(p) for p in relay["points"]}
        best_streams = best["config"]["streams"]
        more = load.stream_counts(opts.rate_streams) if opts.rate_streams else []
        counts = [best_streams] + [n for n in more if n in swept and n != best_streams]
        for streams in counts:
            for fraction in (float(f) for f in opts.rate_points.split(",") if f):
                label = rate_label(fraction, streams, best_streams)
                print(f"== {label} of {swept[streams]:.0f}/s on {streams} streams (open loop)", file=sys.stderr)
                report["results"][label] = run_target(
                    "relay", opts, workdir, bundle, tag=label.replace("@", "-").replace("%", "").replace("/", "-"),
                    saturate=False, rate=round(fraction * swept[streams]), streams=str(streams),
                    **profiled("relay", opts))
    if opts.idle_streams:
        print(f"== relay: {opts.idle_streams} idle streams", file=sys.stderr)
        report["results"]["relay idle"] = run_target(
            "relay", opts, workdir, bundle, tag="relay-idle", saturate=False, rate=0.0,
            streams=str(opts.idle_streams), duration=2.0, ramp_up=20.0, connect_concurrency=200,
            handshake_timeout=120.0)
    out = ROOT / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    series = {k: r["points"] for k, r in report["results"].items() if k in SWEPT}
    plot.plot_sweep(series, out.with_suffix(".png") if opts.no_doc else PLOT,
                    f"saturation, {'TLS + SASL EXTERNAL' if opts.tls else 'plaintext dialback'}")
    section = render(report)
    print(section)
    if not opts.no_doc:
        write_section(section)
    print(f"results: {out}", file=sys.stderr)
    return 0


def _fmt(value, unit="") -> str:
    return "n/a" if value is None else f"{value:,.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def render(report: dict) -> str:
    m = report["machine"]
    opts = report["options"]
    echo_cpu = opts.get("echo_cpu", "None")  # options are kept as strings
    echo_cpu = opts["generator_cpu"] if echo_cpu == "None" else echo_cpu
    lines = [BEGIN, "## Side by side", "",
             f"Run {report['started']} on {m['cpu']} ({m['cores']} cores, Linux {m['kernel']}, Python {m['python']}).",
             f"Command: `{report['command']}` (defaults: streams {opts['streams']}, window {opts['window']}, "
             f"sizes {opts['sizes']}, {opts['duration']} s per point, TLS {opts['tls']}).",
             f"Target pinned to CPU {opts['target_cpu']}; the generator to CPU {opts['generator_cpu']}, the echo "
             f"component to CPU {echo_cpu}. "
             "Saturation = the highest delivered (echoed) stanzas/s over the sweep; every stanza crosses "
             "the target twice (S2S in -> component -> S2S out).", "",
             "Other jobs share this machine: \"others %\" is the CPU time of both cores during the window "
             "not used by the target, the generator or the echo component, i.e. by other jobs and, on "
             "profiled relay rows, the py-spy sampler (~0 = a quiet machine; 100 = a whole core taken "
             "away).", "",
             "| target | streams | offered/s | delivered/s | latency p50 / p99 / p99.9 ms | handshakes/s | "
             "target CPU % | target RSS MiB | generator CPU % | echo CPU % | others % | "
             "lost / dup / misrouted / errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, result in report["results"].items():
        if result.get("error"):
            lines.append(f"| {kind} | - | failed: {result['error'][:200].replace('|', '/')} |||||||||| |")
        for p in result.get("points", []):
            t, lat, h, d = p.get("throughput", {}), p.get("latency_ms", {}), p.get("handshakes", {}), p["delivery"]
            cpu = p.get("cpu_percent", {})
            label = result["target"]
            rss = (p.get("rss_mib_end") or {}).get(label)
            offered = t.get("offered_per_s")
            lines.append(
                f"| {kind} | {p['config']['streams']} | {'closed loop' if offered == 'saturate' else _fmt(offered)} | "
                f"{_fmt(t.get('delivered_per_s'))} | "
                f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p99'))} / {_fmt(lat.get('p99.9'))} | {_fmt(h.get('per_s'))} | "
                f"{_fmt(cpu.get(label))} | {_fmt(rss)} | {_fmt(cpu.get('generator'))} | {_fmt(cpu.get('echo'))} | "
                f"{_fmt((p.get('machine_busy_percent') or {}).get('others'))} | "
                f"{d['lost']} / {d['duplicated']} / {d['misrouted']} / {d['error_stanzas']} |")
    lines += ["", "Targets:", ""]
    relay_sat, relay_best = saturation(report["results"].get("relay", {}))
    for kind, goal in GOALS.items():
        if kind in report["results"]:
            theirs, their_best = saturation(report["results"][kind])
            ratio = relay_sat / theirs if theirs else None
            ours_core = per_core(relay_best, "relay") if relay_best else None
            theirs_core = per_core(their_best, kind) if their_best else None
            core_ratio = ours_core / theirs_core if ours_core and theirs_core else None
            verdict = "met" if ratio and ratio >= goal else "MISSED"
            lines.append(f"* saturation relay / {kind}: {_fmt(ratio)}x (goal >= {goal:g}x): {verdict}; per core "
                         f"of each target (delivered/s / its CPU): {_fmt(core_ratio)}x")
    lines += floor_lines(report["results"])
    lines += hop_lines(report["results"])
    lines += sm_lines(report["results"])
    for kind, result in report["results"].items():
        if not kind.startswith("relay@") or not result.get("points"):
            continue
        p = result["points"][0]
        p99 = p.get("latency_ms", {}).get("p99")
        gaps = (p.get("sender") or {}).get("tick_gap_ms", {})
        goal = f" (goal < {P99_GOAL_MS:g} ms): {'met' if p99 is not None and p99 < P99_GOAL_MS else 'MISSED'}" \
            if kind.startswith("relay@80%") else ""
        lines.append(f"* {kind} of its saturation on {p['config']['streams']} streams, open loop "
                     f"({p['config']['rate']:.0f}/s offered, one write "
                     f"per stanza): p99 {_fmt(p99)} ms{goal}; the generator's 2 ms send tick came every "
                     f"{_fmt(gaps.get('p50'))} ms (p50), {_fmt(gaps.get('p99'))} ms (p99)")
    idle = report["results"].get("relay idle", {}).get("points", [])
    if idle:
        p = idle[0]
        mem, h = p.get("memory", {}), p.get("handshakes", {})
        relay_mem = mem.get("relay", {})
        per = relay_mem.get("bytes_per_stream")
        verdict = "met" if per is not None and per <= IDLE_GOAL_BYTES and h.get("failed") == 0 else "MISSED"
        lines.append(f"* idle authenticated streams held by one relay process: {h.get('established')}/"
                     f"{p['config']['streams']} (bidi {h.get('bidi')}); RSS {relay_mem.get('rss_empty_mib')} -> "
                     f"{relay_mem.get('rss_held_mib')} MiB = {per} bytes/stream beyond the empty process "
                     f"(goal <= {IDLE_GOAL_BYTES}): {verdict}; kernel TCP memory (both ends, system-wide) "
                     f"{mem.get('kernel_tcp', {}).get('bytes_per_stream_both_ends')} bytes/stream of socket buffers "
                     f"and {mem.get('kernel_tcp', {}).get('slab_bytes_per_stream_both_ends')} bytes/stream of TCP "
                     f"socket structures (slab)")
    for kind in [k for k in report["results"] if k == "relay" or k.startswith("relay@80%")]:
        points = [p for p in report["results"].get(kind, {}).get("points", []) if p.get("profile")]
        if points:
            p = max(points, key=lambda q: (q.get("throughput") or {}).get("delivered_per_s") or 0)
            prof = p["profile"]
            top = ", ".join(f"{name} {share}%" for name, share in prof.get("self_percent", [])[:6])
            lines.append(f"* py-spy, {kind} at {p['config']['streams']} streams, measurement window only "
                         f"(`{prof['file']}`): self time {top or prof.get('error')}")
    lines += ["", f"![throughput and latency against streams]({PLOT.name})", "", END]
    return "\n".join(lines)


def per_core(point: dict, label: str) -> float | None:
    """Delivered messages/s per core of the target: what it would deliver with a whole
    core to itself (the generator, not the target, may be what stops the sweep)."""
    cpu = (point.get("cpu_percent") or {}).get(label)
    return delivered(point) * 100 / cpu if cpu else None


def paired(results: dict, kind: str, other: str) -> list[tuple[dict, dict]]:
    """(point of ``kind``, point of ``other``) for each stream count both swept."""
    others = {p["config"]["streams"]: p for p in results.get(other, {}).get("points", [])}
    return [(p, others[p["config"]["streams"]]) for p in results.get(kind, {}).get("points", [])
            if p["config"]["streams"] in others]


def floor_share(relay: dict, floor_point: dict) -> tuple[float | None, float | None, float | None]:
    """(relay per core, floor per core, the relay's share of the floor)."""
    ours, theirs = per_core(relay, "relay"), per_core(floor_point, "floor")
    return ours, theirs, (ours / theirs if ours and theirs else None)


MEMBERS = ["relay-hop", "relay-hop:n2"]  # the relay processes of the hop target, without nats-server


def hop_share(local: dict, across: dict, processes: list[str] = MEMBERS + ["nats"]
              ) -> tuple[float | None, float | None, float | None]:
    """(µs per stanza local, µs per stanza across in ``processes`` (n1 + n2 + nats-server unless
    told), one hop's share of a local delivery)."""
    ours, hop = cpu_us_per_stanza(local, ["relay"]), cpu_us_per_stanza(across, processes)
    return ours, hop, ((hop - ours) / 2 / ours if ours and hop else None)  # each stanza hops twice: there and back


def floor_lines(results: dict) -> list[str]:
    """The relay as a share of the raw-relay floor, per stream count of both sweeps."""
    lines = []
    for p, other in paired(results, "relay", "floor"):
        if not delivered(other):
            continue
        ours, theirs, share = floor_share(p, other)
        verdict = "met" if share is not None and share >= FLOOR_GOAL else "MISSED"
        lines.append(f"* relay / raw-relay floor at {p['config']['streams']} streams: delivered/s "
                     f"{delivered(p) / delivered(other):.0%}; per core of the target (delivered/s / its CPU) "
                     f"{_fmt(ours)} / {_fmt(theirs)} = {_fmt(share and 100 * share)}% "
                     f"(goal >= {FLOOR_GOAL:.0%}): {verdict}")
    return lines


def cpu_us_per_stanza(point: dict, labels: list[str]) -> float | None:
    """CPU microseconds of the processes ``labels`` per delivered stanza."""
    cpu = point.get("cpu_percent") or {}
    busy = [cpu.get(label) for label in labels]
    return 1e4 * sum(busy) / delivered(point) if delivered(point) and None not in busy else None


def hop_lines(results: dict) -> list[str]:
    """The cluster hop (relay-hop: two nodes on NATS) against the local path, per stream count."""
    lines = []
    for p, base in paired(results, "relay-hop", "relay"):
        ours, hop, extra = hop_share(base, p)
        members = hop_share(base, p, MEMBERS)[2]
        verdict = "met" if extra is not None and extra <= 0.5 else "MISSED"
        alone = "met" if members is not None and members <= 0.5 else "MISSED"
        lines.append(
            f"* cluster hop at {p['config']['streams']} streams, saturated (every stanza crosses the bus there "
            f"and back): relay CPU per delivered stanza {_fmt(ours)} µs local, {_fmt(hop)} µs across two nodes "
            f"(n1 + n2 + nats-server) = {_fmt(extra and 100 * extra)}% of a local delivery per hop (goal <= 50%): "
            f"{verdict}; the two relay processes alone {_fmt(members and 100 * members)}%: {alone}; "
            f"delivered/s {delivered(base):,.0f} local, {delivered(p):,.0f} across")
    rated = [k for k in results if k.startswith("relay@") and k.endswith("/s") and "-hop" not in k]
    for label in rated:
        hop_label = label.replace("relay@", "relay-hop@")
        base, hop = results[label].get("points", []), results.get(hop_label, {}).get("points", [])
        if base and hop:
            b, h = base[0].get("latency_ms", {}), hop[0].get("latency_ms", {})
            added = h.get("p50") - b.get("p50") if h.get("p50") is not None and b.get("p50") is not None else None
            verdict = "met" if added is not None and added / 2 < 1.0 else "MISSED"
            lines.append(f"* latency at {label[6:]} on {base[0]['config']['streams']} streams (open loop): p50 "
                         f"{_fmt(b.get('p50'))} -> {_fmt(h.get('p50'))} ms, p99 {_fmt(b.get('p99'))} -> "
                         f"{_fmt(h.get('p99'))} ms; added per hop at p50 {_fmt(added and added / 2)} ms "
                         f"(goal < 1 ms): {verdict}")
    return lines


def sm_lines(results: dict) -> list[str]:
    """What XEP-0198 acks cost the relay: its CPU per delivered stanza with them and without, per stream count."""
    without = {p["config"]["streams"]: p for p in results.get(SM_OFF, {}).get("points", [])}
    lines = []
    for p in results.get("relay", {}).get("points", []):
        off = without.get(p["config"]["streams"])
        if off is None:
            continue
        on_us, off_us = cpu_us_per_stanza(p, ["relay"]), cpu_us_per_stanza(off, ["relay"])
        change = f"{100 * (on_us / off_us - 1):+.1f}%" if on_us and off_us else "n/a"
        acks = p.get("stream_management") or {}
        lines.append(
            f"* XEP-0198 at {p['config']['streams']} streams, saturated: relay CPU per delivered stanza "
            f"{_fmt(on_us)} µs with acks, {_fmt(off_us)} µs without ({change}); delivered/s {delivered(p):,.0f} with, "
            f"{delivered(off):,.0f} without; acks enabled on {acks.get('enabled')} streams, "
            f"h errors {acks.get('h_errors')}, unacknowledged at the end {acks.get('unacknowledged_at_end')}")
    return lines


def write_section(section: str) -> None:
    """Replace our section between its markers, or append it; other sections stay as they are."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
