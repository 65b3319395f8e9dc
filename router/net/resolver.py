"""Where to connect for a remote domain: RFC 6120 §3.2 SRV resolution plus XEP-0368.

Both ``_xmpps-server._tcp`` (direct TLS) and ``_xmpp-server._tcp`` (STARTTLS)
are queried; their records are merged and ordered together by priority, then
weighted-random within a priority (RFC 2782). Each ``Target`` says whether it
is direct TLS and carries its addresses (A/AAAA, resolved here too so every
lookup shares one resolver and one cache). The rules (RFC 6120 §3.2, XEP-0368 §3):

* a static route from the config wins over DNS (RFC 6120 §3.2.3);
* a lone SRV record with target ``.`` means "decidedly not available": an
  ``_xmpp-server`` ``.`` stops resolution, an ``_xmpps-server`` ``.`` only
  removes direct TLS; with no usable record left there is no A/AAAA fallback;
* SRV answered (records present) -> only those targets, never the fallback;
* no SRV records at all (NXDOMAIN, NODATA, or the lookup failed) -> A/AAAA of
  the domain itself on port 5269 (RFC 6120 §3.2.2);
* answers are cached for their TTL; negative answers for ``NEGATIVE_TTL``.

DANE (RFC 7673): with ``[tls] dane`` queries carry EDNS0 with the DO bit and the
AD bit (RFC 6840 §5.7), and the AD bit of each answer is kept with it: the
validating resolver the operator runs (``[tls] nameservers``) is trusted to say
what DNSSEC proved (RFC 6698 §4.1). A ``Target`` is ``secure`` when its SRV
record and an address record were validated (RFC 7673 §3.1, §3.2); ``tlsa``
looks up ``_<port>._tcp.<target host>`` (RFC 7673 §3.3).

DNS goes through dnspython's ``dns.asyncresolver``: maintained, pure Python,
asyncio-native (no thread pool as ``getaddrinfo`` would need), and it gives
SRV records and TTLs, which ``getaddrinfo`` cannot. Static-route host names are
resolved with the system resolver instead (``/etc/hosts`` is where operators
put internal names).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver

from router.config import StaticRoute
from router.routing.limits import Refusals
from router.trust.dane import Tlsa

log = logging.getLogger("router.net.resolver")

# RFC 6120 §3.2.2: the fallback port when no SRV record exists.
DEFAULT_S2S_PORT = 5269
# How long "no such record" is remembered; short, so a newly published record
# is used soon, long enough to not re-query per stanza for a dead domain.
NEGATIVE_TTL = 60.0
# Upper bound on one lookup (all retries); the outbound connect has its own timeout.
DNS_LIFETIME = 5.0
# Entries kept before expired ones are purged (one per name and record type).
CACHE_MAX_ENTRIES = 10000
# A remote domain's DNS is the remote's to write: one answer can list thousands of SRV
# targets or addresses, and each would be looked up and connected to (a stanza would
# turn into thousands of queries and connection attempts, to addresses of the
# remote's choosing), and kept in the cache. Servers publish a handful; beyond these
# the rest is left out as the answer arrives: (the limit's name, the records kept).
RECORD_LIMITS = {
    "SRV": ("srv_records", 10),  # per service (_xmpps-server, _xmpp-server), the lowest priorities
    "AAAA": ("addresses_per_host", 4),
    "A": ("addresses_per_host", 4),
    "TLSA": ("tlsa_records", 8),  # a few, for a certificate rollover
}
# EDNS0 payload size for DNSSEC answers (the DNS Flag Day 2020 value: no IP fragmentation)
EDNS_PAYLOAD = 1232

XMPPS_SERVER = "_xmpps-server._tcp."
XMPP_SERVER = "_xmpp-server._tcp."


@dataclass(frozen=True)
class Target:
    """One place to connect: try ``addresses`` in order, TLS first if ``direct_tls``
    (SNI = the remote domain, ALPN ``xmpp-server``, XEP-0368)."""

    host: str
    port: int
    direct_tls: bool
    addresses: tuple[str, ...] = ()
    secure: bool = False  # DNSSEC validated its SRV record and an address record (RFC 7673 §3.2)


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    host: str  # "." when the service is decidedly not available
    direct_tls: bool
    secure: bool = False  # the SRV answer had the AD bit


@dataclass(frozen=True)
class TlsaAnswer:
    """The TLSA records of one target: ``records`` None when the lookup failed (RFC 7673
    §3.4: do not connect), ``secure`` when the answer had the AD bit."""

    records: tuple[Tlsa, ...] | None
    secure: bool


class ResolutionError(Exception):
    """The domain has no usable address: bounce with ``remote-server-not-found``
    (RFC 6120 §10.4.3)."""

    condition = "remote-server-not-found"


def order_records(records: Sequence[SrvRecord], rng: random.Random) -> list[SrvRecord]:
    """RFC 2782 order: ascending priority, weighted random within a priority."""
    ordered: list[SrvRecord] = []
    for priority in sorted({r.priority for r in records}):
        # zero-weight records first, as RFC 2782 asks, so they get a small chance
        pool = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight != 0)
        while pool:
            total = sum(r.weight for r in pool)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(pool):
                running += record.weight
                if running >= pick:
                    ordered.append(pool.pop(index))
                    break
    return ordered


class Resolver:
    """Resolves remote domains to ordered ``Target`` lists, with a TTL cache."""

    def __init__(
        self,
        static_routes: Mapping[str, StaticRoute] | None = None,
        dns_resolver: dns.asyncresolver.Resolver | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        lifetime: float = DNS_LIFETIME,
        limit_hit: Callable[[str], None] = lambda limit: None,
        blocklist: Sequence[str] = (),
    ):
        self.static_routes = dict(static_routes or {})
        self.dns = dns_resolver if dns_resolver is not None else dns.asyncresolver.Resolver()
        self.rng = rng or random.Random()
        self.clock = clock
        self.lifetime = lifetime
        self.limit_hit = limit_hit  # metrics.limits_hit.inc: a named limit left records out
        self.blocklist = tuple(ipaddress.ip_network(network) for network in blocklist)  # s2s.connect_blocklist
        # anyone claiming a domain makes us resolve it: each kind of line at most every 10 s
        self._blocked_refusals, self._cut_refusals = Refusals(), Refusals()
        self._cache: dict[tuple[str, str], tuple[float, list, bool]] = {}  # expiry, records, AD bit

    async def resolve(self, domain: str) -> list[Target]:
        """Ordered targets for a normalized remote domain; ResolutionError if none."""
        route = self.static_routes.get(domain)
        if route is not None:
            addresses = await self._system_addresses(route.host, route.port)
            if not addresses:
                raise ResolutionError(f"static route host {route.host} for {domain} has no address")
            return [Target(route.host, route.port, route.direct_tls, addresses)]

        xmpps, xmpp = await asyncio.gather(
            self._srv(XMPPS_SERVER + domain + ".", True), self._srv(XMPP_SERVER + domain + ".", False)
        )
        if _decidedly_unavailable(xmpp):
            raise ResolutionError(f"{domain} publishes no XMPP server service (SRV target '.')")
        answered = bool(xmpps) or bool(xmpp)
        records = [r for r in (xmpps or []) + (xmpp or []) if r.host != "."]
        if not answered and xmpp is None and (self.dns.flags or 0) & dns.flags.AD:
            # RFC 7673 §3.1: with DNSSEC a failed lookup may be a bogus answer (SERVFAIL), which an
            # attacker could cause to strip DANE: "the initiating server MUST NOT" fall back to A/AAAA
            raise ResolutionError(f"the SRV lookup for {domain} failed (DNSSEC: possibly a bogus answer); "
                                  "not falling back to its address records")
        if not answered:
            addresses, _ = await self._addresses(domain)
            if not addresses:
                raise ResolutionError(f"{domain} has no SRV record and no A/AAAA address")
            return self._allowed(domain, [Target(domain, DEFAULT_S2S_PORT, False, addresses)])
        if not records:
            raise ResolutionError(f"{domain} publishes no usable SRV target")

        ordered = order_records(records, self.rng)
        address_lists = await asyncio.gather(*(self._addresses(r.host) for r in ordered))
        targets = [
            Target(r.host, r.port, r.direct_tls, addresses, r.secure and secure)
            for r, (addresses, secure) in zip(ordered, address_lists)
            if addresses
        ]
        if not targets:
            hosts = ", ".join(sorted({r.host for r in ordered}))
            raise ResolutionError(f"no address for the SRV targets of {domain} ({hosts})")
        return self._allowed(domain, targets)

    def _allowed(self, domain: str, targets: list[Target]) -> list[Target]:
        """``targets`` without the addresses in ``s2s.connect_blocklist``; ResolutionError
        when that leaves none."""
        blocked = [a for t in targets for a in t.addresses if self._blocked(a)]
        if not blocked:
            return targets
        self.limit_hit("connect_blocklist")
        count = self._blocked_refusals.note(self.clock())
        if count:
            log.warning("%s: DNS names %s, in s2s.connect_blocklist: not connecting there (%d time(s) since the "
                        "last such line)", domain, ", ".join(blocked), count)
        kept = [replace(t, addresses=tuple(a for a in t.addresses if a not in blocked)) for t in targets]
        if not any(t.addresses for t in kept):
            raise ResolutionError(f"{domain} resolves only to addresses in s2s.connect_blocklist ({', '.join(blocked)})")
        return [t for t in kept if t.addresses]

    def _blocked(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        # an IPv6 address that carries an IPv4 one (::ffff:10.0.0.1, 6to4 2002:a00:1::) is that one too
        carried = ip.ipv4_mapped or ip.sixtofour if ip.version == 6 else None
        return any(ip in network or (carried is not None and carried in network) for network in self.blocklist)

    async def services(self, domain: str) -> dict[str, list[SrvRecord] | None]:
        """The raw SRV answers for ``domain`` by service (``check-dns`` shows them):
        records, [] for none, None when the lookup failed."""
        xmpps, xmpp = await asyncio.gather(
            self._srv(XMPPS_SERVER + domain + ".", True), self._srv(XMPP_SERVER + domain + ".", False)
        )
        return {XMPPS_SERVER.rstrip("."): xmpps, XMPP_SERVER.rstrip("."): xmpp}

    async def secure_srv_records(self, domain: str) -> list[SrvRecord]:
        """The DNSSEC-validated SRV records of both services for ``domain``, targets
        ``.`` left out: where an inbound peer's TLSA records are (RFC 7673 §3.1)."""
        answers = await self.services(domain)
        return [r for records in answers.values() for r in records or () if r.secure and r.host != "."]

    async def tlsa(self, host: str, port: int) -> TlsaAnswer:
        """The TLSA records of the target ``host``:``port`` (RFC 7673 §3.3: the SRV
        target's port and host name, ``_<port>._tcp.<host>``)."""
        rdatas, secure = await self._lookup(tlsa_name(host, port), "TLSA")
        if rdatas is None:
            return TlsaAnswer(None, False)
        return TlsaAnswer(tuple(Tlsa(rr.usage, rr.selector, rr.mtype, rr.cert) for rr in rdatas), secure)

    def forget(self, domain: str) -> int:
        """Drop the cached answers for a normalized remote domain (its SRV records, the
        addresses and TLSA records of their targets, the domain's own addresses), so the next connection
        asks DNS again; returns how many answers were dropped. For an operator who
        changed a peer's records (``python -m router ctl dns-flush``)."""
        names = {XMPPS_SERVER + domain + ".", XMPP_SERVER + domain + ".", domain + "."}
        for service in (XMPPS_SERVER, XMPP_SERVER):
            cached = self._cache.get((service + domain + ".", "SRV"))
            if cached is not None:
                names.update(_host(rr.target) + "." for rr in cached[1] if rr.target != dns.name.root)
                names.update(tlsa_name(_host(rr.target), rr.port) for rr in cached[1] if rr.target != dns.name.root)
        dropped = [key for key in self._cache if key[0] in names]
        for key in dropped:
            del self._cache[key]
        return len(dropped)

    async def _srv(self, name: str, direct_tls: bool) -> list[SrvRecord] | None:
        """SRV records, [] when there are none, None when the lookup failed."""
        rdatas, secure = await self._lookup(name, "SRV")
        if rdatas is None:
            return None
        return [
            SrvRecord(rr.priority, rr.weight, rr.port, _host(rr.target), direct_tls, secure) for rr in rdatas
        ]

    async def _addresses(self, host: str) -> tuple[tuple[str, ...], bool]:
        """AAAA then A addresses of a host name (RFC 6724 prefers IPv6), and whether
        DNSSEC validated one of the two answers (RFC 7673 §3.2)."""
        if _is_ip(host):
            return (host,), False
        name = host + "."
        (v6, v6_secure), (v4, v4_secure) = await asyncio.gather(self._lookup(name, "AAAA"), self._lookup(name, "A"))
        addresses = tuple(rr.address for rr in (v6 or []) + (v4 or []))
        return addresses, bool(v6 and v6_secure or v4 and v4_secure)

    async def _lookup(self, name: str, rdtype: str) -> tuple[list | None, bool]:
        """The records (None when the lookup failed) and whether the answer had the AD bit."""
        key = (name.lower(), rdtype)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        try:
            answer = await self.dns.resolve(name, rdtype, lifetime=self.lifetime, search=False)
            records, ttl = self._bounded(name, rdtype, list(answer)), answer.rrset.ttl
            secure = bool(answer.response.flags & dns.flags.AD)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            records, ttl, secure = [], NEGATIVE_TTL, False
        except dns.exception.DNSException:
            return None, False  # timeout, SERVFAIL, no nameserver: not cached, try again next time
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
        self._cache[key] = (now + ttl, records, secure)
        return records, secure

    def _bounded(self, name: str, rdtype: str, records: list) -> list:
        """At most `RECORD_LIMITS` of an answer: SRV records of the lowest priorities first."""
        limit, most = RECORD_LIMITS.get(rdtype, (None, len(records)))
        if len(records) <= most:
            return records
        self.limit_hit(limit)
        count = self._cut_refusals.note(self.clock())
        if count:
            log.warning("%s has %d %s records; %d are used (resolver.RECORD_LIMITS; %d answer(s) cut since the "
                        "last such line)", name.rstrip("."), len(records), rdtype, most, count)
        return sorted(records, key=lambda rr: rr.priority)[:most] if rdtype == "SRV" else records[:most]

    async def _system_addresses(self, host: str, port: int) -> tuple[str, ...]:
        if _is_ip(host):
            return (host,)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return ()
        return tuple(dict.fromkeys(info[4][0] for info in infos))


def dns_resolver(nameservers: tuple[str, ...] = (), dnssec: bool = False) -> dns.asyncresolver.Resolver:
    """A dnspython resolver asking ``nameservers`` ("ip", "ip:port", "[v6]:port"; none:
    the system's). ``dnssec``: EDNS0 with DO and the AD bit set in queries, so that a
    validating resolver reports what it validated (RFC 6840 §5.7, RFC 6698 §4.1)."""
    resolver = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*_host_port(text)) for text in nameservers]
    if dnssec:
        resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def tlsa_name(host: str, port: int) -> str:
    """RFC 6698 §3: the TLSA owner name of a TCP service at ``host``:``port``."""
    return f"_{port}._tcp.{host}."


def _host_port(text: str) -> tuple[str, int]:
    """"ip", "ip:port" or "[v6]:port" (as ``[tls] nameservers`` takes them) -> (ip, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host.rstrip("]"), int(port or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def _decidedly_unavailable(records: list[SrvRecord] | None) -> bool:
    return records is not None and len(records) == 1 and records[0].host == "."


def _host(target: dns.name.Name) -> str:
    return "." if target == dns.name.root else target.to_text(omit_final_dot=True).lower()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
