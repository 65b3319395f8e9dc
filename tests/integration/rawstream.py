"""A byte-level XEP-0114 component for tests that need to see (or pace) the exact
bytes the relay writes, or to send bytes no well-behaved client would."""

from __future__ import annotations

import asyncio
import re

from router.wire.handshake import handshake_digest
from router.wire.namespaces import COMPONENT_NS, STREAM_NS

_ID = re.compile(rb"<stream:stream[^>]*\sid=['\"]([^'\"]+)['\"]")


class RawComponent:
    """Connects, completes the handshake and then exposes the raw byte stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, received: bytes):
        self.reader = reader
        self.writer = writer
        self.received = received  # bytes after the handshake reply, not yet consumed

    @classmethod
    async def connect(cls, port: int, domain: str, secret: str, *, rcvbuf: int | None = None) -> "RawComponent":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        if rcvbuf is not None:
            import socket

            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        writer.write(f"<stream:stream xmlns='{COMPONENT_NS}' xmlns:stream='{STREAM_NS}' to='{domain}'>".encode())
        data = b""
        while not (match := _ID.search(data)):
            chunk = await reader.read(65536)
            assert chunk, f"relay closed before sending a stream header: {data!r}"
            data += chunk
        writer.write(f"<handshake>{handshake_digest(match.group(1).decode(), secret)}</handshake>".encode())
        while b"<handshake/>" not in data:
            chunk = await reader.read(65536)
            assert chunk, f"relay closed during the handshake: {data!r}"
            data += chunk
        rest = data.split(b"<handshake/>", 1)[1]
        return cls(reader, writer, rest)

    async def read_exactly(self, n: int, *, chunk: int = 65536, delay: float = 0.0) -> bytes:
        """``n`` bytes, read ``chunk`` at a time with ``delay`` seconds between reads."""
        out = bytearray(self.received[:n])
        self.received = self.received[n:]
        while len(out) < n:
            data = await self.reader.read(min(chunk, n - len(out)))
            assert data, f"stream ended after {len(out)} of {n} bytes"
            out += data
            if delay:
                await asyncio.sleep(delay)
        return bytes(out)

    async def read_until(self, marker: bytes, limit: int = 1 << 22) -> bytes:
        data = bytearray(self.received)
        found = data.find(marker)
        while found < 0:
            chunk = await self.reader.read(65536)
            assert chunk, f"stream ended before {marker!r}: {bytes(data[-500:])!r}"
            start = max(0, len(data) - len(marker))
            data += chunk
            assert len(data) < limit
            found = data.find(marker, start)
        end = found + len(marker)
        self.received = bytes(data[end:])
        return bytes(data[:end])

    async def read_to_eof(self) -> bytes:
        data = self.received + await self.reader.read()
        self.received = b""
        return data

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(b"</stream:stream>")
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass
