"""The XML namespaces of the protocols the relay speaks, each defined once.

(The tokenizer, ``router/_fastparse.pyx``, keeps its own compiled copies of
the stream and ``xml:`` namespaces, which it compares at C level.)
"""

# RFC 6120 §4.8: streams, their content namespaces and the error namespaces
STREAM_NS = "http://etherx.jabber.org/streams"
SERVER_NS = "jabber:server"
CLIENT_NS = "jabber:client"
STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XML_NS = "http://www.w3.org/XML/1998/namespace"
# RFC 6120 §5 and §6: STARTTLS and SASL
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
# XEP-0220 Server Dialback: its elements and its stream feature
DIALBACK_NS = "jabber:server:dialback"
DIALBACK_FEATURE_NS = "urn:xmpp:features:dialback"
# XEP-0288 bidirectional server-to-server connections: its element and its stream feature
BIDI_NS = "urn:xmpp:bidi"
BIDI_FEATURE_NS = "urn:xmpp:features:bidi"
# XEP-0478 stream limits advertisement (a child of <stream:features/>)
STREAM_LIMITS_NS = "urn:xmpp:stream-limits:0"
# XEP-0198 stream management (acks; the feature and its elements share it)
SM_NS = "urn:xmpp:sm:3"
# XEP-0114 external components
COMPONENT_NS = "jabber:component:accept"
# built-in services: XEP-0199 ping, XEP-0030 disco#info
PING_NS = "urn:xmpp:ping"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
