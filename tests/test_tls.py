"""router.trust.tls: real handshakes on 127.0.0.1 under uvloop (RFC 6120 §5.4.3.1: certificates both ways,
chosen by the 'to' domain; §13.7.2: validation; XEP-0368 ALPN/SNI)."""

import asyncio
import ssl

import pytest
import uvloop
from cryptography import x509

from router.trust import certs, pki, tls

HANDSHAKE_TIMEOUT = 10


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    """A CA, two local domains' certificates and a few kinds of peer certificates on disk."""
    directory = tmp_path_factory.mktemp("pki")
    root = pki.make_ca("Test Root")
    inter = pki.make_ca("Test Inter", issuer=root)
    return {
        "root": root,
        "inter": inter,
        "montague": pki.make_leaf(root, "montague.lit").write(directory, "montague"),
        "conference": pki.make_leaf(root, "conference.montague.lit").write(directory, "conference"),
        "self_signed": pki.make_leaf(None, "capulet.lit").write(directory, "self_signed"),
        "server_auth_only": pki.make_leaf(root, "capulet.lit", client_auth=False).write(directory, "sa_only"),
        "via_inter": pki.make_leaf(inter, "capulet.lit").write(directory, "via_inter", chain=(inter,)),
    }


@pytest.fixture(scope="module")
def server_tls(pki_dir):
    return tls.server_context(
        {"montague.lit": pki_dir["montague"], "Conference.Montague.LIT": pki_dir["conference"]}, "montague.lit"
    )


def _names(der: bytes) -> tuple[str, ...]:
    return certs.identities(x509.load_der_x509_certificate(der)).dns_ids


async def _direct_tls(server_ctx, client_ctx, server_hostname):
    """Connect with TLS from the first byte; return (server view, client view) of the session."""
    server_view = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        ssl_object = writer.get_extra_info("ssl_object")
        server_view.set_result((tls.peer_chain(ssl_object), ssl_object.selected_alpn_protocol()))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname),
            HANDSHAKE_TIMEOUT,
        )
        ssl_object = writer.get_extra_info("ssl_object")
        client_view = (tls.peer_chain(ssl_object), ssl_object.selected_alpn_protocol())
        result = await asyncio.wait_for(server_view, HANDSHAKE_TIMEOUT)
        writer.close()
        return result, client_view
    finally:
        server.close()
        await server.wait_closed()


async def _starttls(server_tls_obj, header_to, client_ctx):
    """Plain TCP first, then both sides upgrade the established connection like STARTTLS
    (the server picks its context from the stream header `to`; the client sends no SNI)."""
    server_view = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        assert await reader.readexactly(10) == b"<starttls>"
        writer.write(b"<proceed/>")
        await writer.drain()
        await writer.start_tls(server_tls_obj.context_for(header_to))
        server_view.set_result(tls.peer_chain(writer.get_extra_info("ssl_object")))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"<starttls>")
        assert await asyncio.wait_for(reader.readexactly(10), HANDSHAKE_TIMEOUT) == b"<proceed/>"
        await asyncio.wait_for(writer.start_tls(client_ctx), HANDSHAKE_TIMEOUT)
        client_chain = tls.peer_chain(writer.get_extra_info("ssl_object"))
        result = await asyncio.wait_for(server_view, HANDSHAKE_TIMEOUT)
        writer.close()
        return result, client_chain
    finally:
        server.close()
        await server.wait_closed()


def test_untrusted_self_signed_client_certificate_reaches_the_server(pki_dir, server_tls):
    client = tls.client_context(*pki_dir["self_signed"])
    (server_chain, _), (client_chain, _) = uvloop.run(_direct_tls(server_tls.default, client, "montague.lit"))
    assert [_names(d) for d in server_chain] == [("capulet.lit",)]
    status = certs.peer_status(server_chain, certs.TrustStore((pki_dir["root"].cert,)), "capulet.lit")
    assert (status.trusted, status.matches) == (False, True)
    assert _names(client_chain[0]) == ("montague.lit",)


def test_server_auth_only_client_certificate_reaches_the_server(pki_dir, server_tls):
    client = tls.client_context(*pki_dir["server_auth_only"])
    (server_chain, _), _ = uvloop.run(_direct_tls(server_tls.default, client, "montague.lit"))
    assert len(server_chain) == 1
    status = certs.peer_status(server_chain, certs.TrustStore((pki_dir["root"].cert,)), "capulet.lit")
    assert status.authenticated, status.reason


def test_plain_cert_optional_would_reject_these_certificates(pki_dir):
    """Why tls.py overrides the OpenSSL verify callback: stock CERT_OPTIONAL fails the handshake."""
    stock = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stock.load_cert_chain(*pki_dir["montague"])
    stock.load_verify_locations(cadata=pki_dir["root"].cert_pem().decode())
    stock.verify_mode = ssl.CERT_OPTIONAL
    handled = []

    async def attempt():
        async def handle(reader, writer):
            handled.append(True)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=stock)
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=tls.client_context(*pki_dir["self_signed"]), server_hostname="montague.lit"),
                HANDSHAKE_TIMEOUT)
            try:  # TLS 1.3: the client learns of the rejection on its first read
                await asyncio.wait_for(reader.read(), HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, ConnectionError):
                pass
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(attempt())
    assert handled == []


def test_intermediate_chain_is_available_to_the_server(pki_dir, server_tls):
    client = tls.client_context(*pki_dir["via_inter"])
    (server_chain, _), _ = uvloop.run(_direct_tls(server_tls.default, client, "montague.lit"))
    assert len(server_chain) == 2
    status = certs.peer_status(server_chain, certs.TrustStore((pki_dir["root"].cert,)), "capulet.lit")
    assert status.authenticated, status.reason


def test_client_without_certificate_connects(server_tls):
    (server_chain, _), (client_chain, _) = uvloop.run(
        _direct_tls(server_tls.default, tls.client_context(), "montague.lit")
    )
    assert server_chain == []
    assert _names(client_chain[0]) == ("montague.lit",)


@pytest.mark.parametrize("sni, expected", [
    ("conference.montague.lit", ("conference.montague.lit",)),
    ("CONFERENCE.montague.lit", ("conference.montague.lit",)),
    ("montague.lit", ("montague.lit",)),
    ("unknown.lit", ("montague.lit",)),
])
def test_sni_selects_server_certificate(pki_dir, server_tls, sni, expected):
    client = tls.client_context(*pki_dir["self_signed"])
    (server_chain, _), (client_chain, _) = uvloop.run(_direct_tls(server_tls.default, client, sni))
    assert _names(client_chain[0]) == expected
    assert _names(server_chain[0]) == ("capulet.lit",)  # the switched context still accepts any cert


def test_alpn_xmpp_server_negotiated_for_direct_tls(pki_dir, server_tls):
    client = tls.client_context(*pki_dir["self_signed"], direct_tls=True)
    (_, server_alpn), (_, client_alpn) = uvloop.run(_direct_tls(server_tls.default, client, "montague.lit"))
    assert server_alpn == client_alpn == "xmpp-server"


def test_no_alpn_for_starttls_client(pki_dir, server_tls):
    client = tls.client_context(*pki_dir["self_signed"])
    (_, server_alpn), _ = uvloop.run(_direct_tls(server_tls.default, client, "montague.lit"))
    assert server_alpn is None


@pytest.mark.parametrize("header_to, expected", [
    ("conference.montague.lit", ("conference.montague.lit",)),
    ("montague.lit", ("montague.lit",)),
    (None, ("montague.lit",)),
])
def test_starttls_picks_certificate_by_stream_header_to(pki_dir, server_tls, header_to, expected):
    client = tls.client_context(*pki_dir["self_signed"])
    server_chain, client_chain = uvloop.run(_starttls(server_tls, header_to, client))
    assert _names(client_chain[0]) == expected
    assert _names(server_chain[0]) == ("capulet.lit",)


def test_default_domain_needs_a_certificate(pki_dir):
    with pytest.raises(ValueError, match="default domain"):
        tls.server_context({"montague.lit": pki_dir["montague"]}, "capulet.lit")


def test_context_for_invalid_domain_falls_back_to_default(server_tls):
    assert server_tls.context_for("not a domain") is server_tls.default
    assert server_tls.context_for("Conference.Montague.Lit.") is server_tls.by_domain["conference.montague.lit"]
