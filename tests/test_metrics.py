"""Metrics exposition through prometheus_client: our cheap families as a custom
collector, the process collector, histograms, OpenMetrics, and the HTTP endpoint
over loopback."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from router.metrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE, PREFIX, Registry, RelayMetrics, start_metrics_server


def test_counter_and_gauge_render_with_labels():
    r = Registry()
    c = r.counter("t_events_total", "Events seen.", ("kind",))
    g = r.gauge("t_open", "Open things.")
    c.inc("a")
    c.inc("a", by=2)
    c.inc("b")
    g.inc()
    g.inc()
    g.dec()
    text = r.render().decode()
    assert text.splitlines() == [
        "# HELP t_events_total Events seen.",
        "# TYPE t_events_total counter",
        't_events_total{kind="a"} 3.0',
        't_events_total{kind="b"} 1.0',
        "# HELP t_open Open things.",
        "# TYPE t_open gauge",
        "t_open 1.0",
    ]
    assert c.get("a") == 3 and c.get("never") == 0


def test_escaping_and_float_values():
    r = Registry()
    g = r.gauge("t_g", "line one\nback\\slash", ("v",))
    g.set(0.25, 'q"uo\\te\n')
    text = r.render().decode()
    assert "# HELP t_g line one\\nback\\\\slash" in text
    assert 't_g{v="q\\"uo\\\\te\\n"} 0.25' in text


def test_collected_gauge_is_computed_at_scrape_time():
    depth = {"now": 0}
    r = Registry()
    r.gauge("t_depth", "Depth.", collect=lambda: {(): depth["now"]})
    assert "t_depth 0.0\n" in r.render().decode()
    depth["now"] = 7
    assert "t_depth 7.0\n" in r.render().decode()


def test_label_count_mismatch_and_duplicate_names_are_errors():
    r = Registry()
    c = r.counter("t_c_total", "C.", ("a", "b"))
    c.inc("only-one")
    with pytest.raises(ValueError, match="do not match"):
        r.render()
    with pytest.raises(ValueError, match="twice"):
        r.counter("t_c_total", "again")


def test_relay_families_are_all_exposed():
    m = RelayMetrics()
    m.streams_open.inc("in", "dialback", "no")
    m.negotiations_failed.inc("out", "remote-server-timeout")
    m.parse_errors.inc("restricted-xml")
    text = m.render().decode()
    for family in (
        "streams_open",
        "negotiations_completed_total",
        "negotiations_failed_total",
        "stanzas_routed_total",
        "stanzas_bounced_total",
        "stanzas_rejected_total",
        "bytes_received_total",
        "bytes_sent_total",
        "queued_stanzas",
        "parse_errors_total",
    ):
        assert f"# TYPE {PREFIX}{family} " in text
    assert f'{PREFIX}streams_open{{bidi="no",direction="in",mechanism="dialback"}} 1.0' in text  # labels sorted
    assert f'{PREFIX}parse_errors_total{{condition="restricted-xml"}} 1.0' in text


def test_process_metrics_and_histograms_are_exposed():
    m = RelayMetrics()
    m.negotiation_seconds.labels("in").observe(0.004)
    m.queue_wait_seconds.labels("sent").observe(2.0)
    text = m.render().decode()
    for family in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
        assert f"\n{family} " in text
    assert f'{PREFIX}negotiation_seconds_bucket{{direction="in",le="0.005"}} 1.0' in text
    assert f'{PREFIX}negotiation_seconds_bucket{{direction="in",le="0.0025"}} 0.0' in text
    assert f'{PREFIX}queue_wait_seconds_count{{outcome="sent"}} 1.0' in text
    assert f"# TYPE {PREFIX}dialback_verification_seconds histogram" in text


async def _http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return status, headers, body


def test_scrape_over_loopback():
    async def scenario():
        metrics = RelayMetrics()
        metrics.stanzas_routed.inc("remote", by=5)
        server = await start_metrics_server(metrics, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            status, headers, body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == "HTTP/1.1 200 OK"
            assert headers["Content-Type"] == CONTENT_TYPE
            assert int(headers["Content-Length"]) == len(body)
            assert f'{PREFIX}stanzas_routed_total{{destination="remote"}} 5.0' in body.decode()

            metrics.stanzas_routed.inc("remote")
            _, _, body = await _http(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert f'{PREFIX}stanzas_routed_total{{destination="remote"}} 6.0' in body.decode()

            status, _, _ = await _http(port, b"GET / HTTP/1.1\r\n\r\n")
            assert status.startswith("HTTP/1.1 404")
            status, _, _ = await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert status.startswith("HTTP/1.1 405")
            status, _, _ = await _http(port, b"nonsense\r\n\r\n")
            assert status.startswith("HTTP/1.1 400")
            status, headers, body = await _http(
                port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
            assert headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE and body.endswith(b"# EOF\n")
            assert f'{PREFIX}stanzas_routed_total{{destination="remote"}} 6.0' in body.decode()
            status, headers, body = await _http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["Content-Length"]) > 0
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(scenario())


def test_oversized_request_is_dropped_without_answer():
    async def scenario():
        server = await start_metrics_server(Registry(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /" + b"a" * 20000)
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:  # closed with our bytes unread: RST instead of FIN
                answer = b""
            assert answer == b""
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(scenario())
