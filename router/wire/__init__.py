"""The wire: XML namespaces, lxml helpers, stream and stanza errors, JIDs, the bytes a forwarded stanza needs."""
