"""Byte templates and dialback keys of the simulated remote servers.

Everything a stream sends in steady state is pre-built once per stream, so the
send loop only formats the stanza id (stream, sequence, send time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from ._fastload import StanzaTemplate

STREAM_NS = "http://etherx.jabber.org/streams"
DIALBACK_NS = "jabber:server:dialback"
SERVER_NS = "jabber:server"

LOAD_SUFFIX = "load.test"
SENDER_NODE = "u"
SENDER_RESOURCE = "r"
TARGET_NODE = "echo"


def load_domain(index: int) -> str:
    """Domain of simulated server `index` (0-based): g0001.load.test, ..."""
    return f"g{index + 1:04d}.{LOAD_SUFFIX}"


def domain_index(domain: str) -> int | None:
    """Inverse of `load_domain`, None for any other domain."""
    head, _, tail = domain.partition(".")
    if tail != LOAD_SUFFIX or len(head) < 2 or head[0] != "g" or not head[1:].isdigit():
        return None
    return int(head[1:]) - 1


def dialback_key(secret: str, receiving: str, originating: str, stream_id: str) -> str:
    """XEP-0185: HMAC-SHA256 keyed with hex(SHA-256(secret)), lower-case hex output."""
    hashed = hashlib.sha256(secret.encode()).hexdigest().encode()
    message = f"{receiving} {originating} {stream_id}".encode()
    return hmac.new(hashed, message, hashlib.sha256).hexdigest()


def initial_header(sender: str, target: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
        f"xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='{target}' from='{sender}' "
        "xml:lang='en' version='1.0'>"
    ).encode()


def response_header(local: str, remote: str | None, stream_id: str) -> bytes:
    to = f" to='{remote}'" if remote else ""
    return (
        "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
        f"xmlns='jabber:server' xmlns:db='jabber:server:dialback' id='{stream_id}' from='{local}'{to} "
        "xml:lang='en' version='1.0'>"
    ).encode()


STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
BIDI = b"<bidi xmlns='urn:xmpp:bidi'/>"
SASL_SUCCESS = b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
STREAM_END = b"</stream:stream>"


def sasl_external(sender: str) -> bytes:
    authzid = base64.b64encode(sender.encode()).decode()
    return f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>{authzid}</auth>".encode()


def db_result(sender: str, target: str, key: str) -> bytes:
    return f"<db:result from='{sender}' to='{target}'>{key}</db:result>".encode()


def db_result_type(sender: str, target: str, kind: str) -> bytes:
    return f"<db:result from='{sender}' to='{target}' type='{kind}'/>".encode()


def db_verify_answer(local: str, remote: str, stream_id: str, kind: str) -> bytes:
    return f"<db:verify from='{local}' to='{remote}' id='{stream_id}' type='{kind}'/>".encode()


def listener_features(tls_available: bool, tls_done: bool, sasl_done: bool) -> bytes:
    """What the simulated servers offer the target on connections it opens to them."""
    parts = []
    if tls_available and not tls_done:
        parts.append(STARTTLS.decode())
    if tls_done and not sasl_done:
        parts.append("<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms>")
    parts.append("<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>")
    return f"<stream:features>{''.join(parts)}</stream:features>".encode()


def parse_size_mix(text: str) -> list[tuple[int, float]]:
    """'200:0.7,1000:0.2,10000:0.1' -> [(200, 0.7), ...] (stanza bytes, weight)."""
    mix = []
    for part in text.split(","):
        size, _, weight = part.partition(":")
        mix.append((int(size), float(weight or 1)))
    if not mix or any(size < 150 or weight <= 0 for size, weight in mix):
        raise ValueError(f"bad stanza size mix {text!r}: sizes must be >= 150 bytes, weights > 0")
    return mix


SIZE_CYCLE = 100  # stanza sizes repeat with this period, in the mix's proportions


def size_cycle(mix: list[tuple[int, float]]) -> list[int]:
    """A deterministic, interleaved sequence of SIZE_CYCLE sizes in the mix's proportions."""
    total = sum(w for _, w in mix)
    credit = [0.0] * len(mix)
    cycle = []
    for _ in range(SIZE_CYCLE):
        for i, (_, w) in enumerate(mix):
            credit[i] += w / total
        best = max(range(len(mix)), key=credit.__getitem__)
        credit[best] -= 1
        cycle.append(mix[best][0])
    return cycle


def stanza_template(index: int, target_domain: str, cycle: list[int]) -> StanzaTemplate:
    """The message stanzas of simulated stream ``index``, in the sizes of ``cycle``, ready to format.

    The id is `<stream>.<seq>.<sent_us>`: the echo carries it back, so the
    receiver recovers which stream sent it, in which order, and when.
    """
    head = (
        f"<message from='{SENDER_NODE}@{load_domain(index)}/{SENDER_RESOURCE}' to='{TARGET_NODE}@{target_domain}' "
        f"type='normal' id='{index}."
    ).encode()
    tails = {}
    for size in set(cycle):
        fixed = len(head) + len("123456.1234567890'><body></body></message>")
        pad = max(1, size - fixed)
        tails[size] = b"'><body>" + b"x" * pad + b"</body></message>"
    return StanzaTemplate(head, [tails[size] for size in cycle])
