"""``python -m router ctl``: ask a running relay over its control socket and print
the answer, as text or as JSON (``--json``); ``ctl top`` refreshes a live view
of the busiest streams until Ctrl-C.

One request per connection. The socket is ``--socket``, else the ``[listen]
control`` of ``--config`` (``--worker`` picks one of a node's workers), else
the embedded default's.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from router.admin import tables
from router.admin.protocol import encode, socket_path
from router.config import DEFAULT_STATE_DIR, ConfigError, default_config_text, load_config, parse_config
from router.wire.errors import STREAM_CONDITIONS

EXIT_OK = 0
EXIT_REFUSED = 1  # the relay refused the request, or could not be reached
EXIT_USAGE = 2
TOP_ROWS = 20  # streams ctl top shows by default
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class CtlError(Exception):
    """The relay could not be asked, or refused; the text says why."""


def request(path: Path, command: str, timeout: float, **arguments: Any) -> Any:
    """Send one request and return its result; raises CtlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(encode({"command": command, **arguments}))
            with sock.makefile("rb") as answers:
                line = answers.readline()
    except FileNotFoundError:
        raise CtlError(f"no control socket at {path}: is the relay running, with [listen] control there?") from None
    except ConnectionRefusedError:
        raise CtlError(f"nothing answers at {path}: the relay that made it is gone") from None
    except PermissionError:
        raise CtlError(f"not allowed to use {path}: run ctl as the relay's user") from None
    except OSError as exc:  # a timeout included
        raise CtlError(f"{path}: {exc.strerror or exc or type(exc).__name__}") from None
    if not line:
        raise CtlError(f"{path}: the relay closed the connection without answering")
    answer = json.loads(line)
    if not answer.get("ok"):
        raise CtlError(answer.get("error") or "the relay refused the request")
    return answer["result"]


def control_socket(args: argparse.Namespace) -> Path:
    """``--socket``, else the one the configuration (``--config`` or the embedded default) names."""
    if args.socket is not None:
        return args.socket
    if args.config:
        config = load_config(args.config, create_state=False)
    else:
        config = parse_config(default_config_text(DEFAULT_STATE_DIR), Path.cwd(), create_state=False)
    path = socket_path(config, args.worker)
    if path is None:
        raise CtlError(f"{config.source}: [listen] control is false, the relay has no control socket")
    return path


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        path = control_socket(args)
        if args.ctl_command == "top":
            top(path, args, out)
        else:
            command, arguments, render = _request_of(args)
            result = request(path, command, args.timeout, **arguments)
            print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else render(result), file=out)
    except ConfigError as error:
        print(f"{args.config}: {len(error.problems)} problem(s):", *(f"  {p}" for p in error.problems),
              sep="\n", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as error:
        print(f"ctl: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:  # the way out of `ctl top`
        pass
    return EXIT_OK


def _request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any]:
    """The request a subcommand makes, and how its result reads as text."""
    name = args.ctl_command
    if name == "streams":
        return "streams", {}, tables.streams
    if name == "show":
        return "show", {"id": args.id}, tables.stream
    if name == "queues":
        return "queues", {}, tables.queues
    if name == "dns-flush":
        return "dns-flush", {"domain": args.domain}, \
            lambda result: f"{result['domain']}: {result['dropped']} cached DNS answer(s) dropped"
    if name == "close":
        target = {"id": args.id} if args.id is not None else {"domain": args.domain}
        options = {k: v for k, v in (("condition", args.condition), ("text", args.text)) if v is not None}
        shown = f"stream {args.id}" if args.id is not None else args.domain
        return "close", {**target, **options}, lambda result: tables.closed(result, shown)
    if name == "deny":
        arguments = {"pattern": args.pattern, **({"close": True} if args.close else {})}
        return f"deny-{args.action}", arguments, lambda result: tables.deny(result, args.pattern, args.action == "add")
    raise AssertionError(f"ctl subcommand {name} makes no request")


def top(path: Path, args: argparse.Namespace, out: TextIO) -> None:
    """Refresh every ``--interval`` seconds, ``--iterations`` times (forever without),
    with rates from two successive listings."""
    clear = CLEAR_SCREEN if out.isatty() else ""
    before = request(path, "counters", args.timeout)
    shown = 0
    while args.iterations is None or shown < args.iterations:
        time.sleep(args.interval)
        after = request(path, "counters", args.timeout)
        rates, rows = compare(before, after)
        title = f"xmpp-router top ({path}, worker {after['worker']})"
        print(clear + tables.top(after["totals"], rates, rows[:args.limit], title), file=out, flush=True)
        before, shown = after, shown + 1


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Rates per second between two ``counters`` answers: the relay's totals, and
    each stream's bytes in and out, busiest first (a new stream counts from zero;
    bytes in start again after a stream restart)."""
    elapsed = max(after["time"] - before["time"], 1e-6)
    rates = {key: max(after["totals"][key] - before["totals"][key], 0) / elapsed
             for key in ("stanzas_routed", "stanzas_bounced", "bytes_in", "bytes_out")}
    earlier = {s["id"]: s for s in before["streams"]}
    rows = []
    for s in after["streams"]:
        previous = earlier.get(s["id"], {"bytes_in": 0, "bytes_out": 0})
        in_rate = max(s["bytes_in"] - previous["bytes_in"], 0) / elapsed
        out_rate = max(s["bytes_out"] - previous["bytes_out"], 0) / elapsed
        rows.append({**s, "in_rate": in_rate, "out_rate": out_rate})
    rows.sort(key=lambda r: (r["in_rate"] + r["out_rate"], r["queue"], -r["id"]), reverse=True)
    return rates, rows


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def add_arguments(ctl: argparse.ArgumentParser) -> None:
    """``ctl``'s options and subcommands (router.cli wires them in)."""
    ctl.add_argument("--socket", type=Path, metavar="PATH",
                     help="the relay's control socket (default: [listen] control of --config, else the embedded "
                          "default's ./state/control.sock)")
    ctl.add_argument("--config", metavar="FILE", help="the relay's configuration file, to find its socket")
    ctl.add_argument("--worker", type=int, default=0, metavar="I",
                     help="with [cluster] workers > 1: the worker whose socket to use (default 0)")
    ctl.add_argument("--timeout", type=positive, default=10.0, metavar="SECONDS",
                     help="how long to wait for the relay (default 10)")
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print the relay's answer as JSON, for scripts")
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    commands.add_parser("streams", parents=[json_output],
                        help="every stream: domains, authentication, TLS, certificate, bytes, age, idle, queue")
    show = commands.add_parser("show", parents=[json_output], help="one stream in full")
    show.add_argument("id", type=int, metavar="ID")
    close = commands.add_parser("close", parents=[json_output],
                                help="close a stream, or every stream of a domain, optionally with a stream error")
    which = close.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", metavar="ID")
    which.add_argument("--domain", metavar="DOMAIN", help="every stream of this remote (or component) domain")
    close.add_argument("--condition", choices=sorted(STREAM_CONDITIONS), metavar="CONDITION",
                       help="send this RFC 6120 stream error first (e.g. policy-violation, system-shutdown)")
    close.add_argument("--text", help="the stream error's text")
    commands.add_parser("queues", parents=[json_output],
                        help="stanzas waiting for an outbound stream, and connection backoff, per remote domain")
    flush = commands.add_parser("dns-flush", parents=[json_output], help="forget a remote domain's cached DNS answers")
    flush.add_argument("domain", metavar="DOMAIN")
    deny = commands.add_parser("deny", parents=[json_output],
                               help="add or remove a policy.deny entry until the next reload")
    deny.add_argument("action", choices=("add", "remove"))
    deny.add_argument("pattern", metavar="PATTERN", help="a domain, or *.domain for every domain below it")
    deny.add_argument("--close", action="store_true", help="add: also close the open streams it now refuses")
    top_view = commands.add_parser("top", help="a live view of the totals and the busiest streams (Ctrl-C ends it)")
    top_view.add_argument("--interval", type=positive, default=1.0, metavar="SECONDS",
                          help="between refreshes (default 1)")
    top_view.add_argument("--iterations", type=int, metavar="N", help="stop after N refreshes (default: never)")
    top_view.add_argument("--limit", type=int, default=TOP_ROWS, metavar="N",
                          help=f"streams shown (default {TOP_ROWS})")
