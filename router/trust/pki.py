"""Certificate factory: `gen-cert` and first-run self-signed certificates (`make_leaf`,
`ensure_self_signed`), and the private CAs of the load generator and the tests (`make_ca`;
bench/ uses it, so it stays here). Reading a credential back is test-only: tests/pki_helpers.py.

Everything is EC P-256 (fast to generate).  XMPP identities are added as RFC 6120
§13.7.1 subjectAltNames: DNS-IDs, SRV-IDs (RFC 4985 otherName) and id-on-xmppAddr.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
ID_ON_DNSSRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")

DEFAULT_LIFETIME = datetime.timedelta(days=365)
CLOCK_SKEW_MARGIN = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Credential:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: str | os.PathLike, name: str, *, chain: tuple["Credential", ...] = ()) -> tuple[Path, Path]:
        """Write `<name>.crt` (leaf, then `chain` certificates) and `<name>.key` (mode 0600)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{name}.crt"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem() + b"".join(c.cert_pem() for c in chain))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem())
        os.chmod(key_path, 0o600)  # O_CREAT mode does not apply to an existing file
        return cert_path, key_path


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def utf8_string(text: str) -> bytes:
    """DER UTF8String (tag 0x0c), the value type of id-on-xmppAddr."""
    return _der(0x0C, text.encode("utf-8"))


def ia5_string(text: str) -> bytes:
    """DER IA5String (tag 0x16), the value type of SRVName (RFC 4985)."""
    return _der(0x16, text.encode("ascii"))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())



def _base_builder(common_name, issuer, key, not_before, not_after, *, ca, path_length):
    """Subject, issuer, validity, basicConstraints and keyUsage shared by CA and leaf certificates."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = not_before or _now() - CLOCK_SKEW_MARGIN
    not_after = not_after or not_before + DEFAULT_LIFETIME
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )


def make_ca(
    name: str,
    *,
    issuer: Credential | None = None,
    path_length: int | None = None,
    name_constraints: x509.NameConstraints | None = None,
    ekus: tuple[ObjectIdentifier, ...] = (),
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Credential:
    """A CA certificate: self-signed root when `issuer` is None, else an intermediate.

    `ekus`: an EKU extension listing these (none when empty).  `key`: reuse a CA's key, as
    a cross-signed or renewed intermediate does (same subject, same key, another certificate).
    """
    key = key or _new_key()
    builder = _base_builder(name, issuer, key, not_before, not_after, ca=True, path_length=path_length)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    return Credential(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def make_leaf(
    issuer: Credential | None,
    domain: str,
    *,
    dns_ids: list[str] | tuple[str, ...] | None = None,
    srv_ids: list[str] | tuple[str, ...] = (),
    xmpp_addrs: list[str] | tuple[str, ...] = (),
    common_name: str | None = None,
    server_auth: bool = True,
    client_auth: bool = True,
    extra_ekus: tuple[ObjectIdentifier, ...] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Credential:
    """An end-entity certificate for `domain`; self-signed when `issuer` is None.

    `dns_ids` defaults to `[domain]`; pass `[]` for none. Each of `srv_ids` adds the
    SRV-ID `_xmpp-server.<d>`. The EKU extension lists serverAuth/clientAuth as asked
    plus `extra_ekus`; it is omitted when that list is empty.
    """
    key = _new_key()
    if dns_ids is None:
        dns_ids = [domain]
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_ids]
    names += [x509.OtherName(ID_ON_DNSSRV, ia5_string(f"_xmpp-server.{d}")) for d in srv_ids]
    names += [x509.OtherName(ID_ON_XMPPADDR, utf8_string(a)) for a in xmpp_addrs]
    ekus = [ExtendedKeyUsageOID.SERVER_AUTH] if server_auth else []
    ekus += [ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else []
    ekus += list(extra_ekus)
    builder = _base_builder(common_name or domain, issuer, key, not_before, not_after, ca=False, path_length=None)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    signer_key = issuer.key if issuer else key
    return Credential(builder.sign(signer_key, hashes.SHA256()), key)


def ensure_self_signed(directory: str | os.PathLike, domain: str) -> tuple[Path, Path]:
    """Paths of `<domain>.crt/.key` in `directory`, created self-signed on first run.

    DNS-ID and SRV-ID only: ejabberd 23.01 crashes on an id-on-xmppAddr name
    (docs/interop.md)."""
    directory = Path(directory)
    cert_path, key_path = directory / f"{domain}.crt", directory / f"{domain}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    return make_leaf(None, domain, srv_ids=[domain]).write(directory, domain)
