"""Stream headers, features with required flags, restarts (RFC 6120 §4: headers §4.7, features §4.3,
namespaces §4.8, stream errors §4.9)."""

from __future__ import annotations

import re

import pytest

from router.negotiation import events as ev
from router.negotiation.session import Session, parse_version
from router.trust.policy import Policy
from test_negotiation_support import Wire, canonical, config, pki_world  # noqa: F401

STREAMS = "http://etherx.jabber.org/streams"


def header(to="b.example", from_="a.example", version="1.0", extra=""):
    attrs = ""
    if to is not None:
        attrs += f" to='{to}'"
    if from_ is not None:
        attrs += f" from='{from_}'"
    if version is not None:
        attrs += f" version='{version}'"
    return (f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAMS}' xmlns='jabber:server' "
            f"xmlns:db='jabber:server:dialback'{attrs}{extra}>").encode()


def receiver(**overrides):
    return Session("receiver", config(["b.example", "c.example"], **overrides))


def run(session, data):
    session.receive_data(data)
    return session.data_to_send(), session.events()


def closed_with(events):
    return [e.condition for e in events if isinstance(e, ev.Closed)]


def test_stream_id_unpredictable_and_new_after_restart(pki_world):
    """RFC 6120 §4.7.3: stream ids are unpredictable and non-repeating; §4.3.3: a new one after each restart."""
    ca, leaves = pki_world
    ids = set()
    for _ in range(20):
        session = receiver()
        out, _ = run(session, header())
        ids.add(session.stream_id)
        assert re.fullmatch(r"[0-9a-f]{32}", session.stream_id)
        assert f"id='{session.stream_id}'".encode() in out
    assert len(ids) == 20
    a = Session("initiator", config(["a.example"], trust=[ca]), "a.example", "b.example")
    b = receiver(trust=[ca])
    wire = Wire(a, b, (pki_leaf(ca, "a.example"),), (pki_leaf(ca, "b.example"),))
    wire.pump()
    assert b.sasl_done
    stream_ids = re.findall(rb"id='([0-9a-f]+)'", bytes(wire.r_bytes))
    assert len(stream_ids) == 3 and len(set(stream_ids)) == 3  # initial, after TLS, after SASL


def pki_leaf(ca, name):
    from router.trust import pki

    return pki.make_leaf(ca, name).cert_der()


def test_initiator_sends_no_id_and_receiver_ignores_one():
    """RFC 6120 §4.7.3: the initiator sends no id; the receiver ignores one."""
    a = Session("initiator", config(["a.example"]), "a.example", "b.example")
    assert b" id=" not in a.data_to_send()
    session = receiver()
    out, _ = run(session, header(extra=" id='attacker-chosen'"))
    assert session.stream_id != "attacker-chosen" and b"attacker-chosen" not in out


def test_unknown_to_gets_header_then_host_unknown_then_close():
    """RFC 6120 §4.9.1.3: an unknown 'to' is <host-unknown/>; §4.9.1.2: send our header before a stream error."""
    session = receiver()
    out, events = run(session, header(to="elsewhere.example"))
    items = canonical(out)
    assert items[0][0] == "header" and ("from", "") in items[0][1]  # §4.9.1.3: authoritative FQDN or empty
    assert b"<host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in out
    assert out.index(b"<stream:stream") < out.index(b"<stream:error>") < out.index(b"</stream:stream>")
    assert out.endswith(b"</stream:stream>") and items[-1] == ("end",)
    assert closed_with(events) == ["host-unknown"]


def test_missing_to_is_host_unknown():
    """RFC 6120 §4.7.2, §4.9.1.3: a missing 'to' is <host-unknown/>."""
    _, events = run(receiver(), header(to=None))
    assert closed_with(events) == ["host-unknown"]


def test_response_header_attributes():
    """RFC 6120 §4.7.1-§4.7.2: 'from' is ours, 'to' the initiator's; §4.7.4: xml:lang; XEP-0220 §2.4.1: xmlns:db."""
    session = receiver()
    out, _ = run(session, header(to="C.Example.", extra=" xml:lang='fr'"))
    head = canonical(out)[0]
    attrs = dict(head[1])
    assert attrs["from"] == "c.example" and attrs["to"] == "a.example" and attrs["version"] == "1.0"
    assert dict(head[2]) == {"stream": STREAMS, None: "jabber:server", "db": "jabber:server:dialback"}
    assert b"xml:lang='fr'" in out  # §4.7.4: answer in the initiator's language
    assert session.stream_lang == "fr"


@pytest.mark.parametrize("version, answer", [("1.0", "1.0"), ("1.1", "1.0"), ("01.00", "1.0"), ("2.0", "1.0"), ("1.10", "1.0")])
def test_version_is_compared_numerically(version, answer):
    """RFC 6120 §4.7.5: versions compare numerically; we answer with the lower one."""
    out, events = run(receiver(), header(version=version))
    assert f"version='{answer}'".encode() in out and b"<stream:features" in out
    assert not closed_with(events)


def test_parse_version_ignores_leading_zeros():
    """RFC 6120 §4.7.5: leading zeros are ignored on receipt."""
    assert parse_version("01.010") == (1, 10) > parse_version("1.9")
    assert parse_version(None) is None
    with pytest.raises(ValueError):
        parse_version("1")


def test_malformed_version_is_unsupported_version():
    """RFC 6120 §4.7.5, §4.9.3.25: <unsupported-version/>."""
    _, events = run(receiver(), header(version="one.zero"))
    assert closed_with(events) == ["unsupported-version"]


def test_versionless_peer_gets_no_version_no_features_and_dialback_only():
    """RFC 6120 §4.7.5: a peer without 'version' is 0.9: no version and no features (§4.3.2) in our answer, so
    dialback only."""
    session = receiver()
    out, events = run(session, header(version=None))
    assert b" version=" not in out.partition(b"?>")[2] and b"features" not in out and not events
    session.receive_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert closed_with(session.events()) == ["policy-violation"]  # STARTTLS was not offered
    session = receiver()
    run(session, header(version=None))
    session.receive_data(b"<db:result from='a.example' to='b.example'>key</db:result>")
    assert [type(e) for e in session.events()] == [ev.VerifyKey]


def test_wrong_stream_namespace_is_invalid_namespace():
    """RFC 6120 §4.8.1: the header is qualified by http://etherx.jabber.org/streams."""
    data = b"<stream:stream xmlns:stream='urn:wrong' xmlns='jabber:server' to='b.example' version='1.0'>"
    _, events = run(receiver(), data)
    assert closed_with(events) == ["invalid-namespace"]


def test_jabber_client_content_namespace_is_invalid_namespace():
    """RFC 6120 §4.8.2-§4.8.3: the S2S content namespace is jabber:server."""
    data = header().replace(b"xmlns='jabber:server'", b"xmlns='jabber:client'")
    _, events = run(receiver(), data)
    assert closed_with(events) == ["invalid-namespace"]


def test_first_level_jabber_client_element_is_invalid_namespace():
    """RFC 6120 §4.8.3: a first-level element in an unsupported content namespace is <invalid-namespace/>."""
    session = receiver()
    run(session, header())
    _, events = run(session, b"<message xmlns='jabber:client' to='x@b.example'/>")
    assert closed_with(events) == ["invalid-namespace"]


def test_prefix_free_header_is_accepted():
    """RFC 6120 §4.8.2, §9.2: prefix-free canonicalization is equivalent to the stream: prefix."""
    data = b"<stream xmlns='http://etherx.jabber.org/streams' to='b.example' from='a.example' version='1.0'>"
    session = receiver()
    out, events = run(session, data)
    assert not events and b"<stream:features" in out
    session.receive_data(b"<db:result xmlns:db='jabber:server:dialback' from='a.example' to='b.example'>k</db:result>")
    assert [type(e) for e in session.events()] == [ev.VerifyKey]


def test_other_stream_prefix_is_bad_namespace_prefix():
    """RFC 6120 §4.8.5: we accept only the prefix 'stream'; another is <bad-namespace-prefix/>."""
    data = header().replace(b"stream:stream", b"s:stream").replace(b"xmlns:stream", b"xmlns:s")
    _, events = run(receiver(), data)
    assert closed_with(events) == ["bad-namespace-prefix"]


def test_extension_namespace_on_the_header_is_invalid_namespace():
    """RFC 6120 §4.8.5: extension namespaces must not be declared on the stream header."""
    _, events = run(receiver(), header(extra=" xmlns:foo='urn:example:foo'"))
    assert closed_with(events) == ["invalid-namespace"]


def test_denied_domain_at_header_time_is_policy_violation():
    """RFC 6120 §13.14: federation is a local choice; a denied domain gets <policy-violation/> after our header."""
    session = receiver(policy=Policy(require_encryption=False, deny=("a.example",)))
    out, events = run(session, header())
    assert closed_with(events) == ["policy-violation"]
    assert b"<policy-violation" in out and out.index(b"<stream:stream") < out.index(b"<stream:error>")


# ---------------------------------------------------------------- features and required flags


def features_of(out: bytes) -> list[bytes]:
    return [item[1] for item in canonical(out) if item[0] == "element" and b"stream:features" in item[1]]


def test_xep0192_required_flags_follow_the_policy_stage():
    """RFC 6120 §4.3.2: mandatory features carry <required/>; by default we also flag <dialback/> as XEP-0192
    did."""
    out, _ = run(receiver(), header())
    [feats] = features_of(out)
    # TLS optional: <starttls/> without <required/>, dialback the only way to authenticate now
    assert b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"></starttls>' in feats
    assert b'<dialback xmlns="urn:xmpp:features:dialback"><errors></errors><required></required></dialback>' in feats
    assert b"bidi" not in feats  # bidi only after TLS by default


def test_required_flags_switch_keeps_only_the_starttls_one():
    """RFC 6120 §5.4.1: without the XEP-0192 flags, only a mandatory <starttls/> carries <required/>."""
    out, _ = run(receiver(required_flags=False, policy=Policy(require_encryption=True)), header())
    [feats] = features_of(out)
    assert b"<required></required></starttls>" in feats
    out, _ = run(receiver(required_flags=False), header())
    [feats] = features_of(out)
    assert b"required" not in feats and b"<errors></errors>" in feats


def test_mandatory_tls_advertises_only_starttls_with_required():
    """RFC 6120 §5.3.1, §5.4.1: with mandatory TLS, only <starttls><required/></starttls> before TLS."""
    out, _ = run(receiver(policy=Policy(require_encryption=True), bidi="always"), header())
    [feats] = features_of(out)
    assert feats == (b'<stream:features xmlns:stream="http://etherx.jabber.org/streams">'
                     b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"><required></required></starttls>'
                     b"</stream:features>")


def test_dialback_feature_advertises_errors_and_bidi_uses_the_feature_namespace():
    """XEP-0220 §2.4.2: <dialback><errors/></dialback>; XEP-0288 §2.1: the feature is urn:xmpp:features:bidi."""
    out, _ = run(receiver(bidi="always", required_flags=False), header())
    [feats] = features_of(out)
    assert b'<dialback xmlns="urn:xmpp:features:dialback"><errors></errors></dialback>' in feats
    assert b'<bidi xmlns="urn:xmpp:features:bidi"></bidi>' in feats and b"urn:xmpp:bidi\"" not in feats


def test_no_acceptable_authentication_closes_with_policy_violation():
    """RFC 6120 §6.4.5: no acceptable way to authenticate: <policy-violation/> rather than waiting for a timeout."""
    _, events = run(receiver(tls_offered=False, dialback=False), header())
    assert closed_with(events) == ["policy-violation"]


def _initiator_after_features(features: bytes, **overrides):
    session = Session("initiator", config(["a.example"], **overrides), "a.example", "b.example")
    session.data_to_send()
    response = (b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                b"xmlns='jabber:server' id='abc123' from='b.example' to='a.example' version='1.0'>")
    session.receive_data(response + features)
    return session, session.data_to_send(), session.events()


def test_unsupported_required_feature_is_unsupported_feature():
    """RFC 6120 §4.9.3.23: a mandatory feature the initiator does not support."""
    feats = b"<stream:features><compression xmlns='http://jabber.org/features/compress'><required/></compression></stream:features>"
    session, out, events = _initiator_after_features(feats)
    assert closed_with(events) == ["unsupported-feature"]
    assert [e.bounce for e in events if isinstance(e, ev.AuthFailed)] == ["remote-server-timeout"]


def test_required_starttls_we_cannot_do_is_unsupported_feature():
    """RFC 6120 §5.3.1, §4.9.3.23: TLS is mandatory-to-negotiate once <required/> is present."""
    feats = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
             b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
    _, out, events = _initiator_after_features(feats, tls_client=False)
    assert closed_with(events) == ["unsupported-feature"] and b"<db:result" not in out
    _, out, events = _initiator_after_features(feats)
    assert out.endswith(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>") and not events


def test_empty_features_without_any_auth_method_is_not_permission():
    """RFC 6120 §4.3.2 vs XEP-0220 §2.1.1: empty features end negotiation, yet dialback authorizes per pair.

    No <required/> left, but our pair still needs authentication and nothing offers it."""
    _, _, events = _initiator_after_features(b"<stream:features/>")
    assert closed_with(events) == ["unsupported-feature"]


def test_urn_xmpp_bidi_inside_features_is_not_the_bidi_feature(pki_world):
    """XEP-0288 §2.1-§2.2: urn:xmpp:bidi is the request namespace, urn:xmpp:features:bidi the feature."""
    feats = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
             b"<bidi xmlns='urn:xmpp:bidi'/></stream:features>")
    session, out, events = _initiator_after_features(feats, bidi="always")
    assert b"urn:xmpp:bidi" not in out and not session.bidi
    assert b"<db:result from='a.example' to='b.example'>" in out


def test_empty_mechanisms_and_unknown_children_are_tolerated():
    """RFC 6120 §6.4.1: an empty <mechanisms/> (XEP-0288 Example 4, ejabberd) offers nothing; §4.3.2: unknown
    features are ignored."""
    feats = (b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><required/></mechanisms>"
             b"<dialback xmlns='urn:xmpp:features:dialback'/><unknown xmlns='urn:example'/></stream:features>")
    session, out, events = _initiator_after_features(feats)
    # an empty <mechanisms/> offers nothing, even when flagged required; dialback is used instead
    assert b"<db:result" in out and not closed_with(events)


def test_new_features_without_restart_are_refused():
    """RFC 6120 §4.3.5: after negotiation only an empty <features/>; new features need <reset/>."""
    feats = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"
    session, _, _ = _initiator_after_features(feats)
    session.receive_data(b"<stream:features/>")  # an empty one may follow completion
    assert not session.events()
    session.receive_data(feats)
    assert closed_with(session.events()) == ["unsupported-stanza-type"]


def test_initiator_requires_tls_by_policy_when_not_offered():
    """RFC 6120 §5.2: TLS may be mandatory by local policy; RFC 7590 §3.1: the feature can be stripped."""
    feats = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"
    _, out, events = _initiator_after_features(feats, policy=Policy(require_encryption=True))
    assert closed_with(events) == ["policy-violation"] and b"<db:result" not in out


def test_initiator_with_versionless_peer_goes_straight_to_dialback():
    """RFC 6120 §4.7.5: a 0.9 peer sends no features; only dialback is possible."""
    session = Session("initiator", config(["a.example"]), "a.example", "b.example")
    session.data_to_send()
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                         b"xmlns:db='jabber:server:dialback' id='legacy1' from='b.example'>")
    assert b"<db:result from='a.example' to='b.example'>" in session.data_to_send()


def test_initiator_closes_when_the_response_header_has_no_id():
    """RFC 6120 §4.7.3: the response header must carry an id (dialback keys depend on it)."""
    session = Session("initiator", config(["a.example"]), "a.example", "b.example")
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                         b"from='b.example' version='1.0'>")
    assert closed_with(session.events()) == ["bad-format"]


def test_unknown_first_level_element_is_unsupported_stanza_type():
    """RFC 6120 §4.8.4, §4.9.3.24."""
    session = receiver()
    run(session, header())
    _, events = run(session, b"<foo xmlns='urn:example:foo'/>")
    assert closed_with(events) == ["unsupported-stanza-type"]


def test_prefixed_jabber_server_stanza_is_bad_namespace_prefix():
    """RFC 6120 §4.8.5: elements in jabber:server must not be prefixed."""
    session = receiver()
    run(session, header())
    _, events = run(session, b"<s:message xmlns:s='jabber:server' from='a@a.example' to='b@b.example'/>")
    assert closed_with(events) == ["bad-namespace-prefix"]


def test_stanza_before_authentication_is_not_authorized_and_not_delivered():
    """RFC 6120 §4.3.5, §4.9.3.12: <not-authorized/>, and the stanza is not processed."""
    session = receiver()
    run(session, header())
    _, events = run(session, b"<message from='x@a.example' to='y@b.example'/>")
    assert closed_with(events) == ["not-authorized"]
    assert not [e for e in events if isinstance(e, ev.Stanza)]


def test_pre_authentication_size_limit_is_smaller_and_raised_after_auth():
    """RFC 6120 §13.12: stanza size limits (never below 10000 bytes); beyond, <policy-violation/>."""
    policy = Policy(require_encryption=False, pre_auth_max_stanza_bytes=10000, max_stanza_bytes=50000)
    session = receiver(policy=policy)
    run(session, header())
    assert session.tokenizer.max_stanza_bytes == 10000
    _, events = run(session, b"<db:result from='a.example' to='b.example'>" + b"k" * 20000 + b"</db:result>")
    assert closed_with(events) == ["policy-violation"]
    session2 = receiver(policy=policy)
    run(session2, header())
    _, events = run(session2, b"<db:result from='a.example' to='b.example'>k</db:result>")
    key_event = next(e for e in events if isinstance(e, ev.VerifyKey))
    session2.key_verified(key_event.token, "valid")
    assert session2.tokenizer.max_stanza_bytes == 50000
    big = b"<message from='x@a.example' to='y@b.example'><body>" + b"x" * 20000 + b"</body></message>"
    _, events = run(session2, big)
    assert [type(e) for e in events if not isinstance(e, ev.Authenticated)] == [ev.Stanza]


def test_graceful_close_keeps_processing_input_until_the_peer_closes():
    """RFC 6120 §4.4: after our </stream:stream>, send nothing more but keep processing input."""
    session = receiver()
    run(session, header())
    _, events = run(session, b"<db:result from='a.example' to='b.example'>k</db:result>")
    token = next(e for e in events if isinstance(e, ev.VerifyKey)).token
    session.key_verified(token, "valid")
    session.data_to_send(), session.events()
    session.close()
    assert session.data_to_send() == b"</stream:stream>"
    assert session.events() == [ev.Closed(None, None)]
    _, events = run(session, b"<message from='x@a.example' to='y@b.example'/></stream:stream>")
    assert [type(e) for e in events] == [ev.Stanza, ev.PeerClosed]
    assert session.data_to_send() == b""  # nothing after our </stream:stream>


def test_peer_stream_error_is_reported_and_answered_with_our_close():
    session = receiver()
    run(session, header())
    out, events = run(session, b"<stream:error><invalid-id xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                               b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>bye</text></stream:error>")
    assert events == [ev.PeerClosed("undefined-condition", "bye")]
    assert out == b"</stream:stream>"
