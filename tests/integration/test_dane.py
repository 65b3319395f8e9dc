"""DANE for S2S (RFC 7673) against a running relay whose ``[tls] nameservers`` is a real UDP
DNS server on loopback (tests/dnsserver.py) that sets the AD bit for the names the test
calls DNSSEC-validated. Outbound: a test-side remote server with a self-signed certificate
no CA vouches for, found through SRV + A, checked against TLSA. Inbound: a test peer whose
self-signed certificate matches its domain's TLSA records gets SASL EXTERNAL."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dnsserver import zone_server
from pki_helpers import load_credential
from router.config import parse_config
from router.negotiation import events as ev
from router.negotiation.dialback import key_matches
from router.negotiation.session import Session, SessionConfig
from router.net import danecheck
from router.trust import tls
from router.trust.policy import Policy
from router.wire.namespaces import STANZAS_NS

from .conftest import arun, running
from .peer import Peer, PeerClosed
from .test_s2s import component, error_condition

READ_SIZE = 65536
MAX_EVENT_ROUNDS = 20  # session events handled per read, at most (a StartTLS leads to one more round)


def spki_sha256(files) -> str:
    """The SPKI SHA-256 association data (``3 1 1 <hex>``) of the certificate in ``files`` (cert, key)."""
    cert = load_credential(*files).cert
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def with_dane(spec, dns_port: int, exempt=(), auth: dict | None = None):
    """``spec``'s config with ``[tls] dane`` asking the test DNS server, and ``[policy.auth]`` overrides."""
    text = spec.toml().replace("[tls]\n", f"[tls]\ndane = true\nnameservers = ['127.0.0.1:{dns_port}']\n"
                                          f"dane_exempt = {json.dumps(list(exempt))}\n", 1)
    if auth:
        text += "[policy.auth]\n" + "".join(f'"{domain}" = "{mode}"\n' for domain, mode in auth.items())
    return parse_config(text, spec.base, source=f"<test relay {spec.name} with DANE>")


@dataclass
class RemoteServer:
    """A remote XMPP server the relay connects to: a receiving ``Session`` that offers STARTTLS
    (or takes direct TLS) with ``cert``, verifies the relay's dialback keys with the relay's
    secret (standing in for the relay's authoritative server) and keeps what it receives."""

    domain: str
    cert: tuple  # (cert path, key path)
    relay_secret: str
    direct_tls: bool = False
    stanzas: asyncio.Queue = field(default_factory=asyncio.Queue)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.context = tls.server_context({self.domain: tuple(map(str, self.cert))}, self.domain).default
        self.config = SessionConfig(local_domains=frozenset({self.domain}), dialback_secret="remote-secret-0123456789",
                                    policy=Policy(require_encryption=True))
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                 ssl=self.context if self.direct_tls else None)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        session = Session("receiver", self.config, direct_tls=self.direct_tls)
        try:
            if self.direct_tls:
                session.tls_established(tls.peer_chain(writer.get_extra_info("ssl_object")))
            while not session.closed:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                session.receive_data(data)
                await self._act(session, writer)
        finally:
            writer.close()

    async def _act(self, session: Session, writer) -> None:
        for _ in range(MAX_EVENT_ROUNDS):
            writer.write(session.data_to_send())
            events = session.events()
            if not events:
                return
            for event in events:
                if isinstance(event, ev.StartTLS):
                    await writer.start_tls(self.context)
                    session.tls_established(tls.peer_chain(writer.get_extra_info("ssl_object")))
                elif isinstance(event, ev.VerifyKey):
                    valid = key_matches(self.relay_secret, event.receiving, event.originating, event.stream_id,
                                        event.key)
                    session.key_verified(event.token, "valid" if valid else "invalid")
                elif isinstance(event, ev.Stanza):
                    element = event.element
                    self.stanzas.put_nowait(bytes(session.tokenizer.buffer[element.start: element.end]))

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def relay(relay_spec):
    return relay_spec("relay", domains=("relay.test",), components={"bot.relay.test": "s"},
                      s2s={"negotiation_timeout": 10.0, "connect_timeout": 5.0})


def remote_zone(port: int, tlsa: str, direct_tls: bool = False) -> dict:
    """dane.test served by xmpp.dane.test:port, with one TLSA record for that target."""
    service = "_xmpps-server" if direct_tls else "_xmpp-server"
    return {
        (f"{service}._tcp.dane.test", "SRV"): [f"0 0 {port} xmpp.dane.test."],
        ("xmpp.dane.test", "A"): ["127.0.0.1"],
        (f"_{port}._tcp.xmpp.dane.test", "TLSA"): [tlsa],
    }


async def send_to_remote(spec, relay_config, zone, remote: RemoteServer, secure, fail=()):
    """Start the DNS server and the relay; a component sends one message to v@dane.test.
    What comes of it: ("delivered", stanza bytes) or ("bounced", (condition, text)), and the relay's metrics."""
    async with zone_server(zone, secure=secure, fail=fail) as dns:
        async with running(relay_config(dns.port)) as relay:
            bot = await component(spec, "bot.relay.test", "s")
            bot.send("<message from='u@bot.relay.test' to='v@dane.test' id='m1'><body>hi</body></message>")
            delivered = asyncio.ensure_future(remote.stanzas.get())
            bounced = asyncio.ensure_future(bot.receive(timeout=15))
            done, pending = await asyncio.wait({delivered, bounced}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await bot.close()
            if delivered in done:
                return "delivered", delivered.result(), relay.metrics
            assert bounced in done, "neither delivered nor bounced"
            stanza = bounced.result()
            text = stanza.findtext(f"{{jabber:component:accept}}error/{{{STANZAS_NS}}}text")
            return "bounced", (error_condition(stanza)[1], text), relay.metrics


def outbound(relay, pki, *, tlsa_for: str = "remote", secure=True, exempt=(), auth="secure", direct_tls=False,
             fail_tlsa=False):
    """One message to dane.test, whose server presents a self-signed certificate; its TLSA
    record is for that certificate (``tlsa_for="remote"``) or for another one; ``fail_tlsa``:
    the TLSA look-up gets SERVFAIL (what a validating resolver answers for a bogus record)."""
    cert = pki.credential("dane.test", trusted=False)
    other = pki.credential("other.dane.test", trusted=False)
    tlsa = "3 1 1 " + spki_sha256(cert if tlsa_for == "remote" else other)

    async def scenario():
        remote = RemoteServer("dane.test", cert, relay.secret, direct_tls=direct_tls)
        port = await remote.start()
        try:
            return await send_to_remote(
                relay, lambda dns_port: with_dane(relay, dns_port, exempt, {"dane.test": auth}),
                remote_zone(port, tlsa, direct_tls), remote, secure,
                fail=[f"_{port}._tcp.xmpp.dane.test"] if fail_tlsa else ())
        finally:
            await remote.stop()

    return arun(scenario())


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_matching_dane_ee_authenticates_a_certificate_no_ca_trusts(relay, pki, direct_tls):
    """policy.auth secure for dane.test: only a trusted certificate may prove it, and no CA
    signed its certificate; its TLSA record (DNSSEC-validated) does."""
    outcome, stanza, metrics = outbound(relay, pki, direct_tls=direct_tls)
    assert outcome == "delivered", stanza
    assert b"id='m1'" in stanza
    assert metrics.dane_checks.get("out", "match") == 1


def test_without_dane_the_same_certificate_does_not_prove_the_domain(relay, pki):
    """The control for the test above: with the answers not validated, DANE says nothing and
    secure authentication fails for want of a trusted certificate."""
    outcome, (condition, text), metrics = outbound(relay, pki, secure=False)
    assert (outcome, condition) == ("bounced", "remote-server-timeout")
    assert "trusted certificate" in text and "DANE" not in text
    assert metrics.dane_checks.get("out", "insecure") == 1


def test_mismatching_tlsa_means_the_server_is_not_used(relay, pki):
    """RFC 7673 §3.4: usable TLSA records and no match: the stream is closed and the stanza
    bounces with a text naming DANE, even where dialback alone would do."""
    outcome, (condition, text), metrics = outbound(relay, pki, tlsa_for="other", auth="dialback")
    assert (outcome, condition) == ("bounced", "remote-server-timeout")
    assert text.startswith("cannot reach dane.test: DANE: the certificate of xmpp.dane.test:"), text
    assert metrics.dane_checks.get("out", "mismatch") == 1
    assert metrics.negotiations_failed.get("out", "policy-violation") >= 1


def test_a_failed_tlsa_lookup_means_the_server_is_not_used(relay, pki):
    """RFC 7673 §3.4: a TLSA look-up that fails for a validated SRV target (bogus or
    indeterminate) forbids the connection, as a mismatch does."""
    outcome, (condition, text), metrics = outbound(relay, pki, auth="dialback", fail_tlsa=True)
    assert (outcome, condition) == ("bounced", "remote-server-timeout")
    assert "DANE: the TLSA look-up of _" in text and "failed" in text, text
    assert metrics.dane_checks.get("out", "failed") == 1


@pytest.mark.parametrize("case", ["insecure", "exempt"])
def test_tlsa_is_ignored_when_not_validated_or_the_domain_is_exempt(relay, pki, case):
    """An answer without the AD bit is no DANE answer (RFC 7673 §3.1), and ``[tls] dane_exempt``
    opts a domain out: the mismatching record changes nothing, dialback authenticates."""
    exempt = ("dane.test",) if case == "exempt" else ()
    outcome, stanza, metrics = outbound(relay, pki, tlsa_for="other", auth="dialback", secure=case == "exempt",
                                        exempt=exempt)
    assert outcome == "delivered", stanza
    assert metrics.dane_checks.get("out", "mismatch") == 0
    assert metrics.dane_checks.get("out", "insecure") == (1 if case == "insecure" else 0)


# ---------------------------------------------------------------------- inbound


@pytest.mark.parametrize("case", ["validated", "not-validated", "over-limit"])
def test_inbound_peer_with_a_dane_matching_certificate_gets_sasl_external(relay_spec, pki, monkeypatch, case):
    """The peer's domain publishes (DNSSEC-validated) SRV and TLSA records naming its
    self-signed certificate: SASL EXTERNAL is offered and succeeds; policy.auth secure leaves
    it no other way. Without validation, or with no room for one more check in flight, the
    relay offers nothing it could use and says so."""
    if case == "over-limit":
        monkeypatch.setattr(danecheck, "MAX_INBOUND_CHECKS", 0)
    secure = case != "not-validated"
    spec = relay_spec("relay", domains=("relay.test",), echo=("echo.relay.test",))
    cert = pki.credential("p.dane.test", trusted=False)
    zone = {
        ("_xmpp-server._tcp.p.dane.test", "SRV"): ["0 0 5269 xmpp.p.dane.test."],
        ("_5269._tcp.xmpp.p.dane.test", "TLSA"): ["3 1 1 " + spki_sha256(cert)],
    }

    async def scenario():
        async with zone_server(zone, secure=secure) as dns:
            async with running(with_dane(spec, dns.port, auth={"p.dane.test": "secure"})) as relay:
                peer = await Peer.connect(spec.s2s_port, "p.dane.test", "echo.relay.test", cert=cert,
                                          ca_path=pki.ca_path)
                try:
                    await peer.authenticated()
                    outcome = "authenticated"
                except PeerClosed as closed:
                    outcome = (closed.condition, closed.text)
                await peer.close()
                return outcome, relay.metrics

    outcome, metrics = arun(scenario())
    if case == "validated":
        assert outcome == "authenticated"
        assert metrics.negotiations_completed.get("in", "sasl-external") == 1
        assert metrics.dane_checks.get("in", "match") == 1
        return
    assert outcome[0] == "policy-violation" and "no authentication method acceptable" in outcome[1]
    if case == "not-validated":
        assert metrics.dane_checks.get("in", "insecure") == 1
    else:
        assert metrics.dane_checks.get("in", "limit") == 1 and metrics.limits_hit.get("dane_lookups") == 1
