"""router.trust.certs: chain trust and RFC 6125 identity matching for XMPP S2S (RFC 6120 §13.7; XEP-0178 §3)."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router.trust import certs, pki

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def root():
    return pki.make_ca("Test Root")


@pytest.fixture(scope="module")
def store(root):
    return certs.TrustStore.from_pem(root.cert_pem())


def chain(*creds):
    return [c.cert_der() for c in creds]


# --- path validation (RFC 6120 §13.7.2) -------------------------------------------


def test_leaf_signed_by_anchor_is_trusted(root, store):
    leaf = pki.make_leaf(root, "capulet.lit")
    assert certs.verify_chain(chain(leaf), store) == leaf.cert


def test_empty_chain_is_rejected(store):
    with pytest.raises(certs.CertificateError, match="no certificate"):
        certs.verify_chain([], store)


def test_garbage_der_is_rejected(store):
    with pytest.raises(certs.CertificateError, match="unparsable"):
        certs.verify_chain([b"\x30\x03\x02\x01\x00"], store)


def test_self_signed_untrusted(store):
    own = pki.make_leaf(None, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="self-signed"):
        certs.verify_chain(chain(own), store)


def test_pinned_self_signed_is_trusted():
    own = pki.make_leaf(None, "capulet.lit")
    assert certs.verify_chain(chain(own), certs.TrustStore((own.cert,))) == own.cert


def test_pinned_self_signed_with_ca_flag_is_trusted(root, store):
    """`openssl req -x509` and several servers' generators assert CA:TRUE on their own
    certificate; pinned, it is trusted as it is, while a CA-issued one must be an end entity."""
    own = pki.make_ca("capulet.lit")
    pinned = certs.TrustStore((own.cert,))
    assert certs.verify_chain(chain(own), pinned) == own.cert
    assert certs.peer_status(chain(own), pinned, "capulet.lit").authenticated
    issued = pki.make_ca("capulet.lit", issuer=root)
    with pytest.raises(certs.CertificateError, match="'CN=capulet.lit' is a CA certificate, not a server's"):
        certs.verify_chain(chain(issued), store)


def test_pinned_certificate_still_expires():
    own = pki.make_leaf(None, "capulet.lit", not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
                        not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC))
    with pytest.raises(certs.CertificateError, match="peer certificate 'CN=capulet.lit' has expired"):
        certs.verify_chain(chain(own), certs.TrustStore((own.cert,)))


def test_other_ca_untrusted(store):
    other = pki.make_ca("Other Root")
    leaf = pki.make_leaf(other, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="self-signed certificate 'CN=Other Root' is not trusted$"):
        certs.verify_chain(chain(leaf, other), store)
    with pytest.raises(certs.CertificateError, match="^no trusted issuer found for 'CN=capulet.lit' .issuer 'CN=Other Root'.$"):
        certs.verify_chain(chain(leaf), store)


def test_same_subject_different_key_is_not_an_issuer(root, store):
    impostor = pki.make_ca("Test Root")  # same name as the anchor, different key
    leaf = pki.make_leaf(impostor, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="'CN=Test Root' is not trusted .a different certificate of that name is."):
        certs.verify_chain(chain(leaf, impostor), store)
    with pytest.raises(certs.CertificateError, match="issuer 'CN=Test Root': signature does not match"):
        certs.verify_chain(chain(leaf), store)


def test_empty_store_trusts_nothing():
    own = pki.make_leaf(None, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="self-signed certificate 'CN=capulet.lit' is not trusted"):
        certs.verify_chain(chain(own), certs.TrustStore())


def test_expired():
    root = pki.make_ca("Long Root", not_before=datetime.datetime(2019, 1, 1, tzinfo=UTC),
                       not_after=datetime.datetime(2099, 1, 1, tzinfo=UTC))
    store = certs.TrustStore((root.cert,))
    leaf = pki.make_leaf(root, "capulet.lit",
                         not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
                         not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC))
    with pytest.raises(certs.CertificateError, match="expired"):
        certs.verify_chain(chain(leaf), store)
    # the same certificate was fine while it was valid
    assert certs.verify_chain(chain(leaf), store, now=datetime.datetime(2020, 6, 1, tzinfo=UTC)) == leaf.cert


def test_not_yet_valid(root, store):
    start = datetime.datetime.now(UTC) + datetime.timedelta(days=2)
    leaf = pki.make_leaf(root, "capulet.lit", not_before=start, not_after=start + datetime.timedelta(days=30))
    with pytest.raises(certs.CertificateError, match="not yet valid"):
        certs.verify_chain(chain(leaf), store)


def test_expired_intermediate(root, store):
    inter = pki.make_ca("Old Inter", issuer=root,
                        not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
                        not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC))
    leaf = pki.make_leaf(inter, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="intermediate certificate 'CN=Old Inter' has expired .2021-01-01"):
        certs.verify_chain(chain(leaf, inter), store)


def test_renewed_intermediate_preferred_over_expired_one(root, store):
    """Both are presented (a stale chain file plus the new one): the verifier backtracks past the expired one."""
    expired = pki.make_ca("Inter", issuer=root,
                          not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
                          not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC))
    renewed = pki.make_ca("Inter", issuer=root, key=expired.key)
    leaf = pki.make_leaf(renewed, "capulet.lit")
    assert certs.verify_chain(chain(leaf, expired, renewed), store) == leaf.cert


def test_expired_trust_anchor():
    old_root = pki.make_ca("Old Root", not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
                           not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC))
    leaf = pki.make_leaf(old_root, "capulet.lit", not_before=datetime.datetime(2020, 2, 1, tzinfo=UTC),
                         not_after=datetime.datetime(2099, 1, 1, tzinfo=UTC))
    with pytest.raises(certs.CertificateError, match="trust anchor certificate 'CN=Old Root' has expired"):
        certs.verify_chain(chain(leaf), certs.TrustStore((old_root.cert,)))


def test_intermediate_chain(root, store):
    inter = pki.make_ca("Inter", issuer=root)
    leaf = pki.make_leaf(inter, "capulet.lit")
    assert certs.verify_chain(chain(leaf, inter), store) == leaf.cert
    with pytest.raises(certs.CertificateError, match="no trusted issuer"):
        certs.verify_chain(chain(leaf), store)  # intermediate missing


def test_two_intermediates_in_any_order(root, store):
    upper = pki.make_ca("Upper", issuer=root)
    lower = pki.make_ca("Lower", issuer=upper)
    leaf = pki.make_leaf(lower, "capulet.lit")
    assert certs.verify_chain(chain(leaf, upper, lower), store) == leaf.cert


def test_unrelated_certificate_before_the_intermediate_is_ignored(root, store):
    inter = pki.make_ca("Inter", issuer=root)
    unrelated = pki.make_ca("Unrelated", issuer=pki.make_ca("Other Root"))
    decoy = pki.make_ca("Inter", issuer=root)  # the intermediate's name, another key
    leaf = pki.make_leaf(inter, "capulet.lit")
    assert certs.verify_chain(chain(leaf, unrelated, inter), store) == leaf.cert
    assert certs.verify_chain(chain(leaf, unrelated, decoy, inter), store) == leaf.cert


def test_cross_signed_intermediate_path_to_the_trusted_root(root, store):
    """The intermediate exists twice (same subject and key): signed by a root we do not trust,
    and cross-signed by ours.  The untrusted one comes first and signs the leaf just as well."""
    legacy_root = pki.make_ca("Legacy Root")
    via_legacy = pki.make_ca("Inter", issuer=legacy_root)
    via_trusted = pki.make_ca("Inter", issuer=root, key=via_legacy.key)
    leaf = pki.make_leaf(via_legacy, "capulet.lit")
    assert certs.verify_chain(chain(leaf, via_legacy, legacy_root, via_trusted), store) == leaf.cert
    with pytest.raises(certs.CertificateError, match="'CN=Legacy Root' is not trusted"):
        certs.verify_chain(chain(leaf, via_legacy, legacy_root), store)


def test_chain_depth_limit(root, store):
    cas = [root]
    for i in range(certs.MAX_INTERMEDIATES + 1):
        cas.append(pki.make_ca(f"Level {i}", issuer=cas[-1]))
    longest = pki.make_leaf(cas[-2], "capulet.lit")
    assert certs.verify_chain(chain(longest, *cas[1:-1]), store) == longest.cert
    too_long = pki.make_leaf(cas[-1], "capulet.lit")
    with pytest.raises(certs.CertificateError, match=f"longer than {certs.MAX_INTERMEDIATES} intermediates"):
        certs.verify_chain(chain(too_long, *reversed(cas[1:])), store)


def test_path_length_constraint(root, store):
    upper = pki.make_ca("Upper", issuer=root, path_length=0)
    lower = pki.make_ca("Lower", issuer=upper)
    leaf = pki.make_leaf(lower, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="path length"):
        certs.verify_chain(chain(leaf, lower, upper), store)
    direct = pki.make_leaf(upper, "capulet.lit")
    assert certs.verify_chain(chain(direct, upper), store) == direct.cert


def _constrained(root, permitted=None, excluded=None, other=False):
    permitted = [x509.DNSName(d) for d in permitted] if permitted is not None else None
    excluded = [x509.DNSName(d) for d in excluded] if excluded is not None else None
    if other:
        excluded = (excluded or []) + [x509.RFC822Name("x@capulet.lit")]
    return pki.make_ca("Constrained", issuer=root, name_constraints=x509.NameConstraints(permitted, excluded))


def test_name_constraints_permitted(root, store):
    inter = _constrained(root, permitted=["capulet.lit"])
    inside = pki.make_leaf(inter, "chat.capulet.lit", srv_ids=["capulet.lit"])
    assert certs.verify_chain(chain(inside, inter), store) == inside.cert
    outside = pki.make_leaf(inter, "capulet.lit", dns_ids=["capulet.lit", "montague.lit"])
    with pytest.raises(certs.CertificateError, match="outside the name constraints"):
        certs.verify_chain(chain(outside, inter), store)
    sneaky_addr = pki.make_leaf(inter, "capulet.lit", xmpp_addrs=["montague.lit"])
    with pytest.raises(certs.CertificateError, match="outside"):
        certs.verify_chain(chain(sneaky_addr, inter), store)


XMPP_IDENTITY_LEAVES = {  # leaves naming a domain in a way RFC 5280 name constraints do not cover
    "SRV-ID": lambda ca, domain: pki.make_leaf(ca, "host.example", dns_ids=[], srv_ids=[domain]),
    "xmppAddr": lambda ca, domain: pki.make_leaf(ca, "host.example", dns_ids=[], xmpp_addrs=[domain]),
    "CN-ID": lambda ca, domain: pki.make_leaf(ca, domain, dns_ids=[]),  # no SAN at all
}


@pytest.mark.parametrize("make_leaf", XMPP_IDENTITY_LEAVES.values(), ids=XMPP_IDENTITY_LEAVES.keys())
def test_name_constraints_cover_xmpp_identities(root, store, make_leaf):
    """The verifier constrains dNSName SANs only; `matches_domain` also accepts these."""
    permitting = _constrained(root, permitted=["capulet.lit"])
    inside = make_leaf(permitting, "capulet.lit")
    assert certs.verify_chain(chain(inside, permitting), store) == inside.cert
    with pytest.raises(certs.CertificateError, match="'montague.lit' is outside the name constraints of 'CN=Constrained'"):
        certs.verify_chain(chain(make_leaf(permitting, "montague.lit"), permitting), store)
    excluding = _constrained(root, excluded=["montague.lit"])
    with pytest.raises(certs.CertificateError, match="'montague.lit' is excluded by the name constraints of 'CN=Constrained'"):
        certs.verify_chain(chain(make_leaf(excluding, "montague.lit"), excluding), store)


def test_name_constraints_excluded(root, store):
    inter = _constrained(root, excluded=["montague.lit"])
    assert certs.verify_chain(chain(pki.make_leaf(inter, "capulet.lit"), inter), store)
    banned = pki.make_leaf(inter, "a.montague.lit")
    with pytest.raises(certs.CertificateError, match="excluded by the name constraints"):
        certs.verify_chain(chain(banned, inter), store)


def test_name_constraints_of_other_kinds_leave_dns_names_alone(root, store):
    """An rfc822Name constraint binds e-mail addresses only (RFC 5280); the verifier checks it."""
    inter = _constrained(root, excluded=["montague.lit"], other=True)
    assert certs.verify_chain(chain(pki.make_leaf(inter, "capulet.lit"), inter), store)
    with pytest.raises(certs.CertificateError, match="excluded by the name constraints"):
        certs.verify_chain(chain(pki.make_leaf(inter, "a.montague.lit"), inter), store)


def test_leaf_cannot_act_as_issuer(root, store):
    fake_ca = pki.make_leaf(root, "fake-ca.lit")
    victim = pki.make_leaf(fake_ca, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="not a CA"):
        certs.verify_chain(chain(victim, fake_ca), store)


def test_server_auth_only_leaf_accepted(root, store):
    """Public CAs stopped issuing clientAuth; servers present one certificate both ways."""
    leaf = pki.make_leaf(root, "capulet.lit", server_auth=True, client_auth=False)
    assert certs.verify_chain(chain(leaf), store) == leaf.cert


@pytest.mark.parametrize("ekus", [(ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,), ()], ids=["anyEKU", "no EKU"])
def test_leaf_with_any_or_no_eku_accepted(root, store, ekus):
    leaf = pki.make_leaf(root, "capulet.lit", server_auth=False, client_auth=False, extra_ekus=ekus)
    assert certs.verify_chain(chain(leaf), store) == leaf.cert


def test_email_protection_only_leaf_rejected(root, store):
    leaf = pki.make_leaf(root, "capulet.lit", server_auth=False, client_auth=False,
                         extra_ekus=(ExtendedKeyUsageOID.EMAIL_PROTECTION,))
    reason = "^peer certificate 'CN=capulet.lit': extended key usage allows neither serverAuth nor clientAuth$"
    with pytest.raises(certs.CertificateError, match=reason):
        certs.verify_chain(chain(leaf), store)


def test_server_auth_only_intermediate_accepted(root, store):
    """Newer public intermediates carry serverAuth only; the client verifier alone would want clientAuth."""
    inter = pki.make_ca("Inter", issuer=root, ekus=(ExtendedKeyUsageOID.SERVER_AUTH,))
    leaf = pki.make_leaf(inter, "capulet.lit", client_auth=False)
    assert certs.verify_chain(chain(leaf, inter), store) == leaf.cert


def test_email_only_intermediate_rejected(root, store):
    inter = pki.make_ca("Inter", issuer=root, ekus=(ExtendedKeyUsageOID.EMAIL_PROTECTION,))
    leaf = pki.make_leaf(inter, "capulet.lit")
    with pytest.raises(certs.CertificateError, match="^an issuing certificate's extended key usage allows neither"):
        certs.verify_chain(chain(leaf, inter), store)


def test_client_auth_only_leaf_accepted(root, store):
    leaf = pki.make_leaf(root, "capulet.lit", server_auth=False, client_auth=True)
    assert certs.verify_chain(chain(leaf), store) == leaf.cert


def test_code_signing_only_leaf_rejected(root, store):
    leaf = pki.make_leaf(root, "capulet.lit", server_auth=False, client_auth=False,
                         extra_ekus=(ExtendedKeyUsageOID.CODE_SIGNING,))
    with pytest.raises(certs.CertificateError, match="extended key usage"):
        certs.verify_chain(chain(leaf), store)


def test_store_from_files(tmp_path, root):
    path, _ = root.write(tmp_path, "root")
    store = certs.TrustStore.from_files(path)
    assert store.anchors == (root.cert,)


# --- identities (RFC 6120 §13.7.1.2, §13.7.2.1: DNS-ID, SRV-ID, xmppAddr; CN-ID last) ----


def test_identities_lists_every_kind(root):
    leaf = pki.make_leaf(root, "capulet.lit", srv_ids=["capulet.lit"], xmpp_addrs=["capulet.lit"],
                         common_name="cn.capulet.lit")
    ids = certs.identities(leaf.cert)
    assert ids == certs.Identities(("capulet.lit",), ("_xmpp-server.capulet.lit",), ("capulet.lit",),
                                   ("cn.capulet.lit",))


def test_dns_id_match_is_case_insensitive(root):
    leaf = pki.make_leaf(root, "Capulet.LIT")
    assert certs.matches_domain(leaf.cert, "capulet.lit")
    assert certs.matches_domain(leaf.cert, "CAPULET.lit.")
    assert not certs.matches_domain(leaf.cert, "montague.lit")
    assert not certs.matches_domain(leaf.cert, "sub.capulet.lit")


def test_wildcard_matches_exactly_one_label(root):
    leaf = pki.make_leaf(root, "capulet.lit", dns_ids=["*.capulet.lit"])
    assert certs.matches_domain(leaf.cert, "chat.capulet.lit")
    assert not certs.matches_domain(leaf.cert, "capulet.lit")
    assert not certs.matches_domain(leaf.cert, "a.chat.capulet.lit")
    assert not certs.matches_domain(leaf.cert, "chat.montague.lit")


@pytest.mark.parametrize("pattern", ["f*.capulet.lit", "chat.*.lit", "*.lit", "*"])
def test_wildcard_not_left_most_whole_label_never_matches(root, pattern):
    leaf = pki.make_leaf(root, "capulet.lit", dns_ids=[pattern])
    for reference in ("foo.capulet.lit", "chat.capulet.lit", "capulet.lit", "lit"):
        assert not certs.matches_domain(leaf.cert, reference)


def test_idna_reference_compared_as_a_label(root):
    leaf = pki.make_leaf(root, "xn--bcher-kva.example")
    assert certs.matches_domain(leaf.cert, "bücher.example")
    assert certs.matches_domain(leaf.cert, "XN--BCHER-KVA.example")
    assert not certs.matches_domain(leaf.cert, "bucher.example")


def test_srv_id_xmpp_server(root):
    leaf = pki.make_leaf(root, "host1.capulet.lit", dns_ids=[], srv_ids=["capulet.lit"])
    assert certs.matches_domain(leaf.cert, "capulet.lit")
    assert not certs.matches_domain(leaf.cert, "host1.capulet.lit")  # no CN fallback: a SAN exists


def test_srv_id_other_service_does_not_match(root):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    imap = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capulet.lit")]))
        .issuer_name(root.cert.subject).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.OtherName(pki.ID_ON_DNSSRV, pki.ia5_string("_imap.capulet.lit"))]), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    assert certs.identities(imap).srv_ids == ("_imap.capulet.lit",)
    assert not certs.matches_domain(imap, "capulet.lit")  # and no CN fallback either


def test_xmpp_addr(root):
    leaf = pki.make_leaf(root, "host1.capulet.lit", dns_ids=[], xmpp_addrs=["capulet.lit"])
    assert certs.matches_domain(leaf.cert, "capulet.lit")
    assert not certs.matches_domain(leaf.cert, "montague.lit")


def test_cn_only_when_no_supported_san(root):
    cn_only = pki.make_leaf(root, "capulet.lit", dns_ids=[])
    assert certs.matches_domain(cn_only.cert, "capulet.lit")
    with_san = pki.make_leaf(root, "other.lit", dns_ids=["other.lit"], common_name="capulet.lit")
    assert not certs.matches_domain(with_san.cert, "capulet.lit")


def test_invalid_reference_never_matches(root):
    leaf = pki.make_leaf(root, "capulet.lit")
    assert not certs.matches_domain(leaf.cert, "")
    assert not certs.matches_domain(leaf.cert, "capulet lit")


# --- peer_status (XEP-0178 §3 step 11: a trusted certificate that names 'from') --------


def test_peer_status_trusted_and_matching(root, store):
    leaf = pki.make_leaf(root, "capulet.lit")
    status = certs.peer_status(chain(leaf), store, "capulet.lit")
    assert status == (True, True, "")
    assert status.authenticated


def test_peer_status_wrong_name(root, store):
    leaf = pki.make_leaf(root, "capulet.lit")
    trusted, matches, reason = certs.peer_status(chain(leaf), store, "montague.lit")
    assert (trusted, matches) == (True, False)
    assert "capulet.lit" in reason and "montague.lit" in reason


def test_peer_status_untrusted_but_matching(store):
    own = pki.make_leaf(None, "capulet.lit")
    status = certs.peer_status(chain(own), store, "capulet.lit")
    assert (status.trusted, status.matches, status.authenticated) == (False, True, False)
    assert "self-signed" in status.reason


def test_peer_status_no_certificate(store):
    assert certs.peer_status([], store, "capulet.lit") == (False, False, "no certificate presented")
