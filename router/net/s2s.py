"""A server-to-server connection: a ``Session`` (sans-IO negotiation) driven
over an ``XmlStream``.

``S2SStream`` turns the session's events into I/O: STARTTLS, authenticated
pairs for the route table, dialback verification requests, closes. Stanzas the
session authorized go to ``StreamHost.route`` as byte ranges, with the
domains the session computed when it authorized them. Once a stream is authenticated, the
compiled router (``router._fastroute``) reads it: it routes the stanzas the
session authorized and hands everything else back through ``take_events``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from router.trust import tls
from router.negotiation import events as ev
from router.net.acks import StreamAcks
from router.net.proxy_header import ProxyHeaderError, ProxyHeaderParser
from router.net.stream import StreamHost, XmlStream

log = logging.getLogger("router.net.s2s")

# Read buffer used only while a STARTTLS handshake finishes (see S2SStream._received).
EARLY_BUFFER_SIZE = 16384
# Read size while a connection from a load balancer waits for its PROXY header
# (direct TLS reads only what the header still lacks: the ClientHello is TLS's).
PROXY_READ_SIZE = 4096


# TCP keepalive probes after the idle time: this many, this far apart (seconds)
KEEPALIVE_PROBES = 3
KEEPALIVE_PROBE_INTERVAL = 10


def tcp_keepalive(transport: asyncio.BaseTransport, idle: float) -> None:
    """SO_KEEPALIVE, probing after ``idle`` seconds of silence (0: off): the kernel
    ends a connection whose peer vanished (a NAT that forgot it, a host gone) even
    when neither side writes, and the stream's close bounces what waited on it."""
    sock = transport.get_extra_info("socket")
    if sock is None or idle <= 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's own timers apply
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_PROBE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


class S2SStream(XmlStream):
    """A server-to-server connection driven by a sans-IO ``Session``.

    ``outbound`` streams are the ones we opened (initiating role); ``pairs``
    asked of an outbound stream are tracked by the relay, which wakes the
    connection attempt waiting for them.
    """

    kind = "s2s"
    remote = True
    __slots__ = ("outbound", "direct_tls", "authenticated", "admitted", "bidi", "mechanism", "local_domain",
                 "remote_domain", "verify_only", "target", "target_host", "failure", "_tls_starting", "_early",
                 "peer_idle_seconds", "proxy")

    def __init__(self, relay: StreamHost, session: Any, *, outbound: bool, direct_tls: bool = False,
                 local: str | None = None, remote: str | None = None, proxied: bool = False) -> None:
        super().__init__(relay)
        self.session = session
        session.watch = self.session_changed
        self.session_changed()
        self.outbound = outbound
        self.direct_tls = direct_tls
        self.authenticated = False
        self.admitted = False  # inbound: counted by the relay's connection limits
        self.bidi = False
        self.mechanism: str | None = None  # metrics label of the first authentication
        self.local_domain = local  # outbound: the domain we connect for
        self.remote_domain = remote
        self.verify_only = False
        self.target: tuple[str, int] | None = None  # outbound: the address and port we connected to
        self.target_host: str | None = None  # outbound: the host name of that target (SRV target, DANE's TLSA name)
        self.failure: str | None = None  # why the stream ended, for the bounces of pairs waiting on it
        self._tls_starting = False  # between StartTLS and the end of the handshake
        self._early: list[bytes] | None = None  # decrypted bytes that arrived in that window
        self.tokenizer = session.tokenizer  # the session's, for the compiled router
        # behind a load balancer (listen.proxy_protocol): its PROXY header, until it has arrived
        self.proxy = ProxyHeaderParser() if proxied else None
        self.peer_idle_seconds = 0  # XEP-0478: the peer's idle limit for what we send (0: none said)

    @property
    def out_lang(self) -> str | None:
        """The xml:lang our header declared: the peer's own on inbound streams."""
        return self.session.stream_lang if not self.outbound else self.session.config.default_lang

    @property
    def domain_label(self) -> str:
        """The remote domain for log lines: authenticated, else the one the peer's
        header claims (a failing negotiation is where it matters most), else "-"."""
        return self.remote_domain or self.session.remote_domain or "-"

    @property
    def direction(self) -> str:
        return "out" if self.outbound else "in"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.closing:  # refused by a connection limit, or from outside listen.proxy_trusted
            return
        tcp_keepalive(transport, self.relay.config.s2s.tcp_keepalive)
        if self.proxy is not None:  # the load balancer's PROXY header comes first (_proxy_received)
            self.side_buffer = bytearray(self.proxy.wanted if self.direct_tls else PROXY_READ_SIZE)
            return
        self._open()

    def _open(self, via: str | None = None, early: bytes = b"") -> None:
        """Start the session: at once, or after the PROXY header of the load balancer
        ``via``, with ``early``, the bytes that followed the header."""
        direction = "outbound" if self.outbound else "inbound"
        log.info("s2s %s stream opened peer=%s domain=%s%s%s", direction, self.peer, self.domain_label,
                 " tls=direct" if self.direct_tls else "", f" via={via}" if via else "")
        if self.direct_tls and via is not None:  # XEP-0368 behind PROXY: the ClientHello follows the header
            self._handle(ev.StartTLS(None))  # server side: SNI picks the certificate
            return
        if self.direct_tls:
            self._tls_done()
        if early:
            self.session.receive_data(early)
        self.pump()
        if early:
            self.tokenizer.release()  # as after every read: an idle stream keeps no buffer

    def _proxy_received(self, data: bytes) -> None:
        """proxy-protocol.txt §2: "The receiver MUST NOT start processing the connection
        before it receives a complete and valid PROXY protocol header"; then the peer is
        the address the header names (the connection's own for LOCAL and UNKNOWN)."""
        try:
            parsed = self.proxy.feed(data)
        except ProxyHeaderError as exc:  # nothing XMPP was said: TCP's close is the answer
            log.warning("s2s inbound connection closed: invalid PROXY header peer=%s: %s", self.peer, exc)
            self.relay.metrics.negotiations_failed.inc(self.direction, "proxy-header")
            self.close_transport()
            return
        if parsed is None:
            if self.direct_tls:
                self.side_buffer = bytearray(self.proxy.wanted)
            return
        header, early = parsed
        via, self.proxy, self.side_buffer = self.peer, None, None
        if header.source is not None:
            self.peer = f"{header.source[0]}:{header.source[1]}"
        self.relay.admission.opened(self)  # the connection limits count the real address
        if not self.closing:
            self._open(via, early)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_starting and self.failure is None:
            self.failure = f"TLS handshake failed: {exc or 'the connection closed'}"
        super().connection_lost(exc)

    def side_received(self, nbytes: int) -> None:
        """uvloop delivers the first decrypted bytes before start_tls() returns: they
        wait in ``side_buffer`` for the session, which sees them after the handshake.
        Before them, on a proxied listener, the PROXY header arrives here."""
        if self.proxy is not None:
            self._proxy_received(bytes(self.side_buffer[:nbytes]))
            return
        if self._early is None:
            self._early = []
        self._early.append(bytes(self.side_buffer[:nbytes]))

    def take_events(self, events: list, start: int, error: Exception | None) -> None:
        """What the compiled router leaves to the session: ``events[start:]`` and the
        read's parse error, in order, then acted on."""
        self.session.take(events, start, error)
        self.pump()

    # ------------------------------------------------------------------ session -> I/O
    def pump(self) -> None:
        """Write what the session wants sent and act on its events, in order."""
        if self.transport is None:
            return
        view = memoryview(self.tokenizer.buffer)
        batches: dict[XmlStream, list[Any]] = {}
        for event in self.session.events():
            if isinstance(event, ev.Stanza):
                self.stanzas_in += 1  # as the compiled router counts its reads' stanzas (XEP-0198 h)
                self.relay.route(self, event.element, event.from_domain, event.to_domain, view, batches)
                continue
            if batches:
                self.forward(batches)
                batches = {}
            self._flush_session()
            self._handle(event)
        if batches:
            self.forward(batches)
        self._flush_session()

    def _flush_session(self) -> None:
        data = self.session.data_to_send()
        if data:
            self.write(data)

    def _handle(self, event: Any) -> None:
        if isinstance(event, ev.StartTLS):
            self.flush()  # <proceed/> (or <starttls/>) leaves before the handshake starts
            self.transport.pause_reading()  # the ClientHello must reach TLS, not us; start_tls resumes
            self._tls_starting = True
            self.side_buffer = bytearray(EARLY_BUFFER_SIZE)
            self.relay.spawn(self._start_tls(event))
        elif isinstance(event, ev.Authenticated):
            if not self.authenticated:
                self.authenticated = True
                self.relay.admission.authenticated(self)
                self.relay.metrics.negotiation_seconds.labels(self.direction).observe(
                    self.loop.time() - self.opened_at)
                self._obey_peer_limits()
            self.mechanism = self.mechanism or ("sasl-external" if event.mechanism == "EXTERNAL" else "dialback")
            self.remote_domain = self.remote_domain or event.pair.remote
            log.info("s2s %s authenticated remote=%s local=%s mechanism=%s direction=%s peer=%s",
                     "outbound" if self.outbound else "inbound", event.pair.remote, event.pair.local,
                     event.mechanism, event.direction, self.peer)
            self.relay.connector.authenticated(self, event)
        elif isinstance(event, ev.AuthFailed):
            log.warning("s2s authentication failed remote=%s local=%s condition=%s peer=%s",
                     event.pair.remote, event.pair.local, event.condition, self.peer)
            self.relay.connector.auth_failed(self, event)
        elif isinstance(event, ev.BidiEnabled):
            self.bidi = True
            if any(event.limits):  # XEP-0478 §2.2: the initiator's limits came in its request
                self.peer_max_bytes, self.peer_idle_seconds = event.limits
            log.info("s2s bidi enabled peer=%s domain=%s", self.peer, self.domain_label)
            self.relay.connector.routes_changed(self)
        elif isinstance(event, ev.VerifyKey):
            self.relay.verifier.verify_key(self, event)
        elif isinstance(event, ev.VerifyResult):
            self.relay.verifier.verify_result(self, event)
        elif isinstance(event, (ev.SmStarted, ev.SmStopped, ev.AckRequested, ev.Acked)):
            self._stream_management(event)
        elif isinstance(event, ev.CheckDane):
            self.relay.dane.check_inbound(self, event.domain)
        elif isinstance(event, ev.Closed):
            metrics = self.relay.metrics
            if event.cause == "parse":
                metrics.parse_errors.inc(event.condition)
            elif event.cause == "stanza":
                metrics.stanzas_rejected.inc(event.condition)
            if event.condition and not self.authenticated:
                metrics.negotiations_failed.inc(self.direction, event.condition)
            if event.condition:
                self.failure = f"we closed the stream with <{event.condition}/>: {event.text}"
            log.log(logging.WARNING if event.condition else logging.INFO,
                     "s2s stream closed by us peer=%s domain=%s condition=%s cause=%s text=%s",
                     self.peer, self.domain_label, event.condition, event.cause, event.text)
            self.relay.connector.unroute(self)  # its pairs go to another stream at once (RFC 6120 §4.4)
            self._flush_session()
            if event.condition:
                self.close_transport()
            else:
                self.closing = True  # nothing more may follow our </stream:stream>; we still read the peer's
                self.abort_after(self.relay.config.s2s.close_timeout)
        elif isinstance(event, ev.PeerClosed):
            self.failure = "the peer closed the stream" + (f" with <{event.condition}/>" if event.condition else "") \
                + (f": {event.text}" if event.text else "")
            log.log(logging.WARNING if event.condition else logging.INFO,
                     "s2s stream closed by peer peer=%s domain=%s condition=%s text=%s",
                     self.peer, self.domain_label, event.condition, event.text)
            self.relay.connector.unroute(self)  # its pairs go to another stream at once, TLS close or not
            self._flush_session()
            self.close_transport()

    def _stream_management(self, event: Any) -> None:
        """XEP-0198: counting starts or stops; the peer asks what we handled, or says what it did."""
        if isinstance(event, ev.SmStarted):
            if self.acks is None:
                self.acks = StreamAcks(self)
                self.relay.metrics.stream_management.inc("enabled")
            self.acks.start(event.outbound, event.inbound)
        elif isinstance(event, ev.SmStopped):
            self.acks = None
        elif self.acks is None:
            return
        elif isinstance(event, ev.AckRequested):
            self.acks.answer()
        else:
            problem = self.acks.acknowledged(event.h)
            if problem is not None:  # XEP-0198 §4: an h beyond what was sent is the peer's error
                self.fail("undefined-condition", problem)

    def _obey_peer_limits(self) -> None:
        """XEP-0478 §3: on our outbound stream, the limits of the peer's last features hold
        from authentication on (larger stanzas bounce, whitespace keeps it within idle-seconds)."""
        advertised = self.session.advertised
        if not self.outbound or advertised is None or not any(advertised.limits):
            return
        self.peer_max_bytes, self.peer_idle_seconds = advertised.limits
        log.info("s2s peer limits max_bytes=%d idle_seconds=%d peer=%s domain=%s", self.peer_max_bytes,
                 self.peer_idle_seconds, self.peer, self.domain_label)

    async def _start_tls(self, event: Any) -> None:
        server_side = not self.outbound
        try:
            if server_side:
                context = self.relay.tls_server_context(event.domain)
                server_hostname = None
            else:
                context = self.relay.tls_client_context(self.local_domain)
                server_hostname = self.remote_domain
            transport = await asyncio.wait_for(
                self.loop.start_tls(self.transport, self, context, server_side=server_side,
                                    server_hostname=server_hostname),
                self.relay.config.s2s.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            # RFC 6120 §5.4.3.2: a failed handshake ends TCP without </stream>
            reason = str(exc) or type(exc).__name__  # a timeout has no text of its own
            log.warning("s2s TLS handshake failed peer=%s domain=%s: %s", self.peer, self.domain_label, reason)
            self.failure = self.failure or f"TLS handshake failed: {reason}"
            self.relay.metrics.negotiations_failed.inc(self.direction, "tls-handshake")
            if self.transport is not None:
                self.transport.abort()
            return
        if transport is None:
            return
        self.use_transport(transport)
        self._tls_starting = False
        self.side_buffer = None
        self._tls_done()
        early, self._early = self._early or [], None
        for data in early:
            self.session.receive_data(data)
        self.pump()
        self.tokenizer.release()

    def _tls_done(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object")
        chain = tls.peer_chain(ssl_object) if ssl_object is not None else []
        log.info("s2s stream secured peer=%s domain=%s version=%s", self.peer, self.domain_label,
                 ssl_object.version() if ssl_object is not None else "-")
        if self.outbound and self.relay.dane.hold_outbound(self, chain):
            return  # RFC 7673 §4: the session hears of TLS with DANE's verdict on the certificate
        self.session.tls_established(chain)

    # ------------------------------------------------------------------ relay -> stream
    def fail(self, condition: str, text: str) -> None:
        if self.closing:
            return
        if self._unframed():
            log.warning("s2s inbound connection closed before its stream began peer=%s condition=%s text=%s",
                        self.peer, condition, text)
            self.relay.metrics.negotiations_failed.inc(self.direction, condition)
            self.close_transport()
            return
        self._final_ack()
        self.session.close(condition, text, cause="local")
        self.pump()
        self.close_transport()

    def close_gracefully(self, condition: str | None = None, text: str | None = None) -> None:
        """``</stream:stream>`` (after a stream error when ``condition``), then wait
        a bounded time for the peer's close."""
        if self.closing or self.transport is None:
            return
        if self._unframed():
            self.close_transport()
            return
        self._final_ack()
        self.session.close(condition, text, cause="local")
        self.pump()
        self.abort_after(self.relay.config.s2s.close_timeout)

    def _final_ack(self) -> None:
        """XEP-0198 §4: tell the peer what we handled before our close, so it re-sends nothing of it."""
        if self.acks is not None and self.acks.in_base is not None and not self.session.closed:
            self.write(self.acks.handled())

    def _unframed(self) -> bool:
        """Behind a load balancer, nothing XMPP may be written before its PROXY header
        nor, on a direct-TLS listener, before our TLS: a close is TCP's alone then."""
        return self.proxy is not None or (self.direct_tls and self.transport is not None
                                          and self.transport.get_extra_info("ssl_object") is None)
