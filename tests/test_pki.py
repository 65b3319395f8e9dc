"""router.trust.pki: the certificates every other test builds on must carry what was asked."""

import datetime
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki_helpers import load_credential
from router.trust import pki


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca("Test Root")


def _san(cert):
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_round_trip_through_files(tmp_path, ca):
    leaf = pki.make_leaf(ca, "a.example")
    cert_path, key_path = leaf.write(tmp_path, "a")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = load_credential(cert_path, key_path)
    assert loaded.cert == leaf.cert
    assert loaded.key.private_numbers() == leaf.key.private_numbers()
    assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)
    # OpenSSL itself accepts the pair (this is what the TLS layer loads).
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)


def test_write_tightens_mode_of_existing_key_file(tmp_path, ca):
    key_path = tmp_path / "a.key"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    pki.make_leaf(ca, "a.example").write(tmp_path, "a")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_write_appends_chain(tmp_path, ca):
    inter = pki.make_ca("Inter", issuer=ca)
    leaf = pki.make_leaf(inter, "a.example")
    cert_path, _ = leaf.write(tmp_path, "a", chain=(inter,))
    certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    assert certs == [leaf.cert, inter.cert]


def test_signed_by_issuer_and_self_signed(ca):
    leaf = pki.make_leaf(ca, "a.example")
    leaf.cert.verify_directly_issued_by(ca.cert)
    assert leaf.cert.issuer == ca.cert.subject
    own = pki.make_leaf(None, "b.example")
    own.cert.verify_directly_issued_by(own.cert)
    with pytest.raises(Exception):
        own.cert.verify_directly_issued_by(ca.cert)


def test_sans_present(ca):
    leaf = pki.make_leaf(ca, "a.example", dns_ids=["a.example", "*.a.example"],
                         srv_ids=["a.example"], xmpp_addrs=["a.example"])
    san = _san(leaf.cert)
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "*.a.example"]
    others = {o.type_id.dotted_string: o.value for o in san.get_values_for_type(x509.OtherName)}
    assert others["1.3.6.1.5.5.7.8.7"] == b"\x16\x16_xmpp-server.a.example"
    assert others["1.3.6.1.5.5.7.8.5"] == b"\x0c\x09a.example"


def test_dns_ids_default_and_empty(ca):
    assert _san(pki.make_leaf(ca, "a.example").cert).get_values_for_type(x509.DNSName) == ["a.example"]
    bare = pki.make_leaf(ca, "a.example", dns_ids=[], common_name="cn.example")
    with pytest.raises(x509.ExtensionNotFound):
        _san(bare.cert)
    assert bare.cert.subject.rfc4514_string() == "CN=cn.example"


@pytest.mark.parametrize(
    "server_auth, client_auth, expected",
    [
        (True, True, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        (True, False, [ExtendedKeyUsageOID.SERVER_AUTH]),
        (False, True, [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ],
)
def test_eku_as_asked(ca, server_auth, client_auth, expected):
    leaf = pki.make_leaf(ca, "a.example", server_auth=server_auth, client_auth=client_auth)
    assert list(leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == expected


def test_no_eku_extension_when_nothing_asked(ca):
    leaf = pki.make_leaf(ca, "a.example", server_auth=False, client_auth=False)
    with pytest.raises(x509.ExtensionNotFound):
        leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_expiry_dates(ca):
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    end = datetime.datetime(2020, 2, 1, tzinfo=datetime.timezone.utc)
    leaf = pki.make_leaf(ca, "a.example", not_before=start, not_after=end)
    assert leaf.cert.not_valid_before_utc == start
    assert leaf.cert.not_valid_after_utc == end
    fresh = pki.make_leaf(ca, "a.example")
    now = datetime.datetime.now(datetime.timezone.utc)
    assert fresh.cert.not_valid_before_utc <= now < fresh.cert.not_valid_after_utc


def test_ca_constraints(ca):
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    inter = pki.make_ca("Inter", issuer=ca, path_length=0)
    assert inter.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    inter.cert.verify_directly_issued_by(ca.cert)
    leaf_bc = pki.make_leaf(ca, "a.example").cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_bc.value.ca is False


def test_ca_eku_only_when_asked(ca):
    with pytest.raises(x509.ExtensionNotFound):
        ca.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    inter = pki.make_ca("Inter", issuer=ca, ekus=(ExtendedKeyUsageOID.SERVER_AUTH,))
    eku = inter.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_ca_with_given_key_is_a_cross_sign(ca):
    """Same subject and key under two issuers: a leaf of one verifies under the other."""
    other_root = pki.make_ca("Other Root")
    first = pki.make_ca("Inter", issuer=ca)
    cross = pki.make_ca("Inter", issuer=other_root, key=first.key)
    assert cross.cert.subject == first.cert.subject and cross.cert.public_key() == first.cert.public_key()
    cross.cert.verify_directly_issued_by(other_root.cert)
    ski = x509.SubjectKeyIdentifier
    assert cross.cert.extensions.get_extension_for_class(ski) == first.cert.extensions.get_extension_for_class(ski)
    pki.make_leaf(first, "a.example").cert.verify_directly_issued_by(cross.cert)


def test_ensure_self_signed_creates_once(tmp_path):
    cert_path, key_path = pki.ensure_self_signed(tmp_path, "relay.example")
    first = cert_path.read_bytes()
    assert pki.ensure_self_signed(tmp_path, "relay.example") == (cert_path, key_path)
    assert cert_path.read_bytes() == first
    cert = load_credential(cert_path, key_path).cert
    assert _san(cert).get_values_for_type(x509.DNSName) == ["relay.example"]
