"""What ``ctl`` shows of a stream: a JSON-ready description built from the stream's
own attributes when asked, so the data path pays nothing for it.

Counters per stream are the ones streams already keep: bytes out is what was
handed to the transport (``XmlStream.handed``), bytes in what the tokenizer
accepted since the stream's last restart (after STARTTLS and SASL, so the
negotiation's first bytes are not in it). Stanzas are counted per relay only
(``totals``): a count per stream would cost the compiled read path.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509

from router.net.components import ComponentStream
from router.net.s2s import S2SStream
from router.net.stream import XmlStream

# Peer certificates already parsed, by their DER bytes: a listing every second
# (``ctl top``) must not parse thousands of certificates each time.
_CERTIFICATES: dict[bytes, dict[str, Any] | None] = {}
CERTIFICATE_CACHE_MAX = 1024


def domains(stream: XmlStream) -> tuple[list[str], list[str]]:
    """The stream's local and remote domains: its pairs', else the ones its
    negotiation names so far."""
    if isinstance(stream, ComponentStream):
        return ([stream.domain] if stream.domain else []), []
    session = stream.session
    pairs = (*session.inbound_pairs, *session.outbound_pairs)
    local = {pair.local for pair in pairs} | {d for d in (stream.local_domain, session.local_domain) if d}
    remote = {pair.remote for pair in pairs} | {d for d in (stream.remote_domain, session.remote_domain) if d}
    return sorted(local), sorted(remote)


def bytes_in(stream: XmlStream) -> int:
    return stream.tokenizer.offset


def counters(stream: XmlStream) -> dict[str, Any]:
    """The little ``ctl top`` needs of a stream, twice a refresh."""
    local, remote = domains(stream)
    return {"id": stream.ctl_id, "kind": stream.kind, "direction": direction(stream),
            "domain": ", ".join(remote or local) or "-", "bytes_in": bytes_in(stream),
            "bytes_out": stream.handed, "stanzas_in": stream.stanzas_in, "stanzas_out": stream.stanzas_out,
            "queue": stream.backlog()}


def direction(stream: XmlStream) -> str:
    return stream.direction if isinstance(stream, S2SStream) else "in"  # components connect to us


def describe(stream: XmlStream, now: float) -> dict[str, Any]:
    """Everything ``ctl streams`` and ``ctl show`` print of one stream."""
    local, remote = domains(stream)
    described = {
        "id": stream.ctl_id,
        "kind": stream.kind,
        "direction": direction(stream),
        "peer": stream.peer,
        "local_domains": local,
        "remote_domains": remote,
        "authenticated": stream.authenticated,
        "closing": stream.closing,
        "age": round(now - stream.opened_at, 3),
        "idle": round(now - stream.last_rx, 3),  # since anything was received (s2s.idle_timeout counts it)
        "bytes_in": bytes_in(stream),
        "bytes_out": stream.handed,
        "stanzas_in": stream.stanzas_in,
        "stanzas_out": stream.stanzas_out,
        "queue": stream.backlog(),
        "paused": stream.paused,
    }
    if isinstance(stream, S2SStream):
        session = stream.session
        described.update(
            mechanism=stream.mechanism,
            bidi=stream.bidi,
            direct_tls=stream.direct_tls,
            inbound_pairs=[list(pair) for pair in session.inbound_pairs],  # [local, remote]: the peer sends
            outbound_pairs=[list(pair) for pair in session.outbound_pairs],  # we send
            tls=tls_of(stream),
            peer_certificate=certificate(session.peer_chain[0]) if session.peer_chain else None,
        )
    else:
        described.update(mechanism="handshake" if stream.authenticated else None, bidi=False, tls=None)
    return described


def tls_of(stream: XmlStream) -> dict[str, Any] | None:
    """Protocol version and cipher of the stream's TLS session; None in the clear."""
    ssl_object = stream.transport.get_extra_info("ssl_object") if stream.transport is not None else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return {"version": ssl_object.version(), "cipher": cipher[0] if cipher else None,
            "bits": cipher[2] if cipher else None}


def certificate(der: bytes) -> dict[str, Any] | None:
    """Subject, issuer and expiry of the peer's leaf certificate (None if it does not parse)."""
    if der in _CERTIFICATES:
        return _CERTIFICATES[der]
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        described = None
    else:
        expires = cert.not_valid_after_utc
        described = {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                     "not_after": expires.isoformat()}
    if len(_CERTIFICATES) >= CERTIFICATE_CACHE_MAX:
        _CERTIFICATES.clear()
    _CERTIFICATES[der] = described
    return described
