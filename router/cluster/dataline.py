"""The cluster bus's data connection to NATS: stanza batches and their answers.

A thin asyncio protocol around ``natsproto``: reads go into its reader's
buffer, each message goes to its subscription's callback inside the read
callback that brought it, and a publish is one ``writelines`` on the
transport, so a batch costs no task, no queue and no extra turn of the event
loop (``bench.messagecost``: nats-py spends about twice the CPU per message).
What waits here is bounded by the bus: unanswered batches by
``max_bus_in_flight``, and what NATS holds for us by the server's own
slow-consumer limit, past which it closes the connection (``on_lost``; the
bus bounces what waited for answers and opens a new one).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable
from urllib.parse import ParseResult

from router.cluster import natsproto

log = logging.getLogger("router.cluster.dataline")


class LineError(Exception):
    """The data connection could not be opened: the text says why."""


Handler = Callable[[natsproto.Msg], None]


class DataLine(asyncio.BufferedProtocol):
    """One NATS connection whose messages go to their subscription's handler (``handlers``,
    by sid); ``on_lost(reason)`` once, when it ends other than by `close`."""

    def __init__(self, handlers: list[Handler], on_lost: Callable[[str], None]) -> None:
        self.handlers, self.on_lost = handlers, on_lost
        self.reader = natsproto.NatsReader()
        self.transport: asyncio.Transport | None = None
        self.max_payload = 1024 * 1024  # until the server's INFO says
        loop = asyncio.get_running_loop()
        self.info: asyncio.Future = loop.create_future()
        self.ready: asyncio.Future = loop.create_future()
        self.open = False

    def connection_made(self, transport) -> None:
        if self.transport is None:  # start_tls wraps the connection: the protocol stays
            self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.reader.buffer_updated(nbytes)
        except natsproto.ProtocolError as exc:
            self._end(f"the NATS server sent {exc}")
            return
        for event in events:
            if type(event) is natsproto.Msg:  # before the PONG nothing is ours: its sender bounces it
                if self.open and 0 <= event.sid < len(self.handlers):
                    self.handlers[event.sid](event)
            elif type(event) is natsproto.Ping:
                self.transport.write(natsproto.PONG)
            elif type(event) is natsproto.Pong:
                if not self.ready.done():
                    self.open = True
                    self.ready.set_result(None)
            elif type(event) is natsproto.Info:
                max_payload = event.options.get("max_payload")
                if isinstance(max_payload, int) and max_payload > 0:
                    self.max_payload = max_payload
                if not self.info.done():
                    self.info.set_result(event.options)
            elif type(event) is natsproto.ServerError:
                if not self.ready.done():
                    self._end(f"NATS refused the connection: {event.text}")
                    return
                log.warning("cluster bus: NATS says: %s", event.text)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"the connection to NATS was lost ({exc or 'closed by the server'})")

    def _end(self, reason: str) -> None:
        for waiter in (self.info, self.ready):
            if not waiter.done():
                waiter.set_exception(LineError(reason))
                waiter.exception()  # retrieved: `open_line` may have stopped waiting (a timeout)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.open:
            self.open = False
            self.on_lost(reason)

    def publish(self, subject: str, payload: bytes | bytearray, reply: str = "") -> None:
        self.transport.writelines(natsproto.publish(subject, payload, reply))

    def close(self) -> None:
        """Ours: written bytes still go out; ``on_lost`` is not called."""
        self.open = False
        if self.transport is not None:
            self.transport.close()


async def open_line(url: ParseResult, credentials: ParseResult | None, name: str, subscriptions: dict[str, Handler],
                    on_lost: Callable[[str], None], timeout: float) -> DataLine:
    """Connect to ``url`` (TLS when its scheme is ``tls`` or the server requires it),
    authenticate with the user and password or token of ``url``, else of ``credentials``,
    subscribe ``{subject: handler}``, and return once the server answered a PING after all that."""
    loop = asyncio.get_running_loop()
    line = DataLine(list(subscriptions.values()), on_lost)
    host, port = url.hostname or "127.0.0.1", url.port or 4222
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: line, host, port)
            info = await line.info
            if url.scheme == "tls" or info.get("tls_required"):
                transport = await loop.start_tls(transport, line, ssl.create_default_context(), server_hostname=host)
                line.transport = transport
            options = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                       "name": f"{name} data", "lang": "python", "version": "router", "protocol": 1}
            source = url if url.username else credentials
            if source is not None and source.username:
                if source.password is not None:
                    options.update(user=source.username, **{"pass": source.password})
                else:
                    options["auth_token"] = source.username
            transport.writelines([natsproto.connect(options)]
                                 + [natsproto.subscribe(subject, sid) for sid, subject in enumerate(subscriptions)]
                                 + [natsproto.PING])
            await line.ready
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        line.close()
        raise LineError(f"cannot open the data connection to NATS {host}:{port}: "
                        f"{exc or type(exc).__name__}") from None
    except LineError:
        line.close()
        raise
    return line
