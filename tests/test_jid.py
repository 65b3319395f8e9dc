"""router.jid: domainpart extraction and the canonical domain form (RFC 7622; tricky T-03)."""

import pytest

from router.jid import domain_of, normalize_domain


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


def test_results_are_cached_but_bounded():
    domain_of.cache_clear()
    domain_of("juliet@capulet.lit")
    domain_of("juliet@capulet.lit")
    info = domain_of.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    assert info.maxsize is not None and normalize_domain.cache_info().maxsize is not None
