"""Incremental, validating tokenizer for one XMPP stream (Cython).

The tokenizer splits a stream into its header, its top-level elements and its
end tag, validates everything it passes (XML 1.0 + namespaces, RFC 6120
restricted XML, limits) and reports each top-level element as one event with
its raw byte range. It never builds a tree and performs no I/O.

Buffer model
------------
The tokenizer owns a receive buffer (a ``bytearray``). Bytes enter it either
by ``feed(data)`` (a copy) or, for an ``asyncio.BufferedProtocol``, by writing
straight into ``get_buffer()`` and calling ``buffer_updated(n)``. Every
``Element``/``StreamHeader``/``StreamEnd`` event carries ``[start, end)``
offsets into ``tokenizer.buffer`` *as it is right after the call that returned
the event*. Bytes of a partial element at the end of a read are kept; before
the next read the tokenizer compacts them to the front of the buffer, or, if
anything else still refers to the buffer (a memoryview of it in a batch or a
pending ``transport.write``: its reference count says so), it swaps in a
fresh ``bytearray`` and copies only the partial tail. A buffer that anything
else refers to is never written to again; one that nothing else refers to is
reused in place.

Work is linear in the bytes fed however they are chunked: the scanner keeps
its state (including a partial UTF-8 sequence, tag, attribute or reference)
between calls and never rescans bytes it has already accepted.

Errors
------
Any violation raises ``ParseError`` whose ``condition`` is the RFC 6120 stream
error condition to send. Events completed earlier in the same call are on
``err.events`` so a caller can still act on them in order. After an error the
tokenizer is dead: every further call raises the same error.

Conditions: malformed XML or namespaces -> ``not-well-formed``; bytes that
are not UTF-8 (overlong, surrogate, truncated, > U+10FFFF, 0xFE/0xFF) or an
XML declaration naming another encoding -> ``unsupported-encoding`` (RFC 6120
§4.9.3.22 "violating the rules of UTF-8"); comments, PIs, DTDs, entities other
than the five predefined, ``standalone`` -> ``restricted-xml``; limits ->
``policy-violation``; stream element not in the stream namespace ->
``invalid-namespace``; stream prefix other than ``stream`` or a prefixed
``jabber:server`` element -> ``bad-namespace-prefix``. The stream element is
refused below the header (``not-well-formed``), so stanza bytes can never
restart a stream they are forwarded into.

Restart
-------
A call stops scanning right after a top-level TLS ``<proceed/>`` or
``<starttls/>`` or SASL ``<success/>`` (the XML document ends there) and
returns; the bytes after it stay unscanned (the next call scans them if the
caller does not restart). After STARTTLS or SASL success, ``restart(end)``
discards everything after byte offset ``end`` of the current buffer (the
``end`` of ``<proceed/>``, ``<starttls/>`` or ``<success/>``), returns those
discarded bytes and expects a new XML declaration / stream header next; it
also clears an error found at or after ``end`` (one found before is raised).
A caller refuses a non-empty tail after ``<starttls/>``/``<proceed/>`` and
re-feeds it after SASL.

``buffer`` is a ``bytearray`` larger than its valid content: only the ranges
of events are meaningful. ``get_buffer`` keeps working after an error (so a
``BufferedProtocol`` can be torn down normally); ``feed``/``buffer_updated``
raise it again.
"""

from typing import Final, final

STREAM_NS: Final[str]  # "http://etherx.jabber.org/streams"
XML_NS: Final[str]  # "http://www.w3.org/XML/1998/namespace"

DEFAULT_MAX_STANZA_BYTES: Final[int]  # 512 KiB, as Prosody
DEFAULT_MAX_DEPTH: Final[int]  # 64 (real stanzas nest < 20)
DEFAULT_MAX_ATTRIBUTES: Final[int]  # 64 per element, xmlns declarations included
DEFAULT_MAX_NAME_LENGTH: Final[int]  # 1024 bytes per qualified name
DEFAULT_MAX_ATTRIBUTE_VALUE_LENGTH: Final[int]  # 64 KiB (raw bytes)

class ParseError(Exception):
    condition: str  # RFC 6120 stream error condition, e.g. "not-well-formed"
    text: str  # human explanation including the absolute byte offset
    offset: int  # absolute offset in the stream (bytes since the last restart)
    events: list[StreamHeader | Element | StreamEnd]  # completed before the error

class StreamHeader:
    """The opening ``<stream:stream ...>`` (or prefix-free ``<stream xmlns=...>``)."""

    prefix: str | None  # "stream" or None for the prefix-free form
    # declarations on the header; None = default ns. Shared by the streams whose headers
    # declare the same namespaces: read it, never change it.
    namespaces: dict[str | None, str]
    attributes: dict[str, str]  # decoded; namespaced ones in Clark form "{uri}local"; built when read
    other_attributes: dict[str, str] | None  # attributes without a field of their own
    to: str | None
    from_: str | None
    id: str | None
    version: str | None
    lang: str | None  # xml:lang
    start: int
    end: int

class Element:
    """One complete top-level element (a stanza or a negotiation element)."""

    name: str  # local name, e.g. "message", "result", "starttls"
    ns: str  # resolved namespace URI, e.g. "jabber:server", "jabber:server:dialback"
    prefix: str | None  # prefix used on the element's own tag
    to: str | None  # decoded attribute values (entities resolved)
    from_: str | None
    type: str | None
    id: str | None
    lang: str | None  # xml:lang on the element itself
    start: int  # [start, end) in tokenizer.buffer
    end: int
    header_prefix: bool  # some name inside uses a prefix bound only on the stream header
    own_xmlns: bool  # the element's start tag declares its own default namespace

class StreamEnd:
    """``</stream:stream>`` (or ``</stream>``) was received."""

    start: int
    end: int

@final
class Tokenizer:
    def __init__(
        self,
        *,
        max_stanza_bytes: int = ...,
        max_depth: int = ...,
        max_attributes: int = ...,
        max_name_length: int = ...,
        max_attribute_value_length: int = ...,
    ) -> None: ...
    max_stanza_bytes: int  # writable: raise it once the peer is authenticated
    max_depth: int  # read-only, as are the other limits
    max_attributes: int
    max_name_length: int
    max_attribute_value_length: int
    @property
    def buffer(self) -> bytearray: ...
    @property
    def header(self) -> StreamHeader | None: ...  # the current stream's header, once seen
    @property
    def offset(self) -> int: ...  # absolute number of bytes accepted since the last restart
    def feed(self, data: bytes | bytearray | memoryview) -> list[StreamHeader | Element | StreamEnd]: ...
    def get_buffer(self, sizehint: int = -1) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> list[StreamHeader | Element | StreamEnd]: ...
    def release(self) -> None:
        """Between top-level elements, drop the receive buffer and the per-element
        arrays (an idle stream then holds neither); the next input call allocates
        them again. Call it after acting on a read's events."""
    def restart(self, end: int) -> bytes: ...
