"""DANE for S2S streams at run time (RFC 7673): the TLSA look-ups, and the verdicts handed to sessions.

With ``[tls] dane`` on and the remote domain not in ``[tls] dane_exempt``:

* outbound: right after the TLS handshake of a stream we opened, the session is held
  (its ``tls_established`` waits, so it sends nothing and decides nothing) while the
  target we connected to is looked up: when its SRV and address records were
  DNSSEC-validated (``Target.secure``) and its validated TLSA records hold usable ones,
  the chain must match one (`router.trust.dane.check`), else the stream is closed and
  the pairs waiting on it bounce (RFC 7673 §3.4: the target "MUST NOT" be used; so too
  when the TLSA look-up fails). A match proves the certificate for the remote domain, as
  a trusted CA would (``Session.peer_certificate_ok``: secure authentication, XEP-0344).
  No SRV, an insecure answer or no TLSA record leaves the stream as it would be without DANE.
* inbound: a receiving session whose peer's certificate our trust store does not accept
  asks (`CheckDane`) before it writes its features; the peer's domain's validated SRV
  targets and their TLSA records decide whether SASL EXTERNAL is offered. Peers trigger
  these look-ups before they authenticate, so at most ``MAX_INBOUND_CHECKS`` run at once.

Every check ends within the negotiation timeout (the resolver bounds each query too).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple

from router.net.resolver import ResolutionError, Target, tlsa_name
from router.net.stream import StreamHost
from router.trust import dane

log = logging.getLogger("router.net.danecheck")

# Inbound checks in flight at once; past it a peer gets its features without DANE (no
# SASL EXTERNAL unless a trusted CA vouches for it) and limits_hit{limit="dane_lookups"} counts it.
MAX_INBOUND_CHECKS = 256


class Outcome(NamedTuple):
    """What one check found: ``matched`` for `Session.dane_verdict`, ``result`` for the metric, ``text`` why."""

    matched: bool | None
    result: str
    text: str


class DaneChecker:
    """The relay's DANE checks (one per relay; ``host.dane``)."""

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self.inbound_checks = 0

    def applies(self, domain: str | None) -> bool:
        tls = self.host.config.tls
        return bool(tls.dane and domain) and not dane.exempt(domain, tls.dane_exempt)

    # ------------------------------------------------------------------ outbound
    def hold_outbound(self, stream: Any, chain: list[bytes]) -> bool:
        """After the TLS handshake of our stream: hold its session for a DANE verdict.
        False when DANE does not apply: the caller goes on at once."""
        if not self.applies(stream.remote_domain):
            return False
        self.host.spawn(self._outbound(stream, chain))
        return True

    async def _outbound(self, stream: Any, chain: list[bytes]) -> None:
        timeout = self.host.config.s2s.negotiation_timeout
        try:
            outcome = await asyncio.wait_for(self._outbound_outcome(stream, chain), timeout)
        except asyncio.TimeoutError:
            outcome = Outcome(False, "failed", f"DANE: the DNS look-ups did not complete within {timeout:g} seconds "
                                               f"(RFC 7673 §3.4: the target must not be used)")
        self._record("out", stream, outcome)
        if stream.closed or stream.closing:
            return
        session = stream.session
        session.tls_established(chain)
        if outcome.matched is not None:
            session.dane_verdict(stream.remote_domain, outcome.matched, outcome.text)
        stream.pump()

    async def _outbound_outcome(self, stream: Any, chain: list[bytes]) -> Outcome:
        remote = stream.remote_domain
        try:
            targets = await self.host.resolver.resolve(remote)
        except ResolutionError as exc:
            return Outcome(False, "failed", f"DANE: cannot tell which SRV target this is: {exc}")
        target = connected_target(targets, stream)
        if target is None:
            return Outcome(None, "insecure", f"the connection is to none of the SRV targets {remote} has now")
        if not target.secure:
            return Outcome(None, "insecure", f"{target.host}:{target.port} is a static route, the A/AAAA fallback, "
                                             f"or its SRV or address records were not DNSSEC-validated")
        answer = await self.host.resolver.tlsa(target.host, target.port)
        name = tlsa_name(target.host, target.port).rstrip(".")
        if answer.records is None:
            return Outcome(False, "failed", f"DANE: the TLSA look-up of {name} failed "
                                            f"(RFC 7673 §3.4: the target must not be used)")
        if not answer.secure or not answer.records:
            return Outcome(None, "no-tlsa", f"no DNSSEC-validated TLSA record at {name}")
        verdict = dane.check(chain, answer.records, (remote, target.host))
        if verdict.matched is None:
            return Outcome(None, "no-tlsa", f"{name}: {verdict.reason}")
        if verdict.matched:
            return Outcome(True, "match", f"{name}: {verdict.reason}")
        return Outcome(False, "mismatch", f"DANE: the certificate of {target.host}:{target.port} does not match "
                                          f"{name} ({verdict.reason})")

    # ------------------------------------------------------------------ inbound
    def check_inbound(self, stream: Any, domain: str) -> None:
        """A receiving session's `CheckDane`: answer with ``dane_verdict``, now or once looked up."""
        if self.inbound_checks >= MAX_INBOUND_CHECKS:
            self.host.metrics.limits_hit.inc("dane_lookups")
            self._record("in", stream, Outcome(None, "limit", f"{MAX_INBOUND_CHECKS} DANE checks already in flight "
                                                              f"(dane_lookups): the certificate is judged without DANE"))
            stream.session.dane_verdict(domain, None)
            stream.pump()
            return
        self.inbound_checks += 1
        self.host.spawn(self._inbound(stream, domain))

    async def _inbound(self, stream: Any, domain: str) -> None:
        timeout = self.host.config.s2s.negotiation_timeout
        try:
            outcome = await asyncio.wait_for(self._inbound_outcome(domain, stream.session.peer_chain), timeout)
        except asyncio.TimeoutError:
            outcome = Outcome(None, "failed", f"the DNS look-ups did not complete within {timeout:g} seconds")
        finally:
            self.inbound_checks -= 1
        self._record("in", stream, outcome)
        if not stream.closed and not stream.closing:
            stream.session.dane_verdict(domain, outcome.matched, outcome.text)
            stream.pump()

    async def _inbound_outcome(self, domain: str, chain) -> Outcome:
        """Does the peer's chain match the TLSA records of one of `domain`'s validated SRV targets?"""
        resolver = self.host.resolver
        records = list({(r.host, r.port): r for r in await resolver.secure_srv_records(domain)}.values())
        if not records:
            return Outcome(None, "insecure", f"{domain} has no DNSSEC-validated SRV record")
        answers = await asyncio.gather(*(resolver.tlsa(r.host, r.port) for r in records))
        mismatches, failed = [], False
        for record, answer in zip(records, answers):
            name = tlsa_name(record.host, record.port).rstrip(".")
            failed = failed or answer.records is None
            if not answer.secure or not answer.records:
                continue
            verdict = dane.check(list(chain), answer.records, (domain, record.host))
            if verdict.matched:
                return Outcome(True, "match", f"{name}: {verdict.reason}")
            if verdict.matched is False:
                mismatches.append(f"{name}: {verdict.reason}")
        if mismatches:
            return Outcome(False, "mismatch", "; ".join(mismatches))
        if failed:
            return Outcome(None, "failed", f"a TLSA look-up for the SRV targets of {domain} failed")
        return Outcome(None, "no-tlsa", f"no validated usable TLSA record for the SRV targets of {domain}")

    # ------------------------------------------------------------------
    def _record(self, direction: str, stream: Any, outcome: Outcome) -> None:
        self.host.metrics.dane_checks.inc(direction, outcome.result)
        level = logging.WARNING if outcome.matched is False or outcome.result in ("failed", "limit") else logging.INFO
        log.log(level, "dane check direction=%s peer=%s domain=%s result=%s: %s", direction, stream.peer,
                stream.domain_label, outcome.result, outcome.text)


def connected_target(targets: list[Target], stream: Any) -> Target | None:
    """The target of ``targets`` that ``stream`` connected to: by the SRV host name the
    connector noted, else (a direct TLS stream is secured before the connector notes
    anything) by the address and port of the connection."""
    peer = stream.target or (stream.transport.get_extra_info("peername") or ())[:2]
    if len(peer) != 2:
        return None
    address, port = peer
    for target in targets:
        if target.port == port and (target.host == stream.target_host if stream.target_host
                                    else address in target.addresses):
            return target
    return None
