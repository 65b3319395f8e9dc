"""Command line: ``python -m router serve|check-config|gen-cert|ctl`` (console script ``xmpp-router``).

``serve`` without ``--config`` runs the embedded default (loopback only,
domain ``localhost`` with the built-in services, key material in ``./state``).
With more than one worker (``[cluster] workers`` or ``--workers``) ``serve``
runs the node's supervisor (router.cluster.supervisor), which starts each
worker as ``serve --worker I``.
A configuration with problems is refused with every problem listed, the same
way ``check-config`` lists them. ``ctl`` asks a running relay over its control
socket (router.admin.ctl).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from router.admin import ctl as admin_ctl
from router.config import DEFAULT_STATE_DIR, Config, ConfigError, Problem, default_config, load_config
from router.config.defaults import MAX_WORKERS

EXIT_OK = 0
EXIT_INVALID = 1  # check-config found problems
EXIT_USAGE = 2  # argparse's code for bad arguments; serve uses it for a refused config too

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_LOG_FORMAT = "%(asctime)s %(levelname)s worker={worker} %(name)s: %(message)s"  # one of a node's workers


def describe(config: Config) -> str:
    """Human summary of what a configuration serves and where to connect."""
    listen = config.listen
    lines = [f"configuration: {config.source}"]
    for domain in config.server.domains:
        lines.append(f"  domain {domain}: built-in ping and disco#info")
    for domain in config.services.echo:
        lines.append(f"  domain {domain}: echo service (messages come back to their sender)")
    for domain in config.services.sink:
        lines.append(f"  domain {domain}: sink service (counts and drops stanzas)")
    for component in config.components:
        lines.append(f"  domain {component.domain}: XEP-0114 component")
    lines.append(f"  s2s: {_where(listen.s2s)} (STARTTLS{', required' if config.tls.required else ''})")
    lines.append(f"  s2s direct TLS (XEP-0368): {_where(listen.s2s_direct_tls)}")
    lines.append(f"  components (XEP-0114): {_where(listen.component)}")
    metrics = f"http://{listen.metrics}/metrics" if listen.metrics else "off"
    lines.append(f"  metrics: {metrics}")
    policy = config.policy
    lines.append(
        f"  policy: require_encryption={_yes(policy.require_encryption)} secure_auth={_yes(policy.secure_auth)}"
        f" allow={len(policy.allow) or 'everyone'} deny={len(policy.deny)} max_stanza_bytes={policy.max_stanza_bytes}"
    )
    lines.append(f"  bidi (XEP-0288): {config.s2s.bidi}")
    for domain, route in config.routes.items():
        tls = ", direct TLS" if route.direct_tls else ""
        lines.append(f"  static route {domain} -> {route.host}:{route.port}{tls}")
    if listen.component is not None:
        if config.components:
            lines.append(
                f"connect a component: XEP-0114 (jabber:component:accept) to {listen.component} "
                "with the domain and secret of its [[component]] entry"
            )
        else:
            lines.append(
                f"connect a component: add [[component]] domain = \"bot.example\" and secret = \"...\" to a config "
                f"file, run with --config, and point the component at {listen.component} (XEP-0114)"
            )
    return "\n".join(lines)


def _where(endpoint) -> str:
    return str(endpoint) if endpoint is not None else "off"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def print_problems(error: ConfigError, source: str, out: TextIO) -> None:
    print(f"{source}: {len(error.problems)} problem(s):", file=out)
    for problem in error.problems:
        print(f"  {problem}", file=out)


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the traceback,
    and which worker of a node wrote it)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.worker is not None:
            line["worker"] = self.worker
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(config: Config, worker: int | None = None) -> None:
    """Every log line to stderr, as text or JSON lines (``log.format``); a worker's
    lines say which worker they come from (the workers of a node share stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        handler.setFormatter(JsonLines(worker))
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT if worker is None else
                                               WORKER_LOG_FORMAT.format(worker=worker)))
    logging.basicConfig(level=config.log.level, handlers=[handler])


def with_workers(config: Config, workers: int | None) -> Config:
    """``serve --workers N`` in place of ``[cluster] workers``; raises ConfigError
    when more than one has no bus (stanzas between workers go over NATS)."""
    if workers is None:
        return config
    if workers > 1 and not config.cluster.nats:
        raise ConfigError([Problem("--workers", f"{workers} workers need cluster.nats: "
                                                "stanzas between workers go over NATS")])
    return replace(config, cluster=replace(config.cluster, workers=workers))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config else default_config(args.state_dir)
        config = with_workers(config, args.workers)
    except ConfigError as error:
        print_problems(error, args.config or "embedded default", sys.stderr)
        return EXIT_USAGE
    setup_logging(config, args.worker)
    if args.worker is not None:
        return serve_as_worker(config, args)
    if config.cluster.workers > 1:
        from router.cluster import supervisor

        return supervisor.run(config)
    from router import process  # imports the whole runtime; not needed by the other commands

    return process.run(config)


def serve_as_worker(config: Config, args: argparse.Namespace) -> int:
    """One of the relay processes of a node, started by its supervisor: it listens
    where the supervisor reserved, and keeps that on SIGHUP."""
    from router import process
    from router.cluster.supervisor import LISTEN_ENV, as_worker, reserved_addresses

    if not args.config or LISTEN_ENV not in os.environ:
        print("--worker is for the processes a node's supervisor starts (serve --workers N --config FILE)",
              file=sys.stderr)
        return EXIT_USAGE
    addresses, workers = reserved_addresses(), config.cluster.workers
    return process.run(as_worker(config, addresses, workers), worker=args.worker,
                      reread=lambda: as_worker(load_config(args.config), addresses, workers))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Parse, then check that the relay can work with it; every problem in one
    report, and nothing written (no secret, no certificate)."""
    from router.config.check import check  # loads cryptography: not needed by the other commands

    try:
        config = load_config(args.file, create_state=False)
    except ConfigError as error:
        print_problems(error, args.file, sys.stdout)
        return EXIT_INVALID
    problems, notes = check(config)
    if problems:
        print_problems(ConfigError(problems), args.file, sys.stdout)
        return EXIT_INVALID
    print("ok")
    for note in notes:
        print(f"  {note}")
    print(describe(config))
    return EXIT_OK


def cmd_gen_cert(args: argparse.Namespace) -> int:
    from router.wire.jid import normalize_domain
    from router.trust.pki import make_leaf

    try:
        domain = normalize_domain(args.domain)
    except ValueError as exc:
        print(f"invalid domain {args.domain!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    existing = [path for path in (args.out / f"{domain}.crt", args.out / f"{domain}.key") if path.exists()]
    if existing and not args.force:
        print(f"{', '.join(map(str, existing))} already exist(s): not overwriting a key without --force",
              file=sys.stderr)
        return EXIT_INVALID
    cert, key = make_leaf(None, domain, srv_ids=[domain]).write(args.out, domain)
    print(f"self-signed certificate for {domain}:")
    print(f"  cert = {cert}")
    print(f"  key  = {key}")
    print(f'add to the config:\n  [tls.certificates."{domain}"]\n  cert = "{cert}"\n  key = "{key}"')
    return EXIT_OK


def cmd_check_dns(args: argparse.Namespace) -> int:
    """What the relay would resolve and try for a remote domain, and whether it answers."""
    import uvloop

    from router.net.dnscheck import report
    from router.net.resolver import Resolver, dns_resolver
    from router.wire.jid import normalize_domain

    try:
        domain = normalize_domain(args.domain)
        config = load_config(args.config, create_state=False) if args.config else None
    except (ValueError, ConfigError) as exc:
        print(f"check-dns: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # the relay's own resolver: --nameserver, else [tls] nameservers (DNSSEC-aware with [tls] dane), else the system's
    nameservers = (args.nameserver,) if args.nameserver else config.tls.nameservers if config else ()
    try:
        resolver = Resolver(config.routes if config else {},
                            dns_resolver(nameservers, bool(config and config.tls.dane)),
                            blocklist=config.s2s.connect_blocklist if config else ())
    except ValueError as exc:
        print(f"check-dns: --nameserver must be an IP address with an optional port: {exc}", file=sys.stderr)
        return EXIT_USAGE
    answered = uvloop.run(report(domain, resolver, print, args.timeout))
    return EXIT_OK if answered else EXIT_INVALID


def worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to {MAX_WORKERS}, got {text!r}")
    return int(text)


def _version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("router")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmpp-router", description="XMPP server-to-server federation relay")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay (embedded default config without --config)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (see docs/config.md)")
    serve.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where the embedded default keeps its certificates and dialback secret (default ./{DEFAULT_STATE_DIR})",
    )
    serve.add_argument("--workers", type=worker_count, metavar="N",
                       help="relay processes sharing the listening ports (default: [cluster] workers, else 1); "
                            "more than one needs [cluster] nats")
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor on its workers
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser("check-config", help="validate a configuration file and print every problem")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=cmd_check_config)

    gen = commands.add_parser("gen-cert", help="write a self-signed certificate and key for a domain")
    gen.add_argument("domain", metavar="DOMAIN")
    gen.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="output directory (default .)")
    gen.add_argument("--force", action="store_true", help="overwrite an existing certificate and key")
    gen.set_defaults(handler=cmd_gen_cert)

    dns_check = commands.add_parser("check-dns", help="show the SRV and A/AAAA records the relay would use for a "
                                                      "remote domain and whether each target answers")
    dns_check.add_argument("domain", metavar="DOMAIN")
    dns_check.add_argument("--config", metavar="FILE", help="use its [routes] (static routes win over DNS)")
    dns_check.add_argument("--nameserver", metavar="HOST[:PORT]", help="ask this DNS server (default: the system's)")
    dns_check.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per address (default 5)")
    dns_check.set_defaults(handler=cmd_check_dns)

    ctl = commands.add_parser("ctl", help="ask a running relay: list, show and close streams, queues, DNS cache, "
                                          "deny entries, a live top (over its control socket)")
    admin_ctl.add_arguments(ctl)
    ctl.set_defaults(handler=admin_ctl.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
