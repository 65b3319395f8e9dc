"""The bytes of the bus: a batch of stanzas as one NATS message, and its answer (no I/O).

A batch names its sender (a 4-byte big-endian length, then the member's name),
then holds for each stanza a header (its normalized from and to domains,
joined by NUL) and its bytes, ready for the destination stream's namespace;
every part is preceded by its 4-byte big-endian length. What a bounce needs
(the stanza's name, type, from, to and id) is read back from those bytes, on
the slow path only: every byte on the bus is paid for by the sender, NATS and
the receiver. The framing itself is compiled
(``router._fastroute``): a stanza is framed once, from its read buffer, and
read in place once. An answer covers the batches of one sender that the
receiving member took since its last answer to it; for each batch one entry
per record, in order: ``null`` when the receiving member took the stanza
(delivered, or queued while it connects: a later failure bounces from there),
else ``[condition, text]`` for the sender to bounce it with.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

from lxml import etree

from router import _fastroute
from router.wire.errors import STANZA_ERROR_TYPES
from router.wire.xml import parse_element

# A batch carries at most this many bytes of stanzas (NATS refuses messages over its
# max_payload, 1 MiB by default); a bigger batch is split.
MAX_BATCH_BYTES = 512 * 1024


class Carried(NamedTuple):
    """One stanza on the bus: what a bounce needs, its domains, its bytes."""

    name: str
    type: str | None
    from_: str | None
    to: str | None
    id: str | None
    from_domain: str
    to_domain: str
    data: bytes


class FrameError(ValueError):
    """A batch or answer that is not what a member sends."""


def outbox(sender: str, member: str, due: Callable[[Any], None]) -> Any:
    """The stanzas ``sender`` gathers for ``member`` in one event-loop iteration,
    framed as they come (``put(Carried)``, or by the compiled router); ``take()``
    gives the batches, each with at most ``MAX_BATCH_BYTES`` of stanza bytes."""
    return _fastroute.Outbox(sender, member, due, MAX_BATCH_BYTES)


def carried(from_domain: str, to_domain: str, data: bytes) -> Carried:
    """A framed stanza with what a bounce or a queue needs, read from its start tag;
    FrameError when its bytes are not one element."""
    try:
        element = parse_element(data, {})
    except etree.XMLSyntaxError as exc:
        raise FrameError(f"a stanza on the bus that is not XML: {exc}") from None
    get = element.get
    return Carried(etree.QName(element).localname, get("type"), get("from"), get("to"), get("id"), from_domain,
                   to_domain, bytes(data))


def decode_batch(payload: bytes) -> tuple[str, list[Carried]]:
    """(the sending member, its stanzas); FrameError when malformed."""
    try:
        sender, records = _fastroute.decode_batch(payload)
    except ValueError as exc:  # UnicodeDecodeError included
        raise FrameError(f"malformed batch: {exc}") from None
    return sender, [carried(*record) for record in records]


def encode_answers(entries: list[tuple[int, list[tuple[str, str] | None]]]) -> bytes:
    """One message answering several batches of one sender: ``[sequence, null]`` for a
    batch whose stanzas were all taken, else ``[sequence, [entry per stanza]]``."""
    return json.dumps([[sequence, answers if any(answers) else None] for sequence, answers in entries]).encode()


def decode_answers(payload: bytes) -> list[tuple[int, list | None]]:
    """(sequence, the stanzas' entries or None for "all taken") per answered batch;
    FrameError when malformed. The entries' count is checked against the batch by
    `answers_for`."""
    try:
        entries = json.loads(payload)
    except ValueError:
        raise FrameError("malformed answer") from None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and (e[1] is None or isinstance(e[1], list))
            for e in entries):
        raise FrameError("an answer is a list of [sequence, null or entries]")
    return [(sequence, answers) for sequence, answers in entries]


def answers_for(answers: list | None, count: int) -> list[tuple[str, str] | None]:
    """A batch's entries: taken (None) or (condition, text) per stanza, in order."""
    if answers is None:
        return [None] * count
    if len(answers) != count or not all(a is None or _is_refusal(a) for a in answers):
        raise FrameError(f"an answer for {count} stanza(s) has {len(answers)} entries or a malformed one")
    # a condition this version does not know (a member of another version) still bounces
    return [None if a is None else (a[0] if a[0] in STANZA_ERROR_TYPES else "undefined-condition", a[1])
            for a in answers]


def _is_refusal(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)
