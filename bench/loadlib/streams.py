"""The simulated remote servers' S2S connections (sans policy, lean on purpose).

`OutboundStream` is one simulated server's stream to the target: header,
optional STARTTLS, then SASL EXTERNAL or dialback (with a bidi request when the
target offers bidi), then stanzas. `InboundStream` is the other side: the
connections the target opens to the simulated servers' authoritative server
(`db:verify`) and, for targets without bidi, to deliver the echoes.

Both read through the project's `Tokenizer` straight into its buffer and act
on raw byte ranges. The echoes and bounces of a read are accounted by the
compiled `Intake.take` (`_fastload`, the base of `LoadContext`), which hands
every other event to the stream's `handle`; negotiation elements are recognised by name and namespace
and features by the namespaces they contain. With XEP-0198 on (`sm`), both
count the stanzas they receive and answer the target's ack requests, and the
outbound streams ask for acks of what they send.
"""

from __future__ import annotations

import asyncio
import os
import time

from router._fastparse import Element, ParseError, StreamEnd, StreamHeader, Tokenizer

from . import sm, wire

TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"


def bare_domain(jid: str | None) -> str | None:
    if not jid:
        return None
    domain = jid.split("@", 1)[-1]
    return domain.split("/", 1)[0]


class _Stream(asyncio.BufferedProtocol):
    """What both directions share: tokenizer plumbing, stanza intake, XEP-0198 counters, teardown."""

    outbound = False

    def __init__(self, ctx):
        self.ctx = ctx
        self.tokenizer = Tokenizer()
        self.transport: asyncio.Transport | None = None
        self.stream_id: str | None = None
        self.closed = False
        self.paused = False
        self.acks: sm.StreamAcks | None = None  # XEP-0198 counters, once enabled

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.tokenizer.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self.ctx.read_us = self.ctx.now_us()  # every echo of one read arrived then
        try:
            events = self.tokenizer.buffer_updated(nbytes)
        except ParseError as exc:
            self.ctx.take(self, exc.events)
            self.fail(f"the peer sent bad XML ({exc.condition}): {exc.text}")
            return
        self.ctx.take(self, events)

    def feed(self, data: bytes):
        self.ctx.read_us = self.ctx.now_us()
        self.ctx.take(self, self.tokenizer.feed(data))

    def handle(self, event):
        """Any event but an echo or a bounce (`Intake.take` accounts for those)."""
        if isinstance(event, Element):
            self.element(event, self.tokenizer.buffer)
        elif isinstance(event, StreamHeader):
            self.header(event)
        elif isinstance(event, StreamEnd):
            self.close(reply=True)

    def other(self, element: Element, raw: bytes):
        """A top-level element this side does not expect: a stream error or noise (XEP-0198 counts its stanzas)."""
        if self.acks is not None and element.name in sm.STANZA_NAMES and element.ns == wire.SERVER_NS:
            self.acks.received += 1
        if element.name == "error" and element.ns == wire.STREAM_NS:
            self.ctx.tracker.stream_errors += 1
            self.ctx.tracker.note("stream", raw.decode("utf-8", "replace"))
            self.close(reply=True)
        else:
            self.ctx.tracker.unknown += 1
            self.ctx.tracker.note("unknown", raw.decode("utf-8", "replace"))

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.ctx.resumed(self)

    def close(self, reply: bool = False):
        if self.closed:
            return
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            if self.acks is not None and self.acks.base is not None:
                # XEP-0198 §4: an <a/> right before closing, so the target re-sends nothing we handled
                self.transport.write(sm.ack(self.acks.handled()))
            self.transport.write(wire.STREAM_END)
            self.transport.close()

    def fail(self, reason: str):
        self.ctx.failure(reason)
        self.close()

    def connection_lost(self, exc):
        self.closed = True


class OutboundStream(_Stream):
    """One simulated server (`index`) talking to the target."""

    outbound = True

    def __init__(self, ctx, index: int):
        super().__init__(ctx)
        self.index = index
        self.domain = wire.load_domain(index)
        self.template = wire.stanza_template(index, ctx.target_domain, ctx.size_cycle)
        self.seq = 0
        self.phase = "header"
        self.tls_done = False
        self.sasl_done = False
        self.bidi = False
        self.sm_offered = False
        self.ready = False
        self.started = time.perf_counter()
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # failures are counted, not raised

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(wire.initial_header(self.domain, self.ctx.target_domain))

    def header(self, event: StreamHeader):
        self.stream_id = event.id
        if not event.id:
            self.fail(f"{self.ctx.target_domain} sent a stream header without an id")

    def element(self, element: Element, buf: bytearray):
        name, ns = element.name, element.ns
        raw = bytes(buf[element.start:element.end])
        if self.ready:
            if ns == sm.SM_NS:
                sm.handle(self, element, raw)
            else:
                self.other(element, raw)
        elif name == "features" and ns == wire.STREAM_NS:
            self.features(raw)
        elif name == "proceed" and ns == TLS_NS and self.phase == "starttls":
            if self.tokenizer.restart(element.end):
                self.fail("bytes after <proceed/> before the TLS handshake")
                return
            self.phase = "tls"
            asyncio.ensure_future(self.upgrade())
        elif name == "success" and ns == SASL_NS and self.phase == "sasl":
            self.sasl_done = True
            tail = self.tokenizer.restart(element.end)
            self.phase = "header"
            self.transport.write(wire.initial_header(self.domain, self.ctx.target_domain))
            if tail:
                self.feed(tail)
        elif name == "result" and ns == wire.DIALBACK_NS and self.phase == "dialback":
            if element.type == "valid":
                self.established()
            else:
                self.fail(f"dialback {element.type} for {self.domain}: {raw.decode('utf-8', 'replace')}")
        elif name == "failure" or (name == "error" and ns == wire.STREAM_NS):
            self.fail(f"{self.domain} refused in phase {self.phase}: {raw.decode('utf-8', 'replace')}")
        else:
            self.other(element, raw)

    def features(self, raw: bytes):
        ctx = self.ctx
        offered = lambda ns: ns.encode() in raw
        self.sm_offered = ctx.cfg.sm and offered(sm.SM_NS)  # the last features before authentication count
        if ctx.tls and not self.tls_done:
            if not offered(TLS_NS):
                self.fail(f"TLS asked for but {ctx.target_domain} does not offer STARTTLS")
                return
            self.phase = "starttls"
            self.transport.write(wire.STARTTLS)
            return
        if self.sasl_done:
            self.established()
            return
        bidi = wire.BIDI if ctx.bidi and offered("urn:xmpp:features:bidi") else b""
        self.bidi = bool(bidi)
        if ctx.mechanism == "external":
            if b">EXTERNAL<" not in raw:
                self.fail(f"{ctx.target_domain} does not offer SASL EXTERNAL to {self.domain}: {raw.decode()}")
                return
            self.phase = "sasl"
            self.transport.write(bidi + wire.sasl_external(self.domain))
        else:
            key = wire.dialback_key(ctx.secret, ctx.target_domain, self.domain, self.stream_id)
            self.phase = "dialback"
            self.transport.write(bidi + wire.db_result(self.domain, ctx.target_domain, key))

    async def upgrade(self):
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, self.ctx.client_ssl,
                server_hostname=self.ctx.target_domain, ssl_handshake_timeout=30,
            )
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            self.fail(f"TLS handshake of {self.domain} failed: {exc!r}")
            return
        except Exception as exc:  # ssl.SSLError and friends: report, never hang
            self.fail(f"TLS handshake of {self.domain} failed: {exc!r}")
            return
        if self.closed:
            return
        self.transport = transport
        self.tls_done = True
        self.phase = "header"
        transport.write(wire.initial_header(self.domain, self.ctx.target_domain))

    def established(self):
        self.phase = "ready"
        self.ready = True
        self.tokenizer.max_stanza_bytes = max(self.tokenizer.max_stanza_bytes, 1 << 20)
        if self.sm_offered and self.acks is None:  # XEP-0198 §3: we count what we send from <enable/> on
            self.acks = sm.StreamAcks(counting_in=False)
            self.ctx.acks.offered += 1
            self.transport.write(sm.ENABLE)
        if not self.done.done():
            self.done.set_result(time.perf_counter() - self.started)

    def send(self, count: int, now_us: int):
        """Write `count` stanzas in one write (with an XEP-0198 ack request when one is due)."""
        data = self.template.render_run(self.seq, count, now_us)
        acks = self.acks
        if acks is not None:
            acks.sent += count
            if acks.sent - acks.requested >= self.ctx.cfg.sm_ack_every and acks.base is not None:
                acks.requested = acks.sent
                data += sm.REQUEST
                self.ctx.acks.requests_sent += 1
        self.transport.write(data)
        self.seq += count
        self.ctx.tracker.sent(self.index, count)

    def label(self) -> str:
        return self.domain

    def fail(self, reason: str):
        if not self.done.done():
            self.done.set_exception(ConnectionError(reason))
        super().fail(reason)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"{self.domain}: connection lost in phase {self.phase} ({exc!r})"))
        elif self.ready and not self.ctx.stopping:
            self.ctx.failure(f"connection lost while running: {self.domain} ({exc!r})")
            self.ctx.died(self)


class InboundStream(_Stream):
    """A connection the target opened to one of the simulated servers."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.local: str | None = None
        self.remote: str | None = None
        self.tls_done = False
        self.sasl_done = False

    def connection_made(self, transport):
        super().connection_made(transport)
        self.ctx.inbound.add(self)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.ctx.inbound.discard(self)

    def header(self, event: StreamHeader):
        self.local, self.remote = event.to, event.from_
        self.stream_id = os.urandom(8).hex()
        features = wire.listener_features(self.ctx.server_ssl is not None, self.tls_done, self.sasl_done)
        self.transport.write(
            wire.response_header(self.local or self.ctx.any_load_domain, self.remote, self.stream_id)
            + (sm.with_offer(features) if self.ctx.cfg.sm else features)
        )
        if self.local is not None and wire.domain_index(self.local) is None:
            self.transport.write(
                b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>the load generator serves only *.load.test</text>"
                b"</stream:error>"
            )
            self.close()

    def element(self, element: Element, buf: bytearray):
        raw = bytes(buf[element.start:element.end])
        name, ns = element.name, element.ns
        if ns == sm.SM_NS:
            sm.handle(self, element, raw)
        elif ns == wire.DIALBACK_NS and name == "verify" and element.type is None:
            receiving, originating = element.from_, element.to
            key = raw[raw.index(b">") + 1:raw.rindex(b"<")].decode()
            good = key == wire.dialback_key(self.ctx.secret, receiving, originating, element.id)
            self.ctx.verifies += 1
            self.transport.write(wire.db_verify_answer(originating, receiving, element.id, "valid" if good else "invalid"))
        elif ns == wire.DIALBACK_NS and name == "result" and element.type is None:
            # The target dialing back to deliver echoes: the generator trusts the target it measures.
            self.transport.write(wire.db_result_type(element.to, element.from_, "valid"))
        elif name == "starttls" and ns == TLS_NS and self.ctx.server_ssl is not None and not self.tls_done:
            if self.tokenizer.restart(element.end):
                self.fail("bytes after <starttls/> before the TLS handshake")
                return
            self.transport.write(wire.PROCEED)
            asyncio.ensure_future(self.upgrade())
        elif name == "auth" and ns == SASL_NS and self.tls_done:
            self.sasl_done = True
            tail = self.tokenizer.restart(element.end)
            self.transport.write(wire.SASL_SUCCESS)
            if tail:
                self.feed(tail)
        elif name == "bidi":
            pass  # not offered; a peer that pipelines it anyway gets a plain stream
        else:
            self.other(element, raw)

    def label(self) -> str:
        return f"the target's stream to {self.local}"

    async def upgrade(self):
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.ctx.server_ssl, server_side=True,
                                                  ssl_handshake_timeout=30)
            self.tls_done = True
        except Exception as exc:  # a failed handshake ends this connection only; report it
            self.fail(f"TLS handshake from the target failed: {exc!r}")
