"""``check-dns``: the records the relay would use for a remote domain and whether
each target answers, against a real UDP DNS server and real listeners on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import uvloop

from router.net.dnscheck import report
from dnsserver import run_with_dns, zone_server
from tests.interop.harness import free_port

ROOT = Path(__file__).resolve().parents[1]


async def xmpp_listener():
    """A server that answers a stream header with its own, as an XMPP server does."""

    async def answer(reader, writer):
        await reader.readuntil(b">")
        writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                     b"xmlns:stream='http://etherx.jabber.org/streams' id='x' version='1.0'>")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


def test_srv_targets_are_listed_in_order_and_each_address_probed():
    closed = free_port()

    async def scenario(make, server):
        listener = await xmpp_listener()
        good = listener.sockets[0].getsockname()[1]
        server.zone.update({
            ("_xmpp-server._tcp.peer.example.", "SRV"): [f"10 0 {good} good.peer.example.",
                                                        f"20 0 {closed} bad.peer.example."],
            ("good.peer.example.", "A"): ["127.0.0.1"],
            ("bad.peer.example.", "A"): ["127.0.0.1"],
        })
        lines = []
        try:
            answered = await report("peer.example", make(), lines.append, timeout=2)
        finally:
            listener.close()
        return answered, lines, good

    answered, lines, good = run_with_dns({}, scenario)
    assert answered
    assert "_xmpps-server._tcp.peer.example: no record" in lines
    assert f"_xmpp-server._tcp.peer.example: priority 10 weight 0 port {good} target good.peer.example" in lines
    assert lines.index(f"target 1: good.peer.example:{good} (STARTTLS), addresses 127.0.0.1") \
        < lines.index(f"target 2: bad.peer.example:{closed} (STARTTLS), addresses 127.0.0.1")
    assert "  127.0.0.1: ok: answers with an XMPP stream header" in lines
    assert any(line.startswith("  127.0.0.1: FAILED: no connection") for line in lines)


def test_a_domain_without_records_is_reported_unreachable():
    async def scenario(make, server):
        lines = []
        return await report("nothing.example", make(), lines.append, timeout=1), lines

    answered, lines = run_with_dns({}, scenario)
    assert not answered
    assert lines[-1].startswith("not reachable: nothing.example has no SRV record and no A/AAAA address")


def test_the_command_uses_the_configs_static_route_and_says_whether_it_answers(tmp_path):
    async def scenario():
        listener = await xmpp_listener()
        port = listener.sockets[0].getsockname()[1]
        config = tmp_path / "relay.toml"
        config.write_text(f'[server]\ndomains = ["relay.test"]\ndialback_secret = "{"s" * 32}"\n'
                          f'[routes]\n"peer.example" = "127.0.0.1:{port}"\n')
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "check-dns", "peer.example", "--config", str(config), "--timeout", "2",
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        listener.close()
        return process.returncode, out.decode(), port

    status, out, port = uvloop.run(scenario())
    assert status == 0, out
    assert f"static route: 127.0.0.1:{port}" in out and "ok: answers with an XMPP stream header" in out


def test_the_command_asks_the_configured_validating_resolver_and_shows_what_it_validated(tmp_path):
    """``[tls] nameservers`` is the resolver check-dns asks, as the relay does; with ``dane`` a target
    whose SRV and address records came with the AD bit is shown as DNSSEC-validated."""

    async def scenario():
        listener = await xmpp_listener()
        port = listener.sockets[0].getsockname()[1]
        zone = {("_xmpp-server._tcp.peer.example", "SRV"): [f"10 0 {port} host.peer.example."],
                ("host.peer.example", "A"): ["127.0.0.1"]}
        async with zone_server(zone, secure=True) as dns_server:
            config = tmp_path / "relay.toml"
            config.write_text(f'[server]\ndomains = ["relay.test"]\ndialback_secret = "{"s" * 32}"\n'
                              f'[tls]\ndane = true\nnameservers = ["127.0.0.1:{dns_server.port}"]\n'
                              f'[s2s]\nconnect_blocklist = []\n')  # the peer is on loopback
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router", "check-dns", "peer.example", "--config", str(config),
                "--timeout", "2", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = await asyncio.wait_for(process.communicate(), 30)
        listener.close()
        return process.returncode, out.decode(), port

    status, out, port = uvloop.run(scenario())
    assert status == 0, out
    assert f"target 1: host.peer.example:{port} (STARTTLS), addresses 127.0.0.1, DNSSEC-validated" in out
