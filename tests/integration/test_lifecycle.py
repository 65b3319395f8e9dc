"""The relay as a process: ``router.process.run`` serves until SIGTERM, closes every
stream with ``<system-shutdown/>`` and exits 0; SIGHUP reloads the configuration
without dropping open streams."""

from __future__ import annotations

import asyncio
import signal

from router.net.component_client import ComponentClient, ComponentStreamError

from .conftest import arun, relay_process


def test_sigterm_closes_streams_with_system_shutdown_and_exits_0(relay_spec, tmp_path):
    spec = relay_spec("proc", domains=("relay.test",), components={"a.relay.test": "sa"})
    with relay_process(spec, tmp_path / "relay.toml") as process:
        async def scenario():
            a = ComponentClient()
            await a.connect("127.0.0.1", spec.component_port, "a.relay.test", "sa")
            process.send_signal(signal.SIGTERM)
            try:
                await a.receive(timeout=10)
                raise AssertionError("expected a stream error")
            except ComponentStreamError as error:
                assert error.condition == "system-shutdown"
            await a.close()

        arun(scenario())
        assert process.wait(20) == 0


def test_sighup_reloads_without_dropping_streams(relay_spec, tmp_path):
    spec = relay_spec("proc", domains=("relay.test",), components={"a.relay.test": "sa"}, echo=("echo.relay.test",))
    path = tmp_path / "relay.toml"
    with relay_process(spec, path) as process:
        async def scenario():
            a = ComponentClient()
            await a.connect("127.0.0.1", spec.component_port, "a.relay.test", "sa")
            d = ComponentClient()
            try:
                await d.connect("127.0.0.1", spec.component_port, "d.relay.test", "sd")
                raise AssertionError("d is not configured yet")
            except ComponentStreamError as error:
                assert error.condition == "host-unknown"
            spec.components["d.relay.test"] = "sd"
            spec.config()
            path.write_text(spec.toml())
            process.send_signal(signal.SIGHUP)
            for _ in range(50):  # the reload is asynchronous to us: poll, bounded
                d = ComponentClient()
                try:
                    await d.connect("127.0.0.1", spec.component_port, "d.relay.test", "sd")
                    break
                except ComponentStreamError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the new component was never accepted")
            # the stream opened before the reload still works, and reaches the new component
            a.send("<message from='a.relay.test' to='echo.relay.test' id='still-up'/>")
            assert (await a.receive()).get("id") == "still-up"
            a.send("<message from='x@a.relay.test' to='y@d.relay.test' id='to-d'/>")
            assert (await d.receive()).get("id") == "to-d"
            await a.close()
            await d.close()

        arun(scenario())
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


def test_a_failed_reload_changes_nothing_and_a_good_one_applies(relay_spec, pki, peers_cert, tmp_path):
    """SIGHUP with a certificate that is not PEM: the reload fails naming the file,
    and nothing changes (before, inbound TLS was switched off while the log said
    the running configuration was kept). The next good reload applies; open
    streams stay up through both."""
    from .peer import Peer

    spec = relay_spec("proc", domains=("relay.test",), echo=("echo.relay.test",))
    path = tmp_path / "relay.toml"
    broken = tmp_path / "broken.crt"
    broken.write_text("this is not a PEM certificate\n")
    with relay_process(spec, path) as process:
        async def new_peer(name: str) -> Peer:
            peer = await Peer.connect(spec.s2s_port, f"{name}.peers.test", "echo.relay.test", cert=peers_cert,
                                      ca_path=pki.ca_path)
            await asyncio.wait_for(peer.authenticated(), 10)
            return peer

        async def echoes(peer: Peer, n: str) -> bool:
            peer.send(f"<message from='u@{peer.session.local_domain}' to='echo.relay.test' id='{n}'/>")
            return f"id='{n}'".encode() in (await asyncio.wait_for(peer.receive(), 10)).replace(b'"', b"'")

        async def component_accepted() -> bool:
            d = ComponentClient()
            try:
                await d.connect("127.0.0.1", spec.component_port, "d.relay.test", "sd")
            except ComponentStreamError as error:
                assert error.condition == "host-unknown"
                return False
            await d.close()
            return True

        async def reloaded(marker: str, count: int) -> None:
            log = path.with_suffix(".log")
            for _ in range(100):  # the reload is asynchronous to us: poll, bounded
                if log.read_text().count(marker) >= count:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"no {marker!r} in the log: {log.read_text()[-2000:]}")

        async def scenario():
            live = await new_peer("p1")
            good_cert = spec.pki.credential("echo.relay.test")[0]
            spec.components["d.relay.test"] = "sd"
            path.write_text(spec.toml().replace(str(good_cert), str(broken)))
            process.send_signal(signal.SIGHUP)
            await reloaded("reload failed, keeping the running configuration", 1)
            log = path.with_suffix(".log").read_text()
            assert f"cannot load the certificate of echo.relay.test ({broken})" in log
            assert not await component_accepted()  # nothing of the new file was applied
            assert await echoes(await new_peer("p2"), "tls-still-on")  # STARTTLS and EXTERNAL still work
            assert await echoes(live, "live-1")
            path.write_text(spec.toml())
            process.send_signal(signal.SIGHUP)
            await reloaded("configuration reloaded from", 1)
            assert await component_accepted()
            assert await echoes(live, "live-2")
            await live.close()

        arun(scenario(), timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
