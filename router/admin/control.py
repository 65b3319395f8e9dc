"""The relay's control socket: a Unix socket only the relay's user may use (mode
0600) that answers one JSON request per line with ``router.admin.commands``.

The relay starts it after its listeners and closes it with them; closing
removes the socket file. A socket file left by a process that is gone is
replaced; one that a live relay answers on makes the start fail.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import socket
import stat
from pathlib import Path

from router.admin.commands import COMMANDS, CommandError
from router.admin.protocol import MAX_REQUEST_BYTES, REQUEST_TIMEOUT, answer, refusal

log = logging.getLogger("router.admin")

# Every stream of this process gets the next number when it opens (Relay.stream_opened):
# a short name that stays the stream's for `ctl show` and `ctl close`.
STREAM_IDS = itertools.count(1)
# How long a relay answering on an existing socket file has to accept our probe.
PROBE_TIMEOUT = 2.0


class ControlServer:
    """The control socket of one relay process."""

    def __init__(self, relay, path: Path) -> None:
        self.relay = relay
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None  # of the socket file we made: never remove another's
        self._clients: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, relay, path: Path) -> ControlServer:
        """Serve ``relay`` on ``path``; raises OSError (with the path) when it cannot."""
        control = cls(relay, path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)  # before listen(): nobody else can connect in between
            control._inode = os.stat(path).st_ino
            control._server = await asyncio.start_unix_server(control._serve, sock=sock, limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"control socket {path}: {exc.strerror or exc}") from None
        log.info("control socket on %s (python -m router ctl --socket %s)", path, path)
        return control

    def close(self) -> None:
        """Stop accepting, end the open requests' connections, remove the socket file."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer each request line until the client closes or goes quiet."""
        self._clients.add(writer)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                except asyncio.TimeoutError:
                    break
                except ValueError:  # no newline within the limit: the rest of the line cannot be trusted
                    writer.write(refusal(f"a request is one line of at most {MAX_REQUEST_BYTES} bytes"))
                    break
                if not line:
                    break
                writer.write(self.handle(line))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def handle(self, line: bytes) -> bytes:
        """One request line -> its answer line."""
        try:
            request = json.loads(line)
        except ValueError as exc:  # not UTF-8, or not JSON
            return refusal(f"not a JSON request: {exc}")
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return refusal('a request is a JSON object with a "command" string')
        command = COMMANDS.get(request["command"])
        if command is None:
            return refusal(f"unknown command {request['command']!r} (known: {', '.join(sorted(COMMANDS))})")
        try:
            return answer(command(self.relay, request))
        except CommandError as exc:
            return refusal(str(exc))
        except Exception:  # a bug in one command must not take the control socket down
            log.exception("ctl: command %s failed", request["command"])
            return refusal(f"internal error in {request['command']} (the relay logged it)")


async def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody answers on; raise OSError if a live relay does,
    or if the path is not a socket at all (never remove an operator's file)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"control socket {path}: the path exists and is not a socket")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), PROBE_TIMEOUT)
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        log.info("control socket %s was left by a process that is gone: replacing it", path)
        return
    except asyncio.TimeoutError:
        writer = None
    except OSError as exc:
        raise OSError(exc.errno, f"control socket {path}: {exc.strerror or exc}") from None
    if writer is not None:
        writer.close()
    raise OSError(errno.EADDRINUSE, f"control socket {path}: another relay answers on it; stop that relay, "
                                    "or give this one its own [listen] control")
