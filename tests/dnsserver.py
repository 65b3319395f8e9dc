"""A real UDP DNS server on 127.0.0.1 for tests: answers from a dict, sets the AD bit on
the answers for names the test calls secure, as a validating resolver does for a
DNSSEC-signed zone (RFC 4035 §3.2.3), and answers SERVFAIL for names it is told to fail
(what a validating resolver answers for a bogus one)."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable

import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import uvloop

from router.net.resolver import Resolver


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."


class ZoneServer(asyncio.DatagramProtocol):
    """Answers from a dict {(name, type): [rdata text]}; NXDOMAIN for unknown names.
    ``secure``: names whose answers carry the AD bit (True: every name); ``fail``: names
    answered with SERVFAIL."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], ttl: int = 300,
                 secure: bool | Iterable[str] = False, fail: Iterable[str] = ()):
        self.zone = {(_absolute(name), rdtype): rdatas for (name, rdtype), rdatas in zone.items()}
        self.ttl = ttl
        self.secure = secure if isinstance(secure, bool) else {_absolute(name) for name in secure}
        self.fail = {_absolute(name) for name in fail}
        self.queries: Counter[tuple[str, str]] = Counter()
        self.query_flags: list[tuple[int, int]] = []  # (header flags, EDNS flags) of every query, in order
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(name, rdtype)] += 1
        self.query_flags.append((query.flags, query.ednsflags))
        response = dns.message.make_response(query)
        if name in self.fail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in self.zone:
            response.answer.append(dns.rrset.from_text(name, self.ttl, "IN", rdtype, *self.zone[(name, rdtype)]))
        elif not any(known == name for known, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if self.secure is True or (self.secure and name in self.secure):
            response.flags |= dns.flags.AD
        self.transport.sendto(response.to_wire(), addr)


@asynccontextmanager
async def zone_server(zone, ttl: int = 300, secure: bool | Iterable[str] = False,
                      fail: Iterable[str] = ()) -> AsyncIterator[ZoneServer]:
    """A `ZoneServer` listening on a free UDP port of 127.0.0.1; stopped on exit."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(lambda: ZoneServer(zone, ttl, secure, fail),
                                                            local_addr=("127.0.0.1", 0))
    try:
        yield server
    finally:
        transport.close()


def run_with_dns(zone, scenario, ttl=300, secure: bool | Iterable[str] = False, fail: Iterable[str] = ()):
    """Start the zone server, hand `scenario` a resolver factory and the server, stop it."""

    async def main():
        async with zone_server(zone, ttl, secure, fail) as server:
            dns_resolver = dns.asyncresolver.Resolver(configure=False)
            dns_resolver.nameservers = ["127.0.0.1"]
            dns_resolver.port = server.port

            def make(**kwargs):
                return Resolver(dns_resolver=dns_resolver, lifetime=2.0, **kwargs)

            return await scenario(make, server)

    return uvloop.run(main())
