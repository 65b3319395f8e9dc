"""Whether a TLS peer's certificate chain matches DNSSEC-validated TLSA records (DANE for S2S).

Pure: the records come from `router.net.resolver` (already validated), the chain from
`router.trust.tls.peer_chain`. The rules, RFC 6698 §2.1 with RFC 7671 and RFC 7673:

* usage DANE-EE(3): the leaf certificate (selector 0) or its SubjectPublicKeyInfo
  (selector 1) matches; RFC 7671 §5.1: "no name checks" and no expiry or chain checks;
* usage DANE-TA(2): a certificate the peer presented above its leaf matches; the chain from
  it down to the leaf must verify (RFC 5280, as `router.trust.certs.verify_chain`) and the
  leaf must name the service domain or the SRV target host name: RFC 7673 §4.2 with §4.1
  ("SRV is secure": the reference identifiers "SHALL include both the service domain and
  the SRV target server host name"). A trust anchor published as a bare key whose
  certificate the peer leaves out of its chain is not supported;
* usages PKIX-TA(0) and PKIX-EE(1) are unusable here, as RFC 7672 §3.1.3 has it for SMTP
  and Prosody does by default: a federation peer cannot know which CAs the relay trusts,
  and the relay's own PKIX check (`certs.peer_status`) applies to every peer anyway;
* matching types Full(0), SHA2-256(1) and SHA2-512(2); a digest of the wrong length, an
  unknown selector or matching type make a record unusable (RFC 6698 §4.1, RFC 7671 §4.1).

"Usable records and no match" means the peer must not be used (RFC 7673 §3.4, RFC 7672
§2.2); "no usable record" means DANE says nothing and the usual checks apply.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from router.trust.certs import CertificateError, TrustStore, matches_domain, verify_chain

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
USAGE_NAMES = {PKIX_TA: "PKIX-TA", PKIX_EE: "PKIX-EE", DANE_TA: "DANE-TA", DANE_EE: "DANE-EE"}
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
# matching type -> digest, None for Full(0) (the selected bytes themselves)
MATCHING_TYPES = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}
USABLE_USAGES = frozenset({DANE_TA, DANE_EE})


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, certificate association data."""

    usage: int
    selector: int
    matching_type: int
    data: bytes

    def __str__(self) -> str:
        return f"{USAGE_NAMES.get(self.usage, self.usage)} {self.selector} {self.matching_type}"


class Verdict(NamedTuple):
    """`matched`: True (the chain matches a usable record), False (usable records, no match: do
    not use the peer), None (no usable record: DANE says nothing). `reason` says which, for logs."""

    matched: bool | None
    reason: str


def usable(records: Iterable[Tlsa]) -> list[Tlsa]:
    """The records this module can apply (RFC 6698 §4.1: the others are skipped, not failed)."""
    found = []
    for record in records:
        if record.usage not in USABLE_USAGES or record.selector not in (SELECTOR_CERT, SELECTOR_SPKI):
            continue
        if record.matching_type not in MATCHING_TYPES:
            continue
        digest = MATCHING_TYPES[record.matching_type]
        if digest is not None and len(record.data) != digest().digest_size:
            continue  # a malformed digest can match nothing
        found.append(record)
    return found


def association(cert: x509.Certificate, selector: int, matching_type: int) -> bytes:
    """The certificate association data a record with `selector` and `matching_type` holds for `cert`."""
    if selector == SELECTOR_CERT:
        selected = cert.public_bytes(Encoding.DER)
    else:
        selected = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = MATCHING_TYPES[matching_type]
    return selected if digest is None else digest(selected).digest()


def check(
    chain_der: list[bytes] | tuple[bytes, ...],
    records: Iterable[Tlsa],
    names: Iterable[str],
    now: datetime.datetime | None = None,
) -> Verdict:
    """Does the presented chain (leaf first) match one of `records`? `names` are the reference
    identifiers a DANE-TA match needs: the service domain and the SRV target host name."""
    records = usable(records)
    if not records:
        return Verdict(None, "no usable TLSA record (only DANE-TA and DANE-EE are used)")
    if not chain_der:
        return Verdict(False, "no certificate presented")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        return Verdict(False, f"unparsable certificate: {exc}")
    names = tuple(names)
    # the remote publishes as many records as it likes: each certificate is hashed once per
    # selector and matching type, and each anchor's chain verified once, whatever their count
    associations: dict[tuple[int, int, int], bytes] = {}
    anchor_failures: dict[int, str | None] = {}

    def data_of(index: int, record: Tlsa) -> bytes:
        key = (index, record.selector, record.matching_type)
        if key not in associations:
            associations[key] = association(chain[index], record.selector, record.matching_type)
        return associations[key]

    ta_failures = []
    for record in records:
        if record.usage == DANE_EE:
            if data_of(0, record) == record.data:
                return Verdict(True, f"the certificate matches TLSA {record}")
            continue
        for index in range(1, len(chain)):
            if data_of(index, record) != record.data:
                continue
            if index not in anchor_failures:
                anchor_failures[index] = _ta_failure(chain_der, chain[index], chain[0], names, now)
                if anchor_failures[index] is not None:
                    ta_failures.append(anchor_failures[index])
            if anchor_failures[index] is None:
                return Verdict(True, f"the chain verifies to the trust anchor of TLSA {record}")
    reason = f"the certificate matches none of {len(records)} usable TLSA record(s)"
    return Verdict(False, reason + "".join(f"; {failure}" for failure in ta_failures))


def _ta_failure(chain_der, anchor: x509.Certificate, leaf: x509.Certificate, names: tuple[str, ...],
                now: datetime.datetime | None) -> str | None:
    """Why a DANE-TA match does not authenticate the leaf, or None when it does."""
    try:
        verify_chain(chain_der, TrustStore((anchor,)), now)
    except CertificateError as exc:
        return f"DANE-TA trust anchor {anchor.subject.rfc4514_string()!r} does not verify the chain: {exc.reason}"
    if not any(matches_domain(leaf, name) for name in names):
        return f"the certificate names none of {', '.join(names)} (DANE-TA needs one, RFC 7673 §4.2)"
    return None


def exempt(domain: str, patterns: Iterable[str]) -> bool:
    """Is `domain` (normalized) opted out of DANE by ``[tls] dane_exempt``? Patterns as
    policy.allow and policy.deny take them (normalized by the config reader):
    ``example.net`` that domain, ``*.example.net`` every domain strictly below it."""
    return any(domain.endswith(p[1:]) if p.startswith("*.") else domain == p for p in patterns)
