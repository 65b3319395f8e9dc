"""lxml helpers for the slow path: elements the control plane must read, and the bytes we write.

The tokenizer hands over a top-level element as a byte range whose namespace
context lives on the stream header (default ``jabber:server``, ``stream:``,
``db:``). ``parse_element`` re-creates that context by wrapping the bytes in a
dummy root carrying the header's declarations (Openfire OF-2556/OF-3353 show
what goes wrong otherwise: RFC 6120 §4.8.3, the stream's default namespace
is inherited by its children).

Writing is done with plain string formatting because our own headers fix the
context: every header we send declares ``xmlns='jabber:server'``, ``stream:``
and ``db:`` (XEP-0220 §2.4.1: declare the dialback namespace on the header), so dialback elements are written as ``<db:result>`` and
their ``<error/>`` child stays in ``jabber:server`` (XEP-0220 §2.5).
"""

from __future__ import annotations

from lxml import etree

from router.wire.namespaces import DIALBACK_NS, SERVER_NS, STREAM_NS

# Negotiation elements are small and already validated by the tokenizer;
# the parser still refuses anything that could fetch or expand.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)

_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"})


def text_node(value: str) -> str:
    """Character data, escaped."""
    return value.translate(_TEXT_ESCAPES)


def attr(value: str) -> str:
    """A single-quoted attribute value, escaped."""
    return "'" + value.translate(_ATTR_ESCAPES) + "'"


def stream_header(
    *, to: str | None, from_: str | None, stream_id: str | None, version: str | None, lang: str
) -> bytes:
    """Our opening tag: XML declaration, ``stream:`` prefix, ``jabber:server`` and ``db:`` always declared."""
    attrs = f" xmlns:stream='{STREAM_NS}' xmlns='{SERVER_NS}' xmlns:db='{DIALBACK_NS}'"
    if to is not None:
        attrs += f" to={attr(to)}"
    if from_ is not None:
        attrs += f" from={attr(from_)}"
    if stream_id is not None:
        attrs += f" id={attr(stream_id)}"
    if version is not None:
        attrs += f" version={attr(version)}"
    attrs += f" xml:lang={attr(lang)}"
    return f"<?xml version='1.0'?><stream:stream{attrs}>".encode()


STREAM_CLOSE = b"</stream:stream>"


def parse_element(raw: bytes, namespaces: dict[str | None, str]) -> etree._Element:
    """Parse one top-level element's bytes in the namespace context of its stream header."""
    decls = "".join(
        f" xmlns={attr(uri)}" if prefix is None else f" xmlns:{prefix}={attr(uri)}"
        for prefix, uri in namespaces.items()
        if prefix != "xml"
    )
    root = etree.fromstring(b"<w" + decls.encode() + b">" + bytes(raw) + b"</w>", _PARSER)
    return root[0]


def child(elem: etree._Element, ns: str, name: str) -> etree._Element | None:
    """The first child ``{ns}name`` of ``elem``."""
    return elem.find(f"{{{ns}}}{name}")


def first_condition(elem: etree._Element, ns: str) -> str | None:
    """Local name of the first child in ``ns`` other than ``<text/>`` (an error condition)."""
    for sub in elem:
        if isinstance(sub.tag, str) and sub.tag.startswith(f"{{{ns}}}"):
            local = sub.tag[len(ns) + 2 :]
            if local != "text":
                return local
    return None


def text_in(elem: etree._Element, ns: str) -> str | None:
    """The ``<text/>`` child in ``ns``, if any."""
    found = elem.find(f"{{{ns}}}text")
    return found.text if found is not None else None
