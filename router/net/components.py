"""XEP-0114 component connections.

A component opens a stream in ``jabber:component:accept`` to the domain it
serves, proves the shared secret with ``<handshake>`` = hex SHA-1 of the
stream id followed by the secret, and then exchanges stanzas. One component
per domain; a component may only send from its own domain; stanzas are
forwarded as byte ranges like on S2S streams (the inherited default namespace
re-scopes them between ``jabber:server`` and ``jabber:component:accept``); once
the handshake is done the compiled router (``router._fastroute``) reads the
stream and hands what is not a stanza it may route to ``take_events``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any

from router._fastparse import Element, ParseError, StreamEnd, StreamHeader, Tokenizer
from router.wire.handshake import handshake_digest
from router.wire.namespaces import COMPONENT_NS, STREAM_NS
from router.wire.errors import STANZA_KINDS, stream_error
from router.wire.jid import domain_of
from router.net.stream import StreamHost, XmlStream
from router.wire.xml import attr

log = logging.getLogger("router.net.components")


class ComponentStream(XmlStream):
    """The relay's side of one XEP-0114 connection."""

    kind = "component"
    shared = True  # it talks to every remote domain: never paused for one of them
    content_ns = COMPONENT_NS
    out_lang = "en"  # declared on our header, so stanzas from 'en' S2S streams need no xml:lang copy
    __slots__ = ("domain", "stream_id", "authenticated", "header_sent")

    def __init__(self, relay: StreamHost) -> None:
        super().__init__(relay)
        limits = relay.config.policy
        self.tokenizer = Tokenizer(max_stanza_bytes=limits.pre_auth_max_stanza_bytes)
        self.domain: str | None = None
        self.stream_id = secrets.token_hex(16)
        self.authenticated = False
        self.header_sent = False

    @property
    def domain_label(self) -> str:
        return self.domain or "-"

    # ------------------------------------------------------------------ input
    def take_events(self, events: list[Any], start: int, error: ParseError | None) -> None:
        """What the compiled router leaves to this stream: ``events[start:]``, then the
        read's parse error."""
        self._handle_events(events[start:] if start else events)
        if error is not None:
            self.relay.metrics.parse_errors.inc(error.condition)
            self.fail(error.condition, error.text)

    def _handle_events(self, events: list[Any]) -> None:
        view = memoryview(self.tokenizer.buffer)
        batches: dict[XmlStream, list[Any]] = {}
        for event in events:
            if self.closing:
                break
            if isinstance(event, Element):
                if self.authenticated and event.name in STANZA_KINDS and event.ns == COMPONENT_NS:
                    self._stanza(event, view, batches)
                else:
                    self.forward(batches)
                    batches = {}
                    self._control(event)
            elif isinstance(event, StreamHeader):
                self._header(event)
            elif isinstance(event, StreamEnd):
                self.forward(batches)
                batches = {}
                log.info("component stream closed by peer domain=%s peer=%s", self.domain or "-", self.peer)
                self.write(b"</stream:stream>")
                self.close_transport()
        if batches:
            self.forward(batches)

    def _header(self, header: StreamHeader) -> None:
        # RFC 6120 §4.9.1.2: even when refusing, send our header first
        self._send_header(header.to)
        if header.namespaces.get(None) != COMPONENT_NS:
            self.fail("invalid-namespace", f"a component stream's default namespace must be {COMPONENT_NS}")
            return
        try:
            domain = domain_of(header.to or "")
        except ValueError:
            self.fail("host-unknown", "the stream header has no valid 'to' domain")
            return
        if self.relay.component_secret(domain) is None:
            self.fail("host-unknown", f"{domain} is not a component domain of this relay")
            return
        self.domain = domain

    def _control(self, element: Element) -> None:
        if self.authenticated:
            if element.name in STANZA_KINDS:
                self._reject("invalid-namespace", f"stanzas on a component stream must be in {COMPONENT_NS}")
            else:
                self._reject("unsupported-stanza-type", f"<{element.name}/> is not a stanza")
            return
        if element.name != "handshake" or element.ns != COMPONENT_NS or self.domain is None:
            self.fail("not-authorized", "the component must complete the handshake first")
            return
        proof = self.tokenizer.buffer[element.start : element.end]
        digest = _text_of(bytes(proof)).strip().lower()
        secret = self.relay.component_secret(self.domain)
        if not hmac.compare_digest(digest.encode(), handshake_digest(self.stream_id, secret).encode()):
            log.warning("component handshake failed domain=%s peer=%s", self.domain, self.peer)
            self.fail("not-authorized", "wrong handshake digest")
            return
        if not self.relay.component_online(self):
            self.fail("conflict", f"another component is already connected for {self.domain}")
            return
        self.authenticated = True
        # the pre-authentication limit no longer applies once the secret is proven
        self.tokenizer.max_stanza_bytes = self.relay.config.policy.max_stanza_bytes
        self.write(b"<handshake/>")
        log.info("component authenticated domain=%s mechanism=handshake peer=%s", self.domain, self.peer)

    def _stanza(self, element: Element, view: memoryview, batches: dict[XmlStream, list[Any]]) -> None:
        if not element.from_ or not element.to:
            self._reject("improper-addressing", f"<{element.name}/> needs both 'from' and 'to'")
            return
        try:
            from_domain = domain_of(element.from_)
            to_domain = domain_of(element.to)
        except ValueError as exc:
            self._reject("improper-addressing", str(exc))
            return
        if from_domain != self.domain:
            self._reject("invalid-from", f"a component for {self.domain} may not send from {from_domain}")
            return
        self.relay.route(self, element, from_domain, to_domain, view, batches)

    def _reject(self, condition: str, text: str) -> None:
        """A stanza this component may not send: the stream error ends the stream."""
        self.relay.metrics.stanzas_rejected.inc(condition)
        self.fail(condition, text)

    # ------------------------------------------------------------------ output
    def fail(self, condition: str, text: str) -> None:
        if self.closing:
            return
        log.warning("component stream error domain=%s peer=%s condition=%s text=%s",
                 self.domain or "-", self.peer, condition, text)
        if not self.header_sent:
            self._send_header(None)
        self.write(stream_error(condition, text) + b"</stream:stream>")
        self.close_transport()

    def _send_header(self, from_: str | None) -> None:
        """Our stream header: ``from`` is the domain the component asked for, once known."""
        from_attr = f" from={attr(from_)}" if from_ is not None else ""
        self.write(f"<?xml version='1.0'?><stream:stream xmlns:stream='{STREAM_NS}' xmlns='{COMPONENT_NS}' "
                   f"id='{self.stream_id}'{from_attr} xml:lang='{self.out_lang}'>".encode())
        self.header_sent = True

    def close_gracefully(self, condition: str | None = None, text: str | None = None) -> None:
        if self.closing or self.transport is None or self._close_timer is not None:  # closed, or closing already
            return
        if condition:
            self.write(stream_error(condition, text))
        self.write(b"</stream:stream>")
        self.abort_after(self.relay.config.s2s.close_timeout)


def _text_of(element_bytes: bytes) -> str:
    """Character data of a simple element like ``<handshake>hex</handshake>``."""
    start = element_bytes.find(b">") + 1
    end = element_bytes.rfind(b"<")
    if start <= 0 or end < start or element_bytes[start - 2 : start] == b"/>":
        return ""
    return element_bytes[start:end].decode("utf-8", "replace")
