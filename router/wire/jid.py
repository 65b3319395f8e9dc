"""JID domain extraction and domain normalization (RFC 7622), for the stanza hot path.

Domains are compared in one canonical form everywhere: lower case, no trailing dot, IDNA
A-labels.  Non-ASCII names go through Python's IDNA 2003 codec (nameprep + ToASCII), the
same family of mapping Prosody applies with libidn.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

CACHE_SIZE = 65536
MAX_PART_BYTES = 1023  # RFC 7622 §3.2-§3.4, per part
MAX_DNS_NAME = 253
MAX_LABEL = 63
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# RFC 7622 §3.3.1: characters a localpart must not contain, with the space and the ASCII
# controls, so that an ASCII localpart needs no isprintable() pass (the hot path's case).
_LOCALPART_FORBIDDEN = frozenset("\"&'/:<>@ \x7f" + "".join(map(chr, range(0x20))))
# A part of at most this many characters fits MAX_PART_BYTES whatever it holds (UTF-8: at
# most 4 bytes a character), so only longer parts are encoded to count their bytes.
_SHORT_PART = MAX_PART_BYTES // 4
# Whole JIDs remembered by domain_of: enough for the active JIDs of a busy relay
# (the benchmark corpus has 20,000), short enough that the table stays under about
# 7 MiB whatever peers send (32,768 entries of at most 96 characters).
RECENT_JIDS = 32768
RECENT_JID_LENGTH = 96
recent_domains: dict[str, str] = {}  # JID -> domain (see domain_of)


@lru_cache(maxsize=CACHE_SIZE)
def normalize_domain(domain: str) -> str:
    """The canonical (A-label, lower-case, no trailing dot) form of `domain`; ValueError if invalid."""
    if not domain:
        raise ValueError("empty domain")
    if domain.startswith("["):
        return _ip6_literal(domain)
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"domain {domain!r} is not a valid internationalized domain name: {exc}") from None
    lowered = domain.lower()
    if lowered != domain:  # an already canonical name stays the caller's object: one string per domain
        domain = lowered
    if len(domain) > MAX_DNS_NAME:
        raise ValueError(f"domain longer than {MAX_DNS_NAME} characters")
    for label in domain.split("."):
        if not label:
            raise ValueError(f"domain {domain!r} has an empty label")
        if len(label) > MAX_LABEL:
            raise ValueError(f"domain label longer than {MAX_LABEL} characters")
        if not _LABEL_CHARS.issuperset(label):
            raise ValueError(f"domain {domain!r} contains a character not allowed in a host name")
    return domain


def _ip6_literal(domain: str) -> str:
    if not domain.endswith("]"):
        raise ValueError(f"unterminated IPv6 literal {domain!r}")
    try:
        return f"[{ipaddress.IPv6Address(domain[1:-1]).compressed}]"
    except ValueError:
        raise ValueError(f"invalid IPv6 literal {domain!r}") from None


def domain_of(jid: str) -> str:
    """The normalized domainpart of `jid`; ValueError if the JID is not valid.

    The hot path calls this twice per stanza: recently seen short JIDs are answered
    from ``recent_domains`` (one dict lookup instead of about a microsecond of checks). That
    table holds only JIDs of at most ``RECENT_JID_LENGTH`` characters, at most
    ``RECENT_JIDS`` of them, and is emptied when full, so a peer sending unique JIDs
    pins at most about 7 MiB (a cache of whole JIDs of any length pinned 136 MiB).
    """
    domain = recent_domains.get(jid)
    if domain is None:
        domain = _parse_domain(jid)
        if len(jid) <= RECENT_JID_LENGTH:
            if len(recent_domains) >= RECENT_JIDS:
                recent_domains.clear()
            recent_domains[jid] = domain
    return domain


def _parse_domain(jid: str) -> str:
    """RFC 7622 §3.2: strip the resource (from the first '/') first, then the localpart
    (up to the first '@'); empty localpart or resource next to its separator is invalid.
    Only the domain's normalization is cached here, so that cache grows with domains.
    """
    bare, slash, resource = jid.partition("/")
    if slash:
        if not resource:
            raise ValueError(f"JID {jid!r} has an empty resourcepart")
        if len(resource) > _SHORT_PART and len(resource.encode("utf-8")) > MAX_PART_BYTES:
            raise ValueError(f"JID resourcepart longer than {MAX_PART_BYTES} bytes")
    local, at, domain = bare.partition("@")
    if not at:
        domain = bare
    else:
        if not local:
            raise ValueError(f"JID {jid!r} has an empty localpart")
        if len(local) > _SHORT_PART and len(local.encode("utf-8")) > MAX_PART_BYTES:
            raise ValueError(f"JID localpart longer than {MAX_PART_BYTES} bytes")
        if not _LOCALPART_FORBIDDEN.isdisjoint(local) or not (local.isascii() or local.isprintable()):
            raise ValueError(f"JID localpart {local!r} contains a forbidden character")
    try:
        return normalize_domain(domain)
    except ValueError as exc:
        raise ValueError(f"JID {jid!r}: {exc}") from None
