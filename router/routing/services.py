"""Built-in services on the relay's own domains: ping, disco#info, echo, sink.

Stanzas addressed to a service domain reach the control plane (they are rare,
except for echo/sink in benchmarks), are parsed with lxml and answered here.
``Services.handle`` takes the parsed stanza and returns the reply bytes, or
None when nothing must be sent. It never answers an error stanza nor an IQ
result/error (RFC 6120 §8.2.3, §8.3.1-§8.3.2).

The relay's server domains host no user accounts, so a ``localpart@domain``
address there names an account that does not exist (RFC 6120 §10.5.3.1, RFC 6121
§8.5.1): IQs and messages to it are bounced with <service-unavailable/>,
presence to it is ignored. The echo and sink domains answer (or swallow)
whatever is addressed to them, localpart or not.

Reply bytes are serialized in the ``jabber:server`` content namespace context:
the stanza element carries no ``xmlns`` (the S2S stream header declares the
default namespace), children in ``jabber:server`` carry none either. A request
that came in another content namespace (``jabber:component:accept``) has its
content elements moved to ``jabber:server`` first; the writer of the
destination stream rewrites the namespace if that stream differs.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Iterable

from lxml import etree

from router.wire.jid import domain_of

if TYPE_CHECKING:
    from router.config import Config
    from router.metrics import RelayMetrics

from router.wire.namespaces import DISCO_INFO_NS, PING_NS, SERVER_NS, STANZAS_NS

# XEP-0030 identities: the relay's own domains present themselves as an IM
# server (the category/type Prosody and ejabberd use); the test services as
# generic components (XEP-0030 registry).
SERVER_IDENTITY = ("server", "im", "XMPP federation relay")
ECHO_IDENTITY = ("component", "generic", "echo service")
SINK_IDENTITY = ("component", "generic", "sink service")
FEATURES = (DISCO_INFO_NS, PING_NS)

_JS = "{%s}" % SERVER_NS
_ROOT_XMLNS = f' xmlns="{SERVER_NS}"'.encode()


class Services:
    """The relay's built-in services, keyed by domain (all normalized)."""

    def __init__(
        self,
        server_domains: Iterable[str] = (),
        echo_domains: Iterable[str] = (),
        sink_domains: Iterable[str] = (),
        metrics: RelayMetrics | None = None,
    ):
        self.server_domains = frozenset(server_domains)
        self.echo_domains = frozenset(echo_domains)
        self.sink_domains = frozenset(sink_domains)
        self.domains = self.server_domains | self.echo_domains | self.sink_domains
        self.metrics = metrics
        self.sink_received = 0  # stanzas swallowed by the sink (tests and benchmarks read it)

    @classmethod
    def from_config(cls, config: Config, metrics: RelayMetrics | None = None) -> Services:
        return cls(config.server.domains, config.services.echo, config.services.sink, metrics)

    def _identity(self, domain: str) -> tuple[str, str, str]:
        if domain in self.echo_domains:
            return ECHO_IDENTITY
        if domain in self.sink_domains:
            return SINK_IDENTITY
        return SERVER_IDENTITY

    def _count(self, service: str) -> None:
        if self.metrics is not None:
            self.metrics.service_stanzas.inc(service)

    def handle(self, stanza: etree._Element) -> bytes | None:
        """Reply bytes for a stanza addressed to one of ``self.domains``, or None.

        None means: nothing to send (sink, presence, error stanzas, IQ
        results). The caller has already authorized the stanza, so it has
        ``to`` and ``from``; without ``from`` there is nobody to answer.
        """
        kind = etree.QName(stanza).localname
        stanza_type = stanza.get("type")
        to = stanza.get("to")
        if not stanza.get("from") or not to:
            return None
        domain = domain_of(to)
        if domain in self.sink_domains:
            self.sink_received += 1
            self._count("sink")
            if kind != "iq":
                return None
        if stanza_type == "error":
            return None  # never answer an error (RFC 6120 §8.3.1)
        no_such_user = domain in self.server_domains and _has_localpart(to)
        if kind == "iq":
            return self._iq(stanza, domain, stanza_type, no_such_user)
        if kind == "message":
            if domain in self.echo_domains:
                self._count("echo")
                return _serialize(_echo(stanza))
            if no_such_user:
                # RFC 6121 §8.5.1: "either (a) silently ignore the message or (b) return a
                # <service-unavailable/> stanza error"; (b), as the relay drops nothing silently.
                self._count("error")
                return error_reply(stanza, "cancel", "service-unavailable", f"{domain} has no user accounts")
            if stanza_type in ("groupchat", "headline"):
                self._count("ignored")
                return None  # RFC 6121 §8.5.2: no error for headline/groupchat to nobody
            self._count("error")
            return error_reply(stanza, "cancel", "service-unavailable", f"{domain} does not accept messages")
        # Presence to a service: nothing subscribes here (RFC 6121 §4.3 ignore); to a user
        # that does not exist, RFC 6121 §8.5.1: "the server MUST silently ignore the
        # stanza" (a probe may be ignored too).
        self._count("ignored")
        return None

    def _iq(self, stanza: etree._Element, domain: str, stanza_type: str | None, no_such_user: bool) -> bytes | None:
        if stanza_type not in ("get", "set"):
            if stanza_type == "result":
                return None  # IQ result MUST NOT be answered (§8.2.3)
            self._count("error")
            return error_reply(stanza, "modify", "bad-request", "IQ type must be get, set, result or error")
        if no_such_user:
            # RFC 6120 §10.5.3.1, RFC 6121 §8.5.1: "For an IQ stanza, the server MUST
            # return a <service-unavailable/> stanza error to the sender."
            self._count("error")
            return error_reply(stanza, "cancel", "service-unavailable", f"{domain} has no user accounts")
        payload = [child for child in stanza if isinstance(child.tag, str)]
        if len(payload) != 1:
            self._count("error")
            return error_reply(stanza, "modify", "bad-request", "IQ get/set must carry exactly one payload element")
        child = etree.QName(payload[0])
        if stanza_type == "get" and (child.namespace, child.localname) == (PING_NS, "ping"):
            self._count("ping")
            return _serialize(_reply(stanza, "result"))
        if stanza_type == "get" and (child.namespace, child.localname) == (DISCO_INFO_NS, "query"):
            if payload[0].get("node"):
                self._count("error")
                return error_reply(stanza, "cancel", "item-not-found", "no disco#info node here")
            self._count("disco")
            return _serialize(self._disco_info(stanza, domain))
        self._count("error")
        return error_reply(
            stanza, "cancel", "service-unavailable", f"{child.namespace} {stanza_type} is not supported by {domain}"
        )

    def _disco_info(self, stanza: etree._Element, domain: str) -> etree._Element:
        reply = _reply(stanza, "result")
        query = etree.SubElement(reply, f"{{{DISCO_INFO_NS}}}query", nsmap={None: DISCO_INFO_NS})
        category, type_, name = self._identity(domain)
        etree.SubElement(query, f"{{{DISCO_INFO_NS}}}identity", category=category, type=type_, name=name)
        for feature in FEATURES:
            etree.SubElement(query, f"{{{DISCO_INFO_NS}}}feature", var=feature)
        return reply


def _has_localpart(jid: str) -> bool:
    """Whether ``jid`` names an account (``local@domain[/resource]``) rather than the
    domain itself (``domain[/resource]``, answered by the server: RFC 6120 §10.5.1-2).
    The resource is cut off first: it may itself contain '@' (RFC 7622 §3.2)."""
    return "@" in jid.partition("/")[0]


def _reply(stanza: etree._Element, stanza_type: str) -> etree._Element:
    """A new stanza of the same kind with ``from``/``to`` swapped and ``id`` kept."""
    reply = etree.Element(_JS + etree.QName(stanza).localname, nsmap={None: SERVER_NS})
    reply.set("from", stanza.get("to"))
    reply.set("to", stanza.get("from"))
    if stanza.get("id") is not None:
        reply.set("id", stanza.get("id"))
    reply.set("type", stanza_type)
    return reply


def _echo(stanza: etree._Element) -> etree._Element:
    """The message back to its sender: same type, id and children."""
    reply = _reply(stanza, stanza.get("type") or "normal")
    if stanza.get("type") is None:
        del reply.attrib["type"]
    source_ns = etree.QName(stanza).namespace
    for attribute, value in stanza.attrib.items():
        if attribute not in ("from", "to", "id", "type"):
            reply.set(attribute, value)
    for child in stanza:
        reply.append(copy.deepcopy(child))
    if source_ns != SERVER_NS:
        for element in reply.iter():
            if isinstance(element.tag, str) and etree.QName(element).namespace == source_ns:
                element.tag = _JS + etree.QName(element).localname
    etree.cleanup_namespaces(reply, top_nsmap={None: SERVER_NS})  # drops the stream's declarations
    return reply


def error_reply(stanza: etree._Element, error_type: str, condition: str, text: str | None = None) -> bytes:
    """RFC 6120 §8.3 error for ``stanza``: same kind, swapped addresses, id mirrored,
    without the original payload."""
    reply = _reply(stanza, "error")
    error = etree.SubElement(reply, _JS + "error", type=error_type)
    etree.SubElement(error, f"{{{STANZAS_NS}}}{condition}", nsmap={None: STANZAS_NS})
    if text:
        text_element = etree.SubElement(error, f"{{{STANZAS_NS}}}text", nsmap={None: STANZAS_NS})
        text_element.text = text
    return _serialize(reply)


def _serialize(reply: etree._Element) -> bytes:
    """Bytes without the root's ``xmlns="jabber:server"`` (the stream declares it).

    The root is built in that namespace, so the first declaration in the output
    is the root's own.
    """
    return etree.tostring(reply).replace(_ROOT_XMLNS, b"", 1)
