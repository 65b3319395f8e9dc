"""Why the relay joins the chunks it writes to a TLS stream: uvloop's SSL transport
encrypts every chunk given to ``writelines`` with an ``SSL_write`` of its own, as TLS
records of its own, where a plain transport hands the same list to one ``writev``.
One process (pinned to one CPU) writes 200,000 stanzas of the load generator's size
mix to itself over TLS on loopback, ``PER`` stanzas per event-loop iteration, as
``writelines(chunks)`` and as ``write(b"".join(chunks))``; it prints the process's
CPU per stanza, both ends of the connection included.

    python -m bench.tlswrites --per 1,5,20,100
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
import time

import uvloop

from router.trust import pki

COUNT = 200_000
HOST = "127.0.0.1"


class Drain(asyncio.BufferedProtocol):
    """Reads everything; ``done`` once ``expected`` bytes came."""

    def __init__(self, expected: int) -> None:
        self.buffer = bytearray(65536)
        self.received, self.expected = 0, expected
        self.done = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)


async def cpu_per_stanza(joined: bool, per: int, server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    loop = asyncio.get_running_loop()
    chunks = [memoryview(b"x" * (2000 if i % 10 == 9 else 200)) for i in range(per)]  # 90% 200 B, 10% 2000 B
    rounds = COUNT // per
    drain = Drain(rounds * sum(len(c) for c in chunks))
    listener = await loop.create_server(lambda: drain, HOST, 0, ssl=server)
    transport, _ = await loop.create_connection(asyncio.Protocol, HOST, listener.sockets[0].getsockname()[1],
                                                ssl=client, server_hostname="bench.test")
    start = time.process_time()
    for _ in range(rounds):
        if joined:
            transport.write(b"".join(chunks))
        else:
            transport.writelines(chunks)
        await asyncio.sleep(0)
    await drain.done
    spent = time.process_time() - start
    transport.close()
    listener.close()
    return spent * 1e6 / (rounds * per)


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = pki.ensure_self_signed(tempfile.mkdtemp(prefix="bench-tlswrites-"), "bench.test")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per", default="1,5,20,100", help="stanzas per event-loop iteration, comma-separated")
    opts = p.parse_args(argv)
    uvloop.install()
    server, client = contexts()
    for per in (int(n) for n in opts.per.split(",")):
        plain, joined = (asyncio.run(cpu_per_stanza(j, per, server, client)) for j in (False, True))
        print(f"{per:4d} stanzas per write: writelines {plain:.2f} µs, joined {joined:.2f} µs CPU per stanza "
              f"({plain / joined:.1f}x)")


if __name__ == "__main__":
    main()
