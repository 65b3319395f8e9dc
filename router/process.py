"""One relay process from start to exit: the relay started, its banner, signals
(SIGHUP reloads, SIGTERM and SIGINT stop), and systemd's readiness protocol.

``run(config)`` is what ``python -m router serve`` calls for one process (a
node's workers too, with their index and how they re-read their config).
Under systemd (``Type=notify``, see ``contrib/xmpp-router.service``) the
process says READY=1 once its listeners are up, RELOADING=1 then READY=1
around a reload, and STOPPING=1 when it begins to shut down
(``router.notify``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

from router.config import Config, load_config
from router.net.admission import raise_fd_limit
from router.notify import monotonic_usec, notify
from router.server import Relay

log = logging.getLogger("router.process")


def _reload(relay: Relay, reread: Callable[[], Config]) -> None:
    notify("RELOADING=1", monotonic_usec())
    try:
        relay.reload(reread())
    except Exception as exc:  # a bad file keeps the running configuration (reload is atomic)
        log.error("reload failed, keeping the running configuration: %s", exc)
    notify("READY=1")


def _reread(relay: Relay) -> Config:
    """The configuration again: the file it came from, or the embedded default as it
    is (then a reload re-reads certificates only)."""
    source = relay.config.source
    return relay.config if source.startswith("<") else load_config(source)


def _banner(config: Config, relay: Relay) -> None:
    for name, (host, port) in relay.listening.items():
        print(f"{name}: listening on {host}:{port}", flush=True)
    if config.components and "component" in relay.listening:
        host, port = relay.listening["component"]
        for component in config.components:
            print(f"component {component.domain}: connect a XEP-0114 component to {host}:{port} "
                  f"with its configured secret", flush=True)
    elif "component" in relay.listening:
        host, port = relay.listening["component"]
        print("no component configured; to connect a XEP-0114 component, put\n"
              "  [[component]]\n  domain = \"bot.localhost\"\n  secret = \"choose-a-secret\"\n"
              f"in a config file, run `python -m router serve --config FILE`, and point the component "
              f"at {host}:{port} with that domain and secret", flush=True)
    print(f"serving domains: {', '.join(sorted(config.local_domains))}", flush=True)


async def serve(config: Config, worker: int | None = None, reread: Callable[[], Config] | None = None) -> int:
    raise_fd_limit()
    relay = Relay(config, worker=worker or 0)
    try:
        await relay.start()
    except OSError as exc:  # e.g. a port already in use
        log.error("cannot start listening: %s", exc)
        await relay.stop(timeout=0)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, _reload, relay, reread or (lambda: _reread(relay)))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    _banner(config, relay)
    notify("READY=1", f"STATUS=serving {len(config.local_domains)} domain(s)")
    await stop.wait()
    notify("STOPPING=1")
    log.info("shutting down")
    await relay.stop()
    return 0


def run(config: Config, worker: int | None = None, reread: Callable[[], Config] | None = None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT (exit status 0). A worker of a node
    (router.cluster.supervisor) has its index, and ``reread``: how SIGHUP reads
    its configuration again (keeping the listeners the supervisor reserved)."""
    import uvloop

    return uvloop.run(serve(config, worker, reread))
