"""A small asyncio XEP-0114 component client.

Used by the tests and the load generator to act as ``anything@<domain>`` on a
server (Prosody, ejabberd, or the relay) and as the readiness check for those
servers: a server is ready when a component handshake completes, not when its
port merely accepts TCP.
"""

from __future__ import annotations

import asyncio
from collections import deque

from lxml import etree

from router._fastparse import Element, ParseError, StreamHeader, Tokenizer
from router.wire.handshake import handshake_digest
from router.wire.namespaces import COMPONENT_NS, STREAM_NS, STREAMS_NS
from router.wire.xml import first_condition, parse_element, text_in


DEFAULT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0
READ_SIZE = 65536


class ComponentError(Exception):
    """The component connection failed (handshake refused, stream error, stream closed)."""


class ComponentStreamError(ComponentError):
    """The server sent ``<stream:error>``; `condition` is its RFC 6120 condition."""

    def __init__(self, condition: str, text: str | None):
        self.condition = condition
        self.text = text
        super().__init__(f"stream error <{condition}/>" + (f": {text}" if text else ""))


class ComponentClosed(ComponentError):
    """The server ended the stream or closed the TCP connection."""


def stream_error_of(element: etree._Element) -> ComponentStreamError:
    """The condition and text of a ``<stream:error>`` element."""
    condition = first_condition(element, STREAMS_NS) or "undefined-condition"
    return ComponentStreamError(condition, text_in(element, STREAMS_NS))


class _StreamReader:
    """The project's tokenizer, turning the server's bytes into its stream id and lxml elements."""

    def __init__(self) -> None:
        self._tokenizer = Tokenizer()
        self.stream_id: str | None = None
        self.header_seen = False
        self.ended = False
        self.error: ComponentError | None = None

    def feed(self, data: bytes) -> list[etree._Element]:
        """Elements completed by `data`; bad XML sets `error` after the elements before it."""
        try:
            events = self._tokenizer.feed(data)
        except ParseError as exc:
            events = exc.events
            self.error = ComponentError(f"the server sent bad XML (<{exc.condition}/>): {exc.text}")
        elements = []
        for event in events:
            if isinstance(event, StreamHeader):
                self.header_seen = True
                self.stream_id = event.id
            elif isinstance(event, Element):
                raw = self._tokenizer.buffer[event.start : event.end]
                elements.append(parse_element(raw, self._tokenizer.header.namespaces))
            else:
                self.ended = True
        return elements


class ComponentClient:
    """One XEP-0114 connection: `connect`, then `send` / `receive`, then `close`."""

    def __init__(self) -> None:
        self.domain: str | None = None
        self.stream_id: str | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stream: _StreamReader | None = None
        self._pending: deque[etree._Element] = deque()

    async def __aenter__(self) -> "ComponentClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self, host: str, port: int, domain: str, secret: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Open the TCP connection and complete the handshake, all within `timeout` seconds.

        Raises `ComponentStreamError` when the server refuses (e.g. ``<not-authorized/>``),
        `ComponentClosed` when it hangs up, `TimeoutError` when it does not answer.
        """
        async with asyncio.timeout(timeout):
            self._reader, self._writer = await asyncio.open_connection(host, port)
            self._stream = _StreamReader()
            self.domain = domain
            try:
                await self._handshake(f"{host}:{port}", domain, secret)
            except BaseException:
                self._writer.close()  # a failed connect leaves nothing open
                self._writer = None
                raise

    async def _handshake(self, where: str, domain: str, secret: str) -> None:
        self.send(
            "<?xml version='1.0'?>"
            f"<stream:stream xmlns='{COMPONENT_NS}' xmlns:stream='{STREAM_NS}' to='{domain}'>"
        )
        while self._stream.stream_id is None:
            await self._read_more()
            if self._stream.header_seen and self._stream.stream_id is None:
                raise ComponentError(f"{where} sent a stream header without an id")
            self._raise_if_error_pending()
        self.stream_id = self._stream.stream_id
        self.send(f"<handshake>{handshake_digest(self.stream_id, secret)}</handshake>")
        element = await self._next_element()
        if element.tag != f"{{{COMPONENT_NS}}}handshake":
            raise ComponentError(f"expected <handshake/> from {where}, got {etree.tostring(element)!r}")

    def send(self, xml: bytes | str) -> None:
        """Queue raw XML (one or more stanzas) on the stream."""
        if self._writer is None:
            raise ComponentError("not connected")
        self._writer.write(xml.encode("utf-8") if isinstance(xml, str) else xml)

    async def receive(self, timeout: float = DEFAULT_TIMEOUT) -> etree._Element:
        """The next top-level element (in ``jabber:component:accept``).

        Raises `ComponentStreamError` on ``<stream:error>``, `ComponentClosed` at the end
        of the stream, `TimeoutError` when nothing arrives within `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            return await self._next_element()

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """End the stream, wait (up to `timeout`) for the server to end its own, close (idempotent)."""
        writer = self._writer
        if writer is None:
            return
        try:
            if not writer.is_closing():
                writer.write(b"</stream:stream>")
                async with asyncio.timeout(timeout):
                    while not self._stream.ended:
                        await self._read_more()
        except (ComponentError, OSError, TimeoutError):
            pass  # the server hung up, sent garbage or is slow: close our side anyway
        finally:
            self._writer = None
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout)
            except (OSError, TimeoutError):
                pass  # the socket is closed either way

    async def _next_element(self) -> etree._Element:
        while not self._pending:
            await self._read_more()
        element = self._pending.popleft()
        if element.tag == f"{{{STREAM_NS}}}error":
            raise stream_error_of(element)
        return element

    def _raise_if_error_pending(self) -> None:
        for element in self._pending:
            if element.tag == f"{{{STREAM_NS}}}error":
                raise stream_error_of(element)

    async def _read_more(self) -> None:
        if self._stream.error:
            raise self._stream.error
        if self._stream.ended:
            raise ComponentClosed(f"the server ended the stream of {self.domain}")
        data = await self._reader.read(READ_SIZE)
        if not data:
            raise ComponentClosed(f"the server closed the connection of {self.domain}")
        self._pending.extend(self._stream.feed(data))
        if self._stream.error and not self._pending:
            raise self._stream.error
        if self._stream.ended and not self._pending:
            raise ComponentClosed(f"the server ended the stream of {self.domain}")
