"""Whether the certificate a remote XMPP server presents proves the domain it claims.

Path validation is cryptography's verifier (RFC 5280 with the CA/B Forum profile); this module
adds what the verifier cannot know: the key purposes a server may present in either TLS role,
and the XMPP identities (RFC 6120 §13.7, RFC 6125/9525 DNS-ID, SRV-ID, id-on-xmppAddr;
XEP-0178).  The TLS layer accepts any peer certificate at the handshake (dialback must still
work over an encrypted stream with an untrusted certificate); the negotiation layer asks
`peer_status` whether SASL EXTERNAL may succeed for the domain the peer claims.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from router.wire.jid import normalize_domain

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
ID_ON_DNSSRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")
XMPP_SERVER_SERVICE = "_xmpp-server"
MAX_INTERMEDIATES = 6  # CA certificates between the leaf and the anchor
ACCEPTED_EKUS = frozenset(
    {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)
EKU_REFUSED = "extended key usage allows neither serverAuth nor clientAuth"


class CertificateError(Exception):
    """The presented chain is not trusted; `reason` says why, for logs and stream error texts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrustStore:
    """Trust anchors: CA certificates, or a peer's own certificate pinned as it is."""

    anchors: tuple[x509.Certificate, ...] = ()
    _store: Store | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: a system bundle holds ~150 roots and every authenticated stream asks.
        object.__setattr__(self, "_store", Store(list(self.anchors)) if self.anchors else None)

    @classmethod
    def from_pem(cls, *pem_blobs: bytes) -> "TrustStore":
        return cls(tuple(c for blob in pem_blobs for c in x509.load_pem_x509_certificates(blob)))

    @classmethod
    def from_files(cls, *paths: str | os.PathLike) -> "TrustStore":
        blobs = []
        for path in paths:
            with open(path, "rb") as f:
                blobs.append(f.read())
        return cls.from_pem(*blobs)

    @classmethod
    def system(cls) -> "TrustStore":
        """The operating system's CA bundle (OpenSSL's default cafile); empty if there is none."""
        cafile = ssl.get_default_verify_paths().cafile
        if not cafile or not os.path.exists(cafile):
            return cls()
        with open(cafile, "rb") as f:
            blocks = f.read().split(b"-----END CERTIFICATE-----")
        anchors = []
        with warnings.catch_warnings():  # a few old roots break RFC 5280 details; skip them, not the bundle
            warnings.simplefilter("ignore")
            for block in blocks:
                if b"-----BEGIN CERTIFICATE-----" in block:
                    try:
                        anchors.append(x509.load_pem_x509_certificate(block + b"-----END CERTIFICATE-----\n"))
                    except ValueError:
                        continue
        return cls(tuple(anchors))


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _subject(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string())


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _accept_eku(_policy, _cert, eku: x509.ExtendedKeyUsage | None) -> None:
    """A server presents one certificate as TLS client and as TLS server, and public CAs now
    issue serverAuth only: either purpose will do, as will any or none stated.  Applied to CAs
    too, where the client verifier would demand clientAuth of a serverAuth-only intermediate."""
    if eku is not None and ACCEPTED_EKUS.isdisjoint(eku):
        raise ValueError(EKU_REFUSED)


_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _accept_eku)
# subjectAltName and AKI optional: CN-only and self-signed leaves are judged by name below, not refused here.
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _accept_eku)
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
)
# A leaf that is itself an anchor was pinned as it is (self-signed ones often assert CA:TRUE).
_PINNED_POLICY = ExtensionPolicy.permit_all().may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _accept_eku)


def verify_chain(
    chain_der: list[bytes] | tuple[bytes, ...],
    store: TrustStore,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """Validate the peer's chain (leaf first, then intermediates in any order, unrelated ones
    ignored) up to an anchor of `store`; return the leaf certificate or raise CertificateError.

    The client verifier is used in both TLS roles because it matches no subject name: the
    XMPP identities are `matches_domain`'s job.  Revocation is not checked.  A leaf that is
    itself in the store (a pinned self-signed certificate) is trusted.
    """
    if not chain_der:
        raise CertificateError("no certificate presented")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        raise CertificateError(f"unparsable certificate: {exc}") from None
    now = now or _utcnow()
    leaf, pool = chain[0], chain[1:]
    if store._store is None:
        raise CertificateError(_untrusted_reason(leaf, pool, store, "empty trust store"))
    verifier = (
        PolicyBuilder()
        .store(store._store)
        .time(now)
        .max_chain_depth(MAX_INTERMEDIATES)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_PINNED_POLICY if leaf in store.anchors else _EE_POLICY)
        .build_client_verifier()
    )
    try:
        path = verifier.verify(leaf, pool).chain
    except VerificationError as exc:
        raise CertificateError(_reason(str(exc), leaf, pool, store, now)) from None
    _check_xmpp_name_constraints(leaf, path[1:])
    return leaf


# The verifier's wrapping: what remains is the failure itself.
_NOISE = re.compile(
    r"^validation failed: (candidates exhausted: )?(Python extension validator failed: \w+: )?"
    r"| \(encountered processing .*\)$"
)
# After backtracking the verifier reports only the last candidate's failure and not which
# certificate failed; these say what that means in terms of the presented chain.
_UNTRUSTED = ("all candidates exhausted", "signature does not match", "exceeds max depth")
_REASONS = (
    ("path length constraint violated", "an intermediate CA exceeds a path length constraint above it"),
    ("cA must be asserted in a CA", "an issuing certificate is not a CA (basicConstraints)"),
    ("cA must not be asserted in an EE", "peer certificate {leaf} is a CA certificate, not a server's"),
    ("keyCertSign must be asserted", "an issuing certificate's key usage does not allow signing certificates"),
    ("no permitted name constraints matched", "a name of {leaf} ({names}) is outside the name constraints of an issuing CA"),
    ("excluded name constraint matched", "a name of {leaf} ({names}) is excluded by the name constraints of an issuing CA"),
)


def _reason(message: str, leaf, pool, store: TrustStore, now: datetime.datetime) -> str:
    """A `CertificateError.reason` for the verifier's `message`, naming the certificate at
    fault where the presented chain shows it (for the reason only: the verifier decided)."""
    detail = _NOISE.sub("", message)
    if "not valid at validation time" in detail:
        return _validity_reason(leaf, pool, store, now)
    if any(text in detail for text in _UNTRUSTED):
        return _untrusted_reason(leaf, pool, store, detail)
    if EKU_REFUSED in detail:  # the leaf is checked before any issuer is looked for
        owner = "an issuing certificate's" if "candidates exhausted" in message else f"peer certificate {_subject(leaf)}:"
        return f"{owner} {EKU_REFUSED}"
    for text, reason in _REASONS:
        if text in detail:
            return reason.format(leaf=_subject(leaf), names=describe_names(leaf))
    return f"certificate chain refused: {detail}"


def _validity_reason(leaf, pool, store: TrustStore, now: datetime.datetime) -> str:
    """Which certificate is outside its validity period: the leaf, else a presented or trusted issuer."""
    issuers = {c.issuer for c in (leaf, *pool)}
    candidates = [("peer", leaf)] + [("intermediate", c) for c in pool if c.subject in issuers]
    candidates += [("trust anchor", a) for a in store.anchors if a.subject in issuers]
    for role, cert in candidates:
        if now < cert.not_valid_before_utc:
            return f"{role} certificate {_subject(cert)} is not yet valid (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z)"
        if now > cert.not_valid_after_utc:
            return f"{role} certificate {_subject(cert)} has expired ({cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z)"
    return "a certificate in the chain is outside its validity period"


def _untrusted_reason(leaf, pool, store: TrustStore, detail: str) -> str:
    """Follow the presented issuers from the leaf to where the path stops, and say why it stops there."""
    top, path = leaf, [leaf]
    while top.issuer != top.subject:
        issuer = next((c for c in pool if c.subject == top.issuer and c not in path and _signed_by(top, c)), None)
        if issuer is None:
            break
        path.append(issuer)
        top = issuer
    if len(path) - 1 > MAX_INTERMEDIATES:
        return f"certificate chain longer than {MAX_INTERMEDIATES} intermediates"
    if top.issuer == top.subject:
        namesake = " (a different certificate of that name is)" if any(a.subject == top.subject for a in store.anchors) else ""
        return f"self-signed certificate {_subject(top)} is not trusted{namesake}"
    mismatch = ": signature does not match" if "signature" in detail else ""
    return f"no trusted issuer found for {_subject(top)} (issuer {top.issuer.rfc4514_string()!r}{mismatch})"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _constraint_covers(name: str, base: str) -> bool:
    """RFC 5280 §4.2.1.10 dNSName subtree: `base` and names below it (`.base`: below only)."""
    name, base = name.lower().rstrip("."), base.lower().rstrip(".")
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _check_xmpp_name_constraints(leaf: x509.Certificate, issuers: list[x509.Certificate]) -> None:
    """Apply the issuers' DNS name constraints to the identities the verifier does not see:
    it constrains dNSName SANs only (RFC 5280), while `matches_domain` also accepts the domain
    of an SRV-ID or id-on-xmppAddr, and the CN of a certificate without those."""
    ids = identities(leaf)
    names = [srv.partition(".")[2] for srv in ids.srv_ids] + list(ids.xmpp_addrs)
    if not (ids.dns_ids or ids.srv_ids or ids.xmpp_addrs):
        names += ids.common_names
    for ca in issuers:
        constraints = _extension(ca, x509.NameConstraints)
        if constraints is None:
            continue
        permitted = [t.value for t in constraints.permitted_subtrees or () if isinstance(t, x509.DNSName)]
        excluded = [t.value for t in constraints.excluded_subtrees or () if isinstance(t, x509.DNSName)]
        for name in names:
            if any(_constraint_covers(name, base) for base in excluded):
                raise CertificateError(f"{name!r} is excluded by the name constraints of {_subject(ca)}")
            if permitted and not any(_constraint_covers(name, base) for base in permitted):
                raise CertificateError(f"{name!r} is outside the name constraints of {_subject(ca)}")


@dataclass(frozen=True)
class Identities:
    """The XMPP-relevant presented identifiers of a certificate (RFC 6120 §13.7.1.2)."""

    dns_ids: tuple[str, ...]
    srv_ids: tuple[str, ...]  # raw SRVName values, e.g. "_xmpp-server.example.net"
    xmpp_addrs: tuple[str, ...]
    common_names: tuple[str, ...]


def _der_string(value: bytes) -> str | None:
    """Decode a DER UTF8String/IA5String (the otherName value types used here); None if not one."""
    if len(value) < 2 or value[0] not in (0x0C, 0x16):
        return None
    length, offset = value[1], 2
    if length & 0x80:
        size = length & 0x7F
        length, offset = int.from_bytes(value[2 : 2 + size], "big"), 2 + size
    if offset + length != len(value):
        return None
    try:
        return value[offset:].decode("utf-8" if value[0] == 0x0C else "ascii")
    except UnicodeDecodeError:
        return None


def identities(cert: x509.Certificate) -> Identities:
    san = _extension(cert, x509.SubjectAlternativeName)
    dns_ids: list[str] = []
    srv_ids: list[str] = []
    xmpp_addrs: list[str] = []
    if san is not None:
        dns_ids = list(san.get_values_for_type(x509.DNSName))
        for other in san.get_values_for_type(x509.OtherName):
            text = _der_string(other.value)
            if text is None:
                continue
            if other.type_id == ID_ON_DNSSRV:
                srv_ids.append(text)
            elif other.type_id == ID_ON_XMPPADDR:
                xmpp_addrs.append(text)
    common_names = [
        attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(attr.value, str)
    ]
    return Identities(tuple(dns_ids), tuple(srv_ids), tuple(xmpp_addrs), tuple(common_names))


def _normalized(name: str) -> str | None:
    try:
        return normalize_domain(name)
    except ValueError:
        return None


def _dns_id_matches(presented: str, reference: str) -> bool:
    """RFC 6125 §6.4.3 / RFC 9525 §6.3: case-insensitive, A-labels; '*' only as the whole
    left-most label, matching exactly one label, and never directly under a top-level label."""
    if presented.startswith("*."):
        rest = _normalized(presented[2:])
        if rest is None or "." not in rest or "*" in rest:
            return False
        head, _, tail = reference.partition(".")
        return bool(head) and tail == rest
    if "*" in presented:
        return False
    return _normalized(presented) == reference


def matches_domain(cert: x509.Certificate, domain: str) -> bool:
    """Whether `cert` identifies the XMPP server `domain` (the reference identity: the `to`
    we sent, or the `from` the peer sent; never an SRV target host)."""
    reference = _normalized(domain)
    if reference is None:
        return False
    ids = identities(cert)
    if any(_dns_id_matches(d, reference) for d in ids.dns_ids):
        return True
    for srv in ids.srv_ids:
        service, _, srv_domain = srv.partition(".")
        if service.lower() == XMPP_SERVER_SERVICE and _normalized(srv_domain) == reference:
            return True
    if any(_normalized(addr) == reference for addr in ids.xmpp_addrs):
        return True
    if ids.dns_ids or ids.srv_ids or ids.xmpp_addrs:
        return False  # CN-ID is only a fallback for certificates without supported SANs
    return any(_dns_id_matches(cn, reference) for cn in ids.common_names)


def describe_names(cert: x509.Certificate) -> str:
    """The presented identifiers, for error texts."""
    ids = identities(cert)
    names = list(ids.dns_ids) + list(ids.srv_ids) + [f"xmpp:{a}" for a in ids.xmpp_addrs]
    return ", ".join(names) if names else "CN=" + ",".join(ids.common_names)


class PeerStatus(NamedTuple):
    """Summary for the negotiation layer: SASL EXTERNAL may succeed iff `authenticated`."""

    trusted: bool
    matches: bool
    reason: str  # empty when trusted and matching

    @property
    def authenticated(self) -> bool:
        return self.trusted and self.matches


def peer_status(
    chain_der: list[bytes] | tuple[bytes, ...],
    store: TrustStore,
    claimed_domain: str,
    now: datetime.datetime | None = None,
) -> PeerStatus:
    """Trust and name check of the chain a peer presented, against the domain it claims."""
    if not chain_der:
        return PeerStatus(False, False, "no certificate presented")
    reasons = []
    try:
        leaf = verify_chain(chain_der, store, now)
        trusted = True
    except CertificateError as exc:
        trusted = False
        reasons.append(exc.reason)
        try:
            leaf = x509.load_der_x509_certificate(chain_der[0])
        except ValueError:
            return PeerStatus(False, False, exc.reason)
    matches = matches_domain(leaf, claimed_domain)
    if not matches:
        reasons.append(f"certificate names ({describe_names(leaf)}) do not match {claimed_domain!r}")
    return PeerStatus(trusted, matches, "; ".join(reasons))
