"""Federation policy and per-stanza authorization: pure decisions, no I/O (RFC 6120 §8.1.1.2,
§8.1.2.2 S2S addressing; §13.14 federation is a per-deployment choice).

Conditions returned are RFC 6120 error condition names (stream errors, reused as dialback
error conditions); the negotiation layer maps a refusal at SASL time to
`<failure><not-authorized/></failure>` (RFC 6120 §6.5.10).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from router.wire.jid import domain_of, normalize_domain

MECHANISM_EXTERNAL = "EXTERNAL"
MECHANISM_DIALBACK = "dialback"
AUTH_SECURE = "secure"  # certificates only (SASL EXTERNAL)
AUTH_DIALBACK = "dialback"  # dialback allowed as well
DEFAULT_MAX_STANZA_BYTES = 512 * 1024  # Prosody's s2s_stanza_size_limit
DEFAULT_PRE_AUTH_MAX_STANZA_BYTES = 16 * 1024  # features, TLS, SASL and dialback elements are small


@dataclass(frozen=True)
class Decision:
    """Allow, or deny with an RFC 6120 condition and a human-readable text."""

    allowed: bool
    condition: str = ""
    text: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


def deny(condition: str, text: str) -> Decision:
    return Decision(False, condition, text)


def _normalize_pattern(pattern: str) -> str:
    """`example.net` (that domain) or `*.example.net` (every domain strictly below it)."""
    if pattern.startswith("*."):
        return "*." + normalize_domain(pattern[2:])
    return normalize_domain(pattern)


def _matches(domain: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def _first_match(domain: str, patterns) -> str | None:
    return next((p for p in patterns if _matches(domain, p)), None)


@dataclass(frozen=True)
class Policy:
    """Federation rules; patterns are normalized on construction (ValueError if invalid).

    `allow` empty means everyone not denied; `deny` wins over `allow`.  `auth_overrides`
    maps a domain pattern to "secure" or "dialback", overriding `secure_auth` for it; an
    exact domain wins over a wildcard, a longer wildcard over a shorter one.  Stored as a
    tuple of (pattern, mode) pairs, most specific first, so a Policy is hashable.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    require_encryption: bool = True
    secure_auth: bool = False
    auth_overrides: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    pre_auth_max_stanza_bytes: int = DEFAULT_PRE_AUTH_MAX_STANZA_BYTES
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(_normalize_pattern(p) for p in self.allow))
        object.__setattr__(self, "deny", tuple(_normalize_pattern(p) for p in self.deny))
        items = self.auth_overrides.items() if isinstance(self.auth_overrides, Mapping) else self.auth_overrides
        overrides = {}
        for pattern, mode in items:
            if mode not in (AUTH_SECURE, AUTH_DIALBACK):
                raise ValueError(f"auth override for {pattern!r} must be {AUTH_SECURE!r} or {AUTH_DIALBACK!r}, not {mode!r}")
            overrides[_normalize_pattern(pattern)] = mode
        # most specific first: exact names, then wildcards by decreasing length
        ordered = sorted(overrides.items(), key=lambda item: (item[0].startswith("*."), -len(item[0])))
        object.__setattr__(self, "auth_overrides", tuple(ordered))
        if self.pre_auth_max_stanza_bytes <= 0 or self.max_stanza_bytes <= 0:
            raise ValueError("stanza size limits must be positive")

    def auth_mode(self, remote_domain: str) -> str:
        """"secure" or "dialback" for an already normalized remote domain."""
        for pattern, mode in self.auth_overrides:
            if _matches(remote_domain, pattern):
                return mode
        return AUTH_SECURE if self.secure_auth else AUTH_DIALBACK


def federation_allowed(policy: Policy, remote_domain: str) -> Decision:
    """May we federate with `remote_domain` at all (header time, dialback, outbound)?"""
    try:
        domain = normalize_domain(remote_domain)
    except ValueError as exc:
        return deny("improper-addressing", f"invalid remote domain: {exc}")
    denied_by = _first_match(domain, policy.deny)
    if denied_by is not None:
        return deny("policy-violation", f"federation with {domain} is not allowed (deny rule {denied_by})")
    if policy.allow and _first_match(domain, policy.allow) is None:
        return deny("policy-violation", f"federation with {domain} is not allowed (not on the allow list)")
    return ALLOW


def auth_mechanism_allowed(policy: Policy, remote_domain: str, mechanism: str, encrypted: bool) -> Decision:
    """May `remote_domain` authenticate with `mechanism` ("EXTERNAL" or "dialback") on a
    stream that is (`encrypted`) or is not TLS-protected?"""
    if mechanism not in (MECHANISM_EXTERNAL, MECHANISM_DIALBACK):
        raise ValueError(f"unknown authentication mechanism {mechanism!r}")
    federation = federation_allowed(policy, remote_domain)
    if not federation:
        return federation
    domain = normalize_domain(remote_domain)
    if policy.require_encryption and not encrypted:
        return deny("policy-violation", f"TLS is required before authenticating {domain}")
    if mechanism == MECHANISM_DIALBACK and policy.auth_mode(domain) == AUTH_SECURE:
        return deny("not-authorized", f"{domain} must authenticate with a trusted certificate (SASL EXTERNAL); dialback is not accepted")
    return ALLOW


class Refusal(NamedTuple):
    """Why a stanza received on a stream may not be routed: a stream error condition and text."""

    condition: str
    text: str


def check_stanza(
    from_jid: str | None,
    to_jid: str | None,
    inbound_pairs: Collection[tuple[str, str]],
    local_domains: frozenset[str],
) -> tuple[str, str] | Refusal:
    """The stanza's pair when it may be routed, else a ``Refusal``: the domains are
    computed here once and travel with the stanza to routing.

    The pair is in ``Pair(local, remote)`` order, ``(to domain, from domain)``: the plain
    tuple it looked up in `inbound_pairs`, returned as is so that a stanza costs one tuple
    and one membership test (a NamedTuple hashes and compares as a plain tuple).

    `inbound_pairs` holds the normalized ``Pair(local, remote)`` pairs authenticated on the
    stream (the peer may send remote -> local), `local_domains` the normalized domains
    served here. RFC 6120 §4.3.5: nothing before authentication; §8.1.1.2, §8.1.2.2: 'to'
    and 'from' present and valid, 'to' a domain of ours validated on the stream, 'from'
    authenticated for that very pair.
    """
    if not inbound_pairs:
        return Refusal("not-authorized", "stanza received before the stream was authenticated")
    if not to_jid:
        return Refusal("improper-addressing", "stanza has no 'to' address")
    if not from_jid:
        return Refusal("improper-addressing", "stanza has no 'from' address")
    try:
        to_domain = domain_of(to_jid)
    except ValueError as exc:
        return Refusal("improper-addressing", f"invalid 'to' address: {exc}")
    try:
        from_domain = domain_of(from_jid)
    except ValueError as exc:
        return Refusal("improper-addressing", f"invalid 'from' address: {exc}")
    if to_domain not in local_domains:
        return Refusal("host-unknown", f"{to_domain} is not served here")
    pair = (to_domain, from_domain)  # (local, remote)
    if pair in inbound_pairs:
        return pair
    if not any(local == to_domain for local, _ in inbound_pairs):
        return Refusal("host-unknown", f"{to_domain} was not authenticated as a target on this stream")
    return Refusal("invalid-from", f"{from_domain} is not authenticated for {to_domain} on this stream")
