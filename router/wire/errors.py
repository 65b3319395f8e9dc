"""Stream and stanza error conditions (RFC 6120 §4.9, §8.3) and the bytes that carry them.

Everything here writes for one of *our* S2S streams: our headers declare
``xmlns='jabber:server'`` as the default namespace, so stanza-level ``<error/>``
children need no namespace of their own (they are in ``jabber:server``, as
XEP-0220 §2.5 requires for dialback errors too). No lxml: bounces are built
from the tokenizer's decoded routing attributes, so the runtime can bounce on
the hot path.
"""

from __future__ import annotations

from router.wire.xml import attr, text_node

from router.wire.namespaces import STANZAS_NS, STREAMS_NS

# RFC 6120 §4.9.3, the complete list of defined stream error conditions.
STREAM_CONDITIONS = frozenset(
    {
        "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
        "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
        "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed",
        "policy-violation", "remote-connection-failed", "reset", "resource-constraint",
        "restricted-xml", "see-other-host", "system-shutdown", "undefined-condition",
        "unsupported-encoding", "unsupported-feature", "unsupported-stanza-type",
        "unsupported-version",
    }
)

# RFC 3920 names still seen on input (RFC 6120 §4.9.2: map them to their RFC 6120 successors).
_LEGACY_STREAM_CONDITIONS = {"xml-not-well-formed": "not-well-formed"}

# RFC 6120 §8.3.3: each stanza error condition with the error type the RFC gives it.
STANZA_ERROR_TYPES = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}

# XEP-0220 §2.5 also uses this stream condition inside dialback errors (the authoritative server could not be reached: remote-connection-failed).
DIALBACK_ERROR_CONDITIONS = frozenset(STANZA_ERROR_TYPES) | {"remote-connection-failed"}

STANZA_KINDS = frozenset({"message", "presence", "iq"})


def stream_condition(name: str | None) -> str:
    """The defined condition a received name stands for (unknown ones are `undefined-condition`, §4.9.2)."""
    name = _LEGACY_STREAM_CONDITIONS.get(name, name)
    return name if name in STREAM_CONDITIONS else "undefined-condition"


def stream_error(condition: str, text: str | None = None) -> bytes:
    """``<stream:error>`` with one defined condition and an optional English text (§4.9.2)."""
    if condition not in STREAM_CONDITIONS:
        raise ValueError(f"{condition!r} is not an RFC 6120 stream error condition")
    body = f"<{condition} xmlns='{STREAMS_NS}'/>"
    if text:
        body += f"<text xmlns='{STREAMS_NS}' xml:lang='en'>{text_node(text)}</text>"
    return f"<stream:error>{body}</stream:error>".encode()


def error_child(condition: str, text: str | None = None, error_type: str | None = None) -> str:
    """The ``<error type=...>`` child of an error stanza or a dialback error (§8.3.2)."""
    if condition not in DIALBACK_ERROR_CONDITIONS:
        raise ValueError(f"{condition!r} is not a stanza error condition")
    error_type = error_type or STANZA_ERROR_TYPES.get(condition, "cancel")
    body = f"<{condition} xmlns='{STANZAS_NS}'/>"
    if text:
        body += f"<text xmlns='{STANZAS_NS}' xml:lang='en'>{text_node(text)}</text>"
    return f"<error type={attr(error_type)}>{body}</error>"


def bounce(
    kind: str,
    from_: str | None,
    to: str | None,
    stanza_id: str | None,
    stanza_type: str | None,
    condition: str,
    text: str | None = None,
) -> bytes | None:
    """The error stanza answering a stanza that could not be delivered, or None when none is allowed.

    RFC 6120 §8.3: same kind, ``type='error'``, ``from``/``to`` swapped, ``id``
    mirrored, no original payload (it may be the oversize or malformed part).
    Errors are never answered (§8.3.1), nor are IQ results (§8.2.3).
    """
    if kind not in STANZA_KINDS or stanza_type == "error" or (kind == "iq" and stanza_type == "result"):
        return None
    attrs = ""
    if to:
        attrs += f" from={attr(to)}"
    if from_:
        attrs += f" to={attr(from_)}"
    if stanza_id is not None:
        attrs += f" id={attr(stanza_id)}"
    return f"<{kind}{attrs} type='error'>{error_child(condition, text)}</{kind}>".encode()
