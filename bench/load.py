"""Synthetic S2S load generator: many simulated remote servers against one target (or several).

Each simulated server (`g0001.load.test`, ...) opens an S2S stream to the
target, authenticates with dialback (the generator answers the target's
`db:verify` on its own listener, which the target must route `*.load.test`
to) or SASL EXTERNAL (certificates from the generator's test CA, which the
target must trust), asks for bidi where offered, then sends messages to
`echo@<target domain>` at a fixed rate (or saturating, with a window of
stanzas in flight per stream). The echoes carry `<stream>.<seq>.<sent µs>` in
their id: that gives end-to-end latency and exposes lost, duplicated and
misrouted stanzas.

    python -m bench.load --target-port 5269 --target-domain bench.test --streams 50 --rate 2000
    python -m bench.load --start relay --streams 10,100,1000 --saturate --output results/relay.json

XEP-0198 acks are on wherever the target offers them (`--no-sm`: never): every
stream counts what it receives and answers the target's `<r/>`, asks for acks
itself every `--sm-ack-every` stanzas and once more after the drain, and the
summary says whether every `<a h/>` was possible and everything acknowledged.
`--relay-option s2s.stream_management=false` runs the relay without it, so
its CPU per delivered stanza can be set against a run with it:

    python -m bench.load --start relay --streams 100 --rate 20000 --relay-option s2s.stream_management=false

A cluster started elsewhere: `--target HOST:PORT` (repeated) spreads the
streams over its nodes round-robin, and `--echo HOST:PORT` starts the echo
component against one node's component port. Peers may die mid-run: every
stanza sent is then accounted for as echoed, bounced back to the generator
(an error with its id), its echo bounced to the echo component, or not taken
(sent on a stream that died after the last XEP-0198 h its peer gave); any
other is lost (`delivery.fates` in the JSON, `dead_streams` per stream):

    python -m bench.load --target 127.0.0.1:5269 --target 127.0.0.1:5270 --echo 127.0.0.1:5347 \
        --echo-secret S --streams 12 --rate 3000 --sm-ack-every 1 --output run.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.loadlib import procstat, runner
from bench.loadlib.plot import plot_sweep


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    t = p.add_argument_group("target")
    t.add_argument("--start", choices=("relay", "relay-hop", "relay-w2", "prosody", "ejabberd"),
                   help="start this target (with the echo component) instead of using a running one")
    t.add_argument("--target-host", default="127.0.0.1")
    t.add_argument("--target-port", type=int, default=5269)
    t.add_argument("--target", action="append", default=[], type=host_port, metavar="HOST:PORT",
                   help="a target's S2S address instead of --target-host/--target-port; repeat it to spread "
                        "the streams over several (round-robin), e.g. the nodes of a cluster")
    t.add_argument("--echo", type=host_port, metavar="HOST:PORT",
                   help="without --start: run the echo component against this component port of the target "
                        "(for --target-domain), and count the bounces it receives")
    t.add_argument("--echo-secret", default="", help="the component secret for --echo")
    t.add_argument("--target-domain", default="bench.test")
    t.add_argument("--target-pid", type=int, help="sample this process's CPU and RSS from /proc")
    t.add_argument("--watch-pid", action="append", default=[], metavar="LABEL=PID", help="sample another process too")
    t.add_argument("--target-cpu", help="with --start: pin the target to this CPU (taskset)")
    t.add_argument("--generator-cpu", help="pin the generator (and the echo component) to this CPU")
    t.add_argument("--echo-cpu", help="pin the echo component to this CPU instead (e.g. the target's: the "
                                      "generator then has its CPU to itself)")
    t.add_argument("--profile", choices=("py-spy", "cprofile"),
                   help="with --start: py-spy the target during each measurement window (any target), "
                        "or run the relay under cProfile (whole run)")
    t.add_argument("--workdir", type=Path, help="with --start: where configs, logs and certificates go; "
                                                "with --echo: where the echo component's stats file goes")
    t.add_argument("--bus-tls", action="store_true",
                   help="with --start relay-hop or relay-w2: the members reach nats-server over TLS")
    t.add_argument("--relay-option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="with --start relay*: a config setting of the relay (TOML value; repeatable), "
                        "e.g. s2s.stream_management=false")
    g = p.add_argument_group("load")
    g.add_argument("--streams", default="50", help="stream count, or a comma list for a sweep (e.g. 10,100,1000)")
    g.add_argument("--rate", type=float, default=1000.0, help="stanzas/s over all streams; 0 = idle streams")
    g.add_argument("--saturate", action="store_true", help="closed loop: keep --window stanzas in flight per stream")
    g.add_argument("--window", type=int, default=16)
    g.add_argument("--sizes", default="200:1", help="stanza size mix, bytes:weight,... (e.g. 200:0.8,2000:0.2)")
    g.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    g.add_argument("--warmup", type=float, default=1.0)
    g.add_argument("--ramp-up", type=float, default=0.0, help="spread the stream openings over this many seconds")
    g.add_argument("--connect-concurrency", type=int, default=200, help="handshakes in progress at once")
    g.add_argument("--handshake-timeout", type=float, default=60.0, help="per stream, seconds")
    g.add_argument("--drain", type=float, default=5.0, help="after the window, wait for echoes until none came for this many seconds (60 s at most)")
    g.add_argument("--sink", action="store_true", help="the target sinks the stanzas: measure sending only")
    a = p.add_argument_group("authentication")
    a.add_argument("--tls", action="store_true", help="STARTTLS on every stream")
    a.add_argument("--mechanism", choices=("dialback", "external"), default="dialback")
    a.add_argument("--no-bidi", action="store_true", help="do not ask for XEP-0288 bidi")
    a.add_argument("--sm", action=argparse.BooleanOptionalAction, default=True,
                   help="XEP-0198 acks where the target offers them, offered to the target's streams to us")
    a.add_argument("--sm-ack-every", type=int, default=1000, help="ask for an XEP-0198 ack after this many stanzas")
    a.add_argument("--listen-host", default="127.0.0.1", help="the simulated servers' own S2S listener")
    a.add_argument("--listen-port", type=int, default=15269)
    a.add_argument("--secret", default="load-generator-dialback-secret")
    a.add_argument("--pki-dir", type=Path, help="CA + *.load.test certificate (created if missing)")
    a.add_argument("--target-ca", help="CA file of the target's certificate (default: the generator's CA)")
    o = p.add_argument_group("output")
    o.add_argument("--output", type=Path, help="JSON result file (a PNG plot beside it for a sweep)")
    o.add_argument("--quiet", action="store_true", help="no live status line")
    return p


def host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:5269' (or '[::1]:5269') -> ('127.0.0.1', 5269)."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"HOST:PORT expected, got {text!r}")
    return host.strip("[]"), int(port)


def generator_pki(directory: Path) -> tuple[str, str, str]:
    """(ca_file, cert, key) in `directory`, created on first use."""
    from router.trust import pki

    from bench.loadlib import wire

    ca_file, cert, key = directory / "ca.pem", directory / "load.crt", directory / "load.key"
    if not (ca_file.exists() and cert.exists() and key.exists()):
        ca = pki.make_ca("Load Generator CA")
        directory.mkdir(parents=True, exist_ok=True)
        ca_file.write_bytes(ca.cert_pem())
        ca.write(directory, "ca")
        pki.make_leaf(ca, wire.LOAD_SUFFIX, dns_ids=[f"*.{wire.LOAD_SUFFIX}", wire.LOAD_SUFFIX]).write(directory, "load")
    return str(ca_file), str(cert), str(key)


def base_config(args, **over) -> runner.LoadConfig:
    if args.sm_ack_every < 1:
        raise SystemExit(f"--sm-ack-every needs a positive count, got {args.sm_ack_every}")
    pids = {}
    if args.target_pid:
        pids["target"] = args.target_pid
    for item in args.watch_pid:
        label, _, pid = item.partition("=")
        pids[label] = int(pid)
    fields = dict(
        target_host=args.target_host, target_port=args.target_port, target_domain=args.target_domain,
        listen_host=args.listen_host, listen_port=args.listen_port, rate=args.rate, saturate=args.saturate,
        window=args.window, sizes=args.sizes, duration=args.duration, warmup=args.warmup, ramp_up=args.ramp_up,
        connect_concurrency=args.connect_concurrency, handshake_timeout=args.handshake_timeout, drain=args.drain, tls=args.tls, mechanism=args.mechanism,
        bidi=not args.no_bidi, echo=not args.sink, secret=args.secret, target_pids=pids, progress=not args.quiet,
        sm=args.sm, sm_ack_every=args.sm_ack_every, targets=tuple(args.target),
    )
    fields.update(over)
    return runner.LoadConfig(**fields)


def stream_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--streams needs positive counts, got {text!r}")
    return counts


def run_on(target, args, counts: list[int], pki_files: tuple[str, str, str], workdir: Path) -> dict:
    """Start `target` (a bench.loadlib.targets.Target), run the sweep, stop it."""
    from bench.loadlib import targets

    target.start(targets.load_routes(max(counts), args.listen_host, args.listen_port))
    try:
        target.start_echo(args.sink, args.echo_cpu or args.generator_cpu, workdir / f"{target.name}-echo-stats.json")
        cfg = base_config(args, target_host=target.s2s[0], target_port=target.s2s[1], target_domain=target.domain,
                          echo_stats=str(workdir / f"{target.name}-echo-stats.json"),
                          ca_file=pki_files[0], cert_file=pki_files[1], key_file=pki_files[2],
                          target_pids={target.name: target.pid, "echo": target.echo_process.pid,
                                       **getattr(target, "extra_pids", {})})
        if args.profile == "py-spy" and target.name == "relay":  # py-spy reads CPython stacks only
            prefix = str(getattr(target, "workdir", workdir) / "relay-py-spy")
            cfg = runner.LoadConfig(**(asdict(cfg) | {"profile_pid": target.pid, "profile_prefix": prefix}))
        points = uvloop_run(runner.run_sweep(cfg, counts))
    finally:
        target.stop()
    result = {"target": target.name, "points": points}
    stats = workdir / f"{target.name}-echo-stats.json"
    if stats.exists():
        result["echo_component"] = echo_report(stats, points, args.sink)
    profile = getattr(target, "profile_path", None)
    if profile is not None:
        result["profile"] = str(profile)

    return result


def run_with_echo(cfg: runner.LoadConfig, args, counts: list[int]) -> dict:
    """The sweep with the echo component connected to ``--echo`` for its whole length."""
    from bench.loadlib import targets

    directory = args.workdir or Path(tempfile.mkdtemp(prefix="bench-load-echo-"))
    directory.mkdir(parents=True, exist_ok=True)
    stats = directory / "echo-stats.json"
    echo = targets.start_echo(args.echo, args.target_domain, args.echo_secret, stats, args.sink,
                              args.echo_cpu or args.generator_cpu)
    try:
        cfg = runner.LoadConfig(**(asdict(cfg) | {"echo_stats": str(stats),
                                                  "target_pids": cfg.target_pids | {"echo": echo.pid}}))
        points = uvloop_run(runner.run_sweep(cfg, counts))
    finally:
        targets.end(echo, 5)
    return {"points": points, "echo_component": echo_report(stats, points, args.sink) if stats.exists() else None}


def echo_report(stats: Path, points: list[dict], sink: bool) -> dict:
    """The echo component's final counts and bounced ids, and how many of the messages it took came
    back neither as an echo nor as a bounce to it: echoes that vanished (0 unless something is wrong).
    Bounces that came after a point read the file count as came back."""
    report = json.loads(stats.read_text())
    if not sink:
        deliveries = [p.get("delivery", {}) for p in points]
        late = len(report["bounced_ids"]) - sum(d.get("echo_bounces_read", 0) for d in deliveries)
        report["unreturned"] = report["messages"] - sum(d.get("echo_returned", 0) for d in deliveries) - late
    return report


def uvloop_run(coro):
    import uvloop

    return uvloop.run(coro)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    counts = stream_counts(args.streams)
    if args.generator_cpu is not None:
        os.sched_setaffinity(0, {int(args.generator_cpu)})
    procstat.raise_fd_limit()
    report = {"command": "python -m bench.load " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.start and (args.echo or args.target):
        raise SystemExit("--start runs its own target and echo component: no --target or --echo with it")
    if args.start:
        from bench.loadlib import targets

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-load-"))
        workdir.mkdir(parents=True, exist_ok=True)
        bundle = targets.Pki(workdir / "certs")
        pki_files = (str(bundle.ca_file), str(bundle.load_cert), str(bundle.load_key))
        target = targets.make_target(args.start, workdir, bundle, args.tls, args.target_cpu, args.profile,
                                     args.relay_option, args.bus_tls)
        report |= run_on(target, args, counts, pki_files, workdir)
        report["workdir"] = str(workdir)
    else:
        pki_files = (None, None, None)
        if args.tls or args.mechanism == "external":
            pki_dir = args.pki_dir or Path(tempfile.mkdtemp(prefix="bench-load-pki-"))
            pki_files = generator_pki(pki_dir)
            print(f"generator CA (the target must trust it): {pki_files[0]}", file=sys.stderr)
        cfg = base_config(args, ca_file=args.target_ca or pki_files[0], cert_file=pki_files[1], key_file=pki_files[2])
        report["target"] = ",".join(f"{host}:{port}" for host, port in cfg.addresses())
        report |= run_with_echo(cfg, args, counts) if args.echo else {"points": uvloop_run(runner.run_sweep(cfg, counts))}
    summarize(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=str))
        if len(counts) > 1:
            plot_sweep({report["target"]: report["points"]}, args.output.with_suffix(".png"),
                       f"{report['target']}: {args.streams} streams")
    vanished = (report.get("echo_component") or {}).get("unreturned", 0)
    return 0 if all(ok(p) for p in report["points"]) and not vanished else 1


def ok(point: dict) -> bool:
    """Every stanza echoed once, in order, and nothing else amiss (a bounce or a dead peer is not ok either)."""
    d = point.get("delivery", {})
    h = point.get("handshakes", {})
    fates = d.get("fates", {})
    not_echoed_once = d.get("lost", 0) + sum(fates.get(k, 0) for k in ("bounced", "echo_bounced", "not_taken", "more_than_one"))
    bad = (not_echoed_once if point["config"]["echo"] else 0) + d.get("duplicated", 0) + d.get("misrouted", 0)
    acks = point.get("stream_management", {})
    bad += acks.get("h_errors", 0) + acks.get("unacknowledged_at_end", 0) + d.get("out_of_order", 0)
    return bad == 0 and d.get("error_stanzas", 0) == 0 and h.get("failed", 1) == 0


def summarize(report: dict) -> None:
    for p in report["points"]:
        h, d = p.get("handshakes", {}), p.get("delivery", {})
        t, lat = p.get("throughput", {}), p.get("latency_ms", {})
        print(f"{report['target']} {p['label']}: established {h.get('established')}/{p['config']['streams']}"
              f" ({h.get('per_s')} handshakes/s, p50 {h.get('p50_ms')} ms)"
              f" | sent {t.get('sent_per_s')}/s delivered {t.get('delivered_per_s')}/s"
              f" | latency p50 {lat.get('p50')} p99 {lat.get('p99')} p99.9 {lat.get('p99.9')} ms"
              f" | lost {d.get('lost')} dup {d.get('duplicated')} misrouted {d.get('misrouted')}"
              f" errors {d.get('error_stanzas')} | cpu {p.get('cpu_percent')} | machine busy {p.get('machine_busy_percent')}")
        fates = d.get("fates", {})
        if any(v for k, v in fates.items() if k != "echoed") or d.get("out_of_order"):
            print(f"  fates: {fates} | out of order {d.get('out_of_order')}"
                  f" | streams that died {len(d.get('dead_streams', []))}")
        cpu = (p.get("cpu_percent") or {}).get(report["target"])
        if cpu is not None and t.get("delivered_per_s"):
            print(f"  {report['target']}: {1e4 * cpu / t['delivered_per_s']:.2f} µs CPU per delivered stanza")
        acks = p.get("stream_management")
        if acks:
            print(f"  XEP-0198: enabled on {acks['enabled']}/{acks['offered']} offering streams"
                  f" (+{acks['enabled_by_target']} by the target) | acks received {acks['acks_received']}"
                  f" of {acks['ack_requests_sent']} requests | target's requests answered"
                  f" {acks['ack_requests_answered']} | h errors {acks['h_errors']}"
                  f" | unacknowledged at the end {acks['unacknowledged_at_end']}")
            for sample in acks.get("samples", []):
                print(f"    {sample}")
        for reason, n in p.get("errors", {}).get("failures", {}).items():
            print(f"  failure x{n}: {reason}")
        for kind, samples in d.get("samples", {}).items():
            print(f"  {kind}: {samples[0]}")
        for name, mem in p.get("memory", {}).items():
            if "bytes_per_stream" in mem:
                print(f"  {name}: RSS {mem['rss_empty_mib']} -> {mem['rss_held_mib']} MiB, "
                      f"{mem['bytes_per_stream']} bytes per held stream")
            else:
                print(f"  kernel TCP (both ends): {mem['bytes_per_stream_both_ends']} bytes/stream of buffers, "
                      f"{mem.get('slab_bytes_per_stream_both_ends')} bytes/stream of socket structures")
        if p.get("sender"):
            gaps = p["sender"]["tick_gap_ms"]
            print(f"  sender: tick gap p50 {gaps['p50']} p99 {gaps['p99']} max {gaps['max']} ms,"
                  f" writes into paused transports {p['sender']['writes_while_paused']}")
    component = report.get("echo_component") or {}
    if component.get("bounced_ids") or component.get("unreturned"):
        print(f"echo component: took {component['messages']} messages; {len(component['bounced_ids'])} echoes "
              f"bounced back to it; {component.get('unreturned')} neither came back nor bounced")


if __name__ == "__main__":
    sys.exit(main())
