"""``<stream:features/>`` with XEP-0192 required flags: writing ours, reading the peer's.

XEP-0192 (obsolete, but part of this project's brief) puts ``<required/>`` in
every feature whose negotiation is mandatory at that stage, so an initiator
knows when it may send stanzas: no required feature left (and nothing it
still wants) means go. RFC 6120 only defines the flag for ``<starttls/>``;
`SessionConfig.required_flags` = False keeps that one and drops the others
for peers that choke on unknown children.

Each feature module (tls, sasl, dialback, bidi, limits, sm) offers at most one `Offer`
per stage; this module only renders and parses the container, and imports
no other module of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from lxml import etree

from router.wire.namespaces import BIDI_FEATURE_NS, DIALBACK_FEATURE_NS, SASL_NS, SM_NS, STREAM_LIMITS_NS, TLS_NS
from router.wire.xml import child

# Announced limits above this are no limit at all (and would not fit a C size on the hot path).
MAX_ANNOUNCED_LIMIT = 2**31 - 1


MIN_MAX_BYTES = 10000  # RFC 6120 §13.12: no stanza size limit is below this


class StreamLimits(NamedTuple):
    """XEP-0478 ``<limits/>``: what the announcing receiver accepts; 0 where nothing (valid) was said."""

    max_bytes: int = 0  # "the maximum size of any first-level stream elements (including stanzas)"
    idle_seconds: int = 0  # "seconds without any traffic from the initiating entity" before it acts



@dataclass(frozen=True)
class Offer:
    """One feature child: ``<name xmlns=ns>children[<required/>]</name>``."""

    name: str
    ns: str
    children: str = ""
    required: bool = False


def render(offers: list[Offer], required_flags: bool) -> bytes:
    """Our ``<stream:features>`` element (XEP-0170 order is the order of `offers`)."""
    parts = []
    for offer in offers:
        inner = offer.children
        if offer.required and (required_flags or offer.ns == TLS_NS):
            inner += "<required/>"
        parts.append(f"<{offer.name} xmlns='{offer.ns}'>{inner}</{offer.name}>" if inner else f"<{offer.name} xmlns='{offer.ns}'/>")
    return ("<stream:features>" + "".join(parts) + "</stream:features>").encode() if parts else b"<stream:features/>"


@dataclass(frozen=True)
class Advertised:
    """What a peer's features element offers, as the initiator needs it."""

    starttls: bool = False
    starttls_required: bool = False
    mechanisms: tuple[str, ...] = ()
    dialback: bool = False
    dialback_errors: bool = False
    bidi: bool = False
    sm: bool = False  # XEP-0198 stream management (urn:xmpp:sm:3)
    required: frozenset[str] = field(default_factory=frozenset)  # "{ns}name" of features flagged required
    limits: StreamLimits = StreamLimits()  # XEP-0478: what the peer accepts on this stream

    @property
    def empty(self) -> bool:
        return not (self.starttls or self.mechanisms or self.dialback or self.bidi or self.required)


def parse(features: etree._Element) -> Advertised:
    """Read a peer's features. Unknown children are ignored unless flagged required.

    A ``<bidi xmlns='urn:xmpp:bidi'/>`` inside features (the request namespace,
    which draft 0.0.2 of XEP-0288 put there by mistake) is not the bidi
    feature (XEP-0288 §2.1); an empty ``<mechanisms/>`` (XEP-0288 Example 4,
    against RFC 6120 §6.4.1) offers nothing.
    """
    required = set()
    present: dict[str, etree._Element] = {}  # tag -> the first child of that tag: one pass, not a find each
    for feature in features:
        if not isinstance(feature.tag, str):
            continue
        present.setdefault(feature.tag, feature)
        ns = etree.QName(feature).namespace
        if ns is not None and feature.find(f"{{{ns}}}required") is not None:
            required.add(feature.tag)
    mechanisms = present.get(_MECHANISMS)
    dialback = present.get(_DIALBACK)
    return Advertised(
        starttls=_STARTTLS in present,
        starttls_required=_STARTTLS in required,
        mechanisms=tuple(
            (m.text or "").strip().upper() for m in mechanisms.iterfind(f"{{{SASL_NS}}}mechanism")
        )
        if mechanisms is not None
        else (),
        dialback=dialback is not None,
        dialback_errors=dialback is not None and child(dialback, DIALBACK_FEATURE_NS, "errors") is not None,
        bidi=_BIDI in present,
        sm=_SM in present,
        required=frozenset(required),
        limits=parse_limits(present.get(_LIMITS)),
    )


_STARTTLS, _MECHANISMS, _DIALBACK = f"{{{TLS_NS}}}starttls", f"{{{SASL_NS}}}mechanisms", f"{{{DIALBACK_FEATURE_NS}}}dialback"
_BIDI, _SM, _LIMITS = f"{{{BIDI_FEATURE_NS}}}bidi", f"{{{SM_NS}}}sm", f"{{{STREAM_LIMITS_NS}}}limits"


def parse_limits(limits: etree._Element | None) -> StreamLimits:
    """XEP-0478 §2.1 ``<limits/>`` (None: not announced). Each value is an integer;
    one that is not a positive decimal number of sane size says nothing."""
    if limits is None:
        return StreamLimits()
    max_bytes = _positive(child(limits, STREAM_LIMITS_NS, "max-bytes"))
    # RFC 6120 §13.12: a limit "MUST NOT be less than 10000 bytes"; a peer announcing less is held
    # to that floor, which is also where the compiled router starts looking (router._fastroute)
    return StreamLimits(max(max_bytes, MIN_MAX_BYTES) if max_bytes else 0,
                        _positive(child(limits, STREAM_LIMITS_NS, "idle-seconds")))


def _positive(element: etree._Element | None) -> int:
    text = (element.text or "").strip() if element is not None else ""
    if not (text.isascii() and text.isdigit()):
        return 0
    value = int(text)
    return value if value <= MAX_ANNOUNCED_LIMIT else 0


