"""DANE (RFC 6698, RFC 7671, RFC 7673): TLSA matching for every usage, selector and matching
type with certificates made here, and the sans-IO session's side: a receiver's features wait
for the verdict, an initiator ends a stream whose certificate matches none of the records."""

from __future__ import annotations

import datetime
import hashlib
from types import SimpleNamespace

import dns.flags
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from router.negotiation import events as ev
from router.negotiation.session import Session
from router.net import resolver
from router.net.danecheck import connected_target
from router.trust import dane, pki
from router.trust.dane import DANE_EE, DANE_TA, PKIX_EE, PKIX_TA, Tlsa
from dnsserver import run_with_dns
from test_negotiation_stream import closed_with, features_of, header
from test_negotiation_support import config

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
DIGESTS = {0: lambda data: data, 1: lambda data: hashlib.sha256(data).digest(), 2: lambda data: hashlib.sha512(data).digest()}


def selected(credential: pki.Credential, selector: int) -> bytes:
    if selector == 0:
        return credential.cert_der()
    return credential.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record(usage: int, selector: int, matching_type: int, credential: pki.Credential) -> Tlsa:
    """The TLSA record an operator would publish for ``credential``."""
    return Tlsa(usage, selector, matching_type, DIGESTS[matching_type](selected(credential, selector)))


@pytest.fixture(scope="module")
def world():
    """A CA with a leaf for peer.example (SRV target xmpp.hosting.example), another CA, and a
    self-signed leaf for peer.example that nobody trusts."""
    ca = pki.make_ca("DANE test CA")
    other_ca = pki.make_ca("Unrelated CA")
    return {
        "ca": ca,
        "other_ca": other_ca,
        "leaf": pki.make_leaf(ca, "peer.example"),
        "host_leaf": pki.make_leaf(ca, "xmpp.hosting.example"),
        "self_signed": pki.make_leaf(None, "peer.example"),
    }


NAMES = ("peer.example", "xmpp.hosting.example")  # the service domain and the SRV target host name


# ---------------------------------------------------------------- DANE-EE


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching_type", [0, 1, 2])
def test_dane_ee_matches_the_leaf_by_every_selector_and_matching_type(world, selector, matching_type):
    leaf = world["self_signed"]
    verdict = dane.check([leaf.cert_der()], [record(DANE_EE, selector, matching_type, leaf)], NAMES)
    assert verdict.matched is True, verdict.reason


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching_type", [0, 1, 2])
def test_dane_ee_record_of_another_certificate_does_not_match(world, selector, matching_type):
    verdict = dane.check([world["self_signed"].cert_der()], [record(DANE_EE, selector, matching_type, world["leaf"])],
                         NAMES)
    assert verdict == (False, "the certificate matches none of 1 usable TLSA record(s)")


def test_dane_ee_does_no_name_or_expiry_check(world):
    """RFC 7671 §5.1: with DANE-EE the certificate's names and validity dates are not looked at."""
    expired = pki.make_leaf(None, "somewhere.else", not_before=datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc),
                            not_after=datetime.datetime(2002, 1, 1, tzinfo=datetime.timezone.utc))
    assert dane.check([expired.cert_der()], [record(DANE_EE, 1, 1, expired)], NAMES).matched is True


def test_spki_record_survives_a_new_certificate_for_the_same_key(world):
    """Selector 1 names the key: a certificate re-issued for the same key still matches, a selector 0
    record (the whole certificate) no longer does."""
    leaf = world["self_signed"]
    now = datetime.datetime.now(datetime.timezone.utc)
    reissued = pki.Credential(
        x509.CertificateBuilder().subject_name(leaf.cert.subject).issuer_name(leaf.cert.subject)
        .public_key(leaf.key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(leaf.key, hashes.SHA256()),
        leaf.key)
    assert dane.check([reissued.cert_der()], [record(DANE_EE, 1, 1, leaf)], NAMES).matched is True
    assert dane.check([reissued.cert_der()], [record(DANE_EE, 0, 1, leaf)], NAMES).matched is False


# ---------------------------------------------------------------- DANE-TA


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching_type", [0, 1, 2])
def test_dane_ta_matches_an_issuer_in_the_chain(world, selector, matching_type):
    chain = [world["leaf"].cert_der(), world["ca"].cert_der()]
    verdict = dane.check(chain, [record(DANE_TA, selector, matching_type, world["ca"])], NAMES)
    assert verdict.matched is True, verdict.reason


def test_dane_ta_accepts_the_srv_target_host_name(world):
    """RFC 7673 §4.2 with §4.1: the reference identifiers are the service domain and the SRV target host name."""
    chain = [world["host_leaf"].cert_der(), world["ca"].cert_der()]
    assert dane.check(chain, [record(DANE_TA, 0, 1, world["ca"])], NAMES).matched is True
    assert dane.check(chain, [record(DANE_TA, 0, 1, world["ca"])], ("peer.example",)).matched is False


def test_dane_ta_needs_the_leaf_to_name_the_domain(world):
    stranger = pki.make_leaf(world["ca"], "stranger.example")
    verdict = dane.check([stranger.cert_der(), world["ca"].cert_der()], [record(DANE_TA, 0, 1, world["ca"])], NAMES)
    assert verdict.matched is False
    assert "names none of peer.example, xmpp.hosting.example" in verdict.reason


def test_dane_ta_needs_the_chain_to_verify_from_the_anchor(world):
    """The record names a CA the peer presented, but that CA did not issue the leaf."""
    chain = [world["leaf"].cert_der(), world["other_ca"].cert_der()]
    verdict = dane.check(chain, [record(DANE_TA, 0, 1, world["other_ca"])], NAMES)
    assert verdict.matched is False and "does not verify the chain" in verdict.reason


def test_dane_ta_record_of_the_leaf_itself_is_not_a_trust_anchor(world):
    chain = [world["leaf"].cert_der(), world["ca"].cert_der()]
    assert dane.check(chain, [record(DANE_TA, 0, 1, world["leaf"])], NAMES).matched is False


def test_dane_ta_through_an_intermediate(world):
    intermediate = pki.make_ca("DANE intermediate", issuer=world["ca"])
    leaf = pki.make_leaf(intermediate, "peer.example")
    chain = [leaf.cert_der(), intermediate.cert_der(), world["ca"].cert_der()]
    assert dane.check(chain, [record(DANE_TA, 1, 2, world["ca"])], NAMES).matched is True
    assert dane.check(chain, [record(DANE_TA, 0, 1, intermediate)], NAMES).matched is True


def test_many_records_cost_one_hash_per_certificate_and_kind_and_one_chain_check_per_anchor(world, monkeypatch):
    """The remote publishes its TLSA records, as many as it likes: 400 that match nothing and
    three kinds of DANE-TA record for an anchor whose chain does not name the domain."""
    calls = {"association": 0, "chain": 0}
    association, ta_failure = dane.association, dane._ta_failure

    def counted(name, function):
        def count(*args):
            calls[name] += 1
            return function(*args)
        return count

    monkeypatch.setattr(dane, "association", counted("association", association))
    monkeypatch.setattr(dane, "_ta_failure", counted("chain", ta_failure))
    chain = [pki.make_leaf(world["ca"], "stranger.example").cert_der(), world["ca"].cert_der()]
    noise = [Tlsa(usage, 1, 1, n.to_bytes(32, "big")) for n in range(200) for usage in (DANE_EE, DANE_TA)]
    anchors = [record(DANE_TA, selector, matching_type, world["ca"]) for selector, matching_type in ((0, 1), (1, 1), (0, 2))]
    verdict = dane.check(chain, noise + anchors, NAMES)
    assert verdict.matched is False and verdict.reason.count("names none of") == 1
    assert calls == {"association": 4, "chain": 1}  # (leaf, 1, 1), (CA, 1, 1), (CA, 0, 1), (CA, 0, 2)


# ---------------------------------------------------------------- usable records


def test_pkix_usages_are_not_used(world):
    """PKIX-TA(0) and PKIX-EE(1) are unusable here (RFC 7672 §3.1.3's rule for SMTP): even when they match,
    DANE says nothing."""
    chain = [world["leaf"].cert_der(), world["ca"].cert_der()]
    records = [record(PKIX_EE, 0, 1, world["leaf"]), record(PKIX_TA, 0, 1, world["ca"])]
    assert dane.check(chain, records, NAMES).matched is None
    assert dane.usable(records) == []


def test_unknown_or_malformed_records_are_skipped_not_failed(world):
    leaf = world["self_signed"]
    good = record(DANE_EE, 0, 1, leaf)
    bad = [Tlsa(DANE_EE, 2, 1, good.data), Tlsa(DANE_EE, 0, 3, good.data), Tlsa(4, 0, 1, good.data),
           Tlsa(DANE_EE, 0, 1, good.data[:20]), Tlsa(DANE_EE, 0, 2, good.data)]  # digest lengths wrong in the last two
    assert dane.usable(bad) == []
    assert dane.check([leaf.cert_der()], bad, NAMES).matched is None
    assert dane.check([leaf.cert_der()], bad + [good], NAMES).matched is True


def test_one_matching_record_among_several_is_enough_and_an_unusable_match_is_not(world):
    leaf = world["self_signed"]
    other = record(DANE_EE, 1, 1, world["leaf"])
    assert dane.check([leaf.cert_der()], [other, record(DANE_EE, 0, 2, leaf)], NAMES).matched is True
    assert dane.check([leaf.cert_der()], [other, record(PKIX_EE, 0, 2, leaf)], NAMES).matched is False


def test_no_certificate_or_garbage_does_not_match(world):
    records = [record(DANE_EE, 0, 1, world["leaf"])]
    assert dane.check([], records, NAMES) == (False, "no certificate presented")
    assert dane.check([b"\x30\x03junk"], records, NAMES).matched is False


def test_exempt_patterns_match_as_policy_lists_do():
    patterns = ("peer.example", "*.hosting.example")
    assert dane.exempt("peer.example", patterns) and dane.exempt("a.hosting.example", patterns)
    assert not dane.exempt("hosting.example", patterns) and not dane.exempt("sub.peer.example", patterns)


# ---------------------------------------------------------------- the resolver's side (a real DNS server)

SRV_ZONE = {
    ("_xmpp-server._tcp.peer.example", "SRV"): ["10 0 5269 xmpp.hosting.example."],
    ("xmpp.hosting.example", "A"): ["127.0.0.1"],
    ("_5269._tcp.xmpp.hosting.example", "TLSA"): ["3 1 1 " + "ab" * 32, "2 0 2 " + "cd" * 64],
}


@pytest.mark.parametrize("secure, expected", [
    (True, True),
    (["_xmpp-server._tcp.peer.example"], False),  # RFC 7673 §3.2: no validated address record, no TLSA
    (["xmpp.hosting.example"], False),  # RFC 7673 §3.1: an insecure SRV answer, no DANE
    (False, False),
])
def test_a_target_is_secure_when_its_srv_and_address_answers_had_the_ad_bit(secure, expected):
    async def scenario(make, server):
        return await make().resolve("peer.example")

    [target] = run_with_dns(SRV_ZONE, scenario, secure=secure)
    assert (target.host, target.port, target.secure) == ("xmpp.hosting.example", 5269, expected)


def test_tlsa_lookup_at_the_port_and_host_of_the_srv_target():
    async def scenario(make, server):
        resolver = make()
        return (await resolver.tlsa("xmpp.hosting.example", 5269), await resolver.tlsa("xmpp.hosting.example", 5270),
                await resolver.tlsa("broken.example", 5269))

    found, absent, failed = run_with_dns(SRV_ZONE, scenario, secure=True, fail=["_5269._tcp.broken.example"])
    assert found.secure and set(found.records) == {Tlsa(3, 1, 1, bytes.fromhex("ab" * 32)),
                                                   Tlsa(2, 0, 2, bytes.fromhex("cd" * 64))}
    assert absent == resolver.TlsaAnswer((), False)
    assert failed == resolver.TlsaAnswer(None, False)  # SERVFAIL: a bogus answer is not "no record"


def test_the_dane_resolver_asks_with_the_do_and_ad_bits_and_reads_nameserver_ports():
    """RFC 6840 §5.7: the AD bit in the query asks the validating resolver to report validation;
    the DO bit (EDNS0) asks for DNSSEC records."""
    async def scenario(make, server):
        plain = resolver.Resolver(dns_resolver=resolver.dns_resolver((f"127.0.0.1:{server.port}",)), lifetime=2.0)
        await plain.tlsa("xmpp.hosting.example", 5269)
        secure = resolver.Resolver(dns_resolver=resolver.dns_resolver((f"127.0.0.1:{server.port}",), dnssec=True),
                                   lifetime=2.0)
        return await secure.tlsa("xmpp.hosting.example", 5269), server.query_flags

    answer, flags = run_with_dns(SRV_ZONE, scenario, secure=True)
    assert answer.secure and len(answer.records) == 2
    (plain_flags, plain_edns), (dane_flags, dane_edns) = flags
    assert not plain_flags & dns.flags.AD and not plain_edns & dns.flags.DO
    assert dane_flags & dns.flags.AD and dane_edns & dns.flags.DO
    servers = resolver.dns_resolver(("127.0.0.1:5353", "::1", "[::1]:54")).nameservers
    assert [(s.address, s.port) for s in servers] == [("127.0.0.1", 5353), ("::1", 53), ("::1", 54)]


@pytest.mark.parametrize("dnssec", [True, False])
def test_with_dnssec_a_failed_srv_lookup_never_falls_back_to_address_records(dnssec):
    """RFC 7673 §3.1: a SERVFAIL (how a validating resolver reports a bogus answer) is not "no
    SRV record": with DNSSEC the domain is unreachable; without it, A/AAAA as RFC 6120 §3.2.2."""
    zone = {("peer.example", "A"): ["127.0.0.1"]}

    async def scenario(make, server):
        dns_resolver = resolver.dns_resolver((f"127.0.0.1:{server.port}",), dnssec=dnssec)
        try:
            return await resolver.Resolver(dns_resolver=dns_resolver, lifetime=2.0).resolve("peer.example")
        except resolver.ResolutionError as exc:
            return str(exc)

    found = run_with_dns(zone, scenario, fail=["_xmpp-server._tcp.peer.example"])
    if dnssec:
        assert "possibly a bogus answer" in found
    else:
        assert [(t.host, t.port, t.addresses) for t in found] == [("peer.example", 5269, ("127.0.0.1",))]


def test_secure_srv_records_of_an_inbound_peer():
    zone = {**SRV_ZONE, ("_xmpps-server._tcp.peer.example", "SRV"): ["5 0 5270 tls.hosting.example."]}

    async def scenario(make, server):
        return await make().secure_srv_records("peer.example")

    insecure_xmpps = run_with_dns(zone, scenario, secure=["_xmpp-server._tcp.peer.example"])
    assert [(r.host, r.port, r.direct_tls) for r in insecure_xmpps] == [("xmpp.hosting.example", 5269, False)]


def test_the_target_a_stream_reached_is_found_by_host_name_else_by_address():
    """A direct TLS stream is secured before the connector notes the SRV host name it reached:
    the connection's address and port tell the target then."""
    targets = [resolver.Target("a.hosting.example", 5269, False, ("127.0.0.2",), True),
               resolver.Target("b.hosting.example", 5269, True, ("127.0.0.3",), False)]
    by_name = SimpleNamespace(target=("127.0.0.3", 5269), target_host="a.hosting.example")
    by_address = SimpleNamespace(target=("127.0.0.3", 5269), target_host=None)
    elsewhere = SimpleNamespace(target=("127.0.0.3", 5270), target_host=None)
    assert connected_target(targets, by_name) is targets[0]
    assert connected_target(targets, by_address) is targets[1]
    assert connected_target(targets, elsewhere) is None


# ---------------------------------------------------------------- the session's side


def secured(session: Session, chain, from_="a.example") -> bytes:
    """A receiver through STARTTLS with the peer's ``chain``; what it wrote after the peer's new header."""
    session.receive_data(header(from_=from_) + STARTTLS)
    session.tls_established(chain)
    session.data_to_send()
    session.events()
    session.receive_data(header(from_=from_))
    return session.data_to_send()


def test_receiver_features_wait_for_the_dane_verdict_then_offer_external(world):
    peer = pki.make_leaf(None, "a.example")
    session = Session("receiver", config(["b.example"], trust=[world["ca"]], dane=True))
    out = secured(session, [peer.cert_der()])
    assert session.events() == [ev.CheckDane("a.example")]
    assert b"<stream:stream" in out and features_of(out) == []  # header only: the features wait
    session.dane_verdict("other.example", True)  # not what the session asked
    assert session.data_to_send() == b""
    session.dane_verdict("a.example", True)
    [feats] = features_of(out + session.data_to_send())
    assert b"EXTERNAL" in feats
    session.receive_data(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
    assert b"<success" in session.data_to_send()
    assert [e.mechanism for e in session.events() if isinstance(e, ev.Authenticated)] == ["EXTERNAL"]


@pytest.mark.parametrize("matched", [False, None])
def test_receiver_without_a_dane_match_offers_no_external(world, matched):
    session = Session("receiver", config(["b.example"], trust=[world["ca"]], dane=True))
    out = secured(session, [pki.make_leaf(None, "a.example").cert_der()])
    session.dane_verdict("a.example", matched, "no match")
    [feats] = features_of(out + session.data_to_send())
    assert b"EXTERNAL" not in feats and b"dialback" in feats


@pytest.mark.parametrize("case", ["trusted", "exempt", "dane off"])
def test_receiver_asks_nothing_when_dane_cannot_change_the_outcome(world, case):
    trusted = case == "trusted"
    chain = [pki.make_leaf(world["ca"] if trusted else None, "a.example").cert_der()]
    overrides = {"dane": case != "dane off", "dane_exempt": ("a.example",) if case == "exempt" else ()}
    session = Session("receiver", config(["b.example"], trust=[world["ca"]], **overrides))
    [feats] = features_of(secured(session, chain))
    assert not [e for e in session.events() if isinstance(e, ev.CheckDane)]
    assert (b"EXTERNAL" in feats) == trusted


def after_tls(world) -> Session:
    """An initiator whose STARTTLS handshake just ended (the runtime held it for DANE)."""
    session = Session("initiator", config(["a.example"], trust=[world["ca"]]), "a.example", "b.example")
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                         b"id='x1' from='b.example' version='1.0'><stream:features>"
                         b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>")
    session.receive_data(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    session.data_to_send()
    session.events()
    session.tls_established([pki.make_leaf(None, "b.example").cert_der()])
    return session


def test_initiator_dane_match_proves_the_receiving_server(world):
    session = after_tls(world)
    assert not session.peer_certificate_ok("b.example")
    session.dane_verdict("b.example", True, "matches")
    assert session.peer_certificate_ok("b.example") and not session.closed


def test_initiator_dane_mismatch_ends_the_stream_and_fails_its_pairs(world):
    """RFC 7673 §3.4: usable TLSA records and no match: the connection must not be used."""
    session = after_tls(world)
    session.dane_verdict("b.example", False, "DANE: the certificate does not match")
    events = session.events()
    assert closed_with(events) == ["policy-violation"]
    [failed] = [e for e in events if isinstance(e, ev.AuthFailed)]
    assert (failed.pair, failed.bounce, failed.text) == (("a.example", "b.example"), "remote-server-timeout",
                                                         "DANE: the certificate does not match")
    out = session.data_to_send()
    assert out.index(b"<stream:stream") < out.index(b"<policy-violation") < out.index(b"</stream:stream>")
