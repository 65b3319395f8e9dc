"""TLS contexts for S2S streams (STARTTLS and XEP-0368 direct TLS).

Both directions accept any peer certificate at the handshake: an untrusted, self-signed or
serverAuth-only certificate still gives an encrypted stream on which dialback works
(RFC 7590 §3.4).  Trust and identity are decided afterwards by `router.trust.certs` on the
chain returned by `peer_chain`.

The server side must *request* a client certificate without letting OpenSSL reject it.
Python's ssl module has no switch for that (CERT_OPTIONAL fails the handshake on an
untrusted chain or a serverAuth-only EKU), so `_accept_any_client_certificate` installs an
OpenSSL verify callback that always returns 1, through ctypes on the context's `SSL_CTX*`.
"""

from __future__ import annotations

import ctypes
import ssl
from dataclasses import dataclass

import _ssl

from router.wire.jid import normalize_domain

ALPN_XMPP_SERVER = "xmpp-server"  # XEP-0368 §3
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
SSL_VERIFY_PEER = 0x01

_VERIFY_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


@_VERIFY_CALLBACK_TYPE
def _accept_any(preverify_ok: int, x509_store_ctx: int) -> int:
    """OpenSSL verify callback: the chain is judged later by router.trust.certs."""
    return 1


def _libssl() -> ctypes.CDLL:
    """libssl as linked into Python's _ssl module (dlsym searches its dependencies, so the
    symbols are those of the very OpenSSL the ssl module uses)."""
    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK_TYPE]
    lib.SSL_CTX_set_verify.restype = None
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_callback.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_callback.restype = ctypes.c_void_p
    return lib


_LIBSSL = _libssl()


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The `SSL_CTX*` stored right after PyObject_HEAD in CPython's PySSLContext."""
    return ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value


def _accept_any_client_certificate(context: ssl.SSLContext) -> None:
    """Request a peer certificate (SSL_VERIFY_PEER) but never fail the handshake over it."""
    context.verify_mode = ssl.CERT_OPTIONAL
    pointer = _ssl_ctx_pointer(context)
    # Guard against a different object layout: the pointer must see the mode just set.
    if not pointer or _LIBSSL.SSL_CTX_get_verify_mode(pointer) != SSL_VERIFY_PEER:
        raise RuntimeError("cannot locate SSL_CTX in ssl.SSLContext; unsupported Python build")
    _LIBSSL.SSL_CTX_set_verify(pointer, SSL_VERIFY_PEER, _accept_any)
    if _LIBSSL.SSL_CTX_get_verify_callback(pointer) != ctypes.cast(_accept_any, ctypes.c_void_p).value:
        raise RuntimeError("OpenSSL verify callback was not installed")


def _base_server_context(cert_path, key_path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(cert_path, key_path)
    context.set_alpn_protocols([ALPN_XMPP_SERVER])
    _accept_any_client_certificate(context)
    return context


@dataclass(frozen=True)
class ServerContexts:
    """One server SSLContext per local domain.

    Direct TLS listeners use `default`; the certificate is switched by SNI.  STARTTLS has
    no SNI from some peers (Prosody), so the runtime picks `context_for(header_to)` before
    `loop.start_tls`; SNI, when sent, still wins.
    """

    by_domain: dict[str, ssl.SSLContext]
    default_domain: str

    @property
    def default(self) -> ssl.SSLContext:
        return self.by_domain[self.default_domain]

    def context_for(self, domain: str | None) -> ssl.SSLContext:
        """The context holding `domain`'s certificate, or the default domain's."""
        if domain:
            try:
                return self.by_domain.get(normalize_domain(domain), self.default)
            except ValueError:
                pass
        return self.default

    def _on_sni(self, ssl_object, server_name: str | None, initial: ssl.SSLContext) -> None:
        if server_name:
            chosen = self.context_for(server_name)
            if chosen is not initial:
                ssl_object.context = chosen
        return None


def server_context(credentials_by_domain: dict[str, tuple[str, str]], default_domain: str) -> ServerContexts:
    """Build the per-domain server contexts from `{domain: (cert_path, key_path)}`."""
    by_domain = {normalize_domain(d): _base_server_context(*paths) for d, paths in credentials_by_domain.items()}
    default_domain = normalize_domain(default_domain)
    if default_domain not in by_domain:
        raise ValueError(f"no certificate configured for the default domain {default_domain}")
    contexts = ServerContexts(by_domain, default_domain)
    for context in by_domain.values():
        context.sni_callback = contexts._on_sni
    return contexts


def client_context(cert_path=None, key_path=None, *, direct_tls: bool = False) -> ssl.SSLContext:
    """Outbound context: presents our certificate, verifies nothing in OpenSSL (certs.py
    judges the server's chain against the `to` domain).  Pass `server_hostname=<to domain>`
    to start_tls/open_connection so SNI names the domain (XEP-0368 §3)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert_path is not None:
        context.load_cert_chain(cert_path, key_path)
    if direct_tls:
        context.set_alpn_protocols([ALPN_XMPP_SERVER])
    return context


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The DER certificates the peer presented, leaf first; [] if it presented none.

    Uses CPython's private `get_unverified_chain` (public from 3.13) when present, which
    also works when OpenSSL did not verify; else the leaf alone.
    """
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    get_chain = getattr(inner, "get_unverified_chain", None)
    if get_chain is not None:
        # 3.11 inserts the server-side peer leaf even when there is none: drop None entries
        chain = [cert for cert in get_chain() if cert is not None]
        if chain:
            return [cert.public_bytes(_ssl.ENCODING_DER) for cert in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []
