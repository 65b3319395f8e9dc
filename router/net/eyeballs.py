"""Happy Eyeballs (RFC 8305): in which order to try a peer's addresses, and a
staggered race of connection attempts over them where the first to connect wins.

It knows nothing of XMPP: the connector hands it the SRV targets' addresses,
in RFC 2782 order, and gets back one connection.

* Order (RFC 8305 §4 "interleave address families"): each group (an SRV target)
  keeps its place; within it IPv6 and IPv4 addresses alternate, IPv6 first.
* Race (RFC 8305 §5 "Connection Attempts"): one attempt starts, the next one
  ``delay`` later or as soon as an attempt fails, whichever comes first; the
  first attempt to complete wins and every other one is cancelled (its socket
  closed). Each attempt is bounded by ``timeout``.
* Held connections: an attempt's connection (TLS handshake included) is made
  with ``Held``, a protocol that reads nothing, so only the winner is ever
  handed to its real protocol (``Held.hand_over``): a loser never has one.

Neither uvloop's ``create_connection`` (it has no ``happy_eyeballs_delay``) nor
``asyncio.staggered.staggered_race`` does this: the latter is private, and in
3.11 two attempts that complete in the same loop iteration trip its assertion
and the second connection is never closed; hence this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Awaitable, Callable, Iterable, Sequence, TypeVar

Group = TypeVar("Group")
Result = TypeVar("Result")
Taken = TypeVar("Taken")

# RFC 8305 §5: "a subsequent connection MUST NOT be started within 10 milliseconds
# of the previous attempt" (the delay's lower bound, whatever the config says).
MIN_ATTEMPT_DELAY = 0.01


def interleave(addresses: Iterable[str]) -> list[str]:
    """RFC 8305 §4: IPv6 and IPv4 alternate, IPv6 first (RFC 6724 prefers it);
    each family keeps its own order. A name that is no IP address counts as IPv4."""
    v6, v4 = [], []
    for address in addresses:
        (v6 if _is_ipv6(address) else v4).append(address)
    ordered = []
    for index in range(max(len(v6), len(v4))):
        ordered += v6[index : index + 1] + v4[index : index + 1]
    return ordered


def attempt_order(groups: Iterable[tuple[Group, Sequence[str]]]) -> list[tuple[Group, str]]:
    """(group, address) pairs to try: the groups in the order given (SRV priority
    and weight, RFC 2782), each group's addresses interleaved by family."""
    return [(group, address) for group, addresses in groups for address in interleave(addresses)]


class RaceLost(Exception):
    """Every attempt failed; ``errors[i]`` is why attempt ``i`` did."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(f"{len(errors)} connection attempt(s) failed")
        self.errors = errors


async def staggered_race(
    attempts: Sequence[Callable[[], Awaitable[Result]]],
    *,
    delay: float,
    timeout: float,
    take: Callable[[Result], Taken],
    discard: Callable[[Result], None],
    failed: Callable[[int, BaseException], None] | None = None,
) -> Taken:
    """Run ``attempts`` staggered (RFC 8305 §5) and return ``take(result)`` of the
    first to complete, called in the very step it completes (no other task runs
    in between; if ``take`` raises, that attempt failed). A result that comes
    after is given to ``discard``, and the attempts still running are cancelled
    and awaited before this returns. ``failed(index, error)`` hears of each
    failure, a timeout included; RaceLost when every attempt failed."""
    loop = asyncio.get_running_loop()
    delay = max(delay, MIN_ATTEMPT_DELAY)
    errors: dict[int, BaseException] = {}
    won: list[Taken] = []  # the winner's take(), once there is one
    running: set[asyncio.Task] = set()
    ended = asyncio.Event()  # an attempt won or failed

    async def attempt(index: int) -> None:
        try:
            async with asyncio.timeout(timeout):
                result = await attempts[index]()
            if won:
                discard(result)
                return
            try:
                won.append(take(result))
            except Exception:
                discard(result)
                raise
        except Exception as exc:  # noqa: BLE001 - whatever ends one attempt lets the next one start
            errors[index] = exc
            if failed is not None:
                failed(index, exc)
        finally:
            running.discard(asyncio.current_task())
            ended.set()

    started = 0
    try:
        while not won:
            if started < len(attempts):
                running.add(loop.create_task(attempt(started)))
                started += 1
            elif not running:
                raise RaceLost([errors[index] for index in range(started)])
            try:
                async with asyncio.timeout(delay if started < len(attempts) else None):
                    await ended.wait()
            except TimeoutError:
                pass  # RFC 8305 §5 "Connection Attempt Delay" passed: the next attempt starts
            ended.clear()
    finally:
        for task in running:
            task.cancel()
    if running:
        await asyncio.wait(set(running))  # the cancelled attempts close their sockets
    return won[0]


class Held(asyncio.Protocol):
    """A connection an attempt made, read from as little as possible until it is
    handed over to its real protocol (``hand_over``) or dropped (``close``).
    uvloop starts reading a TCP transport after ``connection_made`` whatever that
    asked, so what arrives first (one read, then reading pauses) waits in
    ``early`` for the real protocol."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.ended: BaseException | None = None  # the peer closed or reset it before hand-over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.early.append(data)
        self.transport.pause_reading()

    def eof_received(self) -> None:
        self.ended = self.ended or ConnectionResetError("the peer closed the connection before it was used")

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = self.ended or exc or ConnectionResetError("the connection closed before it was used")

    def hand_over(self, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        """Make ``protocol`` the connection's owner: ``connection_made``, then what
        arrived while it was held, then reading resumes. A connection the peer
        already ended is closed instead (ConnectionError): ``protocol`` never sees it."""
        transport = self.transport
        if self.ended is not None:
            transport.abort()
            raise self.ended
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        early, self.early = self.early, []
        if not transport.is_closing():
            for data in early:
                _feed(protocol, data)
            transport.resume_reading()
        return transport

    def close(self) -> None:
        """Drop a connection that lost the race (nothing was sent on it)."""
        self.transport.abort()


async def open_held(host: str, port: int, *, ssl=None, server_hostname: str | None = None) -> Held:
    """A connection to ``host`` (an address) and ``port``, its TLS handshake done
    when ``ssl`` is given, held unread until ``Held.hand_over``."""
    transport, held = await asyncio.get_running_loop().create_connection(
        Held, host, port, ssl=ssl, server_hostname=server_hostname)
    if held.ended is not None:
        transport.abort()
        raise held.ended
    return held


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` as a read would (a BufferedProtocol fills its own buffer)."""
    if not isinstance(protocol, asyncio.BufferedProtocol):
        protocol.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:  # each pass consumes at least one byte
        buffer = memoryview(protocol.get_buffer(len(view))).cast("B")
        size = min(len(buffer), len(view))
        if not size:
            raise RuntimeError("get_buffer() returned an empty buffer")
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False
