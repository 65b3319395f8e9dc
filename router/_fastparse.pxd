# Declarations of the tokenizer: the structs, event classes and Tokenizer fields and cdef
# methods that _fastparse.pyx implements (Cython reads this file when compiling the .pyx:
# the .pxd declares, the .pyx implements). The compiled router, router/_fastroute.pyx,
# cimports it to read event fields and the receive buffer without going through Python.

cimport cython

cdef struct NsDecl:
    Py_ssize_t poff  # prefix bytes in the arena; plen == 0 is the default namespace
    Py_ssize_t plen
    Py_ssize_t uoff  # namespace URI bytes (decoded) in the arena
    Py_ssize_t ulen

cdef struct Attr:
    Py_ssize_t name  # absolute stream offset of the name
    Py_ssize_t value  # absolute stream offset of the raw value (inside the quotes)
    Py_ssize_t vlen
    int nlen
    int colon  # index of ':' in the name, -1 if none
    int flags  # A_DECODE, A_DECL
    const char* uri  # resolved namespace of a prefixed attribute (while its tag is processed)
    Py_ssize_t ulen

cdef struct Open:
    Py_ssize_t name  # absolute stream offset of the element's qualified name
    int nlen
    Py_ssize_t ndecls  # namespace declarations in scope before this element
    Py_ssize_t arena


cdef class StreamHeader:
    cdef readonly object prefix
    cdef readonly dict namespaces
    cdef readonly dict other_attributes  # those not in a field below; None when there are none
    cdef readonly object to
    cdef readonly object from_
    cdef readonly object id
    cdef readonly object version
    cdef readonly object lang
    cdef readonly Py_ssize_t start
    cdef readonly Py_ssize_t end


cdef class Element:
    cdef readonly str name
    cdef readonly str ns
    cdef readonly object prefix
    cdef readonly object to
    cdef readonly object from_
    cdef readonly object type
    cdef readonly object id
    cdef readonly object lang
    cdef readonly Py_ssize_t start
    cdef readonly Py_ssize_t end
    cdef readonly bint header_prefix
    cdef readonly bint own_xmlns


cdef class StreamEnd:
    cdef readonly Py_ssize_t start
    cdef readonly Py_ssize_t end


@cython.final  # direct (inlinable) calls to its cdef methods instead of the vtable
cdef class Tokenizer:
    cdef public Py_ssize_t max_stanza_bytes
    cdef readonly int max_depth
    cdef readonly int max_attributes
    cdef readonly int max_name_length
    cdef readonly Py_ssize_t max_attribute_value_length

    # receive buffer: bytes [0, fill) are valid, [pos, fill) not yet accepted
    cdef bytearray buf
    cdef Py_ssize_t fill
    cdef Py_ssize_t pos
    cdef Py_ssize_t base  # absolute stream offset of buf[0]

    # scanner state
    cdef int state
    cdef bint at_start  # nothing but a BOM seen yet: an XML declaration may follow
    cdef bint in_decl  # the start tag being scanned is the XML declaration
    cdef bint seen_header
    cdef Py_ssize_t tok_abs  # absolute start of the top-level construct in progress, -1 if none
    cdef Py_ssize_t name_abs  # absolute start of the current tag's name
    cdef int name_len
    cdef int name_colon
    cdef int nattrs
    cdef bint had_ws  # whitespace seen since the last attribute (one is required before the next)
    cdef unsigned char quote
    cdef int depth  # open elements below the stream element
    cdef object error
    cdef list events

    # C-level bookkeeping
    cdef Attr* attrs
    cdef int attrs_cap
    cdef Open* stack
    cdef int stack_cap
    cdef NsDecl* decls
    cdef Py_ssize_t ndecls
    cdef Py_ssize_t decls_cap
    cdef Py_ssize_t nhdecls  # the first nhdecls declarations are the stream header's
    cdef char* arena
    cdef Py_ssize_t arena_len
    cdef Py_ssize_t arena_cap
    cdef unsigned char* scratch
    cdef Py_ssize_t scratch_cap
    cdef Py_ssize_t found  # index of the declaration the last lookup matched, -1 if implicit

    # the stream header and the top-level element in progress
    cdef StreamHeader header_ev
    cdef bytes hdr_qname
    cdef tuple hdr_uris  # the header's namespace URIs, by declaration index
    cdef Element t_elem  # the top-level element in progress, filled from its start tag
    cdef object last_to  # the last to/from decoded, reused while the next stanzas repeat it
    cdef object last_from
    cdef bint t_hdr_prefix
    cdef bint t_restart  # the element ends the XML document (TLS proceed/starttls, SASL success)
    cdef bint paused  # scanning stopped after such an element, until restart() or the next call

    # the per-read calls, direct from the compiled router (cpdef on a final class)
    cpdef object get_buffer(self, Py_ssize_t sizehint=*)
    cpdef list buffer_updated(self, Py_ssize_t nbytes)
    cpdef release(self)

    cdef void _reset_stream(self)
    cdef int _fail(self, str condition, str what, Py_ssize_t idx) except -1
    cdef int _nwf(self, str what, Py_ssize_t idx) except -1
    cdef int _bad_char(self, int code, Py_ssize_t idx) except -1
    cdef int _prepare(self, Py_ssize_t need) except -1
    cdef int _grow_attrs(self) except -1
    cdef int _grow_stack(self, int depth) except -1
    cdef int _push(self, int d, int nlen, Py_ssize_t ndecls0, Py_ssize_t arena0) except -1
    cdef list _run(self)
    cdef int _scan(self) except -1
    cdef Py_ssize_t _angle(self, const unsigned char* b, Py_ssize_t p, Py_ssize_t end, int st) except -2
    cdef Py_ssize_t _ref(self, const unsigned char* b, Py_ssize_t p, Py_ssize_t end) except -2
    cdef int _bad_name(self, int status, Py_ssize_t idx) except -1
    cdef int _etag_name(self, const unsigned char* b, Py_ssize_t start, Py_ssize_t p) except -1
    cdef int _stag_end(self, const unsigned char* b, Py_ssize_t p, bint empty) except -1
    cdef int _declare(self, const unsigned char* b, Attr* a, Py_ssize_t p) except -1
    cdef bint _lookup(self, const unsigned char* pre, Py_ssize_t plen, const char** uri, Py_ssize_t* ulen) noexcept
    cdef int _top_start(self, const unsigned char* b, const unsigned char* name, int colon, int nlen,
                        const char* uri, Py_ssize_t ulen, bint own_default) except -1
    cdef int _header(self, const unsigned char* b, Py_ssize_t p, bint empty,
                     const unsigned char* name, int colon, int nlen, const char* uri, Py_ssize_t ulen) except -1
    cdef int _decl_end(self, const unsigned char* b, Py_ssize_t p) except -1
    cdef int _etag_end(self, Py_ssize_t p) except -1
    cdef int _emit_element(self, Py_ssize_t p) except -1
    cdef object _value(self, const unsigned char* b, Attr* a)
    cdef object _value_as(self, const unsigned char* b, Attr* a, object prev)
