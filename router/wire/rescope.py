"""Fix-ups a stanza needs when its bytes are forwarded into another stream.

The relay forwards a stanza as the byte range the tokenizer found. The range
can be forwarded as it is unless it borrows a prefix declared on the input
stream's header, lacks an ``xml:lang`` the output stream would not give it, or
declares its own content namespace that differs from the output stream's
(RFC 6120 §4.7.4, §4.8.3, §4.8.5): then ``rescope`` returns a fixed-up copy.
"""

from __future__ import annotations

from router._fastparse import Element


def _escape_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;").replace('"', "&quot;")


def _start_tag_attributes(data: bytes | memoryview, name_end: int) -> list[tuple[str, int, int]]:
    """The attributes of an already validated start tag as (name, value_start, value_end)."""
    out = []
    i, n = name_end, len(data)
    while i < n:
        c = data[i]
        if c in b" \t\r\n":
            i += 1
            continue
        if c in b"/>":
            return out
        j = i
        while data[j] not in b"= \t\r\n":
            j += 1
        name = bytes(data[i:j]).decode()
        while data[j] in b" \t\r\n=":
            j += 1
        quote = data[j]
        k = j + 1
        while data[k] != quote:
            k += 1
        out.append((name, j + 1, k))
        i = k + 1
    return out


def rescope(
    data: bytes | memoryview,
    element: Element,
    header_namespaces: dict[str | None, str],
    source_lang: str | None,
    dest_ns: str,
    dest_lang: str | None,
) -> bytes | None:
    """A copy of ``data`` (the element's bytes) fixed up for another stream, or
    None when the bytes can be forwarded as they are.

    Fix-ups (RFC 6120 §4.7.4, §4.8.3, §4.8.5): declare on the element the
    prefixes it borrows from the input stream header; give it the input
    stream's ``xml:lang`` when it has none and the output stream's default
    differs; move an element that declares its own content namespace into the
    output stream's one (``jabber:server`` <-> ``jabber:component:accept``).
    Children that inherit the default namespace follow the element.
    """
    add_lang = element.lang is None and source_lang is not None and source_lang != dest_lang
    fix_ns = element.own_xmlns and element.ns != dest_ns
    if not (element.header_prefix or add_lang or fix_ns):
        return None
    qname = f"{element.prefix}:{element.name}" if element.prefix else element.name
    name_end = 1 + len(qname.encode())
    attributes = _start_tag_attributes(data, name_end)
    declared = {name for name, _, _ in attributes}
    extra = []
    if element.header_prefix:
        for prefix, uri in header_namespaces.items():
            if prefix is not None and f"xmlns:{prefix}" not in declared:
                extra.append(f" xmlns:{prefix}='{_escape_attr(uri)}'")
    if add_lang:
        extra.append(f" xml:lang='{_escape_attr(source_lang)}'")
    raw = bytes(data)
    if fix_ns:
        for name, vstart, vend in attributes:
            if name == "xmlns":
                raw = raw[:vstart] + _escape_attr(dest_ns).encode() + raw[vend:]
                break
    return raw[:name_end] + "".join(extra).encode() + raw[name_end:]
