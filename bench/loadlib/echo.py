"""The XEP-0114 component every target serves its benchmark domain through.

`echo` sends each message back to its sender (from/to swapped, same id and
payload) so the generator can time and check it; `sink` only counts. It reads
with the project's Tokenizer and writes one batch per read, so it costs the
same on every target and stays small next to the target itself.

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

COMPONENT_NS = "jabber:component:accept"
STATS_EVERY_S = 0.2  # the stats file is rewritten this often while bounces come
MAX_HEADS = 4096  # echo start tags kept, one per (to, from, type): a simulated server's sender and the target


def _attr(value: str) -> str:
    if "&" in value or "<" in value or "'" in value:
        value = value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")
    return value


class EchoComponent(asyncio.BufferedProtocol):
    def __init__(self, domain: str, secret: str, sink: bool, ready: asyncio.Future):
        self.domain, self.secret, self.sink, self.ready = domain, secret, sink, ready
        self.tokenizer = Tokenizer(max_stanza_bytes=1 << 20)
        self.transport = None
        self.authenticated = False
        self.counts = {"messages": 0, "errors": 0, "iq": 0, "other": 0}
        self.bounced_ids: list[str] = []  # of the error messages received: the echoes the target bounced
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self.heads: dict[tuple, bytes] = {}  # (to, from, type) -> the echo's start tag up to its id

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
        buf = self.tokenizer.buffer
        out = []
        for event in events:
            if isinstance(event, Element):
                if self.authenticated:
                    self.stanza(event, buf, out)
                elif event.name == "handshake":
                    self.authenticated = True
                    if not self.ready.done():
                        self.ready.set_result(None)
                else:
                    self.stop(f"handshake refused: {bytes(buf[event.start:event.end])!r}")
                    return
            elif isinstance(event, StreamHeader):
                self.transport.write(f"<handshake>{handshake_digest(event.id, self.secret)}</handshake>".encode())
            elif isinstance(event, StreamEnd):
                self.stop("server ended the stream")
                return
        if out:
            self.transport.write(b"".join(out))

    def stanza(self, el: Element, buf: bytearray, out: list):
        counts = self.counts
        if el.type == "error":
            counts["errors"] += 1
            if el.name == "message" and el.id is not None:
                self.bounced_ids.append(el.id)
            if counts["errors"] <= 3:
                sys.stderr.write(f"echo: error stanza {bytes(buf[el.start:el.end])[:300]!r}\n")
            return
        if el.name == "message":
            counts["messages"] += 1
            if self.sink:
                return
            gt = buf.index(b">", el.start, el.end)
            key = (el.to, el.from_, el.type)
            head = self.heads.get(key)
            if head is None:
                type_attr = f" type='{_attr(el.type)}'" if el.type else ""
                head = f"<message from='{_attr(el.to or '')}' to='{_attr(el.from_ or '')}'{type_attr}".encode()
                if len(self.heads) < MAX_HEADS:
                    self.heads[key] = head
            out.append(head)
            out.append(f" id='{_attr(el.id)}'>".encode() if el.id is not None else b">")
            out.append(b"</message>" if buf[gt - 1] == 0x2F else buf[gt + 1:el.end])  # self-closing: nothing inside
        elif el.name == "iq" and el.type in ("get", "set"):
            counts["iq"] += 1
            out.append(f"<iq type='result' from='{_attr(el.to or '')}' to='{_attr(el.from_ or '')}' id='{_attr(el.id or '')}'/>".encode())
        else:
            counts["other"] += 1

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
