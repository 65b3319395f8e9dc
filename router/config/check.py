"""What ``check-config`` verifies beyond parsing: that the relay this file
describes can work. Every certificate and key loads (PEM), each key matches its
certificate, the chain is in order, the certificate is in date and names its
domain; the policy can be satisfied (encryption required needs a certificate,
certificate-only authentication needs trust anchors). Reads files, writes
nothing."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from router.config.model import Config, Problem
from router.trust import certs

# A certificate that expires sooner than this is worth a warning line.
EXPIRY_WARNING_DAYS = 14


def check(config: Config, now: datetime.datetime | None = None) -> tuple[list[Problem], list[str]]:
    """The problems that would stop the relay working, and notes worth reading."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problems: list[Problem] = []
    notes: list[str] = []
    for domain, files in sorted(config.tls.certificates.items()):
        _check_certificate(domain, files, now, problems, notes)
    policy = config.policy
    have_certificates = bool(config.tls.certificates) or config.tls.self_signed
    if policy.require_encryption and not have_certificates:
        problems.append(Problem("policy.require_encryption", "is true but no local domain has a certificate "
                                "([tls.certificates]): STARTTLS is impossible, so no peer can authenticate"))
    secure = policy.secure_auth or any(mode == "secure" for _, mode in policy.auth_overrides)
    if secure and not (config.tls.trust_anchors or config.tls.system_trust or config.tls.peer_trust_anchors):
        problems.append(Problem("policy.secure_auth", "some domains must authenticate with a trusted certificate, "
                                "but there are no trust anchors (tls.trust_anchors, tls.system_trust)"))
    if config.tls.self_signed:
        for domain in sorted(config.local_domains - set(config.tls.certificates)):
            notes.append(f"{domain}: a self-signed certificate is created in {config.server.state_dir} at the first start")
    if not config.server.dialback_secret:
        notes.append(f"dialback secret: created in {config.server.state_dir} at the first start")
    return problems, notes


def _check_certificate(domain: str, files, now: datetime.datetime, problems: list[Problem], notes: list[str]) -> None:
    where = f"tls.certificates.{domain}"
    try:
        chain = x509.load_pem_x509_certificates(files.cert.read_bytes())
    except ValueError as exc:
        problems.append(Problem(f"{where}.cert", f"{files.cert} is not a PEM certificate: {exc}"))
        return
    try:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        problems.append(Problem(f"{where}.key", f"{files.key} is not an unencrypted PEM private key: {exc}"))
        return
    leaf = chain[0]
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        problems.append(Problem(f"{where}.key", f"{files.key} is not the key of the certificate in {files.cert}"))
    for position, (cert, issuer) in enumerate(zip(chain, chain[1:]), start=1):
        if cert.issuer != issuer.subject:
            problems.append(Problem(f"{where}.cert", f"{files.cert}: certificate {position + 1} did not issue "
                                    f"certificate {position}: put the chain in order, leaf first"))
            break
    days = (leaf.not_valid_after_utc - now).days
    if leaf.not_valid_after_utc <= now:
        problems.append(Problem(f"{where}.cert", f"{files.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"))
    elif leaf.not_valid_before_utc > now:
        problems.append(Problem(f"{where}.cert", f"{files.cert} is not valid before "
                                f"{leaf.not_valid_before_utc:%Y-%m-%d}"))
    elif days < EXPIRY_WARNING_DAYS:
        notes.append(f"{domain}: the certificate expires in {days} day(s), on {leaf.not_valid_after_utc:%Y-%m-%d}")
    else:
        notes.append(f"{domain}: certificate valid for {days} more days")
    if not certs.matches_domain(leaf, domain):
        problems.append(Problem(f"{where}.cert", f"{files.cert} does not name {domain} ({certs.describe_names(leaf)})"))
