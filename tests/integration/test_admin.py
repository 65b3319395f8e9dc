"""The operator's control socket against a running relay, through the real Unix
socket: listing and showing streams, closing them with a stream error, queues
and backoff, the DNS cache, runtime deny entries, bad requests, the socket
file's life, and ``python -m router ctl`` (JSON output, ``top``) as a process."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import stat
import sys

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from router.admin.protocol import MAX_REQUEST_BYTES, socket_path
from router.config import parse_config
from router.negotiation import events as ev
from router.negotiation.pairs import Pair
from router.net.component_client import ComponentClient
from router.server import Relay

from .conftest import ROOT, arun, free_port, relay_process, running
from .peer import Peer, PeerClosed

BOT, BOT_SECRET = "bot.relay.test", "bot-secret"


@pytest.fixture
def spec(relay_spec):
    return relay_spec("relay", domains=("relay.test",), echo=("echo.relay.test",), components={BOT: BOT_SECRET})


async def ask(path, request: bytes | dict) -> dict:
    """One request line over a fresh connection to the control socket; the answer."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
    try:
        writer.write(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return json.loads(await reader.readline())
    finally:
        writer.close()


async def ctl(relay: Relay, command: str, **arguments):
    """The result of a command the relay accepts."""
    answer = await ask(socket_path(relay.config, relay.worker), {"command": command, **arguments})
    assert answer["ok"], answer
    return answer["result"]


async def refused(relay: Relay, command: str, **arguments) -> str:
    answer = await ask(socket_path(relay.config, relay.worker), {"command": command, **arguments})
    assert not answer["ok"], answer
    return answer["error"]


async def listed(relay: Relay) -> dict[int, dict]:
    return {stream["id"]: stream for stream in (await ctl(relay, "streams"))["streams"]}


async def until_gone(relay: Relay, ident: int) -> None:
    while ident in await listed(relay):
        await asyncio.sleep(0.05)


async def peer(spec, pki, cert, local="p1.peers.test", remote="echo.relay.test", **kwargs) -> Peer:
    connected = await Peer.connect(spec.s2s_port, local, remote, cert=cert, ca_path=pki.ca_path, **kwargs)
    await connected.authenticated()
    return connected


async def component(spec) -> ComponentClient:
    client = ComponentClient()
    await client.connect("127.0.0.1", spec.component_port, BOT, BOT_SECRET)
    return client


def s2s_of(streams: dict[int, dict], remote: str) -> list[dict]:
    return [s for s in streams.values() if s["kind"] == "s2s" and remote in s["remote_domains"]]


def test_streams_lists_an_authenticated_s2s_stream_and_a_component(spec, pki, peers_cert):
    async def scenario():
        async with running(spec.config()) as relay:
            p1 = await peer(spec, pki, peers_cert)
            p1.send("<message from='juliet@p1.peers.test/b' to='echo.relay.test' id='e1'><body>hi</body></message>")
            await p1.receive()
            bot = await component(spec)
            result = await ctl(relay, "streams")
            assert result["worker"] == 0
            assert result["totals"]["streams"] == 2 and result["totals"]["s2s_in"] == 1
            assert result["totals"]["components"] == 1 and result["totals"]["stanzas_routed"] >= 1
            (s2s,) = s2s_of({s["id"]: s for s in result["streams"]}, "p1.peers.test")
            assert (s2s["direction"], s2s["mechanism"], s2s["bidi"], s2s["authenticated"]) == (
                "in", "sasl-external", True, True)
            assert s2s["local_domains"] == ["echo.relay.test"] and s2s["remote_domains"] == ["p1.peers.test"]
            assert s2s["inbound_pairs"] == [["echo.relay.test", "p1.peers.test"]]
            assert s2s["tls"]["version"] == "TLSv1.3" and s2s["tls"]["cipher"] and s2s["tls"]["bits"] >= 128
            certificate = s2s["peer_certificate"]
            assert "peers.test" in certificate["subject"] and "integration test CA" in certificate["issuer"]
            expires = datetime.datetime.fromisoformat(certificate["not_after"])
            assert expires > datetime.datetime.now(datetime.timezone.utc)
            assert s2s["bytes_in"] > 0 and s2s["bytes_out"] > 0 and s2s["queue"] == 0
            assert 0 <= s2s["idle"] <= s2s["age"] < 30
            (bot_stream,) = [s for s in result["streams"] if s["kind"] == "component"]
            assert bot_stream["local_domains"] == [BOT] and bot_stream["mechanism"] == "handshake"
            assert bot_stream["tls"] is None and bot_stream["authenticated"]
            # show: the same stream by its id, and a clear refusal for an unknown one
            shown = await ctl(relay, "show", id=s2s["id"])
            assert shown["id"] == s2s["id"] and shown["peer"] == s2s["peer"]
            assert "no stream 999999" in await refused(relay, "show", id=999999)
            assert "needs 'id'" in await refused(relay, "show", id="one")
            await bot.close()
            await p1.close()

    arun(scenario())


def test_close_one_stream_with_a_stream_error(spec, pki, peers_cert):
    async def scenario():
        async with running(spec.config()) as relay:
            p1 = await peer(spec, pki, peers_cert)
            (stream,) = s2s_of(await listed(relay), "p1.peers.test")
            assert "not a stream error condition" in await refused(relay, "close", id=stream["id"],
                                                                   condition="go-away")
            assert await ctl(relay, "close", id=stream["id"], condition="policy-violation",
                             text="maintenance") == {"closed": [stream["id"]]}
            error = await p1.stream_error()
            assert (error.condition, error.text) == ("policy-violation", "maintenance")
            await until_gone(relay, stream["id"])
            await p1.close()

    arun(scenario())


def test_close_every_stream_of_a_domain(spec, pki, peers_cert):
    async def scenario():
        async with running(spec.config()) as relay:
            first = await peer(spec, pki, peers_cert, remote="echo.relay.test")
            second = await peer(spec, pki, peers_cert, remote="relay.test")
            other = await peer(spec, pki, peers_cert, local="p2.peers.test")
            ids = sorted(s["id"] for s in s2s_of(await listed(relay), "p1.peers.test"))
            assert len(ids) == 2
            assert await ctl(relay, "close", domain="P1.peers.test", condition="reset") == {"closed": ids}
            for closed in (first, second):
                assert (await closed.stream_error()).condition == "reset"
            for ident in ids:
                await until_gone(relay, ident)
            # the other domain's stream is untouched and still delivers
            other.send("<message from='x@p2.peers.test' to='echo.relay.test' id='still'/>")
            assert b"still" in await other.receive()
            assert await ctl(relay, "close", domain="p1.peers.test") == {"closed": []}
            for done in (first, second, other):
                await done.close()

    arun(scenario())


def test_queues_and_backoff_per_remote_domain(relay_spec):
    silent = socket.socket()  # accepts TCP (the kernel's backlog) and never answers: the stream stays negotiating
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    spec = relay_spec("relay", domains=("relay.test",), components={BOT: BOT_SECRET},
                      routes={"silent.test": silent.getsockname()[1], "closed.test": free_port()})

    async def scenario():
        async with running(spec.config()) as relay:
            bot = await component(spec)
            bot.send(f"<message from='{BOT}' to='a@silent.test' id='q1'/>")
            bot.send(f"<message from='{BOT}' to='b@silent.test' id='q2'/>")
            bot.send(f"<message from='{BOT}' to='c@closed.test' id='q3'/>")
            assert (await bot.receive()).get("id") == "q3"  # bounced: nothing listens there
            queues = {q["domain"]: q for q in await ctl(relay, "queues")}
            assert queues["silent.test"]["queued"] == 2
            assert queues["silent.test"]["pairs"] == [{"local": BOT, "queued": 2,
                                                       "oldest": queues["silent.test"]["pairs"][0]["oldest"]}]
            assert queues["silent.test"]["failures"] == 0
            assert queues["closed.test"]["queued"] == 0 and queues["closed.test"]["failures"] == 1
            assert 0 <= queues["closed.test"]["retry_in"] <= spec.config().s2s.backoff_base
            await bot.close()

    try:
        arun(scenario())
    finally:
        silent.close()


class CountingDns:
    """Answers SRV and A questions from a dict and counts them (the cache's other side)."""

    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, name, rdtype, lifetime=None, search=None):
        self.asked.append((name, rdtype))
        records = self.zone.get((name, rdtype))
        if records is None:
            raise dns.resolver.NoAnswer()
        return Answer([dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), r) for r in records])


class Answer(list):
    class rrset:  # noqa: N801 (dnspython's attribute name)
        ttl = 3600

    class response:  # noqa: N801 -- the DNS message, whose AD flag DANE reads (not set: not validated)
        flags = 0


def test_dns_flush_forgets_one_domains_cached_answers(spec):
    zone = {("_xmpp-server._tcp.peer.example.", "SRV"): ["10 0 5269 host.peer.example."],
            ("host.peer.example.", "A"): ["192.0.2.1"], ("other.example.", "A"): ["192.0.2.2"]}

    async def scenario():
        async with running(spec.config()) as relay:
            relay.resolver.dns = fake = CountingDns(zone)
            for domain in ("peer.example", "other.example"):
                await relay.resolver.resolve(domain)
            asked = len(fake.asked)
            await relay.resolver.resolve("peer.example")
            assert len(fake.asked) == asked  # cached
            # the SRV pair, the target's A and AAAA: four answers; other.example's stay
            assert await ctl(relay, "dns-flush", domain="Peer.Example") == {"domain": "peer.example", "dropped": 4}
            await relay.resolver.resolve("peer.example")
            assert ("_xmpp-server._tcp.peer.example.", "SRV") in fake.asked[asked:]
            assert ("host.peer.example.", "A") in fake.asked[asked:]
            before_other = len(fake.asked)
            await relay.resolver.resolve("other.example")
            assert len(fake.asked) == before_other
            assert "is not a domain" in await refused(relay, "dns-flush", domain="no such domain")

    arun(scenario())


async def pair_outcome(connected: Peer, pair: Pair) -> str:
    """Ask for one more pair on an authenticated stream: "valid", or the refusal's condition."""
    assert connected.session.request_pair(pair)
    await connected._flush()
    while pair not in connected.session.outbound_pairs:
        failed = [e for e in connected.events if isinstance(e, ev.AuthFailed) and e.pair == pair]
        if failed:
            return failed[0].condition
        await connected._read()
    return "valid"


def test_deny_at_runtime_refuses_new_streams_and_pairs_until_removed(spec, pki, peers_cert):
    async def scenario():
        async with running(spec.config()) as relay:
            p1 = await peer(spec, pki, peers_cert)
            p2 = await peer(spec, pki, peers_cert, local="p2.peers.test",
                            other_domains=("p3.peers.test", "p4.peers.test"))
            assert await pair_outcome(p2, Pair("p3.peers.test", "echo.relay.test")) == "valid"
            assert await ctl(relay, "deny-add", pattern="P4.peers.test") == {"deny": ["p4.peers.test"], "closed": []}
            assert "already denied" in await refused(relay, "deny-add", pattern="p4.peers.test")
            # a new pair on a stream that is already up is refused like on a new stream
            assert await pair_outcome(p2, Pair("p4.peers.test", "echo.relay.test")) == "policy-violation"
            assert await ctl(relay, "deny-add", pattern="p1.peers.test")
            with pytest.raises(PeerClosed) as refusal:
                await peer(spec, pki, peers_cert)
            assert refusal.value.condition == "policy-violation"
            # the open stream stays until asked: with close, the streams the entry refuses end
            p1.send("<message from='x@p1.peers.test' to='echo.relay.test' id='open'/>")
            assert b"open" in await p1.receive()
            (p1_stream,) = s2s_of(await listed(relay), "p1.peers.test")
            result = await ctl(relay, "deny-add", pattern="*.peers.test", close=True)
            assert result["deny"] == ["p4.peers.test", "p1.peers.test", "*.peers.test"]
            assert p1_stream["id"] in result["closed"] and len(result["closed"]) == 2  # p2's stream too
            assert (await p1.stream_error()).condition == "policy-violation"
            for pattern in ("*.peers.test", "p1.peers.test"):
                await ctl(relay, "deny-remove", pattern=pattern)
            assert "not a deny entry" in await refused(relay, "deny-remove", pattern="p1.peers.test")
            assert relay.config.policy.deny == ("p4.peers.test",)
            again = await peer(spec, pki, peers_cert)
            for done in (again, p1, p2):
                await done.close()

    arun(scenario())


def test_bad_requests_are_answered_and_the_socket_keeps_serving(spec):
    async def scenario():
        async with running(spec.config()) as relay:
            path = socket_path(relay.config)
            reader, writer = await asyncio.open_unix_connection(str(path))
            for line, error in ((b"{not json\n", "not a JSON request"), (b"[1, 2]\n", '"command"'),
                                (b'{"command": "reboot"}\n', "unknown command 'reboot'"),
                                (b'{"command": "close"}\n', "needs 'id' or 'domain'"),
                                (b"\xff\xfe\n", "not a JSON request")):
                writer.write(line)
                answer = json.loads(await reader.readline())
                assert answer["ok"] is False and error in answer["error"], (line, answer)
            writer.write(b'{"command": "queues"}\n')  # the same connection still answers
            assert json.loads(await reader.readline()) == {"ok": True, "result": []}
            writer.close()
            # a line beyond the bound is refused and its connection closed
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"x" * (MAX_REQUEST_BYTES + 1024))
            answer = json.loads(await reader.readline())
            assert not answer["ok"] and "at most" in answer["error"]
            assert await reader.read() == b""
            writer.close()
            assert (await ask(path, {"command": "streams"}))["ok"]

    arun(scenario())


def test_socket_file_is_private_replaces_a_stale_one_and_refuses_a_live_one(spec, relay_spec):
    config = spec.config()
    path = socket_path(config)
    assert path == config.server.state_dir / "control.sock"
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound and closed without unlinking: what a killed relay leaves
    stale.close()

    async def scenario():
        async with running(config) as relay:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert (await ctl(relay, "streams"))["totals"]["streams"] == 0
            second = Relay(relay_spec("relay", domains=("relay.test",)).config())  # other ports, same state_dir
            with pytest.raises(OSError, match="another relay answers on it"):
                await second.start()
            await second.stop(timeout=0)
            assert (await ctl(relay, "queues")) == []  # the first one's socket is untouched
        assert not path.exists()

    arun(scenario())


def test_control_false_serves_no_socket(spec):
    config = parse_config(spec.toml().replace("[listen]\n", "[listen]\ncontrol = false\n"), spec.base)
    assert config.listen.control is None

    async def scenario():
        async with running(config):
            assert not (config.server.state_dir / "control.sock").exists()

    arun(scenario())


async def run_ctl(*arguments: str) -> tuple[int, str, str]:
    """``python -m router ctl ...`` as a separate process."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "router", "ctl", *arguments, cwd=ROOT,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    return process.returncode, out.decode(), err.decode()


def test_cli_prints_json_for_scripts_and_a_table_for_people(spec, tmp_path):
    config_path = tmp_path / "relay.toml"

    async def scenario():
        bot = await component(spec)
        code, out, err = await run_ctl("--config", str(config_path), "streams", "--json")
        assert code == 0, err
        streams = json.loads(out)["streams"]
        assert [(s["kind"], s["local_domains"], s["mechanism"]) for s in streams] == [
            ("component", [BOT], "handshake")]
        path = socket_path(spec.config())
        code, out, err = await run_ctl("--socket", str(path), "streams")
        assert code == 0, err
        assert out.splitlines()[0].split()[:4] == ["ID", "KIND", "DIR", "REMOTE"]
        assert BOT in out and "1 stream(s)" in out
        code, out, err = await run_ctl("--socket", str(path), "show", "424242")
        assert code == 1 and "no stream 424242" in err
        code, out, err = await run_ctl("--socket", str(tmp_path / "nothing.sock"), "queues")
        assert code == 1 and "no control socket at" in err
        await bot.close()

    with relay_process(spec, config_path):
        arun(scenario())


def test_ctl_top_shows_rates_of_the_busiest_streams(spec):
    async def scenario():
        async with running(spec.config()) as relay:
            bot = await component(spec)
            sending = True

            async def traffic():
                n = 0
                while sending:
                    bot.send(f"<message from='{BOT}' to='echo.relay.test' id='t{n}'><body>{'x' * 200}</body></message>")
                    await bot.receive()
                    n += 1

            pump = asyncio.ensure_future(traffic())
            try:
                code, out, err = await run_ctl("--socket", str(socket_path(relay.config)), "top", "--iterations", "2",
                                               "--interval", "0.3")
            finally:
                sending = False
                await pump
            assert code == 0, err
            screens = [line for line in out.splitlines() if line.startswith("stanzas ")]
            assert len(screens) == 2
            assert float(screens[-1].split()[1].removesuffix("/s")) > 0  # stanzas/s
            rows = [line.split() for line in out.splitlines() if BOT in line.split()]
            assert rows and rows[-1][1] == "component" and float(rows[-1][4]) > 0  # bytes in per second
            assert "\x1b[" not in out  # no screen control codes when not on a terminal
            await bot.close()

    arun(scenario())
