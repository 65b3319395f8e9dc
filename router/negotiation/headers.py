"""Stream headers (RFC 6120 §4.7, §4.8): checking the peer's header and writing ours.

Pure functions over the tokenizer's `StreamHeader`: each returns what it found
(or a refusal: the stream error condition and its text); the session applies it.
"""

from __future__ import annotations

import re
import secrets

from router.trust import policy as pol
from router.wire.jid import normalize_domain
from router.negotiation.config import SessionConfig
from router.wire.namespaces import DIALBACK_NS, SERVER_NS, STREAM_NS
from router.wire.xml import stream_header

OUR_VERSION = (1, 0)
_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")
_HEADER_NAMESPACES = frozenset({STREAM_NS, SERVER_NS, DIALBACK_NS})

Refusal = tuple[str, str]  # (stream error condition, text)


def new_stream_id() -> str:
    """128 random bits in hex: unpredictable and non-repeating (RFC 6120 §4.7.3), and a valid
    NMTOKEN for ``db:verify/@id`` (XEP-0220 schema), which base64 IDs are not."""
    return secrets.token_hex(16)


def parse_version(value: str | None) -> tuple[int, int] | None:
    """Numeric (major, minor), leading zeros ignored (§4.7.5); None for a version-less (0.9) peer."""
    if value is None:
        return None
    match = _VERSION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"version {value!r} is not 'major.minor'")
    version = int(match.group(1)), int(match.group(2))
    return OUR_VERSION if version == OUR_VERSION else version  # one tuple shared by every 1.0 stream


def peer_version(value: str | None) -> tuple[int, int] | None:
    """The peer's version as a stream keeps it: None below 1.0 (no features, dialback only,
    RFC 6120 §4.7.5). ValueError if it is not 'major.minor'."""
    version = parse_version(value)
    return version if version is None or version >= OUR_VERSION else None


def namespace_refusal(header) -> Refusal | None:
    """Why the header's prefix or namespaces are not acceptable (RFC 6120 §4.8), or None."""
    namespaces = header.namespaces
    if header.prefix not in ("stream", None):
        return "bad-namespace-prefix", f"stream prefix {header.prefix!r} is not accepted; use 'stream'"
    if namespaces.get(header.prefix) != STREAM_NS:
        return "invalid-namespace", "the stream element is not in http://etherx.jabber.org/streams"
    if header.prefix is not None and namespaces.get(None, SERVER_NS) != SERVER_NS:
        return "invalid-namespace", f"content namespace {namespaces.get(None)!r} is not jabber:server"
    extra = sorted(uri for uri in namespaces.values() if uri not in _HEADER_NAMESPACES)
    if extra:
        return "invalid-namespace", f"namespace {extra[0]} must be declared in stanzas, not on the stream header"
    return None


def declares_dialback(header) -> bool:
    """The peer declared the dialback namespace, so it speaks dialback (XEP-0220 §2.4.1)."""
    return DIALBACK_NS in header.namespaces.values()


Addresses = tuple[str | None, str | None, Refusal | None]  # (local, remote, refusal)


def initial_addresses(header, config: SessionConfig, sasl_done: bool, local: str | None, remote: str | None) -> Addresses:
    """Receiver: check the initial header's ``to`` and ``from`` (RFC 6120 §4.7.1-2, §4.9.1.3).

    Returns the stream's domains from now on, ours and the peer's (those our
    response header carries), and the refusal to close with, if any. `local`
    and `remote` are the domains so far (set after SASL: the restarted stream
    must keep them, §6.4.6)."""
    try:
        to = normalize_domain(header.to) if header.to else None
    except ValueError:
        to = None
    if to is None or to not in config.local_domains:
        text = f"{header.to!r} is not served here" if header.to else "the stream header has no 'to'"
        return local, remote, ("host-unknown", text)
    try:
        from_ = normalize_domain(header.from_) if header.from_ else None
    except ValueError as exc:
        return to, remote, ("invalid-from", f"the stream header's 'from' is not a domain: {exc}")
    if sasl_done and (from_ != remote or to != local):
        return local, remote, ("invalid-from", f"the restarted stream must keep from={remote} to={local}")
    if from_ is not None:
        federation = pol.federation_allowed(config.policy, from_)
        if not federation:
            return to, from_, (federation.condition, federation.text)
    return to, from_, None


def initial_header(local: str, remote: str, lang: str) -> bytes:
    """The initiator's header: no ``id`` (§4.7.3), our highest version."""
    return stream_header(to=remote, from_=local, stream_id=None, version="1.0", lang=lang)


def response_header(local: str | None, remote: str | None, stream_id: str, version: tuple[int, int] | None,
                    lang: str) -> bytes:
    """The receiver's header: a new ``id``, min(peer's, ours) as version, none for a 0.9 peer (§4.7.5)."""
    return stream_header(
        to=remote, from_=local or "", stream_id=stream_id,
        version=None if version is None else "%d.%d" % min(version, OUR_VERSION), lang=lang,
    )
