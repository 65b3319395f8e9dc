"""Happy Eyeballs (RFC 8305, router.net.eyeballs): the order of attempts, and the
staggered race with real sockets on loopback: a stalled address is overtaken,
a refused one hands over at once, losers are closed, only the winner is handed
to its protocol.

A stalled address is a listener with a full accept queue (``listen(0)``, one
connection that is never accepted): Linux then drops further SYNs, so a connect
to it neither succeeds nor fails. Whether a stalled attempt's socket is gone is
read from the kernel's table of connecting sockets (SYN-SENT in /proc/net/tcp*).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from contextlib import contextmanager

import pytest
import uvloop

from router.net import eyeballs
from router.trust.pki import make_ca, make_leaf

BOUND = 20.0  # no scenario may take longer (every timeout below is far shorter or far longer)
LONG = 60.0  # a delay or timeout that, if waited for, would fail the test by BOUND


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, BOUND)

    return uvloop.run(bounded())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# a machine (or container) may have IPv6 turned off: the ::1 tests say so instead of failing
needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


@contextmanager
def stalled_listener(host: str):
    """A port on ``host`` where connect() hangs: its accept queue is full."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname()[:2], timeout=5)
    try:
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (connect() is refused)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def connecting_to(port: int) -> int:
    """Sockets of this host still in SYN-SENT towards ``port`` (any loopback address)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "02" and int(fields[2].rpartition(":")[2], 16) == port:
                    count += 1
    return count


class Accepting:
    """A listener keeping every connection it accepts, to see when the client closes it."""

    def __init__(self) -> None:
        self.connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.arrived = asyncio.Event()

    async def start(self, host: str = "127.0.0.1", ssl_context=None, *, handshake: bool = True) -> int:
        if ssl_context is not None and not handshake:
            ssl_context = None  # accepts TCP, reads the ClientHello, never answers it
        self.server = await asyncio.start_server(self._accept, host, 0, ssl=ssl_context)
        return self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer) -> None:
        self.connections.append((reader, writer))
        self.arrived.set()

    async def closed_by_client(self, index: int) -> bool:
        """Whether the client closed connection ``index`` (EOF or reset) within 10 s."""
        try:
            await asyncio.wait_for(self.connections[index][0].read(), 10)  # returns at EOF only
        except (ConnectionError, ssl.SSLError):
            pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        for _, writer in self.connections:
            writer.transport.abort()
        self.server.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(server context, client context) for a test CA and ``srv.test``."""
    directory = tmp_path_factory.mktemp("eyeballs-pki")
    ca = make_ca("eyeballs test CA")
    ca_path, _ = ca.write(directory, "ca")
    cert, key = make_leaf(ca, "srv.test", dns_ids=["srv.test"]).write(directory, "srv")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(ca_path))


def opener(host: str, port: int, **kwargs):
    return lambda: eyeballs.open_held(host, port, **kwargs)


def take_transport(held: eyeballs.Held):
    """The winner, handed to a plain protocol that reads and ignores what comes."""
    return held.hand_over(asyncio.Protocol())


def drop(held: eyeballs.Held) -> None:
    held.close()


# ---------------------------------------------------------------------- order

def test_families_alternate_ipv6_first_each_in_its_own_order():
    addresses = ("192.0.2.1", "192.0.2.2", "2001:db8::1", "192.0.2.3", "2001:db8::2")
    assert eyeballs.interleave(addresses) == ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "192.0.2.3"]
    assert eyeballs.interleave(("::1", "::2", "127.0.0.1")) == ["::1", "127.0.0.1", "::2"]
    assert eyeballs.interleave(("127.0.0.1", "peer.example")) == ["127.0.0.1", "peer.example"]


def test_targets_keep_their_srv_order_and_each_is_interleaved():
    groups = [("first", ("192.0.2.1", "2001:db8::1", "192.0.2.2")), ("second", ("2001:db8::9",)),
              ("third", ("192.0.2.7", "2001:db8::7"))]
    assert eyeballs.attempt_order(groups) == [
        ("first", "2001:db8::1"), ("first", "192.0.2.1"), ("first", "192.0.2.2"),
        ("second", "2001:db8::9"),
        ("third", "2001:db8::7"), ("third", "192.0.2.7"),
    ]


# ---------------------------------------------------------------------- race

@needs_ipv6
def test_a_stalled_ipv6_address_is_overtaken_and_its_attempt_cancelled():
    """The first address never answers: the next one starts after the delay (not
    after the attempt's own timeout, LONG) and wins; the stalled connect is undone."""
    async def scenario():
        good = Accepting()
        port = await good.start()
        try:
            with stalled_listener("::1") as stalled:
                transport = await eyeballs.staggered_race(
                    [opener("::1", stalled), opener("127.0.0.1", port)], delay=0.1, timeout=LONG,
                    take=take_transport, discard=drop)
                left_connecting = connecting_to(stalled)
            assert transport.get_extra_info("peername")[1] == port
            assert len(good.connections) == 1
            transport.abort()
            return left_connecting
        finally:
            good.close()

    assert run(scenario()) == 0


def test_a_refused_address_starts_the_next_attempt_at_once():
    """With a delay far past the test's bound, only the refusal can start attempt 2."""
    async def scenario():
        good = Accepting()
        port = await good.start()
        failures = []
        try:
            transport = await eyeballs.staggered_race(
                [opener("127.0.0.1", closed_port()), opener("127.0.0.1", port)], delay=LONG, timeout=LONG,
                take=take_transport, discard=drop, failed=lambda i, exc: failures.append((i, type(exc))))
            transport.abort()
            return failures
        finally:
            good.close()

    assert run(scenario()) == [(0, ConnectionRefusedError)]


def test_tls_handshake_is_part_of_the_attempt_and_the_losing_connection_is_closed(tls):
    """A TLS target that takes TCP but never answers the handshake loses to the next
    one, whose handshake completes; the loser's TCP connection is closed."""
    server_context, client_context = tls

    async def scenario():
        silent, good = Accepting(), Accepting()
        silent_port = await silent.start(ssl_context=server_context, handshake=False)
        good_port = await good.start(ssl_context=server_context)
        try:
            transport = await eyeballs.staggered_race(
                [opener("127.0.0.1", port, ssl=client_context, server_hostname="srv.test")
                 for port in (silent_port, good_port)],
                delay=0.1, timeout=LONG, take=take_transport, discard=drop)
            secured = transport.get_extra_info("ssl_object") is not None
            winner = transport.get_extra_info("peername")[1]
            loser_closed = await silent.closed_by_client(0)
            transport.abort()
            return secured, winner == good_port, loser_closed
        finally:
            silent.close()
            good.close()

    assert run(scenario()) == (True, True, True)


@needs_ipv6
def test_when_every_attempt_fails_each_error_is_reported_in_attempt_order(tls):
    server_context, client_context = tls

    async def scenario():
        silent = Accepting()
        silent_port = await silent.start(ssl_context=server_context, handshake=False)
        try:
            with stalled_listener("127.0.0.1") as stalled:
                with pytest.raises(eyeballs.RaceLost) as lost:
                    await eyeballs.staggered_race(
                        [opener("::1", closed_port("::1")), opener("127.0.0.1", stalled),
                         opener("127.0.0.1", silent_port, ssl=client_context, server_hostname="srv.test")],
                        delay=0.05, timeout=0.5, take=take_transport, discard=drop)
                left_connecting = connecting_to(stalled)
            return [type(error) for error in lost.value.errors], left_connecting, await silent.closed_by_client(0)
        finally:
            silent.close()

    kinds, left_connecting, tls_closed = run(scenario())
    assert kinds == [ConnectionRefusedError, TimeoutError, TimeoutError]
    assert left_connecting == 0 and tls_closed


def test_a_connection_completing_after_the_winner_is_closed_not_kept():
    """Two attempts finish in the same loop iteration: the first is taken, the
    second goes to ``discard`` and its connection is closed."""
    async def scenario():
        listener = Accepting()
        port = await listener.start()
        gate = asyncio.get_running_loop().create_future()
        taken, discarded = [], []

        def attempt():
            async def connect_then_wait():
                held = await eyeballs.open_held("127.0.0.1", port)
                await gate
                return held
            return connect_then_wait

        async def open_gate_when_both_connected():
            while len(listener.connections) < 2:  # bounded by the scenario's BOUND
                listener.arrived.clear()
                await listener.arrived.wait()
            gate.set_result(None)

        opening = asyncio.ensure_future(open_gate_when_both_connected())
        try:
            winner = await eyeballs.staggered_race(
                [attempt(), attempt()], delay=0.01, timeout=LONG,
                take=lambda held: taken.append(held) or take_transport(held),
                discard=lambda held: (discarded.append(held), held.close()))
            await opening
            winner.write(b"still here")
            by_port = {writer.get_extra_info("peername")[1]: i for i, (_, writer) in enumerate(listener.connections)}
            kept = by_port.pop(winner.get_extra_info("sockname")[1])
            got = await asyncio.wait_for(listener.connections[kept][0].readexactly(10), 10)
            closed = [await listener.closed_by_client(i) for i in by_port.values()]
            winner.abort()
            return len(taken), len(discarded), got, closed
        finally:
            listener.close()

    assert run(scenario()) == (1, 1, b"still here", [True])


# ---------------------------------------------------------------------- hand-over

class Collecting(asyncio.BufferedProtocol):
    """A BufferedProtocol (as S2SStream is) that keeps what it reads."""

    def __init__(self) -> None:
        self.buffer = bytearray(4)  # small: early data must span several get_buffer() calls
        self.received = bytearray()
        self.made = False
        self.more = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.made = True
        transport.write(b"hello")

    def get_buffer(self, sizehint: int):
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]
        self.more.set()

    def connection_lost(self, exc) -> None:
        self.more.set()


@needs_ipv6
def test_what_arrived_while_held_reaches_the_real_protocol_first():
    async def scenario():
        async def speak_first(reader, writer):
            writer.write(b"early bytes;")
            await reader.readexactly(5)
            writer.write(b"answer")
            await reader.read()
            writer.close()

        server = await asyncio.start_server(speak_first, "::1", 0)
        try:
            held = await eyeballs.open_held("::1", server.sockets[0].getsockname()[1])
            for _ in range(100):  # the early bytes reach the held connection (bounded: 10 s)
                if held.early:
                    break
                await asyncio.sleep(0.1)
            protocol = Collecting()
            transport = held.hand_over(protocol)
            for _ in range(100):
                if protocol.received.endswith(b"answer"):
                    break
                protocol.more.clear()
                await asyncio.wait_for(protocol.more.wait(), 10)
            transport.abort()
            return bytes(protocol.received)
        finally:
            server.close()

    assert run(scenario()) == b"early bytes;answer"


def test_a_held_connection_the_peer_ended_is_never_handed_over():
    async def scenario():
        async def hang_up(reader, writer):
            writer.transport.abort()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        protocol = Collecting()
        try:
            try:
                held = await eyeballs.open_held("127.0.0.1", server.sockets[0].getsockname()[1])
            except ConnectionError:
                return protocol.made, "refused by open_held"
            for _ in range(100):  # bounded: 10 s
                if held.ended is not None:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(ConnectionError):
                held.hand_over(protocol)
            return protocol.made, "refused by hand_over"
        finally:
            server.close()

    made, _ = run(scenario())
    assert not made
