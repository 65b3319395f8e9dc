"""The control socket's commands: what each one reads of the relay or does to it,
through the relay's public parts (its streams, route table, resolver and policy).

Each command takes the relay and the request (a dict), returns a JSON-ready
result, or raises ``CommandError`` with the reason the request is refused.
Operator actions are logged at info, starting with ``ctl:``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

from router.admin.streams import counters, describe, direction, domains
from router.net.s2s import S2SStream
from router.net.stream import XmlStream
from router.trust.policy import Policy, federation_allowed
from router.wire.errors import STREAM_CONDITIONS
from router.wire.jid import normalize_domain

log = logging.getLogger("router.admin")

CLOSED_BY_OPERATOR = "closed by the relay's operator"


class CommandError(Exception):
    """A request the relay refuses; the text is the answer's ``error``."""


# ---------------------------------------------------------------- reading requests
def _argument(request: dict, name: str, kind: type) -> Any:
    value = request.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # True is an int
        raise CommandError(f"{request['command']} needs {name!r} ({kind.__name__})")
    return value


def _domain(request: dict) -> str:
    value = _argument(request, "domain", str)
    try:
        return normalize_domain(value)
    except ValueError as exc:
        raise CommandError(f"{value!r} is not a domain: {exc}") from None


def _pattern(request: dict) -> str:
    """A deny entry as ``policy.deny`` takes it: a domain or ``*.domain``, normalized."""
    value = _argument(request, "pattern", str)
    try:
        return Policy(deny=(value,)).deny[0]
    except ValueError as exc:
        raise CommandError(f"{value!r} is not a domain or *.domain: {exc}") from None


def _stream(relay, request: dict) -> XmlStream:
    ident = _argument(request, "id", int)
    stream = next((s for s in relay.streams if s.ctl_id == ident), None)
    if stream is None:
        raise CommandError(f"no stream {ident} (closed, or never opened: see `ctl streams`)")
    return stream


# ---------------------------------------------------------------- listing
def totals(relay) -> dict[str, Any]:
    """Relay-wide counts and counters (the metrics' own figures)."""
    metrics = relay.metrics
    s2s = [stream for stream in relay.streams if isinstance(stream, S2SStream)]
    return {
        "streams": len(relay.streams),
        "s2s_in": sum(not stream.outbound for stream in s2s),
        "s2s_out": sum(stream.outbound for stream in s2s),
        "components": len(relay.streams) - len(s2s),
        "stanzas_routed": _sum(metrics.stanzas_routed),
        "stanzas_bounced": _sum(metrics.stanzas_bounced),
        "bytes_in": _sum(metrics.bytes_received),
        "bytes_out": _sum(metrics.bytes_sent),
        "queued_stanzas": sum(len(queue.items) for queue in relay.table.pending.values()),
    }


def _sum(counter) -> float:
    return sum(value for _, value in counter.samples())


def _by_id(relay) -> list[XmlStream]:
    return sorted(relay.streams, key=lambda stream: stream.ctl_id)


def streams(relay, request: dict) -> dict[str, Any]:
    now = relay.loop.time()
    return {"worker": relay.worker, "time": now, "totals": totals(relay),
            "streams": [describe(stream, now) for stream in _by_id(relay)]}


def show(relay, request: dict) -> dict[str, Any]:
    return describe(_stream(relay, request), relay.loop.time())


def counters_of_all(relay, request: dict) -> dict[str, Any]:
    """For ``ctl top``: the counters only, cheap enough to ask every second."""
    return {"worker": relay.worker, "time": relay.loop.time(), "totals": totals(relay),
            "streams": [counters(stream) for stream in relay.streams]}


def queues(relay, request: dict) -> list[dict[str, Any]]:
    """Per remote domain: stanzas waiting for a stream (per pair), and the
    connection failures that make the next attempt wait."""
    now = relay.loop.time()
    found: dict[str, dict[str, Any]] = {}

    def entry(domain: str) -> dict[str, Any]:
        return found.setdefault(domain, {"domain": domain, "queued": 0, "pairs": [], "failures": 0, "retry_in": 0.0})

    for pair, queue in relay.table.pending.items():
        waiting = entry(pair.remote)
        oldest = now - queue.items[0].since if queue.items else 0.0
        waiting["pairs"].append({"local": pair.local, "queued": len(queue.items), "oldest": round(oldest, 3)})
        waiting["queued"] += len(queue.items)
    for domain, backoff in relay.table.backoff.items():
        failing = entry(domain)
        failing["failures"], failing["retry_in"] = backoff.failures, round(backoff.wait(now), 3)
    return sorted(found.values(), key=lambda waiting: waiting["domain"])


# ---------------------------------------------------------------- acting
def close(relay, request: dict) -> dict[str, Any]:
    """Close one stream (``id``) or every stream of a ``domain`` (a remote domain of an
    S2S stream, a component's domain), with a stream error when ``condition``."""
    condition = request.get("condition")
    if condition is not None and condition not in STREAM_CONDITIONS:
        raise CommandError(f"{condition!r} is not a stream error condition (RFC 6120 §4.9.3: "
                           f"{', '.join(sorted(STREAM_CONDITIONS))})")
    text = request.get("text") if isinstance(request.get("text"), str) else None
    if condition is not None and text is None:
        text = CLOSED_BY_OPERATOR
    if "id" in request:
        stream = _stream(relay, request)
        if stream.closing:
            raise CommandError(f"stream {stream.ctl_id} is already closing")
        chosen = [stream]
    elif "domain" in request:
        domain = _domain(request)
        chosen = [s for s in _by_id(relay) if not s.closing and domain in _domains_served_or_reached(s)]
    else:
        raise CommandError("close needs 'id' or 'domain'")
    for stream in chosen:
        _close(stream, condition, text)
    return {"closed": [stream.ctl_id for stream in chosen]}


def _domains_served_or_reached(stream: XmlStream) -> list[str]:
    """The remote domains of an S2S stream, the domain of a component."""
    local, remote = domains(stream)
    return remote if isinstance(stream, S2SStream) else local


def _close(stream: XmlStream, condition: str | None, text: str | None) -> None:
    local, remote = domains(stream)
    log.info("ctl: closed stream %d (%s %s remote=%s local=%s peer=%s) with %s", stream.ctl_id, stream.kind,
             direction(stream), ",".join(remote) or "-", ",".join(local) or "-", stream.peer,
             f"<{condition}/>" if condition else "no stream error")
    stream.close_gracefully(condition, text)


def dns_flush(relay, request: dict) -> dict[str, Any]:
    domain = _domain(request)
    dropped = relay.resolver.forget(domain)
    log.info("ctl: DNS cache flushed for %s (%d cached answer(s) dropped)", domain, dropped)
    return {"domain": domain, "dropped": dropped}


def deny_add(relay, request: dict) -> dict[str, Any]:
    """Refuse new streams and new pairs from ``pattern`` as a ``policy.deny`` entry
    does, until the next reload; with ``close``, also close the open streams it
    now refuses, with ``<policy-violation/>``."""
    pattern = _pattern(request)
    policy = relay.config.policy
    if pattern in policy.deny:
        raise CommandError(f"{pattern} is already denied (deny: {', '.join(policy.deny)})")
    use_policy(relay, replace(policy, deny=(*policy.deny, pattern)))
    log.info("ctl: deny %s added: new streams and pairs from it are refused until the next reload or restart",
             pattern)
    closed = []
    if request.get("close") is True:
        only = Policy(deny=(pattern,))
        for stream in _by_id(relay):
            if not isinstance(stream, S2SStream) or stream.closing:
                continue
            for remote in domains(stream)[1]:
                decision = federation_allowed(only, remote)
                if not decision:
                    _close(stream, decision.condition, decision.text)
                    closed.append(stream.ctl_id)
                    break
    return {"deny": list(relay.config.policy.deny), "closed": closed}


def deny_remove(relay, request: dict) -> dict[str, Any]:
    """Drop a deny entry (one added at runtime or one of the configuration) until the next reload."""
    pattern = _pattern(request)
    policy = relay.config.policy
    if pattern not in policy.deny:
        raise CommandError(f"{pattern} is not a deny entry (deny: {', '.join(policy.deny) or 'none'})")
    use_policy(relay, replace(policy, deny=tuple(entry for entry in policy.deny if entry != pattern)))
    log.info("ctl: deny %s removed until the next reload or restart", pattern)
    return {"deny": list(relay.config.policy.deny)}


def use_policy(relay, policy: Policy) -> None:
    """Judge new streams by ``policy`` as a reload would (the next reload puts the
    configured one back), and the open streams' further negotiations too: a pair
    asked for on a stream that is already up is refused like one on a new stream."""
    shared = relay.session_config
    relay.config = replace(relay.config, policy=policy)
    relay.session_config = replace(shared, policy=policy)
    for stream in relay.streams:
        if isinstance(stream, S2SStream) and stream.session.config is shared:
            stream.session.config = relay.session_config


COMMANDS: dict[str, Callable[[Any, dict], Any]] = {
    "streams": streams,
    "show": show,
    "counters": counters_of_all,
    "queues": queues,
    "close": close,
    "dns-flush": dns_flush,
    "deny-add": deny_add,
    "deny-remove": deny_remove,
}
