"""The tokenizer must be the compiled Cython extension, not a Python stand-in."""

import importlib.machinery
import sysconfig

import router._fastparse as fastparse


def test_module_is_an_extension_module():
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert fastparse.__file__.endswith(suffix), fastparse.__file__
    assert isinstance(fastparse.__loader__, importlib.machinery.ExtensionFileLoader)


def test_tokenizer_and_events_are_cdef_types():
    # A cdef class has no per-instance __dict__ and rejects unknown attributes.
    for cls in (fastparse.Tokenizer, fastparse.StreamHeader, fastparse.Element, fastparse.StreamEnd):
        assert "__dict__" not in cls.__dict__, f"{cls.__name__} is a Python-level class"
    tokenizer = fastparse.Tokenizer()
    assert not hasattr(tokenizer, "__dict__")
    try:
        tokenizer.some_new_attribute = 1
    except AttributeError:
        pass
    else:
        raise AssertionError("Tokenizer accepts arbitrary attributes: not a cdef class")


def test_contract_names_and_constants():
    assert fastparse.STREAM_NS == "http://etherx.jabber.org/streams"
    assert fastparse.XML_NS == "http://www.w3.org/XML/1998/namespace"
    assert fastparse.DEFAULT_MAX_STANZA_BYTES == 512 * 1024
    for name in (
        "DEFAULT_MAX_DEPTH",
        "DEFAULT_MAX_ATTRIBUTES",
        "DEFAULT_MAX_NAME_LENGTH",
        "DEFAULT_MAX_ATTRIBUTE_VALUE_LENGTH",
    ):
        assert isinstance(getattr(fastparse, name), int) and getattr(fastparse, name) > 0, name
    assert issubclass(fastparse.ParseError, Exception)


def test_default_limits_are_applied_and_overridable():
    tokenizer = fastparse.Tokenizer()
    assert tokenizer.max_stanza_bytes == fastparse.DEFAULT_MAX_STANZA_BYTES
    custom = fastparse.Tokenizer(max_stanza_bytes=20000, max_depth=7, max_attributes=9)
    assert custom.max_stanza_bytes == 20000
    custom.max_stanza_bytes = 1 << 20
    assert custom.max_stanza_bytes == 1 << 20
