"""The relay as a process: ``router.server.run`` serves until SIGTERM, closes every
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
