"""router.wire.jid: domainpart extraction and the canonical domain form (RFC 7622; domains are normalized
before the per-pair checks of RFC 6120 §8.1.2.2 compare them)."""

import pytest

from router.wire import jid
from router.wire.jid import domain_of, normalize_domain


@pytest.mark.parametrize("jid, domain", [
    ("juliet@capulet.lit/balcony", "capulet.lit"),
    ("capulet.lit", "capulet.lit"),
    ("capulet.lit/resource", "capulet.lit"),
    ("juliet@capulet.lit", "capulet.lit"),
    ("Juliet@CAPULET.Lit.", "capulet.lit"),
    # the resource is stripped first: '@' and '/' inside it do not matter
    ("capulet.lit/a@b.example", "capulet.lit"),
    ("juliet@capulet.lit/x/y@z.example", "capulet.lit"),
    ("romeo@bücher.example", "xn--bcher-kva.example"),
    ("[::1]", "[::1]"),
    ("[0:0::1]/r", "[::1]"),
    ("127.0.0.1", "127.0.0.1"),
])
def test_domain_of(jid, domain):
    assert domain_of(jid) == domain


@pytest.mark.parametrize("jid", [
    "", "@capulet.lit", "capulet.lit/", "juliet@", "juliet@/res", "a@b@c.lit",
    "jul iet@capulet.lit", "ju<liet@capulet.lit", "capu let.lit", "capulet..lit", ".capulet.lit",
    "capulet.lit..", "[::1", "[not-ip]", "x" * 64 + ".lit", ("a" * 60 + ".") * 5 + "lit",
    "juliet@" + "x" * 1030, "j" * 1024 + "@capulet.lit", "capulet.lit/" + "r" * 1024,
])
def test_invalid_jids_raise(jid):
    """Checklist 117: these must be reported as improper-addressing by the caller."""
    with pytest.raises(ValueError):
        domain_of(jid)


def test_error_text_names_the_problem():
    with pytest.raises(ValueError, match="empty localpart"):
        domain_of("@capulet.lit")
    with pytest.raises(ValueError, match="empty resourcepart"):
        domain_of("capulet.lit/")


@pytest.mark.parametrize("given, expected", [
    ("Capulet.LIT", "capulet.lit"),
    ("capulet.lit.", "capulet.lit"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("_xmpp-server.capulet.lit", "_xmpp-server.capulet.lit"),
])
def test_normalize_domain(given, expected):
    assert normalize_domain(given) == expected


@pytest.mark.parametrize("bad", ["", ".", "a b", "a/b", "a@b", "a..b", "\u0000.lit", "a" * 64])
def test_normalize_domain_rejects(bad):
    with pytest.raises(ValueError):
        normalize_domain(bad)


def test_caches_stay_bounded_whatever_jids_a_peer_sends():
    """A peer sending unique JIDs must not pin memory per JID: long JIDs are never
    remembered, short ones at most RECENT_JIDS at a time; the domain's
    normalization is cached once per spelling of the domain."""
    normalize_domain.cache_clear()
    jid.recent_domains.clear()
    count = 3000
    for i in range(count):
        assert domain_of(f"user{i}@Capulet.lit/{i:04d}" + "r" * 1000) == "capulet.lit"
    assert not jid.recent_domains  # 1 KB JIDs: none kept
    for i in range(2 * jid.RECENT_JIDS + 10):
        assert domain_of(f"juliet{i}@capulet.lit/r") == "capulet.lit"
        assert len(jid.recent_domains) <= jid.RECENT_JIDS
    assert domain_of("juliet@capulet.lit/r") == "capulet.lit" and "juliet@capulet.lit/r" in jid.recent_domains
    assert normalize_domain.cache_info().currsize == 2  # "Capulet.lit", "capulet.lit"
    assert normalize_domain.cache_info().maxsize is not None


@pytest.mark.parametrize("jid_, valid", [
    ("jüliet@capulet.lit", True),
    ("é" * 255 + "@capulet.lit", True),  # 510 bytes
    ("é" * 512 + "@capulet.lit", False),  # 1024 bytes: the byte limit, not the character count
    ("capulet.lit/" + "é" * 511, True),  # 1022 bytes
    ("capulet.lit/" + "é" * 512, False),
    ("capulet.lit/" + "\U0001f600" * 256, False),  # 256 characters, 1024 bytes
    ("jul\tiet@capulet.lit", False),
    ("jul\x7fiet@capulet.lit", False),
    ("jul\u200biet@capulet.lit", False),  # a format character (Cf) is not printable
    ("jul\u00a0iet@capulet.lit", False),  # nor a non-ASCII space
])
def test_localpart_and_resource_checks(jid_, valid):
    if valid:
        assert domain_of(jid_) == "capulet.lit"
    else:
        with pytest.raises(ValueError):
            domain_of(jid_)
