"""Inbound connections: admitted or refused by the [limits] connection counts.

Every inbound S2S stream is counted overall and per remote IP while it is
open, and among the unauthenticated ones until its first pair authenticates.
One over a limit gets a stream error naming the limit (``policy-violation``
for its address, ``resource-constraint`` for the relay as a whole), is counted
in ``limits_hit_total`` and logged. The overall count is kept below the
process's open-files limit: at that limit ``accept()`` would fail, and libuv
answers that by closing the new connection without telling anyone.
On a listener behind a load balancer (``listen.proxy_protocol``) a connection
from outside ``listen.proxy_trusted`` is closed at once, and the others are
counted under the address their PROXY header names, once it has arrived.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import resource

from router.routing.limits import OVERALL, Limit, Refusals, admit, release
from router.net.s2s import S2SStream
from router.net.stream import StreamHost

log = logging.getLogger("router.net.admission")

# File descriptors kept for what is not an inbound S2S stream (listeners, logs,
# components, DNS, outbound and verification connections).
FD_RESERVE = 256


class Admission:
    """The connection limits of the relay ``host``."""

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self.connections = Limit("max_connections", 0)  # maxima: configure()
        self.connections_per_ip = Limit("max_connections_per_ip", 0)
        self.pre_auth = Limit("max_pre_auth_connections", 0)
        self.untrusted_proxies = Refusals()  # connections to a PROXY listener from outside listen.proxy_trusted

    def configure(self, limits) -> None:
        self.connections.maximum = min(limits.max_connections, inbound_fd_budget())
        if self.connections.maximum < limits.max_connections:
            log.warning("limits.max_connections lowered from %d to %d: the process may open only %d files "
                        "(RLIMIT_NOFILE)", limits.max_connections, self.connections.maximum,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.connections_per_ip.maximum = limits.max_connections_per_ip
        self.pre_auth.maximum = limits.max_pre_auth_connections

    def opened(self, stream: S2SStream) -> None:
        """Count a new inbound stream, or end it with a stream error naming the limit."""
        refused = admit((self.connections, OVERALL), (self.connections_per_ip, stream.ip), (self.pre_auth, OVERALL))
        if refused is None:
            stream.admitted = True
            return
        self.host.metrics.limits_hit.inc(refused.name)
        count = refused.refusals.note(self.host.loop.time())
        if count:
            log.warning("refused %d inbound connection(s) by limits.%s = %d (last from %s)",
                        count, refused.name, refused.maximum, stream.ip)
        if refused is self.connections_per_ip:
            stream.fail("policy-violation", f"too many connections from {stream.ip} "
                        f"(limits.{refused.name} = {refused.maximum})")
        else:
            stream.fail("resource-constraint", f"the relay has too many connections "
                        f"(limits.{refused.name} = {refused.maximum})")

    def proxied(self, stream: S2SStream) -> None:
        """A connection to a listener behind a load balancer: closed at once unless it
        comes from ``listen.proxy_trusted`` (proxy-protocol.txt §2: "only trusted proxies
        are allowed to use this protocol", else anyone could claim any address)."""
        if _trusted(stream.ip, self.host.config.listen.proxy_trusted):
            return
        self.host.metrics.limits_hit.inc("proxy_trusted")
        count = self.untrusted_proxies.note(self.host.loop.time())
        if count:
            log.warning("refused %d connection(s) to a PROXY protocol listener from outside listen.proxy_trusted "
                        "(last from %s)", count, stream.ip)
        stream.close_transport()  # nothing XMPP was said: TCP's close is the answer

    def authenticated(self, stream: S2SStream) -> None:
        """The first pair is authenticated: the stream no longer counts as pre-auth."""
        if stream.admitted:
            self.pre_auth.give(OVERALL)

    def closed(self, stream: S2SStream) -> None:
        if stream.admitted:
            release((self.connections, OVERALL), (self.connections_per_ip, stream.ip))
            if not stream.authenticated:
                self.pre_auth.give(OVERALL)


def _trusted(ip: str, networks: tuple[str, ...]) -> bool:
    """Whether ``ip`` is in one of ``networks`` (listen.proxy_trusted)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address  # a dual-stack listener's IPv4 peer
    return any(address in network for network in _networks(networks))


@functools.lru_cache(maxsize=8)
def _networks(networks: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(network) for network in networks)


def inbound_fd_budget() -> int:
    """Inbound streams the file-descriptor limit leaves room for (``FD_RESERVE``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - FD_RESERVE)


def raise_fd_limit() -> None:
    """Let the process use every file descriptor the system allows it (the soft
    limit is often 1024, the hard one much higher), as ejabberd and Prosody
    packages do; limits.max_connections then bounds the relay's own use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return
        log.info("open-files limit raised from %d to %d", soft, hard)
