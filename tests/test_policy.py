"""router.policy: federation allow/deny, auth mechanism policy and per-stanza addressing
checks (checklist 38, 68, 117-122; flows.md negative variants a1-a4; tricky T-03)."""

import pytest

from router.policy import (
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
PAIRS = {("capulet.lit", "montague.lit")}


# --- check_stanza: flows.md a1-a4 on the stream authenticated as capulet.lit -> montague.lit


def test_117_120_authorized_stanza_passes():
    assert check_stanza("juliet@capulet.lit/balcony", "romeo@montague.lit", PAIRS, LOCAL) is None


def test_117_120_comparison_is_on_normalized_domains():
    assert check_stanza("juliet@Capulet.LIT./balcony", "romeo@MONTAGUE.lit", PAIRS, LOCAL) is None


def test_120_a1_stanza_before_authentication_is_not_authorized():
    condition, text = check_stanza("juliet@capulet.lit/balcony", "romeo@montague.lit", set(), LOCAL)
    assert condition == "not-authorized"
    assert "before" in text


def test_120_not_authorized_wins_over_bad_addressing():
    assert check_stanza(None, None, set(), LOCAL)[0] == "not-authorized"


def test_119_a2_spoofed_from_is_invalid_from():
    condition, text = check_stanza("romeo@montague.lit", "nurse@montague.lit", PAIRS, LOCAL)
    assert condition == "invalid-from"
    assert "montague.lit" in text


@pytest.mark.parametrize("from_jid, to_jid", [
    ("juliet@capulet.lit/balcony", None),
    ("juliet@capulet.lit/balcony", ""),
    (None, "romeo@montague.lit"),
    ("", "romeo@montague.lit"),
])
def test_117_a3_missing_or_empty_address_is_improper_addressing(from_jid, to_jid):
    condition, text = check_stanza(from_jid, to_jid, PAIRS, LOCAL)
    assert condition == "improper-addressing"
    assert ("'to'" if not to_jid else "'from'") in text


@pytest.mark.parametrize("from_jid, to_jid, which", [
    ("juliet@capulet.lit/balcony", "@montague.lit", "'to'"),
    ("juliet@capulet.lit/balcony", "romeo@monta gue.lit", "'to'"),
    ("juliet@capulet.lit/", "romeo@montague.lit", "'from'"),
    ("juliet@capulet..lit", "romeo@montague.lit", "'from'"),
])
def test_117_invalid_jid_is_improper_addressing(from_jid, to_jid, which):
    condition, text = check_stanza(from_jid, to_jid, PAIRS, LOCAL)
    assert condition == "improper-addressing"
    assert which in text


def test_118_a4_to_a_domain_not_served_is_host_unknown():
    condition, text = check_stanza("juliet@capulet.lit/balcony", "tybalt@verona.lit", PAIRS, LOCAL)
    assert condition == "host-unknown"
    assert "verona.lit" in text


def test_118_local_domain_not_validated_on_this_stream_is_host_unknown():
    """Dialback validated capulet.lit -> montague.lit only; conference.montague.lit is ours but
    not a Target Domain of this stream."""
    condition, _ = check_stanza("juliet@capulet.lit", "room@conference.montague.lit", PAIRS, LOCAL)
    assert condition == "host-unknown"


def test_119_check_is_per_pair_not_per_domain():
    """T-03: both domains are validated on the stream, but not as this pair."""
    pairs = {("capulet.lit", "montague.lit"), ("verona.lit", "conference.montague.lit")}
    assert check_stanza("a@verona.lit", "room@conference.montague.lit", pairs, LOCAL) is None
    condition, _ = check_stanza("a@verona.lit", "romeo@montague.lit", pairs, LOCAL)
    assert condition == "invalid-from"


def test_118_pair_for_a_domain_no_longer_served_is_host_unknown():
    pairs = {("capulet.lit", "gone.montague.lit")}
    assert check_stanza("juliet@capulet.lit", "x@gone.montague.lit", pairs, LOCAL)[0] == "host-unknown"


# --- federation allow/deny (checklist 121)


def test_121_default_policy_allows_everyone():
    assert federation_allowed(Policy(), "capulet.lit") == ALLOW


def test_121_deny_exact_and_wildcard():
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


def test_121_allow_list_restricts_and_deny_wins():
    policy = Policy(allow=("capulet.lit", "*.verona.lit"), deny=("bad.verona.lit",))
    assert federation_allowed(policy, "capulet.lit")
    assert federation_allowed(policy, "good.verona.lit")
    assert not federation_allowed(policy, "montague.lit")
    assert "allow list" in federation_allowed(policy, "montague.lit").text
    assert not federation_allowed(policy, "bad.verona.lit")


def test_121_idna_patterns_match_a_labels():
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


# --- authentication mechanism (checklist 38, 68)


def test_38_dialback_allowed_by_default_over_tls():
    assert auth_mechanism_allowed(Policy(), "capulet.lit", MECHANISM_DIALBACK, encrypted=True)
    assert auth_mechanism_allowed(Policy(), "capulet.lit", MECHANISM_EXTERNAL, encrypted=True)


def test_68_encryption_required_refuses_plaintext_dialback():
    decision = auth_mechanism_allowed(Policy(), "capulet.lit", MECHANISM_DIALBACK, encrypted=False)
    assert decision.condition == "policy-violation" and "TLS" in decision.text
    relaxed = Policy(require_encryption=False)
    assert auth_mechanism_allowed(relaxed, "capulet.lit", MECHANISM_DIALBACK, encrypted=False)


def test_38_secure_auth_refuses_dialback_but_not_external():
    policy = Policy(secure_auth=True)
    decision = auth_mechanism_allowed(policy, "capulet.lit", MECHANISM_DIALBACK, encrypted=True)
    assert decision.condition == "not-authorized" and "certificate" in decision.text
    assert auth_mechanism_allowed(policy, "capulet.lit", MECHANISM_EXTERNAL, encrypted=True)


def test_38_per_domain_overrides_most_specific_first():
    policy = Policy(secure_auth=True, auth_overrides={"*.lit": "dialback", "capulet.lit": "secure",
                                                       "*.x.lit": "secure"})
    assert policy.auth_mode("montague.lit") == "dialback"
    assert policy.auth_mode("capulet.lit") == "secure"
    assert policy.auth_mode("a.x.lit") == "secure"
    assert policy.auth_mode("other.example") == "secure"
    assert auth_mechanism_allowed(policy, "montague.lit", MECHANISM_DIALBACK, encrypted=True)
    assert not auth_mechanism_allowed(policy, "a.x.lit", MECHANISM_DIALBACK, encrypted=True)


def test_121_denied_domain_cannot_authenticate_at_all():
    decision = auth_mechanism_allowed(Policy(deny=("capulet.lit",)), "capulet.lit", MECHANISM_EXTERNAL, True)
    assert decision.condition == "policy-violation"


def test_unknown_mechanism_is_a_programming_error():
    with pytest.raises(ValueError):
        auth_mechanism_allowed(Policy(), "capulet.lit", "PLAIN", True)


# --- limits (checklist 122)


def test_122_stanza_limits_before_and_after_authentication():
    policy = Policy(pre_auth_max_stanza_bytes=1000, max_stanza_bytes=5000)
    assert policy.stanza_limit(authenticated=False) == 1000
    assert policy.stanza_limit(authenticated=True) == 5000


def test_policy_is_hashable_and_normalized():
    policy = Policy(allow=("Capulet.LIT.",), auth_overrides={"*.Verona.lit": "secure"})
    assert policy.allow == ("capulet.lit",)
    assert policy.auth_overrides == (("*.verona.lit", "secure"),)
    assert hash(policy) == hash(Policy(allow=("capulet.lit",), auth_overrides={"*.verona.lit": "secure"}))
