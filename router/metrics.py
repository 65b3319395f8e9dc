"""Prometheus text exposition (format 0.0.4) without a client library.

Increments are a dict update keyed by the label-value tuple, cheap enough to
call per stanza; the text is built only when scraped. ``RelayMetrics`` holds
the relay's metric families; ``start_metrics_server`` serves them over HTTP.
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable, Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Every family name starts with this, so dashboards find them together.
PREFIX = "xmpp_router_"
# A scrape request is one line plus a few headers; anything longer is not a scraper.
MAX_REQUEST_BYTES = 8192
# A scraper that connects and sends nothing must not hold a connection forever.
REQUEST_TIMEOUT = 10.0


LabelValues = tuple[str, ...]


class Metric:
    """One family: name, help, label names, and a value per label-value tuple."""

    kind = "untyped"
    __slots__ = ("name", "help", "labelnames", "values")

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.values: dict[LabelValues, float] = {}

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def samples(self) -> Iterable[tuple[LabelValues, float]]:
        return self.values.items()


class Counter(Metric):
    """Only goes up; the name ends in ``_total`` by convention. ``collect``, when set,
    returns counts kept elsewhere (the compiled router's C counters), added to the
    ones ``inc`` kept."""

    kind = "counter"
    __slots__ = ("collect",)

    def __init__(self, name, help, labelnames=(), collect: Callable[[], Mapping[LabelValues, float]] | None = None):
        super().__init__(name, help, labelnames)
        self.collect = collect

    def inc(self, *labels: str, by: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + by

    def get(self, *labels: str) -> float:
        return dict(self.samples()).get(labels, 0)

    def samples(self) -> Iterable[tuple[LabelValues, float]]:
        if self.collect is None:
            return self.values.items()
        merged = dict(self.values)
        for labels, value in self.collect().items():
            if value:
                merged[labels] = merged.get(labels, 0) + value
        return merged.items()


class Gauge(Metric):
    """Goes up and down, or is computed at scrape time by ``collect``."""

    kind = "gauge"
    __slots__ = ("collect",)

    def __init__(self, name, help, labelnames=(), collect: Callable[[], Mapping[LabelValues, float]] | None = None):
        super().__init__(name, help, labelnames)
        self.collect = collect

    def inc(self, *labels: str, by: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + by

    def dec(self, *labels: str, by: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) - by

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def samples(self) -> Iterable[tuple[LabelValues, float]]:
        return self.collect().items() if self.collect is not None else self.values.items()


class Registry:
    """A set of metric families rendered together."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: tuple[str, ...] = (), collect=None) -> Gauge:
        return self._add(Gauge(name, help, labelnames, collect))

    def render(self) -> bytes:
        """The whole registry in Prometheus text format 0.0.4."""
        lines = []
        for metric in self.metrics.values():
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for labels, value in sorted(metric.samples()):
                if len(labels) != len(metric.labelnames):
                    raise ValueError(f"{metric.name}: labels {labels!r} do not match {metric.labelnames!r}")
                if labels:
                    pairs = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(metric.labelnames, labels))
                    lines.append(f"{metric.name}{{{pairs}}} {_format_value(value)}")
                else:
                    lines.append(f"{metric.name} {_format_value(value)}")
        return ("\n".join(lines) + "\n").encode("utf-8")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class RelayMetrics:
    """The relay's metric families; the runtime updates the attributes directly.

    Label values are short fixed vocabularies (never peer domains, which would
    let a remote server blow up the number of series).
    """

    def __init__(self, registry: Registry | None = None):
        self.registry = r = registry or Registry()
        p = PREFIX
        self.streams_open = r.gauge(
            p + "streams_open",
            "S2S streams currently open; direction in|out, mechanism sasl-external|dialback|none, bidi yes|no.",
            ("direction", "mechanism", "bidi"),
        )
        self.negotiations_completed = r.counter(
            p + "negotiations_completed_total",
            "S2S stream negotiations that authenticated a domain pair.",
            ("direction", "mechanism"),
        )
        self.negotiations_failed = r.counter(
            p + "negotiations_failed_total",
            "S2S stream negotiations that failed, by RFC 6120 condition or local reason.",
            ("direction", "reason"),
        )
        self.stanzas_routed = r.counter(
            p + "stanzas_routed_total",
            "Stanzas forwarded, by destination kind remote|component|service.",
            ("destination",),
        )
        self.stanzas_bounced = r.counter(
            p + "stanzas_bounced_total",
            "Stanzas answered with a stanza error instead of being delivered, by condition.",
            ("condition",),
        )
        self.stanzas_rejected = r.counter(
            p + "stanzas_rejected_total",
            "Stanzas refused by authorization or policy, by condition.",
            ("condition",),
        )
        self.bytes_received = r.counter(p + "bytes_received_total", "Bytes read, by link s2s|component.", ("link",))
        self.bytes_sent = r.counter(p + "bytes_sent_total", "Bytes written, by link s2s|component.", ("link",))
        self.queued_stanzas = r.gauge(
            p + "queued_stanzas", "Stanzas waiting for an outbound S2S stream to be negotiated."
        )
        self.outbound_queues = r.gauge(p + "outbound_queues", "Remote domains with stanzas waiting for a stream.")
        self.parse_errors = r.counter(
            p + "parse_errors_total", "Streams closed by the tokenizer, by RFC 6120 stream error condition.", ("condition",)
        )
        self.components_connected = r.gauge(p + "components_connected", "XEP-0114 components currently connected.")
        self.limits_hit = r.counter(
            p + "limits_hit_total",
            "Times a named limit refused work: a connection, a dialback verification, a stanza for a full "
            "write queue (write_queue_max), a stream closed for not reading (write_stall_timeout), a stanza "
            "for one remote domain too many (max_outbound_queues), an outbound connection without a file "
            "descriptor (open_files); max_verify_connections_per_target counts verifications that waited.",
            ("limit",),
        )
        self.outbound_connections = r.counter(
            p + "outbound_connections_total",
            "Outbound TCP connections opened, by purpose stream|verify (a verify-only dialback connection).",
            ("purpose",),
        )
        self.pre_auth_streams = r.gauge(p + "pre_auth_streams", "Inbound S2S streams not yet authenticated.")
        self.pending_verifications = r.gauge(
            p + "pending_verifications", "Dialback keys received and not yet verified by the authoritative server."
        )
        self.bus_stanzas = r.counter(
            p + "bus_stanzas_total",
            "Stanzas carried by the cluster bus (NATS), by direction sent|received and hop worker (another "
            "worker of this node) | node (another node); sent counts the ones the other member took.",
            ("direction", "hop"),
        )
        self.bus_batches = r.counter(
            p + "bus_batches_total",
            "NATS requests carrying stanzas over the cluster bus (one per member per event-loop iteration), by "
            "direction sent|received; bus_stanzas_total / bus_batches_total is the batch size.",
            ("direction",),
        )
        self.bus_failures = r.counter(
            p + "bus_failures_total",
            "Stanzas sent over the cluster bus that bounced: the member did not answer in cluster.bus_timeout "
            "(timeout) or could not be reached (unreachable).",
            ("reason",),
        )
        self.cluster_members = r.gauge(p + "cluster_members", "Other relay processes heard on the cluster bus.")
        self.bus_in_flight = r.gauge(p + "bus_in_flight", "Stanzas sent over the cluster bus and not yet answered.")
        self.bus_connected = r.gauge(p + "bus_connected", "1 while this process is connected to NATS.")
        self.service_stanzas = r.counter(
            p + "service_stanzas_total", "Stanzas handled by built-in services, by service ping|disco|echo|sink|error|ignored.", ("service",)
        )

    def render(self) -> bytes:
        return self.registry.render()


async def _answer(render: Callable[[], Awaitable[bytes]], reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
        writer.close()
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        status, content_type, body = "400 Bad Request", "text/plain", b"malformed request line\n"
    elif parts[0] not in ("GET", "HEAD"):
        status, content_type, body = "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
    elif parts[1].split("?", 1)[0] != "/metrics":
        status, content_type, body = "404 Not Found", "text/plain", b"metrics are at /metrics\n"
    else:
        status, content_type, body = "200 OK", CONTENT_TYPE, await render()
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    writer.write(header if parts[0] == "HEAD" else header + body)
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def start_metrics_server(source: Registry | RelayMetrics | Callable[[], Awaitable[bytes]], host: str,
                               port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` on host:port; the caller closes the returned server.
    ``source`` is a registry, or a coroutine function making the exposition (a
    node's supervisor gathers its workers' in it)."""
    if isinstance(source, (Registry, RelayMetrics)):
        registry = source.registry if isinstance(source, RelayMetrics) else source

        async def render() -> bytes:
            return registry.render()
    else:
        render = source
    return await asyncio.start_server(lambda r, w: _answer(render, r, w), host, port, limit=MAX_REQUEST_BYTES)
