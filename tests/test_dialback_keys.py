"""XEP-0185 dialback keys against the published vectors: HMAC-SHA256 keyed with the hex string of
SHA-256(secret), over 'Receiving Originating StreamID' (XEP-0185 §2-§3)."""

import pytest

from router.negotiation.dialback import dialback_key, key_matches


@pytest.mark.parametrize(
    "secret, receiving, originating, stream_id, key",
    [
        # XEP-0185 §3 example
        ("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F",
         "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"),
        # XEP-0220 Example 1
        ("s3cr3tf0rd14lb4ck", "montague.example", "capulet.example", "D60000229F",
         "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"),
        # XEP-0220 Example 5
        ("d14lb4ck43v3r", "capulet.example", "montague.example", "417GAF25",
         "225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d"),
        # the XEP-0220 example conversation of test_flows.py: piggybacked sender rooms.capulet.example
        ("s3cr3tf0rd14lb4ck", "montague.example", "rooms.capulet.example", "D60000229F",
         "8acfc019f4065de59e88f08d4532376c61c8becf61ce78a25156e42fdbd0b69c"),
        # dialback on a XEP-0288 bidi stream (test_flows.py): one key in each direction
        ("s3cr3tf0rd14lb4ck", "montague.lit", "capulet.lit", "b5cd769b1dc292c6f6557fe76cabc4d112333f9a",
         "3388d61d1e7d79749d56c31dfadbb2d9dca69cb0ebc8d88748a83c18f27ae915"),
        ("d14lb4ck43v3r", "capulet.lit", "conference.montague.lit", "b5cd769b1dc292c6f6557fe76cabc4d112333f9a",
         "21a6ad90105b239ca465925833f3ecc4c3f240325e428154bddaac53e179d839"),
    ],
)
def test_published_key_vectors(secret, receiving, originating, stream_id, key):
    assert dialback_key(secret, receiving, originating, stream_id) == key
    assert key_matches(secret, receiving, originating, stream_id, key)


def test_key_is_lower_case_hex_of_hmac_sha256():
    """XEP-0185 §2: HMAC-SHA256 over 'Receiving Originating StreamID', hex output."""
    key = dialback_key("secret", "a.example", "b.example", "id1")
    assert len(key) == 64 and key == key.lower() and int(key, 16) >= 0


def test_raw_digest_would_give_another_key():
    """The HMAC key is the hex *string* of SHA-256(secret), not the raw digest (the XEP-0185 §3
    vector needs the hex string)."""
    assert not dialback_key("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F").startswith("4530485c")


@pytest.mark.parametrize(
    "change",
    [
        {"secret": "other"}, {"receiving": "montague.example."}, {"originating": "rooms.capulet.example"},
        {"stream_id": "D60000229G"},
    ],
)
def test_any_changed_input_invalidates_the_key(change):
    """XEP-0220 §2.2.2: the authoritative server recomputes the key from 'from', 'to', 'id' and its secret."""
    args = dict(secret="s3cr3tf0rd14lb4ck", receiving="montague.example", originating="capulet.example", stream_id="D60000229F")
    good = dialback_key(**args)
    args.update(change)
    assert not key_matches(args["secret"], args["receiving"], args["originating"], args["stream_id"], good)


def test_upper_case_or_garbage_keys_do_not_match():
    """XEP-0220 §2.2.2: the received key must equal the recomputed one (compared in constant time)."""
    key = dialback_key("s", "a.example", "b.example", "x")
    assert not key_matches("s", "a.example", "b.example", "x", key.upper())
    assert not key_matches("s", "a.example", "b.example", "x", "")
    assert not key_matches("s", "a.example", "b.example", "x", "é" * 64)
    assert key_matches("s", "a.example", "b.example", "x", f"\n  {key}\n")  # XML whitespace around the key
