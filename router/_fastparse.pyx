# cython: language_level=3
"""Incremental, validating tokenizer for one XMPP stream.

API (the contract is ``_fastparse.pyi``)
---------------------------------------
``Tokenizer(**limits)`` splits one stream into events:

* ``StreamHeader`` - the opening ``<stream:stream ...>`` (or the prefix-free
  ``<stream xmlns='http://etherx.jabber.org/streams'>``) with its namespace
  declarations and decoded attributes;
* ``Element`` - one complete top-level element: local name, namespace, prefix,
  decoded ``to``/``from``/``type``/``id``/``xml:lang``, its ``[start, end)``
  byte range in ``tokenizer.buffer`` and two flags for the relay's raw
  forwarding decision (``header_prefix``: some name inside uses a prefix bound
  only on the stream header; ``own_xmlns``: its start tag declares a default
  namespace);
* ``StreamEnd`` - the stream's end tag.

Bytes come in through ``feed(data)`` (one copy) or ``get_buffer()`` +
``buffer_updated(n)`` (``asyncio.BufferedProtocol``, zero copy). A buffer
that anything else still refers to (a memoryview of it in a batch or a
pending ``transport.write``) is never written again: the next read swaps in
a fresh ``bytearray`` instead of moving bytes inside it; one that nothing
else refers to is reused in place. Offsets of events are valid in
``buffer`` until the next ``feed``/``get_buffer``; bytes of ``buffer`` past
the last event are unspecified (the ``bytearray`` is larger than its content).

A call stops scanning right after a top-level TLS ``<proceed/>``/``<starttls/>``
or SASL ``<success/>`` (the XML document ends there) and returns; the bytes
after it are left for ``restart(end)`` to hand back (it then expects a new XML
declaration and header), or are scanned by the next call if the caller does
not restart.

The scanner is a byte-level state machine whose state survives between calls,
so the work is linear in the bytes fed however they are split: names, attribute
values, text and CDATA resume where the last read ended; only constructs of a
few bytes (one UTF-8 sequence, ``]]>``, ``<!--``/``<![CDATA[``, an entity or
character reference, at most 32 bytes) are looked at again when a read ends
inside them. Python objects are made only per top-level element.

Validation: XML 1.0 + namespaces well-formedness (``not-well-formed``),
RFC 6120 §11 restricted XML (``restricted-xml``), the stream namespace and
prefix (``invalid-namespace``, ``bad-namespace-prefix``), UTF-8 only
(``unsupported-encoding``) and these limits (``policy-violation``):

* ``max_stanza_bytes`` = 512 KiB: Prosody's default S2S stanza size limit,
  so anything a Prosody peer accepts passes the relay. Writable at runtime:
  use a smaller value before the peer is authenticated. It bounds every
  top-level construct (XML declaration, stream header, element); an element
  fails as soon as the bytes received for it cross the limit.
* ``max_depth`` = 64 nested elements: real stanzas nest < 20 deep (XHTML-IM,
  PubSub Atom payloads); 64 leaves room and bounds the per-stream stack.
* ``max_attributes`` = 64 per element (namespace declarations included):
  real elements carry < 10; bounds the quadratic duplicate-attribute check.
* ``max_name_length`` = 1024 bytes per qualified name: real names are < 64;
  libxml2's own default name limit is 50 000, far beyond any use.
* ``max_attribute_value_length`` = 64 KiB: the largest real values are JIDs
  (<= 3 x 1023 bytes) and ids; big payloads travel as text, not attributes.

Bytes that break the rules of UTF-8 (overlong, surrogates, truncated,
> U+10FFFF, 0xC0/0xC1/0xF5-0xFF) are ``unsupported-encoding`` as RFC 6120
§4.9.3.22 says; valid UTF-8 for a character XML forbids (U+FFFE, control
characters) is ``not-well-formed``.

Deliberate choices beyond plain XML: ``<stream:stream>`` (the stream element)
is refused anywhere below the header (not-well-formed), so stanza bytes can
never restart a stream they are forwarded into; a prefixed element in
``jabber:server`` is ``bad-namespace-prefix`` (RFC 6120 §4.8.5); ``standalone``
in the XML declaration is ``restricted-xml`` (§11.5); a character reference
longer than 32 bytes (only possible with absurd leading zeros) is
``policy-violation``; a self-closing stream header yields a ``StreamHeader``
and a ``StreamEnd``.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memcmp, memchr
cimport cython

STREAM_NS = "http://etherx.jabber.org/streams"
XML_NS = "http://www.w3.org/XML/1998/namespace"

DEFAULT_MAX_STANZA_BYTES = 512 * 1024
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ATTRIBUTES = 64
DEFAULT_MAX_NAME_LENGTH = 1024
DEFAULT_MAX_ATTRIBUTE_VALUE_LENGTH = 64 * 1024

cdef Py_ssize_t READ_SIZE = 64 * 1024  # free space get_buffer() offers when asked for "any"
cdef int INITIAL_SLOTS = 8  # attribute and nesting slots before the first growth
cdef bytearray EMPTY_BUFFER = bytearray()  # held by a tokenizer with no buffer (new or released)


cdef inline bint shared(PyObject* buf) noexcept:
    """Whether anything besides its one owner refers to ``buf`` (a view of it, say).
    A pointer, so that reading the owner's field takes no reference of its own."""
    return buf.ob_refcnt > 1


cdef bytes B_STREAM_QNAME = b"stream:stream"
# Strings every stream header repeats; one shared copy each instead of one per
# stream keeps an idle stream small (10,000 streams per process).
cdef dict WELL_KNOWN = {v: v for v in (
    "http://etherx.jabber.org/streams", "jabber:server", "jabber:server:dialback",
    "jabber:component:accept", "stream", "db", "to", "from", "id", "version",
    "{http://www.w3.org/XML/1998/namespace}lang", "1.0", "en")}


cdef inline object well_known(object s):
    return WELL_KNOWN.get(s, s)

# Nearly every stream header declares the same few namespaces: streams share one
# read-only namespace map (and the tuple of its URIs) per distinct set of
# declarations, up to this many sets; rarer headers get their own.
cdef Py_ssize_t MAX_SHARED_HEADER_NS = 64
cdef dict SHARED_HEADER_NS = {}  # ((prefix, uri), ...) -> (namespaces dict, uris tuple)
# Bytes of namespace declarations an idle stream keeps room for (the header's take ~75);
# release() gives back what a stanza with many declarations made it grow to.
cdef Py_ssize_t IDLE_ARENA = 128
cdef Py_ssize_t MAX_REF = 32  # longest character reference accepted, "&#x...;" included

cdef const char* C_STREAM_NS = b"http://etherx.jabber.org/streams"
cdef const char* C_XML_NS = b"http://www.w3.org/XML/1998/namespace"
cdef const char* C_XMLNS_NS = b"http://www.w3.org/2000/xmlns/"
cdef str S_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    #define FP_L 0x0101010101010101ULL
    #define FP_H 0x8080808080808080ULL
    #define FP_HAS(x, c) ((((x) ^ (FP_L * (c))) - FP_L) & ~((x) ^ (FP_L * (c))) & FP_H)
    /* Masks over the 8 bytes at s: 0 if none needs attention, else the lowest
       flagged byte is the first one that does (borrows only spill upward, so
       flags above the first special byte may be spurious, never below it). */
    static inline uint64_t fp_text_mask(const unsigned char *s) {  /* text: not 0x20..0x7F, or < & ] */
        uint64_t x; memcpy(&x, s, 8);
        return (x & FP_H) | ((x - FP_L * 0x20) & ~x & FP_H) | FP_HAS(x, 0x3C) | FP_HAS(x, 0x26) | FP_HAS(x, 0x5D);
    }
    static inline uint64_t fp_attr_mask(const unsigned char *s) {  /* attribute values: < & ' " */
        uint64_t x; memcpy(&x, s, 8);
        return (x & FP_H) | ((x - FP_L * 0x20) & ~x & FP_H) | FP_HAS(x, 0x3C) | FP_HAS(x, 0x26)
               | FP_HAS(x, 0x27) | FP_HAS(x, 0x22);
    }
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    static inline int fp_first(uint64_t m) { return __builtin_ctzll(m) >> 3; }
    #else
    static inline int fp_first(uint64_t m) { (void)m; return 0; }  /* byte loop decides */
    #endif
    /* Skip bytes that need no attention (16 at a time with SSE2, else 8):
       returns the index of the first byte that may need attention, or a
       position within 8 bytes of end (the caller looks at those one by one).
       Flagged: bytes < 0x20 or >= 0x80 and the given specials. */
    static inline Py_ssize_t fp_skip_text(const unsigned char *b, Py_ssize_t p, Py_ssize_t end) {
    #if defined(__SSE2__)
        const __m128i lt = _mm_set1_epi8(0x3C), amp = _mm_set1_epi8(0x26), rb = _mm_set1_epi8(0x5D),
                      sp = _mm_set1_epi8(0x20);
        while (p + 16 <= end) {
            __m128i x = _mm_loadu_si128((const __m128i *)(b + p));
            __m128i f = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, lt), _mm_cmpeq_epi8(x, amp)),
                                     _mm_or_si128(_mm_cmpeq_epi8(x, rb), _mm_cmplt_epi8(x, sp)));
            unsigned m = (unsigned)_mm_movemask_epi8(f);
            if (m) return p + __builtin_ctz(m);
            p += 16;
        }
    #endif
        while (p + 8 <= end) {
            uint64_t m = fp_text_mask(b + p);
            if (m) return p + fp_first(m);
            p += 8;
        }
        return p;
    }
    static inline Py_ssize_t fp_skip_attr(const unsigned char *b, Py_ssize_t p, Py_ssize_t end) {
    #if defined(__SSE2__)
        const __m128i lt = _mm_set1_epi8(0x3C), amp = _mm_set1_epi8(0x26), q1 = _mm_set1_epi8(0x27),
                      q2 = _mm_set1_epi8(0x22), sp = _mm_set1_epi8(0x20);
        while (p + 16 <= end) {
            __m128i x = _mm_loadu_si128((const __m128i *)(b + p));
            __m128i f = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, lt), _mm_cmpeq_epi8(x, amp)),
                                     _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, q1), _mm_cmpeq_epi8(x, q2)),
                                                  _mm_cmplt_epi8(x, sp)));
            unsigned m = (unsigned)_mm_movemask_epi8(f);
            if (m) return p + __builtin_ctz(m);
            p += 16;
        }
    #endif
        while (p + 8 <= end) {
            uint64_t m = fp_attr_mask(b + p);
            if (m) return p + fp_first(m);
            p += 8;
        }
        return p;
    }
    static inline int fp_is_ascii(const unsigned char *s, Py_ssize_t n) {
        uint64_t acc = 0, x;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) { memcpy(&x, s + i, 8); acc |= x; }
        for (; i < n; i++) acc |= s[i];
        return (acc & FP_H) == 0;
    }
    /* A str for n bytes of UTF-8 already validated: ASCII is copied straight into a new str. */
    static PyObject *fp_utf8_str(const char *s, Py_ssize_t n) {
        PyObject *r;
        if (!fp_is_ascii((const unsigned char *)s, n))
            return PyUnicode_DecodeUTF8(s, n, NULL);
        r = PyUnicode_New(n, 127);
        if (r != NULL)
            memcpy(PyUnicode_1BYTE_DATA(r), s, n);
        return r;
    }
    /* prev (a str or None) is the ASCII string of the n bytes at s */
    static inline int fp_same_str(PyObject *prev, const char *s, Py_ssize_t n) {
        return prev != Py_None && PyUnicode_IS_COMPACT_ASCII(prev) && PyUnicode_GET_LENGTH(prev) == n
               && memcmp(PyUnicode_1BYTE_DATA(prev), s, n) == 0;
    }
    """
    ctypedef unsigned long long uint64_t
    object fp_utf8_str(const char* s, Py_ssize_t n)
    bint fp_same_str(object prev, const char* s, Py_ssize_t n) noexcept
    Py_ssize_t fp_skip_text(const unsigned char* b, Py_ssize_t p, Py_ssize_t end) noexcept nogil
    Py_ssize_t fp_skip_attr(const unsigned char* b, Py_ssize_t p, Py_ssize_t end) noexcept nogil


cdef enum:
    ST_PROLOG = 0  # before the stream header: BOM, XML declaration, whitespace
    ST_TOP = 1  # between top-level elements
    ST_DONE = 2  # after the stream's end tag: whitespace only
    ST_CONTENT = 3
    ST_CDATA = 4
    ST_STAG_NAME = 5
    ST_STAG = 6  # inside a start tag, between attributes
    ST_ANAME = 7
    ST_AEQ = 8
    ST_AQUOTE = 9
    ST_AVAL = 10
    ST_ETAG_NAME = 11
    ST_ETAG_END = 12

cdef enum:
    A_DECODE = 1  # the value holds a reference or a tab/CR/LF: decode before use
    A_DECL = 2  # xmlns or xmlns:prefix

cdef enum:
    NT_NONE = 0
    NT_START = 1  # ASCII NameStartChar
    NT_CHAR = 2  # ASCII NameChar that cannot start a name
    NT_HIGH = 3  # lead or continuation byte: decode and check

# Byte classes. CT (text), AT (attribute values), DT (CDATA): 0 = plain byte
# that needs no attention; everything else goes to the slow branch.
cdef unsigned char CT[256]
cdef unsigned char AT[256]
cdef unsigned char DT[256]
cdef unsigned char NT[256]
cdef unsigned char NC[256]  # ASCII name characters (NT_START or NT_CHAR): 2 for ':', 1 for the others


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        plain = (c >= 0x20 and c < 0x80) or c == 9 or c == 10 or c == 13
        CT[c] = 0 if plain and c != 60 and c != 38 and c != 93 else 1
        DT[c] = 0 if plain and c != 93 else 1
        AT[c] = 0 if plain and c not in (9, 10, 13, 60, 38, 34, 39) else 1
        if c >= 0x80:
            NT[c] = NT_HIGH
        elif (65 <= c <= 90) or (97 <= c <= 122) or c == 95 or c == 58:
            NT[c] = NT_START
        elif (48 <= c <= 57) or c == 45 or c == 46:
            NT[c] = NT_CHAR
        else:
            NT[c] = NT_NONE
        NC[c] = 2 if c == 58 else (NT[c] == NT_START or NT[c] == NT_CHAR)


_init_tables()


cdef inline bint is_ws(unsigned char c) noexcept:
    return c == 32 or c == 10 or c == 9 or c == 13


cdef inline int utf8_seq(const unsigned char* s, Py_ssize_t avail, unsigned int* out) noexcept:
    """Length of the UTF-8 sequence at s (s[0] >= 0x80): 0 if more bytes are
    needed, -1 if invalid (overlong, surrogate, > U+10FFFF, truncated), -2 if
    valid but U+FFFE/U+FFFF (not XML characters)."""
    cdef unsigned int c = s[0], c1, c2, c3
    if c < 0xC2 or c > 0xF4:
        return -1
    if avail < 2:
        return 0
    c1 = s[1]
    if (c1 & 0xC0) != 0x80:
        return -1
    if c < 0xE0:
        out[0] = ((c & 0x1F) << 6) | (c1 & 0x3F)
        return 2
    if c < 0xF0:
        if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
            return -1
        if avail < 3:
            return 0
        c2 = s[2]
        if (c2 & 0xC0) != 0x80:
            return -1
        out[0] = ((c & 0x0F) << 12) | ((c1 & 0x3F) << 6) | (c2 & 0x3F)
        if out[0] >= 0xFFFE:
            return -2
        return 3
    if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
        return -1
    if avail < 3:
        return 0
    c2 = s[2]
    if (c2 & 0xC0) != 0x80:
        return -1
    if avail < 4:
        return 0
    c3 = s[3]
    if (c3 & 0xC0) != 0x80:
        return -1
    out[0] = ((c & 0x07) << 18) | ((c1 & 0x3F) << 12) | ((c2 & 0x3F) << 6) | (c3 & 0x3F)
    return 4


cdef inline Py_ssize_t utf8_run(const unsigned char* b, Py_ssize_t p, Py_ssize_t end, int* status) noexcept:
    """Accept the multibyte sequences from b[p] up to the next ASCII byte; returns where it
    stopped with status 0 (at an ASCII byte or the end of data), 1 (data ended inside a
    sequence) or the negative utf8_seq code of the sequence there."""
    cdef unsigned int c, cp = 0
    cdef int n
    while p < end:
        c = b[p]
        if c < 0x80:
            break
        # the plain 2- and 3-byte sequences (no overlong/surrogate/U+FFFx cases) inline
        if 0xC2 <= c <= 0xDF and p + 1 < end and (b[p + 1] & 0xC0) == 0x80:
            p += 2
            continue
        if (0xE1 <= c <= 0xEC or c == 0xEE) and p + 2 < end and (b[p + 1] & 0xC0) == 0x80 \
                and (b[p + 2] & 0xC0) == 0x80:
            p += 3
            continue
        n = utf8_seq(b + p, end - p, &cp)
        if n <= 0:
            status[0] = 1 if n == 0 else n
            return p
        p += n
    status[0] = 0
    return p


cdef inline bint is_name_char(unsigned int cp, bint first) noexcept:
    """XML 1.0 (5th edition) NameStartChar / NameChar for code points >= 0x80."""
    if (0xC0 <= cp <= 0xD6) or (0xD8 <= cp <= 0xF6) or (0xF8 <= cp <= 0x2FF) or \
            (0x370 <= cp <= 0x37D) or (0x37F <= cp <= 0x1FFF) or (0x200C <= cp <= 0x200D) or \
            (0x2070 <= cp <= 0x218F) or (0x2C00 <= cp <= 0x2FEF) or (0x3001 <= cp <= 0xD7FF) or \
            (0xF900 <= cp <= 0xFDCF) or (0xFDF0 <= cp <= 0xFFFD) or (0x10000 <= cp <= 0xEFFFF):
        return True
    if first:
        return False
    return cp == 0xB7 or (0x300 <= cp <= 0x36F) or (0x203F <= cp <= 0x2040)


cdef inline bint is_xml_char(unsigned int cp) noexcept:
    return cp == 9 or cp == 10 or cp == 13 or (0x20 <= cp <= 0xD7FF) or \
        (0xE000 <= cp <= 0xFFFD) or (0x10000 <= cp <= 0x10FFFF)


cdef Py_ssize_t scan_name_high(const unsigned char* b, Py_ssize_t p, Py_ssize_t end, Py_ssize_t start,
                               int* status) noexcept:
    """scan_name from a byte >= 0x80 on (names are nearly always ASCII, so this stays out of line)."""
    cdef unsigned int cp = 0
    cdef int n
    while True:
        n = utf8_seq(b + p, end - p, &cp)
        if n <= 0:
            status[0] = 1 if n == 0 else n
            return p
        if not is_name_char(cp, p == start):
            status[0] = -3
            return p
        p += n
        while p < end and NC[b[p]]:
            p += 1
        if p >= end:
            status[0] = 1
            return p
        if b[p] < 0x80:
            status[0] = 0
            return p


cdef inline Py_ssize_t scan_name(const unsigned char* b, Py_ssize_t p, Py_ssize_t end, Py_ssize_t start,
                                 int* status) noexcept:
    """Scan name characters from b[p]; returns where it stopped with status 0 (the
    name ended there), 1 (data ended, maybe inside a UTF-8 sequence) or a
    negative code (-1/-2 see utf8_seq, -3 not a name character); status 0 has
    bit 4 set (16) when b[start:p] may hold a ':' (seen, or scanned in an earlier call)."""
    cdef unsigned char seen = 0
    if p == start:
        if p < end and NT[b[p]] == NT_CHAR:  # '-', '.', digits cannot start a name
            status[0] = -3
            return p
    else:
        seen = 2
    while p < end and NC[b[p]]:  # ASCII name characters (':' is 2, the others 1)
        seen |= NC[b[p]]
        p += 1
    if p >= end:
        status[0] = 1
        return p
    if b[p] < 0x80:
        status[0] = (seen & 2) << 3
        return p
    p = scan_name_high(b, p, end, start, status)
    if status[0] == 0:
        status[0] = 16
    return p


cdef inline bint same_bytes(const unsigned char* x, const unsigned char* y, Py_ssize_t n) noexcept:
    """memcmp(x, y, n) == 0 for the short names of end tags, without a call."""
    cdef Py_ssize_t i
    for i in range(n):
        if x[i] != y[i]:
            return False
    return True


cdef inline int find_colon(const unsigned char* s, Py_ssize_t n) noexcept:
    """Index of the one ':' of a qualified name, -1 if none, -2 if malformed."""
    cdef const unsigned char* hit = <const unsigned char*>memchr(s, 58, n)
    cdef int colon
    cdef unsigned int cp = 0
    if hit == NULL:
        return -1
    colon = hit - s
    if memchr(hit + 1, 58, n - colon - 1) != NULL:
        return -2
    if colon == 0 or colon == n - 1:
        return -2
    if colon > 0:  # the local part must start like a name too (an NCName)
        if NT[s[colon + 1]] == NT_CHAR:
            return -2
        if NT[s[colon + 1]] == NT_HIGH and utf8_seq(s + colon + 1, n - colon - 1, &cp) > 0 \
                and not is_name_char(cp, True):
            return -2
    return colon



cdef inline int prefix_match(const unsigned char* s, Py_ssize_t avail, const char* lit, Py_ssize_t n) noexcept:
    """1 if s starts with lit, 0 if the available bytes are a proper prefix of it, -1 otherwise."""
    cdef Py_ssize_t k = n if avail >= n else avail
    if memcmp(s, lit, k) != 0:
        return -1
    return 1 if k == n else 0


cdef inline bint eq(const void* s, Py_ssize_t n, const char* lit, Py_ssize_t litlen) noexcept:
    return n == litlen and memcmp(s, lit, n) == 0


cdef inline int put_utf8(unsigned char* o, unsigned int cp) noexcept:
    if cp < 0x80:
        o[0] = cp
        return 1
    if cp < 0x800:
        o[0] = 0xC0 | (cp >> 6)
        o[1] = 0x80 | (cp & 0x3F)
        return 2
    if cp < 0x10000:
        o[0] = 0xE0 | (cp >> 12)
        o[1] = 0x80 | ((cp >> 6) & 0x3F)
        o[2] = 0x80 | (cp & 0x3F)
        return 3
    o[0] = 0xF0 | (cp >> 18)
    o[1] = 0x80 | ((cp >> 12) & 0x3F)
    o[2] = 0x80 | ((cp >> 6) & 0x3F)
    o[3] = 0x80 | (cp & 0x3F)
    return 4


cdef Py_ssize_t decode_value(const unsigned char* s, Py_ssize_t n, unsigned char* o) noexcept:
    """Decode an already validated attribute value into o (never longer than n):
    resolve references and normalize literal tab/CR/LF (CRLF counts once) to spaces."""
    cdef Py_ssize_t i = 0, k = 0
    cdef unsigned char c
    cdef unsigned int cp = 0
    while i < n:
        c = s[i]
        if c == 38:  # '&'
            if s[i + 1] == 35:  # '#'
                cp = 0
                i += 2
                if s[i] == 120:  # 'x'
                    i += 1
                    while s[i] != 59:
                        c = s[i]
                        cp = cp * 16 + (c - 48 if c <= 57 else (c | 32) - 87)
                        i += 1
                else:
                    while s[i] != 59:
                        cp = cp * 10 + (s[i] - 48)
                        i += 1
                k += put_utf8(o + k, cp)
            else:
                if s[i + 1] == 108:  # lt
                    o[k] = 60
                elif s[i + 1] == 103:  # gt
                    o[k] = 62
                elif s[i + 2] == 109:  # amp
                    o[k] = 38
                elif s[i + 1] == 113:  # quot
                    o[k] = 34
                else:  # apos
                    o[k] = 39
                k += 1
                while s[i] != 59:
                    i += 1
            i += 1
        elif c == 9 or c == 10 or c == 13:
            o[k] = 32
            k += 1
            i += 1
            if c == 13 and i < n and s[i] == 10:
                i += 1
        else:
            o[k] = c
            k += 1
            i += 1
    return k


cdef str name_str(const unsigned char* s, Py_ssize_t n):
    """Local names of the common stanzas come from constants, others are decoded."""
    if n == 7 and memcmp(s, b"message", 7) == 0:
        return "message"
    if n == 8 and memcmp(s, b"presence", 8) == 0:
        return "presence"
    if n == 2 and memcmp(s, b"iq", 2) == 0:
        return "iq"
    if n == 6 and memcmp(s, b"result", 6) == 0:
        return "result"
    if n == 6 and memcmp(s, b"verify", 6) == 0:
        return "verify"
    return fp_utf8_str(<const char*>s, n)


cdef tuple TYPE_VALUES = ("chat", "get", "set", "result", "error", "groupchat", "normal", "headline",
                          "unavailable", "subscribe", "subscribed", "unsubscribe", "unsubscribed", "probe", "valid",
                          "invalid")
cdef tuple TYPE_BYTES = tuple(v.encode() for v in TYPE_VALUES)


cdef object type_str(const unsigned char* s, Py_ssize_t n):
    """The common values of ``type`` come from constants, others are decoded."""
    cdef Py_ssize_t i
    cdef bytes candidate
    for i in range(len(TYPE_BYTES)):
        candidate = <bytes>TYPE_BYTES[i]
        if len(candidate) == n and memcmp(s, PyBytes_AS_STRING(candidate), n) == 0:
            return TYPE_VALUES[i]
    return fp_utf8_str(<const char*>s, n)


class ParseError(Exception):
    """The stream is broken; ``condition`` is the RFC 6120 stream error to send."""

    def __init__(self, condition, text, offset):
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.offset = offset
        self.events = []


cdef class StreamHeader:
    """The opening ``<stream:stream ...>`` (or prefix-free ``<stream xmlns=...>``)."""

    @property
    def attributes(self):
        """Every attribute, decoded; namespaced ones in Clark form "{uri}local".

        Built when asked: a stream keeps only the five routing attributes as
        fields and a dict for any others (an idle stream holds no dict)."""
        known = {}
        for name, value in (("to", self.to), ("from", self.from_), ("id", self.id),
                            ("version", self.version), (S_XML_LANG, self.lang)):
            if value is not None:
                known[name] = value
        if self.other_attributes is not None:
            known.update(self.other_attributes)
        return known

    def __repr__(self):
        return (f"StreamHeader(prefix={self.prefix!r}, to={self.to!r}, from_={self.from_!r}, "
                f"id={self.id!r}, version={self.version!r}, lang={self.lang!r}, "
                f"namespaces={self.namespaces!r}, start={self.start}, end={self.end})")


@cython.no_gc  # only str/None fields: no cycles, so no GC tracking per stanza
@cython.freelist(256)  # a 64 KiB read returns ~200 elements
cdef class Element:
    """One complete top-level element (a stanza or a negotiation element)."""

    def __repr__(self):
        return (f"Element(name={self.name!r}, ns={self.ns!r}, prefix={self.prefix!r}, to={self.to!r}, "
                f"from_={self.from_!r}, type={self.type!r}, id={self.id!r}, lang={self.lang!r}, "
                f"start={self.start}, end={self.end}, header_prefix={self.header_prefix}, "
                f"own_xmlns={self.own_xmlns})")


@cython.no_gc
cdef class StreamEnd:
    """``</stream:stream>`` (or ``</stream>``) was received."""

    def __repr__(self):
        return f"StreamEnd(start={self.start}, end={self.end})"


cdef class Tokenizer:
    """Splits one XMPP stream into validated events; see the module docstring."""

    def __cinit__(self):
        self.attrs = NULL
        self.stack = NULL
        self.decls = NULL
        self.arena = NULL
        self.scratch = NULL

    def __init__(self, *, Py_ssize_t max_stanza_bytes=DEFAULT_MAX_STANZA_BYTES,
                 int max_depth=DEFAULT_MAX_DEPTH, int max_attributes=DEFAULT_MAX_ATTRIBUTES,
                 int max_name_length=DEFAULT_MAX_NAME_LENGTH,
                 Py_ssize_t max_attribute_value_length=DEFAULT_MAX_ATTRIBUTE_VALUE_LENGTH):
        if max_stanza_bytes < 1 or max_depth < 1 or max_attributes < 1 or max_name_length < 1 \
                or max_attribute_value_length < 0:
            raise ValueError("tokenizer limits must be positive")
        self.max_stanza_bytes = max_stanza_bytes
        self.max_depth = max_depth
        self.max_attributes = max_attributes
        self.max_name_length = max_name_length
        self.max_attribute_value_length = max_attribute_value_length
        # per-element arrays start small and grow up to the limits: an idle
        # stream should not pay for the worst case (10,000 streams per process)
        self.attrs_cap = 0  # attrs, stack and scratch are allocated on first use
        self.stack_cap = 0
        self.decls_cap = 4  # a stream header declares about three; grows by doubling
        self.decls = <NsDecl*>malloc(sizeof(NsDecl) * self.decls_cap)
        self.arena_cap = IDLE_ARENA
        self.arena = <char*>malloc(self.arena_cap)
        self.scratch_cap = 0
        if self.decls == NULL or self.arena == NULL:
            raise MemoryError()
        self.buf = EMPTY_BUFFER
        self.fill = 0
        self.pos = 0
        self.base = 0
        self.error = None
        self._reset_stream()

    def __dealloc__(self):
        free(self.attrs)
        free(self.stack)
        free(self.decls)
        free(self.arena)
        free(self.scratch)

    cdef void _reset_stream(self):
        self.state = ST_PROLOG
        self.at_start = True
        self.in_decl = False
        self.seen_header = False
        self.paused = False
        self.t_restart = False
        self.tok_abs = -1
        self.depth = 0
        self.ndecls = 0
        self.nhdecls = 0
        self.arena_len = 0
        self.header_ev = None
        self.hdr_qname = None
        self.hdr_uris = ()

    @property
    def buffer(self):
        """The bytearray the events of the last call refer to."""
        return self.buf

    @property
    def header(self):
        """The current stream's StreamHeader, once received."""
        return self.header_ev

    @property
    def offset(self):
        """Bytes received since the last restart (absolute offset of the next byte)."""
        return self.base + self.fill

    # ------------------------------------------------------------------ input

    def feed(self, data):
        """Copy ``data`` in and scan it; returns the events completed so far."""
        cdef Py_buffer view
        if self.error is not None:
            raise self.error
        if type(data) is bytes:  # the common case, without the buffer protocol
            if PyBytes_GET_SIZE(data) > 0:
                self._prepare(PyBytes_GET_SIZE(data))
                memcpy(PyByteArray_AS_STRING(self.buf) + self.fill, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                self.fill += PyBytes_GET_SIZE(data)
            return self._run()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len > 0:
                self._prepare(view.len)
                memcpy(PyByteArray_AS_STRING(self.buf) + self.fill, view.buf, view.len)
                self.fill += view.len
        finally:
            PyBuffer_Release(&view)
        return self._run()

    cpdef object get_buffer(self, Py_ssize_t sizehint=-1):
        """A writable memoryview of free space at the end of the buffer (BufferedProtocol)."""
        self._prepare(sizehint if sizehint > 0 else READ_SIZE)
        return memoryview(self.buf)[self.fill:]

    cpdef list buffer_updated(self, Py_ssize_t nbytes):
        """``nbytes`` were written at the start of the last ``get_buffer()`` view: scan them."""
        if self.error is not None:
            raise self.error
        if nbytes < 0 or self.fill + nbytes > PyByteArray_GET_SIZE(self.buf):
            raise ValueError("buffer_updated: more bytes than get_buffer() offered")
        self.fill += nbytes
        return self._run()

    cpdef release(self):
        """Give the receive buffer back when no construct is in progress.

        Call it after acting on a read's events: an idle stream then holds no
        buffer at all, and the next ``get_buffer()``/``feed()`` allocates one.
        Ranges of earlier events are invalid afterwards, as after any input call."""
        cdef char* shrunk
        if self.pos == self.fill and self.tok_abs < 0:
            self.base += self.fill
            self.fill = 0
            self.pos = 0
            self.buf = EMPTY_BUFFER
            # outside a top-level element no start tag, open element or
            # attribute value is in progress: the per-element arrays can go too
            free(self.attrs)
            free(self.stack)
            free(self.scratch)
            self.attrs = NULL
            self.stack = NULL
            self.scratch = NULL
            self.attrs_cap = self.stack_cap = self.scratch_cap = 0
            if self.arena_cap > IDLE_ARENA and self.arena_len <= IDLE_ARENA:
                shrunk = <char*>realloc(self.arena, IDLE_ARENA)  # keeps the header's declarations
                if shrunk != NULL:
                    self.arena = shrunk
                    self.arena_cap = IDLE_ARENA

    def restart(self, Py_ssize_t end):
        """Start a new stream after buffer offset ``end``; returns the bytes after it.

        Whatever was scanned after ``end`` is forgotten, including an error found
        there. The scanner pauses by itself after ``<proceed/>``, ``<starttls/>``
        and ``<success/>``, so normally nothing after ``end`` was scanned."""
        if end < 0 or end > self.fill:
            raise ValueError("restart: offset outside the buffer")
        if self.error is not None and self.error.offset < self.base + end:
            raise self.error
        tail = PyByteArray_AS_STRING(self.buf)[end:self.fill]
        self.error = None
        self.fill = end
        self.pos = end
        self.base = -end
        self._reset_stream()
        return tail

    # ---------------------------------------------------------------- helpers

    cdef int _fail(self, str condition, str what, Py_ssize_t idx) except -1:
        cdef Py_ssize_t off = self.base + idx
        raise ParseError(condition, f"{what} (at byte {off})", off)

    cdef int _nwf(self, str what, Py_ssize_t idx) except -1:
        return self._fail("not-well-formed", what, idx)

    cdef int _bad_char(self, int code, Py_ssize_t idx) except -1:
        if code == -1:  # RFC 6120 §4.9.3.22: "violating the rules of UTF-8 encoding"
            return self._fail("unsupported-encoding", "invalid UTF-8", idx)
        if code == -2:
            return self._nwf("U+FFFE/U+FFFF is not an XML character", idx)
        return self._nwf(f"control character 0x{code:02x} is not allowed in XML", idx)

    cdef int _prepare(self, Py_ssize_t need) except -1:
        """Make room for ``need`` bytes after ``fill``: drop the accepted bytes in
        front of the construct in progress, in a fresh bytearray if anything else
        refers to the current one (a view of it may still be waiting to be written)."""
        cdef Py_ssize_t keep = self.pos
        cdef Py_ssize_t tail, cap = PyByteArray_GET_SIZE(self.buf)
        cdef bytearray nb
        if self.tok_abs >= 0 and self.tok_abs - self.base < keep:
            keep = self.tok_abs - self.base
        tail = self.fill - keep
        if shared(<PyObject*>self.buf) or cap - tail < need:
            nb = PyByteArray_FromStringAndSize(NULL, max(READ_SIZE, tail + need, 2 * tail))  # grow geometrically
            memcpy(PyByteArray_AS_STRING(nb), PyByteArray_AS_STRING(self.buf) + keep, tail)
            self.buf = nb
        elif keep > 0:
            memmove(PyByteArray_AS_STRING(self.buf), PyByteArray_AS_STRING(self.buf) + keep, tail)
        else:
            return 0
        self.base += keep
        self.pos -= keep
        self.fill = tail
        return 0

    cdef int _grow_attrs(self) except -1:
        cdef int cap = min(max(self.attrs_cap * 2, INITIAL_SLOTS), self.max_attributes + 1)
        cdef Attr* grown = <Attr*>realloc(self.attrs, sizeof(Attr) * cap)
        if grown == NULL:
            raise MemoryError()
        self.attrs = grown
        self.attrs_cap = cap
        return 0

    cdef int _grow_stack(self, int depth) except -1:
        cdef int cap = min(max(self.stack_cap * 2, depth + 1, INITIAL_SLOTS), self.max_depth + 2)
        cdef Open* grown = <Open*>realloc(self.stack, sizeof(Open) * cap)
        if grown == NULL:
            raise MemoryError()
        self.stack = grown
        self.stack_cap = cap
        return 0

    cdef list _run(self):
        self.events = []
        self.paused = False
        try:
            self._scan()
        except ParseError as e:
            e.events = self.events
            self.error = e
            self.events = None
            raise
        events = self.events
        self.events = None
        return events

    # ---------------------------------------------------------------- scanner

    cdef int _scan(self) except -1:
        cdef const unsigned char* b = <const unsigned char*>PyByteArray_AS_STRING(self.buf)
        cdef Py_ssize_t p = self.pos, end = self.fill, base = self.base, start, q
        cdef int st = self.state, n, status = 0, colon
        cdef unsigned char c, quote
        cdef unsigned int cp = 0
        cdef Attr* a
        cdef Open* o
        # One pass over the states in the order a tag is written, so that the
        # common transitions fall through without going back to the loop head.
        while p < end:
            if st == ST_CONTENT:
                while True:
                    p = fp_skip_text(b, p, end)
                    if p >= end:
                        break
                    c = b[p]
                    if c == 60:  # '<'
                        break
                    if c >= 0x80:
                        p = utf8_run(b, p, end, &status)
                        if status == 0:
                            continue
                        if status == 1:
                            break
                        self._bad_char(status, p)
                    if CT[c] == 0:
                        p += 1
                    elif c == 38:  # '&'
                        if p + 4 < end and b[p + 1] == 97 and b[p + 2] == 109 and b[p + 3] == 112 and b[p + 4] == 59:
                            p += 5  # &amp;
                        elif p + 3 < end and (b[p + 1] == 108 or b[p + 1] == 103) and b[p + 2] == 116 \
                                and b[p + 3] == 59:
                            p += 4  # &lt; &gt;
                        elif p + 5 < end and b[p + 5] == 59 and ((b[p + 1] == 113 and b[p + 2] == 117 and b[p + 3] == 111
                                                               and b[p + 4] == 116)
                                                              or (b[p + 1] == 97 and b[p + 2] == 112 and b[p + 3] == 111
                                                                  and b[p + 4] == 115)):
                            p += 6  # &quot; &apos;
                        else:
                            q = self._ref(b, p, end)
                            if q < 0:
                                break
                            p = q
                    elif c == 93:  # ']': refuse "]]>"
                        if p + 1 >= end:
                            break
                        if b[p + 1] == 93:
                            if p + 2 >= end:
                                break
                            if b[p + 2] == 62:
                                self._nwf("']]>' is not allowed in text", p)
                        p += 1
                    else:
                        self._bad_char(c, p)
                if p >= end or b[p] != 60 or p + 1 >= end:
                    break
                c = b[p + 1]
                if NT[c] == NT_START:
                    p += 1
                    self.name_abs = base + p
                    st = ST_STAG_NAME
                elif c == 47:  # '/'
                    # the common end tag: the open element's name right followed by '>'
                    o = &self.stack[self.depth]
                    q = p + 2 + o.nlen
                    if q < end and b[q] == 62 and same_bytes(b + p + 2, b + (o.name - base), o.nlen):
                        p = q + 1
                        self._etag_end(p)
                        st = self.state
                        if self.paused:
                            break
                        continue
                    p += 2
                    self.name_abs = base + p
                    st = ST_ETAG_NAME
                else:
                    q = self._angle(b, p, end, st)
                    if q < 0:
                        break
                    p = q
                    st = self.state
            if st == ST_STAG_NAME or st == ST_ETAG_NAME:
                start = self.name_abs - base
                q = scan_name(b, p, end, start, &status)
                if q - start > self.max_name_length:
                    self._fail("policy-violation", f"name longer than {self.max_name_length} bytes",
                               start + self.max_name_length)
                if status < 0:
                    self._bad_name(status, q)
                p = q
                if status == 1:
                    break
                if st == ST_ETAG_NAME:
                    self._etag_name(b, start, p)
                    st = ST_ETAG_END
                else:
                    colon = find_colon(b + start, p - start) if status else -1
                    if colon == -2:
                        self._nwf("malformed qualified name", start)
                    self.name_len = p - start
                    self.name_colon = colon
                    self.nattrs = 0
                    self.had_ws = False
                    st = ST_STAG
            if st == ST_ETAG_END:
                while p < end and is_ws(b[p]):
                    p += 1
                if p >= end:
                    break
                if b[p] != 62:
                    self._nwf("expected '>' to close the end tag", p)
                p += 1
                self._etag_end(p)
                st = self.state
                if self.paused:
                    break
                continue
            if st == ST_STAG:
                if p < end and is_ws(b[p]):
                    self.had_ws = True
                    p += 1
                    while p < end and is_ws(b[p]):
                        p += 1
                if p >= end:
                    break
                c = b[p]
                if c == 62:  # '>'
                    if self.in_decl:
                        self._nwf("the XML declaration must end with '?>'", p)
                    p += 1
                    self._stag_end(b, p, False)
                    st = self.state
                    if self.paused:
                        break
                    continue
                if c == 47:  # '/'
                    if p + 1 >= end:
                        break
                    if b[p + 1] != 62 or self.in_decl:
                        self._nwf("'/' in a start tag must be followed by '>'", p)
                    p += 2
                    self._stag_end(b, p, True)
                    st = self.state
                    if self.paused:
                        break
                    continue
                if c == 63 and self.in_decl:  # '?'
                    if p + 1 >= end:
                        break
                    if b[p + 1] != 62:
                        self._nwf("'?' in the XML declaration must be followed by '>'", p)
                    p += 2
                    self._decl_end(b, p)
                    st = self.state
                    continue
                if NT[c] != NT_START and NT[c] != NT_HIGH:
                    self._nwf(f"unexpected character {chr(c)!r} in a start tag", p)
                if not self.had_ws:
                    self._nwf("attributes must be separated by whitespace", p)
                if self.nattrs >= self.max_attributes:
                    self._fail("policy-violation", f"more than {self.max_attributes} attributes on one element", p)
                if self.nattrs >= self.attrs_cap:
                    self._grow_attrs()
                a = &self.attrs[self.nattrs]
                a.name = base + p
                a.flags = 0
                st = ST_ANAME
            if st == ST_ANAME:
                a = &self.attrs[self.nattrs]
                start = a.name - base
                q = scan_name(b, p, end, start, &status)
                if q - start > self.max_name_length:
                    self._fail("policy-violation", f"name longer than {self.max_name_length} bytes",
                               start + self.max_name_length)
                if status < 0:
                    self._bad_name(status, q)
                p = q
                if status == 1:
                    break
                colon = find_colon(b + start, p - start) if status else -1
                if colon == -2:
                    self._nwf("malformed qualified name", start)
                a.nlen = p - start
                a.colon = colon
                st = ST_AEQ
            if st == ST_AEQ:
                while p < end and is_ws(b[p]):
                    p += 1
                if p >= end:
                    break
                if b[p] != 61:  # '='
                    self._nwf("expected '=' after an attribute name", p)
                p += 1
                st = ST_AQUOTE
            if st == ST_AQUOTE:
                while p < end and is_ws(b[p]):
                    p += 1
                if p >= end:
                    break
                c = b[p]
                if c != 39 and c != 34:
                    self._nwf("attribute values must be quoted", p)
                self.quote = c
                p += 1
                self.attrs[self.nattrs].value = base + p
                st = ST_AVAL
            if st == ST_AVAL:
                a = &self.attrs[self.nattrs]
                start = a.value - base
                quote = self.quote
                status = 0
                while True:
                    p = fp_skip_attr(b, p, end)
                    if p >= end:
                        break
                    c = b[p]
                    if c == quote:
                        break
                    if c >= 0x80:
                        p = utf8_run(b, p, end, &status)
                        if status == 0:
                            continue
                        if status == 1:
                            break
                        self._bad_char(status, p)
                    if AT[c] == 0 or c == 34 or c == 39:
                        p += 1
                    elif c == 9 or c == 10 or c == 13:
                        a.flags |= A_DECODE
                        p += 1
                    elif c == 38:
                        q = self._ref(b, p, end)
                        if q < 0:
                            status = 1
                            break
                        a.flags |= A_DECODE
                        p = q
                    elif c == 60:
                        self._nwf("'<' is not allowed in an attribute value", p)
                    else:
                        self._bad_char(c, p)
                if p - start > self.max_attribute_value_length:
                    self._fail("policy-violation",
                               f"attribute value longer than {self.max_attribute_value_length} bytes",
                               start + self.max_attribute_value_length)
                if status or p >= end:
                    break
                a.vlen = p - start
                self.nattrs += 1
                self.had_ws = False
                p += 1
                st = ST_STAG
                continue
            if st == ST_CDATA:
                while p < end:
                    c = b[p]
                    if DT[c] == 0:
                        p += 1
                    elif c == 93:
                        if p + 2 >= end:
                            break
                        if b[p + 1] == 93 and b[p + 2] == 62:
                            p += 3
                            st = ST_CONTENT
                            break
                        p += 1
                    elif c >= 0x80:
                        n = utf8_seq(b + p, end - p, &cp)
                        if n == 0:
                            break
                        if n < 0:
                            self._bad_char(n, p)
                        p += n
                    else:
                        self._bad_char(c, p)
                if st == ST_CDATA:
                    break
                continue
            if st <= ST_DONE:
                c = b[p]
                if is_ws(c):
                    p += 1
                    while p < end and is_ws(b[p]):
                        p += 1
                    if st == ST_PROLOG:
                        self.at_start = False
                elif c == 60:
                    q = self._angle(b, p, end, st)
                    if q < 0:
                        break
                    p = q
                    st = self.state
                elif c == 0xEF and st == ST_PROLOG and base + p == 0:
                    n = prefix_match(b + p, end - p, b"\xef\xbb\xbf", 3)
                    if n == 0:
                        break
                    if n < 0:
                        self._nwf("text before the stream header", p)
                    p += 3
                elif c >= 0x80 and utf8_seq(b + p, end - p, &cp) == 0:
                    break
                elif c >= 0x80 and utf8_seq(b + p, end - p, &cp) == -1:
                    self._bad_char(-1, p)
                elif st == ST_DONE:
                    self._nwf("data after the end of the stream", p)
                else:
                    self._nwf("text is not allowed outside a stanza", p)
        self.pos = p
        self.state = st
        if self.tok_abs >= 0 and base + end - self.tok_abs > self.max_stanza_bytes:
            self._fail("policy-violation", f"stanza larger than {self.max_stanza_bytes} bytes",
                       self.tok_abs + self.max_stanza_bytes - base)
        return 0

    cdef int _bad_name(self, int status, Py_ssize_t idx) except -1:
        if status == -3:
            return self._nwf("character not allowed in a name", idx)
        return self._bad_char(status, idx)

    cdef int _etag_name(self, const unsigned char* b, Py_ssize_t start, Py_ssize_t p) except -1:
        """The end tag's name b[start:p] must match the open element's."""
        cdef Py_ssize_t nlen = p - start
        cdef Open* o
        if self.depth == 0:
            if not eq(b + start, nlen, PyBytes_AS_STRING(self.hdr_qname), len(self.hdr_qname)):
                self._nwf("end tag does not match the open stream element", start)
        else:
            o = &self.stack[self.depth]
            if nlen != o.nlen or memcmp(b + start, b + (o.name - self.base), nlen) != 0:
                self._nwf("end tag does not match the open element", start)
        return 0

    cdef Py_ssize_t _angle(self, const unsigned char* b, Py_ssize_t p, Py_ssize_t end, int st) except -2:
        """Dispatch on what follows the '<' at b[p]; -1 = need more bytes."""
        cdef Py_ssize_t avail = end - p
        cdef bint top = st <= ST_DONE
        cdef unsigned char c1, c2
        cdef int n
        if avail < 2:
            return -1
        c1 = b[p + 1]
        if c1 == 47:  # '/'
            if st == ST_PROLOG:
                self._nwf("end tag before the stream header", p)
            if st == ST_DONE:
                self._nwf("data after the end of the stream", p)
            if top:
                self.tok_abs = self.base + p
            self.name_abs = self.base + p + 2
            self.state = ST_ETAG_NAME
            return p + 2
        if c1 == 33:  # '!'
            if avail < 3:
                return -1
            c2 = b[p + 2]
            if c2 == 45:  # '-'
                if avail < 4:
                    return -1
                if b[p + 3] == 45:
                    self._fail("restricted-xml", "comments are not allowed (RFC 6120 §11.1)", p)
                self._nwf("malformed comment", p)
            if c2 == 91:  # '['
                n = prefix_match(b + p, avail, b"<![CDATA[", 9)
                if n == 0:
                    return -1
                if n < 0:
                    self._nwf("malformed CDATA section", p)
                if top:
                    self._nwf("CDATA section outside an element", p)
                self.state = ST_CDATA
                return p + 9
            if 65 <= c2 <= 90:
                self._fail("restricted-xml", "DTDs and markup declarations are not allowed (RFC 6120 §11.1)", p)
            self._nwf("malformed markup declaration", p)
        if c1 == 63:  # '?'
            n = prefix_match(b + p, avail, b"<?xml", 5)
            if n == 0:
                return -1
            if n > 0:
                if avail < 6:
                    return -1
                if is_ws(b[p + 5]) or b[p + 5] == 63:
                    if st != ST_PROLOG or not self.at_start:
                        self._nwf("the XML declaration is only allowed at the start of the stream", p)
                    self.at_start = False
                    self.in_decl = True
                    self.tok_abs = self.base + p
                    self.nattrs = 0
                    self.had_ws = False
                    self.state = ST_STAG
                    return p + 5
            self._fail("restricted-xml", "processing instructions are not allowed (RFC 6120 §11.1)", p)
        if st == ST_DONE:
            self._nwf("data after the end of the stream", p)
        if NT[c1] == NT_START or NT[c1] == NT_HIGH:
            if top:
                self.tok_abs = self.base + p
                self.t_hdr_prefix = False
                self.at_start = False
            self.name_abs = self.base + p + 1
            self.state = ST_STAG_NAME
            return p + 1
        self._nwf("'<' must be followed by a name, '/', '!' or '?'", p)

    cdef Py_ssize_t _ref(self, const unsigned char* b, Py_ssize_t p, Py_ssize_t end) except -2:
        """Check the reference at b[p] == '&'; index after its ';' or -1 = need more bytes."""
        cdef Py_ssize_t q = p + 1, lim = end
        cdef unsigned int val = 0, d = 0
        cdef int ndig = 0
        cdef bint hexa = False
        cdef unsigned char c
        if lim > p + MAX_REF:
            lim = p + MAX_REF
        if q >= end:
            return -1
        if b[q] == 35:  # '#'
            q += 1
            if q >= end:
                return -1
            if b[q] == 120:  # 'x'
                hexa = True
                q += 1
            while q < lim:
                c = b[q]
                if 48 <= c <= 57:
                    d = c - 48
                elif hexa and (97 <= (c | 32) <= 102):
                    d = (c | 32) - 87
                elif c == 59 and ndig > 0:
                    break
                else:
                    self._nwf("malformed character reference", p)
                val = val * (16 if hexa else 10) + d
                if val > 0x10FFFF:
                    val = 0x110000
                ndig += 1
                q += 1
            if q >= lim:
                if lim == end and end - p < MAX_REF:
                    return -1
                self._fail("policy-violation", f"character reference longer than {MAX_REF} bytes", p)
            if not is_xml_char(val):
                self._nwf(f"character reference to a character that XML does not allow", p)
            return q + 1
        c = b[q]
        if NT[c] != NT_START and NT[c] != NT_HIGH:
            self._nwf("'&' must start a reference (write '&amp;')", p)
        while q < end and (NT[b[q]] != NT_NONE):
            q += 1
            if q - p > 5:  # longer than "&quot": no predefined entity
                self._fail("restricted-xml", "only the five predefined entities may be referenced (RFC 6120 §11.1)", p)
        if q >= end:
            return -1
        if b[q] != 59:
            self._nwf("entity reference without ';'", p)
        if not (eq(b + p + 1, q - p - 1, b"amp", 3) or eq(b + p + 1, q - p - 1, b"lt", 2)
                or eq(b + p + 1, q - p - 1, b"gt", 2) or eq(b + p + 1, q - p - 1, b"quot", 4)
                or eq(b + p + 1, q - p - 1, b"apos", 4)):
            self._fail("restricted-xml", "only the five predefined entities may be referenced (RFC 6120 §11.1)", p)
        return q + 1

    cdef int _stag_end(self, const unsigned char* b, Py_ssize_t p, bint empty) except -1:
        """A start tag ended before b[p]: namespaces, duplicates, events, nesting."""
        cdef Py_ssize_t base = self.base
        cdef int i, j, n = self.nattrs, colon = self.name_colon, nlen = self.name_len, d = self.depth
        cdef Attr* a
        cdef Attr* o
        cdef const unsigned char* nm
        cdef const unsigned char* name = b + (self.name_abs - base)
        cdef const unsigned char* local
        cdef Py_ssize_t ndecls0 = self.ndecls, arena0 = self.arena_len, llen, elem_found
        cdef bint own_default = False, header = not self.seen_header
        cdef const char* uri
        cdef Py_ssize_t ulen
        if not header and d >= self.max_depth:
            self._fail("policy-violation", f"elements nested deeper than {self.max_depth}", self.name_abs - 1 - base)
        if n == 0 and colon < 0 and d > 0 and not header and not eq(name, nlen, b"stream", 6):
            # fast path: a nested, unprefixed element without attributes
            if empty:
                self.state = ST_CONTENT
            else:
                self._push(d + 1, nlen, ndecls0, arena0)
            return 0
        for i in range(n):
            a = &self.attrs[i]
            nm = b + (a.name - base)
            for j in range(i):
                o = &self.attrs[j]
                if o.nlen == a.nlen and b[o.name - base] == nm[0] and memcmp(b + (o.name - base), nm, a.nlen) == 0:
                    self._nwf("duplicate attribute", a.name - base)
            if a.nlen >= 5 and memcmp(nm, b"xmlns", 5) == 0 and (a.nlen == 5 or a.colon == 5):
                a.flags |= A_DECL
                self._declare(b, a, p)
                if a.nlen == 5:
                    own_default = True
        if colon > 0:
            if eq(name, colon, b"xmlns", 5):
                self._nwf("elements cannot use the xmlns prefix", self.name_abs - base)
            if not self._lookup(name, colon, &uri, &ulen):
                self._nwf(f"unbound namespace prefix {name[:colon].decode('utf-8')!r}", self.name_abs - base)
        elif d == 0 or nlen == 6:
            self._lookup(name, 0, &uri, &ulen)
        else:  # a nested unprefixed element's namespace is not needed
            uri = b""
            ulen = 0
        elem_found = self.found  # attribute lookups below overwrite it
        local = name + colon + 1
        llen = nlen - colon - 1
        if n > 0:
            for i in range(n):
                a = &self.attrs[i]
                if a.colon <= 0 or a.flags & A_DECL:
                    continue
                nm = b + (a.name - base)
                if not self._lookup(nm, a.colon, &a.uri, &a.ulen):
                    self._nwf(f"unbound namespace prefix {nm[:a.colon].decode('utf-8')!r}", a.name - base)
                for j in range(i):
                    o = &self.attrs[j]
                    if o.colon <= 0 or o.flags & A_DECL:
                        continue
                    if o.nlen - o.colon == a.nlen - a.colon and o.ulen == a.ulen \
                            and memcmp(b + (o.name - base) + o.colon, nm + a.colon, a.nlen - a.colon) == 0 \
                            and memcmp(o.uri, a.uri, a.ulen) == 0:
                        self._nwf("duplicate attribute after namespace expansion", a.name - base)
        if header:
            return self._header(b, p, empty, name, colon, nlen, uri, ulen)
        if llen == 6 and memcmp(local, b"stream", 6) == 0 and eq(uri, ulen, C_STREAM_NS, 32):
            self._nwf("a stream element inside the stream", self.name_abs - 1 - base)
        if colon > 0 and eq(uri, ulen, b"jabber:server", 13):
            self._fail("bad-namespace-prefix", "elements in jabber:server must not be prefixed (RFC 6120 §4.8.5)",
                       self.name_abs - base)
        if d == 0:
            self.found = elem_found
            self._top_start(b, name, colon, nlen, uri, ulen, own_default)
        if empty:
            self.ndecls = ndecls0
            self.arena_len = arena0
            if d == 0:
                self._emit_element(p)
                self.state = ST_TOP
            else:
                self.state = ST_CONTENT
        else:
            self._push(d + 1, nlen, ndecls0, arena0)
        return 0

    cdef int _push(self, int d, int nlen, Py_ssize_t ndecls0, Py_ssize_t arena0) except -1:
        """Open the element whose start tag just ended at depth ``d``."""
        if d >= self.stack_cap:
            self._grow_stack(d)
        self.stack[d].name = self.name_abs
        self.stack[d].nlen = nlen
        self.stack[d].ndecls = ndecls0
        self.stack[d].arena = arena0
        self.depth = d
        self.state = ST_CONTENT
        return 0

    cdef int _declare(self, const unsigned char* b, Attr* a, Py_ssize_t p) except -1:
        """Record the namespace declaration a (copied, decoded) and check the xml/xmlns rules."""
        cdef const unsigned char* nm = b + (a.name - self.base)
        cdef const unsigned char* val = b + (a.value - self.base)
        cdef Py_ssize_t plen = a.nlen - 6 if a.nlen > 5 else 0
        cdef Py_ssize_t need = self.arena_len + plen + a.vlen
        cdef char* pre
        cdef char* uri
        cdef Py_ssize_t ulen
        cdef bint xml_ns, xmlns_ns
        cdef NsDecl* dcl
        if need > self.arena_cap:
            self.arena_cap = need * 2
            self.arena = <char*>realloc(self.arena, self.arena_cap)
            if self.arena == NULL:
                raise MemoryError()
        if self.ndecls >= self.decls_cap:
            self.decls_cap *= 2
            self.decls = <NsDecl*>realloc(self.decls, sizeof(NsDecl) * self.decls_cap)
            if self.decls == NULL:
                raise MemoryError()
        pre = self.arena + self.arena_len
        memcpy(pre, nm + 6, plen)
        uri = pre + plen
        if a.flags & A_DECODE:
            ulen = decode_value(val, a.vlen, <unsigned char*>uri)
        else:
            memcpy(uri, val, a.vlen)
            ulen = a.vlen
        xml_ns = eq(uri, ulen, C_XML_NS, 36)
        xmlns_ns = eq(uri, ulen, C_XMLNS_NS, 29)
        if plen == 0:
            if xml_ns or xmlns_ns:
                self._nwf("the default namespace cannot be the xml or xmlns namespace", a.name - self.base)
        elif eq(pre, plen, b"xmlns", 5):
            self._nwf("the xmlns prefix cannot be declared", a.name - self.base)
        elif eq(pre, plen, b"xml", 3):
            if not xml_ns:
                self._nwf("the xml prefix can only be bound to its own namespace", a.name - self.base)
        elif xml_ns or xmlns_ns:
            self._nwf("the xml and xmlns namespaces cannot be bound to another prefix", a.name - self.base)
        elif ulen == 0:
            self._nwf("a prefix cannot be undeclared in XML 1.0 (xmlns:p='')", a.name - self.base)
        dcl = &self.decls[self.ndecls]
        dcl.poff = self.arena_len
        dcl.plen = plen
        dcl.uoff = self.arena_len + plen
        dcl.ulen = ulen
        self.arena_len += plen + ulen
        self.ndecls += 1
        return 0

    cdef bint _lookup(self, const unsigned char* pre, Py_ssize_t plen, const char** uri, Py_ssize_t* ulen) noexcept:
        """Namespace of prefix pre (plen == 0: the default namespace); False if unbound."""
        cdef Py_ssize_t i = self.ndecls - 1
        cdef NsDecl* dcl
        while i >= 0:
            dcl = &self.decls[i]
            if dcl.plen == plen and memcmp(self.arena + dcl.poff, pre, plen) == 0:
                uri[0] = self.arena + dcl.uoff
                ulen[0] = dcl.ulen
                if plen > 0 and i < self.nhdecls:
                    self.t_hdr_prefix = True
                self.found = i
                return True
            i -= 1
        self.found = -1
        if plen == 0:
            uri[0] = b""
            ulen[0] = 0
            return True
        if eq(pre, plen, b"xml", 3):
            uri[0] = C_XML_NS
            ulen[0] = 36
            return True
        return False

    cdef object _value(self, const unsigned char* b, Attr* a):
        """The decoded value of attribute a as str."""
        cdef const char* s = <const char*>b + (a.value - self.base)
        cdef Py_ssize_t n
        if not (a.flags & A_DECODE):
            return fp_utf8_str(s, a.vlen)
        if a.vlen >= self.scratch_cap:
            self.scratch_cap = max(a.vlen * 2, 64)
            self.scratch = <unsigned char*>realloc(self.scratch, self.scratch_cap)
            if self.scratch == NULL:
                raise MemoryError()
        n = decode_value(<const unsigned char*>s, a.vlen, self.scratch)
        return fp_utf8_str(<const char*>self.scratch, n)

    cdef object _value_as(self, const unsigned char* b, Attr* a, object prev):
        """_value, reusing prev when it is the same string (consecutive stanzas often share to/from)."""
        if not (a.flags & A_DECODE) and fp_same_str(prev, <const char*>b + (a.value - self.base), a.vlen):
            return prev
        return self._value(b, a)

    cdef int _top_start(self, const unsigned char* b, const unsigned char* name, int colon, int nlen,
                        const char* uri, Py_ssize_t ulen, bint own_default) except -1:
        """The top-level element's event, filled from its start tag (the range when it ends)."""
        cdef int i
        cdef Attr* a
        cdef const unsigned char* nm
        cdef const unsigned char* local = name + colon + 1
        cdef Element ev = Element.__new__(Element)
        ev.name = name_str(local, nlen - colon - 1)
        if 0 <= self.found < self.nhdecls:
            ev.ns = self.hdr_uris[self.found]
        else:
            ev.ns = fp_utf8_str(uri, ulen)
        if colon >= 0:
            ev.prefix = fp_utf8_str(<const char*>name, colon)
        ev.own_xmlns = own_default
        self.t_restart = (eq(uri, ulen, b"urn:ietf:params:xml:ns:xmpp-tls", 31)
                          and (eq(local, nlen - colon - 1, b"proceed", 7) or eq(local, nlen - colon - 1, b"starttls", 8))) \
            or (eq(uri, ulen, b"urn:ietf:params:xml:ns:xmpp-sasl", 32) and eq(local, nlen - colon - 1, b"success", 7))
        for i in range(self.nattrs):
            a = &self.attrs[i]
            nm = b + (a.name - self.base)
            if a.nlen == 2:
                if nm[0] == 116 and nm[1] == 111:  # to
                    ev.to = self.last_to = self._value_as(b, a, self.last_to)
                elif nm[0] == 105 and nm[1] == 100:  # id
                    ev.id = self._value(b, a)
            elif a.nlen == 4:
                if memcmp(nm, b"from", 4) == 0:
                    ev.from_ = self.last_from = self._value_as(b, a, self.last_from)
                elif memcmp(nm, b"type", 4) == 0:
                    if a.flags & A_DECODE:
                        ev.type = self._value(b, a)
                    else:
                        ev.type = type_str(b + (a.value - self.base), a.vlen)
            elif a.nlen == 8 and memcmp(nm, b"xml:lang", 8) == 0:
                ev.lang = self._value(b, a)
        self.t_elem = ev
        return 0

    cdef int _emit_element(self, Py_ssize_t p) except -1:
        cdef Element ev = self.t_elem
        if self.base + p - self.tok_abs > self.max_stanza_bytes:
            self._fail("policy-violation", f"stanza larger than {self.max_stanza_bytes} bytes",
                       self.tok_abs + self.max_stanza_bytes - self.base)
        ev.start = self.tok_abs - self.base
        ev.end = p
        ev.header_prefix = self.t_hdr_prefix
        self.events.append(ev)
        self.t_elem = None
        self.tok_abs = -1
        self.paused = self.t_restart
        return 0

    cdef int _etag_end(self, Py_ssize_t p) except -1:
        """An end tag ended before b[p]."""
        cdef StreamEnd ev
        cdef Open* o
        if self.depth == 0:
            ev = StreamEnd.__new__(StreamEnd)
            ev.start = self.tok_abs - self.base
            ev.end = p
            self.events.append(ev)
            self.tok_abs = -1
            self.state = ST_DONE
            return 0
        o = &self.stack[self.depth]
        self.ndecls = o.ndecls
        self.arena_len = o.arena
        self.depth -= 1
        if self.depth == 0:
            self._emit_element(p)
            self.state = ST_TOP
        else:
            self.state = ST_CONTENT
        return 0

    cdef int _header(self, const unsigned char* b, Py_ssize_t p, bint empty,
                     const unsigned char* name, int colon, int nlen, const char* uri, Py_ssize_t ulen) except -1:
        """The stream header's start tag ended before b[p]: check it and emit StreamHeader."""
        cdef StreamHeader ev
        cdef StreamEnd end_ev
        cdef Attr* a
        cdef int i
        cdef NsDecl* dcl
        cdef Py_ssize_t where = self.name_abs - self.base
        cdef const unsigned char* nm
        cdef const unsigned char* local = name + colon + 1
        if self.base + p - self.tok_abs > self.max_stanza_bytes:
            self._fail("policy-violation", f"stream header larger than {self.max_stanza_bytes} bytes",
                       self.tok_abs + self.max_stanza_bytes - self.base)
        if not eq(uri, ulen, C_STREAM_NS, 32):
            self._fail("invalid-namespace", f"the stream element must be in the namespace {STREAM_NS}", where)
        if not eq(local, nlen - colon - 1, b"stream", 6):
            self._fail("invalid-namespace", "the root element must be <stream:stream>", where)
        if colon > 0 and not eq(name, colon, b"stream", 6):
            self._fail("bad-namespace-prefix", "the stream namespace prefix must be 'stream' (RFC 6120 §4.8.5)", where)
        ev = StreamHeader.__new__(StreamHeader)
        ev.prefix = None if colon < 0 else "stream"
        declared = []
        for i in range(self.ndecls):
            dcl = &self.decls[i]
            declared.append((well_known(PyUnicode_DecodeUTF8(self.arena + dcl.poff, dcl.plen, NULL))
                             if dcl.plen else None,
                             well_known(PyUnicode_DecodeUTF8(self.arena + dcl.uoff, dcl.ulen, NULL))))
        declared = tuple(declared)
        shared = SHARED_HEADER_NS.get(declared)
        if shared is None:
            shared = (dict(declared), tuple([ns for _, ns in declared]))
            if len(SHARED_HEADER_NS) < MAX_SHARED_HEADER_NS:
                SHARED_HEADER_NS[declared] = shared
        ev.namespaces, self.hdr_uris = shared
        for i in range(self.nattrs):
            a = &self.attrs[i]
            if a.flags & A_DECL:
                continue
            nm = b + (a.name - self.base)
            value = self._value(b, a)
            if a.colon > 0:
                key = "{%s}%s" % (PyUnicode_DecodeUTF8(a.uri, a.ulen, NULL),
                                  PyUnicode_DecodeUTF8(<const char*>nm + a.colon + 1, a.nlen - a.colon - 1, NULL))
            else:
                key = well_known(PyUnicode_DecodeUTF8(<const char*>nm, a.nlen, NULL))
            key = well_known(key)
            value = well_known(value)
            if key == "to":
                ev.to = value
            elif key == "from":
                ev.from_ = value
            elif key == "id":
                ev.id = value
            elif key == "version":
                ev.version = value
            elif key == S_XML_LANG:
                ev.lang = value
            else:
                if ev.other_attributes is None:
                    ev.other_attributes = {}
                ev.other_attributes[key] = value
        # dialback elements repeat the header's domains: decode them into the same strings
        self.last_to = ev.to
        self.last_from = ev.from_
        ev.start = self.tok_abs - self.base
        ev.end = p
        self.nhdecls = self.ndecls
        self.hdr_qname = B_STREAM_QNAME if eq(name, nlen, b"stream:stream", 13) else \
            PyBytes_FromStringAndSize(<const char*>name, nlen)
        self.header_ev = ev
        self.seen_header = True
        self.events.append(ev)
        if empty:
            end_ev = StreamEnd.__new__(StreamEnd)
            end_ev.start = ev.start
            end_ev.end = p
            self.events.append(end_ev)
            self.state = ST_DONE
        else:
            self.state = ST_TOP
        self.tok_abs = -1
        return 0

    cdef int _decl_end(self, const unsigned char* b, Py_ssize_t p) except -1:
        """The XML declaration ended before b[p]: version, UTF-8 only, no standalone."""
        cdef int i = 0, n = self.nattrs
        cdef Py_ssize_t k
        cdef Attr* a
        cdef const unsigned char* nm
        cdef const unsigned char* v
        cdef Py_ssize_t where = self.tok_abs - self.base
        a = &self.attrs[0]
        if n == 0 or not eq(b + (a.name - self.base), a.nlen, b"version", 7):
            self._nwf("the XML declaration must start with version", where)
        v = b + (a.value - self.base)
        if a.vlen < 3 or v[0] != 49 or v[1] != 46:
            self._nwf("unsupported XML version", where)
        for k in range(2, a.vlen):
            if not (48 <= v[k] <= 57):
                self._nwf("unsupported XML version", where)
        i = 1
        if i < n:
            a = &self.attrs[i]
            if eq(b + (a.name - self.base), a.nlen, b"encoding", 8):
                v = b + (a.value - self.base)
                if a.vlen != 5 or (v[0] | 32) != 117 or (v[1] | 32) != 116 or (v[2] | 32) != 102 \
                        or v[3] != 45 or v[4] != 56:
                    self._fail("unsupported-encoding", "XMPP streams must be UTF-8 (RFC 6120 §11.6)", where)
                i += 1
        if i < n:
            a = &self.attrs[i]
            if eq(b + (a.name - self.base), a.nlen, b"standalone", 10):
                self._fail("restricted-xml", "standalone is not allowed in the XML declaration (RFC 6120 §11.5)", where)
            self._nwf("unexpected attribute in the XML declaration", where)
        self.in_decl = False
        self.tok_abs = -1
        self.state = ST_PROLOG
        return 0

