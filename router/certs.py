"""Peer certificate trust and XMPP identity checks (RFC 6120 §13.7, RFC 6125/9525, XEP-0178).

Pure functions, no I/O besides `TrustStore.from_files`.  The TLS layer accepts any peer
certificate at the handshake (dialback must still work over an encrypted stream with an
untrusted certificate); the negotiation layer asks `peer_status` whether SASL EXTERNAL
may succeed for the domain the peer claims.
"""

from __future__ import annotations

import datetime
import os
import ssl
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from router.jid import normalize_domain

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
ID_ON_DNSSRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")
XMPP_SERVER_SERVICE = "_xmpp-server"
MAX_CHAIN_DEPTH = 8  # certificates in a path, anchor included
ACCEPTED_LEAF_EKUS = frozenset(
    {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)


class CertificateError(Exception):
    """The presented chain is not trusted; `reason` says why, for logs and stream error texts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrustStore:
    """Trust anchors (CA certificates), indexed by subject for path building."""

    anchors: tuple[x509.Certificate, ...] = ()
    _by_subject: dict[x509.Name, tuple[x509.Certificate, ...]] = field(init=False, repr=False, compare=False)
    _ders: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        for cert in self.anchors:
            by_subject.setdefault(cert.subject, []).append(cert)
        object.__setattr__(self, "_by_subject", {k: tuple(v) for k, v in by_subject.items()})
        object.__setattr__(self, "_ders", frozenset(_der(c) for c in self.anchors))

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

    def issuers_of(self, cert: x509.Certificate) -> tuple[x509.Certificate, ...]:
        return self._by_subject.get(cert.issuer, ())

    def contains(self, cert: x509.Certificate) -> bool:
        return _der(cert) in self._ders


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _check_validity(cert: x509.Certificate, now: datetime.datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{role} certificate {_subject(cert)} is not yet valid (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z)")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{role} certificate {_subject(cert)} has expired ({cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z)")


def _subject(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string())


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_no_unknown_critical(cert: x509.Certificate, role: str) -> None:
    for ext in cert.extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise CertificateError(f"{role} certificate has an unsupported critical extension {ext.oid.dotted_string}")


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    """serverAuth alone is fine: servers present one certificate in both directions and
    public CAs no longer issue clientAuth; an EKU listing neither is not for TLS."""
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if eku is not None and ACCEPTED_LEAF_EKUS.isdisjoint(eku):
        raise CertificateError("certificate extended key usage allows neither serverAuth nor clientAuth")


def _check_issuer(ca: x509.Certificate, cas_below: int, role: str) -> None:
    """`cas_below`: intermediate CA certificates between this issuer and the leaf (RFC 5280 pathLen)."""
    constraints = _extension(ca, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{role} certificate {_subject(ca)} is not a CA (basicConstraints)")
    if constraints.path_length is not None and cas_below > constraints.path_length:
        raise CertificateError(f"{role} certificate {_subject(ca)} path length constraint exceeded")
    usage = _extension(ca, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise CertificateError(f"{role} certificate {_subject(ca)} key usage does not allow signing certificates")
    _check_no_unknown_critical(ca, role)


def _constraint_covers(name: str, base: str) -> bool:
    """RFC 5280 §4.2.1.10 dNSName subtree: `base` and names below it (`.base`: below only)."""
    name, base = name.lower().rstrip("."), base.lower().rstrip(".")
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _check_name_constraints(ca: x509.Certificate, leaf: x509.Certificate, role: str) -> None:
    """Apply a CA's DNS name constraints to every domain the leaf could be matched on;
    constraints of other kinds are not evaluated, so the chain is refused (fail closed)."""
    constraints = _extension(ca, x509.NameConstraints)
    if constraints is None:
        return
    subtrees = list(constraints.permitted_subtrees or ()) + list(constraints.excluded_subtrees or ())
    if any(not isinstance(tree, x509.DNSName) for tree in subtrees):
        raise CertificateError(f"{role} certificate {_subject(ca)} has name constraints other than DNS names")
    ids = identities(leaf)
    names = [d.removeprefix("*.") for d in ids.dns_ids]
    names += [srv.partition(".")[2] for srv in ids.srv_ids] + list(ids.xmpp_addrs) + list(ids.common_names)
    for name in names:
        if any(_constraint_covers(name, t.value) for t in constraints.excluded_subtrees or ()):
            raise CertificateError(f"{name!r} is excluded by the name constraints of {_subject(ca)}")
        if constraints.permitted_subtrees is not None and not any(
            _constraint_covers(name, t.value) for t in constraints.permitted_subtrees
        ):
            raise CertificateError(f"{name!r} is outside the name constraints of {_subject(ca)}")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(
    chain_der: list[bytes] | tuple[bytes, ...],
    store: TrustStore,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """Validate the peer's chain (leaf first, then intermediates in any order) up to an anchor
    of `store`; return the leaf certificate or raise CertificateError.

    RFC 5280 checks made: signatures, validity dates of every certificate, basicConstraints CA
    and pathLen and keyCertSign on issuers, DNS name constraints, unknown critical
    extensions, depth, leaf EKU.
    Revocation is not checked.  A leaf that is itself in the store (a pinned self-signed
    certificate) is trusted.
    """
    if not chain_der:
        raise CertificateError("no certificate presented")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        raise CertificateError(f"unparsable certificate: {exc}") from None
    now = now or _utcnow()
    leaf, pool = chain[0], chain[1:]
    _check_validity(leaf, now, "peer")
    _check_no_unknown_critical(leaf, "peer")
    _check_leaf_usage(leaf)
    if store.contains(leaf):
        return leaf
    return _build_path(leaf, pool, store, now)


def _build_path(leaf: x509.Certificate, pool: list[x509.Certificate], store: TrustStore, now: datetime.datetime) -> x509.Certificate:
    """Walk issuer links from the leaf; intermediates come from the presented pool, the
    path ends at the first anchor that signed the current certificate."""
    current, used, intermediates = leaf, [leaf], 0
    while len(used) < MAX_CHAIN_DEPTH:
        for anchor in store.issuers_of(current):
            if _signed_by(current, anchor):
                _check_validity(anchor, now, "trust anchor")
                _check_issuer(anchor, intermediates, "trust anchor")
                for ca in used[1:] + [anchor]:
                    _check_name_constraints(ca, leaf, "trust anchor" if ca is anchor else "intermediate")
                return leaf
        candidates = [c for c in pool if c.subject == current.issuer and not any(c is u for u in used)]
        issuer = next((c for c in candidates if _signed_by(current, c)), None)
        if issuer is None:
            if current is leaf and leaf.issuer == leaf.subject and _signed_by(leaf, leaf):
                raise CertificateError(f"self-signed certificate {_subject(leaf)} is not trusted")
            raise CertificateError(f"no trusted issuer found for {_subject(current)} (issuer {current.issuer.rfc4514_string()!r})")
        _check_validity(issuer, now, "intermediate")
        _check_issuer(issuer, intermediates, "intermediate")
        used.append(issuer)
        current = issuer
        if issuer.issuer != issuer.subject:  # RFC 5280 §4.2.1.9: self-issued do not count
            intermediates += 1
    raise CertificateError(f"certificate chain longer than {MAX_CHAIN_DEPTH}")


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
