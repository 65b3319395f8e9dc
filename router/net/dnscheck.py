"""``check-dns DOMAIN``: what the relay would do to reach a remote domain, shown to
an operator. The SRV records of both services (XEP-0368 direct TLS and STARTTLS),
the A/AAAA fallback when there are none, a static route if the config has one,
the targets in the order the relay would try them, and whether each address
answers: a TCP connection, then an XMPP stream header answered (STARTTLS
targets) or a TLS handshake with ALPN ``xmpp-server`` (direct TLS targets).
It uses the relay's own resolver, so what it shows is what the relay does."""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from router.net.resolver import ResolutionError, Resolver, Target
from router.wire.namespaces import SERVER_NS, STREAM_NS

PROBE_TIMEOUT = 5.0  # seconds per address: connect, then the first answer
ANSWER_BYTES = 4096  # enough of a stream header answer to see it is XMPP


async def probe(target: Target, address: str, domain: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """(answers, what happened) for one address of ``target``."""
    context = None
    if target.direct_tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # is it TLS, not is it trusted
        context.set_alpn_protocols(["xmpp-server"])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, target.port, ssl=context, server_hostname=domain if context else None),
            timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        return False, f"no connection: {exc or type(exc).__name__}"
    try:
        if context is not None:
            ssl_object = writer.get_extra_info("ssl_object")
            return True, f"TLS {ssl_object.version()}, ALPN {ssl_object.selected_alpn_protocol() or 'none'}"
        writer.write(f"<?xml version='1.0'?><stream:stream xmlns='{SERVER_NS}' xmlns:stream='{STREAM_NS}' "
                     f"to='{domain}' version='1.0'>".encode())
        try:
            answer = await asyncio.wait_for(reader.read(ANSWER_BYTES), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            return False, f"TCP connected, no XMPP answer: {exc or type(exc).__name__}"
        if b"stream" in answer and b"<" in answer:
            return True, "answers with an XMPP stream header"
        return False, f"TCP connected, not XMPP: {answer[:60]!r}"
    finally:
        writer.close()


async def report(domain: str, resolver: Resolver, say: Callable[[str], None], timeout: float = PROBE_TIMEOUT) -> bool:
    """Print what the relay would use for ``domain``; True when an address answers."""
    route = resolver.static_routes.get(domain)
    if route is not None:
        say(f"static route: {route.host}:{route.port}{' (direct TLS)' if route.direct_tls else ''} "
            f"(the config's [routes]; DNS is not asked)")
    else:
        for service, records in (await resolver.services(domain)).items():
            if records is None:
                say(f"{service}.{domain}: lookup failed")
            elif not records:
                say(f"{service}.{domain}: no record")
            for record in records or ():
                say(f"{service}.{domain}: priority {record.priority} weight {record.weight} "
                    f"port {record.port} target {record.host}")
    try:
        targets = await resolver.resolve(domain)
    except ResolutionError as exc:
        say(f"not reachable: {exc} (stanzas for it bounce with remote-server-not-found)")
        return False
    answered = False
    for number, target in enumerate(targets, 1):
        mode = "direct TLS" if target.direct_tls else "STARTTLS"
        say(f"target {number}: {target.host}:{target.port} ({mode}), addresses {', '.join(target.addresses)}"
            + (", DNSSEC-validated (DANE applies)" if target.secure else ""))
        results = await asyncio.gather(*(probe(target, a, domain, timeout) for a in target.addresses))
        for address, (ok, what) in zip(target.addresses, results):
            answered = answered or ok
            say(f"  {address}: {'ok' if ok else 'FAILED'}: {what}")
    return answered
