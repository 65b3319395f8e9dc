"""The bytes of the bus: a batch of stanzas as one NATS message, and its answer (no I/O).

A batch names its sender (a 4-byte big-endian length, then the member's name),
then holds for each stanza a header (its name, type, from, to, id, and its
normalized from and to domains, joined by NUL; \x01 for an absent one) and its
bytes, ready for the destination stream's namespace; every part is preceded
by its 4-byte big-endian length. The answer has one entry per record, in
order: ``null`` when the receiving member took the stanza (delivered, or
queued while it connects: a later failure bounces from there), else
``[condition, text]`` for the sender to bounce it with.
"""

from __future__ import annotations

import json
from typing import NamedTuple

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


_NONE = b"\x01"  # an absent attribute (XML text never holds \x00 or \x01)


def encode_batch(sender: str, items: list[Carried]) -> bytes:
    parts = [sender.encode()]
    for item in items:
        parts.append(b"\0".join(_NONE if v is None else v.encode() for v in item[:7]))
        parts.append(item.data)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def decode_batch(payload: bytes) -> tuple[str, list[Carried]]:
    """(the sending member, its stanzas); FrameError when malformed."""
    parts, pos, end = [], 0, len(payload)
    while pos < end:
        size = int.from_bytes(payload[pos:pos + 4], "big")
        part = payload[pos + 4:pos + 4 + size]
        if len(part) != size or pos + 4 > end:
            raise FrameError("truncated batch")
        parts.append(part)
        pos += 4 + size
    if not parts or len(parts) % 2 != 1:
        raise FrameError("a batch is its sender, then a header and the bytes of each stanza")
    items = []
    try:
        for i in range(1, len(parts), 2):
            header = [None if v == _NONE else v.decode() for v in parts[i].split(b"\0")]
            if len(header) != 7 or header[5] is None or header[6] is None:
                raise FrameError("a stanza header has seven fields")
            items.append(Carried(*header, parts[i + 1]))
        return parts[0].decode(), items
    except UnicodeDecodeError as exc:
        raise FrameError(f"malformed batch: {exc}") from None


def split(items: list[Carried]) -> list[list[Carried]]:
    """``items`` in batches of at most ``MAX_BATCH_BYTES`` of stanza bytes each, in order."""
    batches, current, size = [], [], 0
    for item in items:
        if current and size + len(item.data) > MAX_BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item.data)
    if current:
        batches.append(current)
    return batches


def encode_answer(answers: list[tuple[str, str] | None]) -> bytes:
    return b"ok" if not any(answers) else json.dumps(answers).encode()


def decode_answer(payload: bytes, count: int) -> list[tuple[str, str] | None]:
    if payload == b"ok":
        return [None] * count
    try:
        answers = json.loads(payload)
    except ValueError:
        raise FrameError("malformed answer") from None
    if not isinstance(answers, list) or len(answers) != count:
        raise FrameError(f"an answer for {count} stanza(s) has {len(answers) if isinstance(answers, list) else '?'}")
    return [tuple(a) if a else None for a in answers]
