"""`SessionConfig`: what a negotiating session may decide, built once by the runtime from `router.config`.

It is frozen and shared by every session of a listener or an outgoing route;
`router.negotiation.session` re-exports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from router.negotiation.features import StreamLimits
from router.trust import certs
from router.trust import policy as pol
from router.wire.jid import normalize_domain


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session needs to decide; built once by the runtime from `router.config`."""

    local_domains: frozenset[str]
    dialback_secret: str
    trust_store: certs.TrustStore = field(default_factory=certs.TrustStore)
    # remote domain -> the only anchors its certificates may chain to, instead of
    # trust_store (RFC 6120 §13.6: a peer provisioned with its own anchors)
    peer_trust: Mapping[str, certs.TrustStore] = field(default_factory=dict)
    policy: pol.Policy = field(default_factory=pol.Policy)
    tls_offered: bool = True  # receiver: we hold a certificate and offer STARTTLS
    tls_client: bool = True  # initiator: we start TLS when offered
    has_certificate: bool = True  # initiator: we present a client certificate, so EXTERNAL may work
    dialback: bool = True  # offer and use Server Dialback
    bidi: str = "encrypted"  # "encrypted" | "always" | "off": offer / request XEP-0288
    # receiver may piggyback its own domains over bidi (XEP-0288 §2.2); off by default because
    # the verifying side did not choose the stream ID that keys such a dialback
    bidi_reverse_dialback: bool = False
    required_flags: bool = True  # XEP-0192 <required/> on features other than <starttls/>
    stream_management: bool = False  # XEP-0198: offer it (receiver), enable it when offered (initiator)
    stream_limits: StreamLimits | None = None  # receiver: the XEP-0478 limits we announce; None: none
    sasl_max_failures: int = 3  # failed <auth/> attempts tolerated (RFC 6120 §6.4.5: 2-5)
    sasl_send_authzid: bool = True  # initiator sends base64(from) as authzid (XEP-0178), else '='
    default_lang: str = "en"
    # receiver: ask the runtime (`CheckDane`) whether TLSA records prove a certificate our trust
    # store does not (RFC 7673), except for remote domains matching `dane_exempt` (normalized patterns)
    dane: bool = False
    dane_exempt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_domains", frozenset(normalize_domain(d) for d in self.local_domains))
        object.__setattr__(self, "peer_trust", {normalize_domain(d): store for d, store in self.peer_trust.items()})
        if self.bidi not in ("encrypted", "always", "off"):
            raise ValueError(f"bidi mode {self.bidi!r} is not 'encrypted', 'always' or 'off'")
