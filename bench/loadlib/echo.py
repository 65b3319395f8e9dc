"""The XEP-0114 component every target serves its benchmark domain through.

`echo` sends each message back to its sender (from/to swapped, same id and
payload) so the generator can time and check it; `sink` only counts. It reads
with the project's Tokenizer and writes one batch per read, its per-stanza
work compiled (`_fastload.EchoCore`), so it costs the same on every target and
stays small next to the target itself.

An echo the target cannot deliver comes back to the component as an error
stanza with the echo's id, which is the generator's stanza's: the component
keeps those ids, and `--stats FILE` holds its counts and them (rewritten
whenever a bounce came, and at exit), so the generator can tell which of its
stanzas ended there (`Bounces` reads them).

    python -m bench.loadlib.echo --port 5347 --domain bench.test --secret S [--sink] [--stats FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from router._fastparse import Element, ParseError, StreamEnd, StreamHeader, Tokenizer
from router.wire.handshake import handshake_digest

from ._fastload import EchoCore

COMPONENT_NS = "jabber:component:accept"
STATS_EVERY_S = 0.2  # the stats file is rewritten this often while bounces come
MAX_HEADS = 4096  # echo start tags kept, one per (to, from, type): a simulated server's sender and the target


def _attr(value: str) -> str:
    if "&" in value or "<" in value or "'" in value:
        value = value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")
    return value


class EchoComponent(EchoCore, asyncio.BufferedProtocol):
    """The component's connection; what it writes back for each stanza is `EchoCore.answer_one`."""

    def __init__(self, domain: str, secret: str, sink: bool, ready: asyncio.Future):
        super().__init__(sink)
        self.domain, self.secret, self.ready = domain, secret, ready
        self.tokenizer = Tokenizer(max_stanza_bytes=1 << 20)
        self.transport = None
        self.authenticated = False
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(
            f"<?xml version='1.0'?><stream:stream xmlns='{COMPONENT_NS}' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{self.domain}'>".encode())

    def get_buffer(self, sizehint):
        return self.tokenizer.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        try:
            events = self.tokenizer.buffer_updated(nbytes)
        except ParseError as exc:
            self.stop(f"server sent bad XML ({exc.condition}): {exc.text}")
            return
        if not self.authenticated:
            events = self.handshake(events)
        if events:
            out = self.answer(self.tokenizer, events)
            if out:
                self.transport.write(out)

    def handshake(self, events: list) -> list | None:
        """XEP-0114 up to the server's <handshake/>: the events after it, None when there are none or it failed."""
        for at, event in enumerate(events):
            if isinstance(event, StreamHeader):
                self.transport.write(f"<handshake>{handshake_digest(event.id, self.secret)}</handshake>".encode())
            elif isinstance(event, Element) and event.name == "handshake":
                self.authenticated = True
                if not self.ready.done():
                    self.ready.set_result(None)
                return events[at + 1:]
            elif isinstance(event, Element):
                buf = self.tokenizer.buffer
                self.stop(f"handshake refused: {bytes(buf[event.start:event.end])!r}")
                return None
            else:
                self.ended(event)
                return None
        return None

    def ended(self, event):
        self.stop("server ended the stream" if isinstance(event, StreamEnd) else f"unexpected {event!r}")

    def head_for(self, key: tuple) -> bytes:
        """The start tag of the echo of a message with this (to, from, type), up to its id."""
        to, from_, kind = key
        type_attr = f" type='{_attr(kind)}'" if kind else ""
        head = f"<message from='{_attr(to or '')}' to='{_attr(from_ or '')}'{type_attr}".encode()
        if len(self.heads) < MAX_HEADS:
            self.heads[key] = head
        return head

    @staticmethod
    def id_attribute(stanza_id: str) -> bytes:
        return f" id='{_attr(stanza_id)}'>".encode()

    @staticmethod
    def iq_result(el: Element) -> bytes:
        return f"<iq type='result' from='{_attr(el.to or '')}' to='{_attr(el.from_ or '')}' id='{_attr(el.id or '')}'/>".encode()

    @staticmethod
    def report(text: str):
        sys.stderr.write(f"echo: {text}\n")

    def stop(self, reason: str):
        sys.stderr.write(f"echo component {self.domain}: {reason}\n")
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport:
            self.transport.close()

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before the handshake: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(None)


async def connect(host: str, port: int, domain: str, secret: str, sink: bool = False, timeout: float = 10) -> EchoComponent:
    """Connect and complete the XEP-0114 handshake (retrying while the server starts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ready = loop.create_future()
        try:
            _, proto = await loop.create_connection(lambda: EchoComponent(domain, secret, sink, ready), host, port)
            await asyncio.wait_for(ready, max(0.1, deadline - loop.time()))
            return proto
        except (OSError, ConnectionError, asyncio.TimeoutError):
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.05)


async def _main(args) -> int:
    proto = await connect(args.host, args.port, args.domain, args.secret, args.sink, args.timeout)
    print("ready", flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    written = None
    while not (stop.done() or proto.lost.done()):
        await asyncio.wait([stop, proto.lost], timeout=STATS_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
        if args.stats and written != len(proto.bounced_ids):
            written = len(proto.bounced_ids)
            write_stats(args.stats, proto)
    if args.stats:
        write_stats(args.stats, proto)
    if proto.transport and not proto.transport.is_closing():
        proto.transport.write(b"</stream:stream>")
        proto.transport.close()
    return 0


def write_stats(path: str, proto: EchoComponent) -> None:
    """The counts and the bounced ids, replaced at once (a reader never sees half a file)."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(proto.counts | {"bounced_ids": proto.bounced_ids}, f)
    os.replace(f"{path}.tmp", path)


class Bounces:
    """The generator's side of the stats file: each ``poll`` hands the ids bounced since the last
    one (since this object was made, at first) to ``take``; ``read`` counts them."""

    def __init__(self, path: str | None, take):
        self.path, self.take = path, take
        self.stamp: tuple[int, int] | None = None
        self.taken = len(self.ids())  # a sweep's earlier points had those
        self.read = 0

    def ids(self) -> list[str]:
        try:
            with open(self.path) as f:
                return json.load(f).get("bounced_ids", [])
        except (TypeError, OSError, ValueError):  # no file named, or not written yet
            return []

    def poll(self) -> None:
        try:
            stat = os.stat(self.path)
        except (TypeError, OSError):
            return
        if (stat.st_mtime_ns, stat.st_size) != self.stamp:
            self.stamp = (stat.st_mtime_ns, stat.st_size)
            ids = self.ids()
            self.take(ids[self.taken:])
            self.read += len(ids) - self.taken
            self.taken = len(ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadlib.echo", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--sink", action="store_true", help="count messages, send nothing back")
    p.add_argument("--stats", help="write the counts and the ids of the bounced echoes here as JSON "
                                   "(while they come, and on exit)")
    p.add_argument("--timeout", type=float, default=15)
    args = p.parse_args(argv)
    try:
        import uvloop
        return uvloop.run(_main(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
