"""The NATS client protocol, the verbs the cluster bus's stanzas need, without I/O.

Out: CONNECT, SUB, PUB, PING, PONG. In: INFO, MSG, HMSG (only its status line
is read: ``503`` is NATS saying no one subscribes to a request's subject),
PING, PONG, ``+OK`` and ``-ERR``. `NatsReader` turns bytes, in any pieces,
into events; reads go straight into its buffer, and a message's payload is
copied once out of it, or for a big one read straight into its own. nats-py
keeps the bus's control connection (the server list, reconnection,
announcements); batches and their answers take a connection of this protocol
(``router.cluster.dataline``), where every message is handled in the read
callback that brought it, with no task or queue per message.

Reference: https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
# nats-server's default max_control_line; a longer line is not the server talking
MAX_CONTROL_LINE = 4096
# NATS refuses a max_payload over 64 MiB: a longer message is not the server talking
MAX_PAYLOAD = 64 * 1024 * 1024
# the room a read gets at least (uvloop's own read size)
READ_SIZE = 256 * 1024
# a payload at least this big that is not all in the buffer is read straight into its own:
# one system call more at its end costs less than copying it
DIRECT_AT_LEAST = 64 * 1024


@dataclass(frozen=True, slots=True)
class Info:
    options: dict


@dataclass(frozen=True, slots=True)
class Msg:
    sid: int
    subject: str
    reply: str
    payload: bytearray
    status: int | None = None  # an HMSG's status code (503: no responders), else None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class ServerError:
    text: str


Event = Info | Msg | Ping | Pong | Ok | ServerError


class ProtocolError(ValueError):
    """Bytes that are not what a NATS server sends; the connection is closed."""


class NatsReader:
    """The server's side of one connection, as events. Reads land in one buffer
    that keeps positions (`get_buffer`, `buffer_updated`); a message's payload is
    its own bytearray: copied out of that buffer when it is small or all there,
    else read straight into it (the buffer then waits for its CRLF)."""

    def __init__(self) -> None:
        self._buffer = bytearray(READ_SIZE)
        self._start = 0  # the first byte not read into events yet
        self._end = 0  # the end of the bytes received
        self._payload: bytearray | None = None  # a big message's payload, read straight into it
        self._filled = 0  # ... its bytes so far
        self._line: tuple = ()  # ... its MSG line, parsed
        self._crlf_due = False  # the CRLF after such a payload comes first in the buffer

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next read goes: the rest of a big message's payload, else after
        the bytes received, with room for at least ``READ_SIZE`` more (a message
        smaller than ``DIRECT_AT_LEAST`` then fits)."""
        if self._payload is not None:
            return memoryview(self._payload)[self._filled:]
        buffer, start, end = self._buffer, self._start, self._end
        want = end - start + READ_SIZE
        if start + want > len(buffer):
            if want > len(buffer):
                self._buffer = bytearray(want)
                self._buffer[:end - start] = memoryview(buffer)[start:end]
            else:
                buffer[:end - start] = buffer[start:end]
            self._start, self._end = 0, end - start
        return memoryview(self._buffer)[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` more were written where `get_buffer` said: the events they complete."""
        payload = self._payload
        if payload is not None:
            self._filled += nbytes
            if self._filled < len(payload):
                return []
            self._payload, self._crlf_due = None, True
            return [_message(self._line, payload)]
        self._end += nbytes
        return self._events()

    def _events(self) -> list[Event]:
        buffer, start, end = self._buffer, self._start, self._end
        events: list[Event] = []
        if self._crlf_due:
            if end - start < 2:
                return events
            _payload_ends(buffer, start)
            start += 2
            self._crlf_due = False
        while True:
            line_end = buffer.find(CRLF, start, end)
            if line_end < 0:
                if end - start > MAX_CONTROL_LINE:
                    raise ProtocolError(f"a control line longer than {MAX_CONTROL_LINE} bytes")
                break
            if line_end - start > MAX_CONTROL_LINE:
                raise ProtocolError(f"a control line longer than {MAX_CONTROL_LINE} bytes")
            line = bytes(memoryview(buffer)[start:line_end])  # one copy (a slice would be a second)
            verb, _, rest = line.partition(b" ")
            verb = verb.upper()
            if verb in (b"MSG", b"HMSG"):
                parsed = _message_line(verb, rest)
                size = parsed[-1]
                stop = line_end + 2 + size
                if end >= stop + 2:
                    _payload_ends(buffer, stop)
                    events.append(_message(parsed, buffer[line_end + 2:stop]))  # its one copy
                    start = stop + 2
                    continue
                if size < DIRECT_AT_LEAST or end >= stop:
                    break  # the line is read again with the rest
                # the rest of a big payload goes straight into its own buffer
                payload = self._payload = bytearray(size)
                self._filled = end - line_end - 2
                payload[:self._filled] = memoryview(buffer)[line_end + 2:end]
                self._line = parsed
                start = end
                break
            if verb == b"PING":
                events.append(Ping())
            elif verb == b"PONG":
                events.append(Pong())
            elif verb == b"+OK":
                events.append(Ok())
            elif verb == b"-ERR":
                events.append(ServerError(rest.decode("utf-8", "replace").strip().strip("'")))
            elif verb == b"INFO":
                try:
                    options = json.loads(rest)
                except ValueError:
                    raise ProtocolError("an INFO that is not JSON") from None
                if not isinstance(options, dict):
                    raise ProtocolError("an INFO that is not a JSON object")
                events.append(Info(options))
            else:
                raise ProtocolError(f"an unknown operation {verb[:20]!r}")
            start = line_end + 2
        if start == end:
            start = end = self._end = 0
        self._start = start
        return events


def _payload_ends(buffer: bytearray, at: int) -> None:
    if buffer[at:at + 2] != CRLF:
        raise ProtocolError("a message's payload is not followed by CRLF")


def _message_line(verb: bytes, rest: bytes) -> tuple:
    """MSG <subject> <sid> [reply] <size>; HMSG <subject> <sid> [reply] <header size> <size>."""
    parts = rest.split()
    sizes = 2 if verb == b"HMSG" else 1
    if len(parts) not in (2 + sizes, 3 + sizes):
        raise ProtocolError(f"a malformed {verb.decode()} line")
    try:
        numbers = [int(p) for p in parts[-sizes:]]
        sid = int(parts[1])
    except ValueError:
        raise ProtocolError(f"a malformed {verb.decode()} line") from None
    if min(numbers) < 0 or numbers[0] > numbers[-1]:
        raise ProtocolError(f"a malformed {verb.decode()} line")
    if numbers[-1] > MAX_PAYLOAD:
        raise ProtocolError(f"a message of {numbers[-1]} bytes, over NATS's limit of {MAX_PAYLOAD}")
    try:
        subject, reply = parts[0].decode(), parts[2].decode() if len(parts) == 3 + sizes else ""
    except UnicodeDecodeError:
        raise ProtocolError(f"a {verb.decode()} line whose subject or reply is not UTF-8") from None
    header = numbers[0] if sizes == 2 else None
    return subject, sid, reply, header, numbers[-1]


def _message(parsed: tuple, body: bytearray) -> Msg:
    subject, sid, reply, header, _ = parsed
    if header is None:
        return Msg(sid, subject, reply, body)
    status_line = body[:header].split(CRLF, 1)[0].split()  # NATS/1.0 [code [description]]
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None
    return Msg(sid, subject, reply, body[header:], status)


def connect(options: dict) -> bytes:
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + CRLF


def subscribe(subject: str, sid: int) -> bytes:
    return b"SUB %s %d\r\n" % (subject.encode(), sid)


def publish(subject: str, payload: bytes | bytearray, reply: str = "") -> tuple:
    """The chunks of one PUB, for one ``writelines``: the payload is not copied."""
    if reply:
        return b"PUB %s %s %d\r\n" % (subject.encode(), reply.encode(), len(payload)), payload, CRLF
    return b"PUB %s %d\r\n" % (subject.encode(), len(payload)), payload, CRLF
