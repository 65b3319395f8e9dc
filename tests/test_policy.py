"""router.trust.policy: federation allow/deny (RFC 6120 §13.14), the authentication mechanism policy
(XEP-0178 §3, XEP-0220 §2.5) and the per-stanza addressing checks (RFC 6120 §4.3.5, §8.1.1.2,
§8.1.2.2), with the negative cases of the STARTTLS + SASL EXTERNAL + bidi conversation of
test_flows.py."""

import pytest

from router.negotiation.pairs import Pair
from router.trust.policy import (
    ALLOW,
    MECHANISM_DIALBACK,
    MECHANISM_EXTERNAL,
    Decision,
    Policy,
    auth_mechanism_allowed,
    check_stanza,
    federation_allowed,
)

LOCAL = frozenset({"montague.lit", "conference.montague.lit"})
PAIRS = {Pair("montague.lit", "capulet.lit")}  # (local, remote): capulet.lit may send to montague.lit


# --- check_stanza on a stream authenticated as capulet.lit -> montague.lit (RFC 6120 §8.1.1.2, §8.1.2.2)


def test_authorized_stanza_passes():
    # the stanza's pair, (local, remote) = (to domain, from domain)
    assert check_stanza("juliet@capulet.lit/balcony", "romeo@montague.lit", PAIRS, LOCAL) == Pair("montague.lit", "capulet.lit")


def test_comparison_is_on_normalized_domains():
    assert check_stanza("juliet@Capulet.LIT./balcony", "romeo@MONTAGUE.lit", PAIRS, LOCAL) == Pair("montague.lit", "capulet.lit")


def test_stanza_before_authentication_is_not_authorized():
    """RFC 6120 §4.3.5, §4.9.3.12."""
    condition, text = check_stanza("juliet@capulet.lit/balcony", "romeo@montague.lit", set(), LOCAL)
    assert condition == "not-authorized"
    assert "before" in text


def test_not_authorized_wins_over_bad_addressing():
    assert check_stanza(None, None, set(), LOCAL)[0] == "not-authorized"


def test_spoofed_from_is_invalid_from():
    """RFC 6120 §8.1.2.2, §4.9.3.9."""
    condition, text = check_stanza("romeo@montague.lit", "nurse@montague.lit", PAIRS, LOCAL)
    assert condition == "invalid-from"
    assert "montague.lit" in text


@pytest.mark.parametrize("from_jid, to_jid", [
    ("juliet@capulet.lit/balcony", None),
    ("juliet@capulet.lit/balcony", ""),
    (None, "romeo@montague.lit"),
    ("", "romeo@montague.lit"),
])
def test_missing_or_empty_address_is_improper_addressing(from_jid, to_jid):
    """RFC 6120 §8.1.1.2, §8.1.2.2, §4.9.3.7."""
    condition, text = check_stanza(from_jid, to_jid, PAIRS, LOCAL)
    assert condition == "improper-addressing"
    assert ("'to'" if not to_jid else "'from'") in text


@pytest.mark.parametrize("from_jid, to_jid, which", [
    ("juliet@capulet.lit/balcony", "@montague.lit", "'to'"),
    ("juliet@capulet.lit/balcony", "romeo@monta gue.lit", "'to'"),
    ("juliet@capulet.lit/", "romeo@montague.lit", "'from'"),
    ("juliet@capulet..lit", "romeo@montague.lit", "'from'"),
])
def test_invalid_jid_is_improper_addressing(from_jid, to_jid, which):
    condition, text = check_stanza(from_jid, to_jid, PAIRS, LOCAL)
    assert condition == "improper-addressing"
    assert which in text


def test_to_a_domain_not_served_is_host_unknown():
    """RFC 6120 §8.1.1.2; §10.4: a relay never forwards a stanza received over S2S to a third domain."""
    condition, text = check_stanza("juliet@capulet.lit/balcony", "tybalt@verona.lit", PAIRS, LOCAL)
    assert condition == "host-unknown"
    assert "verona.lit" in text


def test_local_domain_not_validated_on_this_stream_is_host_unknown():
    """Dialback validated capulet.lit -> montague.lit only; conference.montague.lit is ours but
    not a Target Domain of this stream."""
    condition, _ = check_stanza("juliet@capulet.lit", "room@conference.montague.lit", PAIRS, LOCAL)
    assert condition == "host-unknown"


def test_check_is_per_pair_not_per_domain():
    """RFC 6120 §8.1.2.2, XEP-0220 §2.2.1: dialback authorizes (from, to) pairs; both domains are
    validated on the stream, but not as this pair."""
    pairs = {Pair("montague.lit", "capulet.lit"), Pair("conference.montague.lit", "verona.lit")}
    assert check_stanza("a@verona.lit", "room@conference.montague.lit", pairs, LOCAL) == Pair("conference.montague.lit", "verona.lit")
    condition, _ = check_stanza("a@verona.lit", "romeo@montague.lit", pairs, LOCAL)
    assert condition == "invalid-from"


def test_pair_for_a_domain_no_longer_served_is_host_unknown():
    pairs = {Pair("gone.montague.lit", "capulet.lit")}
    assert check_stanza("juliet@capulet.lit", "x@gone.montague.lit", pairs, LOCAL)[0] == "host-unknown"


# --- federation allow/deny (RFC 6120 §13.14: federation is a per-deployment choice)


def test_default_policy_allows_everyone():
    assert federation_allowed(Policy(), "capulet.lit") == ALLOW


def test_deny_exact_and_wildcard():
    policy = Policy(deny=("evil.lit", "*.spam.lit"))
    assert not federation_allowed(policy, "evil.lit")
    assert not federation_allowed(policy, "EVIL.lit.")
    assert not federation_allowed(policy, "a.spam.lit")
    assert not federation_allowed(policy, "a.b.spam.lit")
    assert federation_allowed(policy, "spam.lit")  # the wildcard covers subdomains only
    assert federation_allowed(policy, "notevil.lit")
    assert federation_allowed(policy, "xspam.lit")
    decision = federation_allowed(policy, "evil.lit")
    assert decision.condition == "policy-violation" and "evil.lit" in decision.text


def test_allow_list_restricts_and_deny_wins():
    policy = Policy(allow=("capulet.lit", "*.verona.lit"), deny=("bad.verona.lit",))
    assert federation_allowed(policy, "capulet.lit")
    assert federation_allowed(policy, "good.verona.lit")
    assert not federation_allowed(policy, "montague.lit")
    assert "allow list" in federation_allowed(policy, "montague.lit").text
    assert not federation_allowed(policy, "bad.verona.lit")


def test_idna_patterns_match_a_labels():
    policy = Policy(deny=("bücher.example",))
    assert not federation_allowed(policy, "xn--bcher-kva.example")


def test_invalid_remote_domain_is_refused():
    decision = federation_allowed(Policy(), "not a domain")
    assert decision == Decision(False, "improper-addressing", decision.text)


def test_invalid_patterns_and_modes_raise():
    with pytest.raises(ValueError):
        Policy(deny=("bad pattern",))
    with pytest.raises(ValueError, match="secure"):
        Policy(auth_overrides={"capulet.lit": "maybe"})
    with pytest.raises(ValueError):
        Policy(max_stanza_bytes=0)


# --- authentication mechanism: dialback or certificates only (XEP-0178 §3 step 9, RFC 6120 §6.4.5)


def test_dialback_allowed_by_default_over_tls():
    assert auth_mechanism_allowed(Policy(), "capulet.lit", MECHANISM_DIALBACK, encrypted=True)
    assert auth_mechanism_allowed(Policy(), "capulet.lit", MECHANISM_EXTERNAL, encrypted=True)


def test_encryption_required_refuses_plaintext_dialback():
    """XEP-0220 §2.5 table: <policy-violation/> when TLS is required before dialback."""
    decision = auth_mechanism_allowed(Policy(), "capulet.lit", MECHANISM_DIALBACK, encrypted=False)
    assert decision.condition == "policy-violation" and "TLS" in decision.text
    relaxed = Policy(require_encryption=False)
    assert auth_mechanism_allowed(relaxed, "capulet.lit", MECHANISM_DIALBACK, encrypted=False)


def test_secure_auth_refuses_dialback_but_not_external():
    """XEP-0220 §2.5 table: <not-authorized/> when a certificate proof is required and absent."""
    policy = Policy(secure_auth=True)
    decision = auth_mechanism_allowed(policy, "capulet.lit", MECHANISM_DIALBACK, encrypted=True)
    assert decision.condition == "not-authorized" and "certificate" in decision.text
    assert auth_mechanism_allowed(policy, "capulet.lit", MECHANISM_EXTERNAL, encrypted=True)


def test_per_domain_overrides_most_specific_first():
    policy = Policy(secure_auth=True, auth_overrides={"*.lit": "dialback", "capulet.lit": "secure",
                                                       "*.x.lit": "secure"})
    assert policy.auth_mode("montague.lit") == "dialback"
    assert policy.auth_mode("capulet.lit") == "secure"
    assert policy.auth_mode("a.x.lit") == "secure"
    assert policy.auth_mode("other.example") == "secure"
    assert auth_mechanism_allowed(policy, "montague.lit", MECHANISM_DIALBACK, encrypted=True)
    assert not auth_mechanism_allowed(policy, "a.x.lit", MECHANISM_DIALBACK, encrypted=True)


def test_denied_domain_cannot_authenticate_at_all():
    decision = auth_mechanism_allowed(Policy(deny=("capulet.lit",)), "capulet.lit", MECHANISM_EXTERNAL, True)
    assert decision.condition == "policy-violation"


def test_unknown_mechanism_is_a_programming_error():
    with pytest.raises(ValueError):
        auth_mechanism_allowed(Policy(), "capulet.lit", "PLAIN", True)


def test_policy_is_hashable_and_normalized():
    policy = Policy(allow=("Capulet.LIT.",), auth_overrides={"*.Verona.lit": "secure"})
    assert policy.allow == ("capulet.lit",)
    assert policy.auth_overrides == (("*.verona.lit", "secure"),)
    assert hash(policy) == hash(Policy(allow=("capulet.lit",), auth_overrides={"*.verona.lit": "secure"}))
