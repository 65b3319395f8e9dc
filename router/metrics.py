"""The relay's metrics: cheap families on the hot path, exposed with prometheus_client.

``Counter`` and ``Gauge`` here are plain dicts keyed by the label-value tuple
(the compiled router's C counters are added at scrape time through
``collect``), cheap enough to update per stanza. ``Registry`` turns them into
prometheus_client families when scraped (a custom collector), next to the
standard process collector (``process_*``: CPU, RSS, open file descriptors)
and the histograms of rare events (negotiation time, dialback verification
time, queue wait). ``start_metrics_server`` serves the Prometheus text format
0.0.4, or OpenMetrics 1.0 to a scraper that asks for it.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, UntypedMetricFamily
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

# What prometheus_client's text generator writes for names like ours (no UTF-8 names);
# every Prometheus version reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets of the histograms (seconds): a loopback negotiation takes a few
# milliseconds, a TLS one across the internet up to seconds, a queued stanza waits
# up to s2s.queue_max_age (60 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
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
    """A set of metric families rendered together, with prometheus_client collectors
    beside them (``standard=True``: the process collector)."""

    def __init__(self, *, standard: bool = False) -> None:
        self.metrics: dict[str, Metric] = {}
        self.exposition = CollectorRegistry(auto_describe=False)
        self.exposition.register(_Families(self))
        if standard:
            ProcessCollector(registry=self.exposition)

    def _add(self, metric: Metric) -> Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: tuple[str, ...] = (), collect=None) -> Gauge:
        return self._add(Gauge(name, help, labelnames, collect))

    def histogram(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Histogram:
        """A prometheus_client histogram, for events far rarer than stanzas."""
        return Histogram(name, help, labelnames, buckets=BUCKETS, registry=self.exposition)

    def render(self, *, openmetrics: bool = False) -> bytes:
        """Every family: Prometheus text 0.0.4, or OpenMetrics 1.0."""
        return (generate_openmetrics if openmetrics else generate_latest)(self.exposition)


_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "untyped": UntypedMetricFamily}


class _Families:
    """The custom collector: our dict-backed families as prometheus_client ones."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self):
        for metric in self.registry.metrics.values():
            family = _FAMILIES[metric.kind](metric.name, metric.help, labels=metric.labelnames)
            for labels, value in sorted(metric.samples()):
                if len(labels) != len(metric.labelnames):
                    raise ValueError(f"{metric.name}: labels {labels!r} do not match {metric.labelnames!r}")
                family.add_metric([str(v) for v in labels], value)
            yield family


class RelayMetrics:
    """The relay's metric families; the runtime updates the attributes directly.

    Label values are short fixed vocabularies (never peer domains, which would
    let a remote server blow up the number of series).
    """

    def __init__(self, registry: Registry | None = None):
        self.registry = r = registry or Registry(standard=True)
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
            "descriptor (open_files), a stanza larger than its remote server's XEP-0478 max-bytes "
            "(peer_max_bytes), a stream that left too many stanzas unacknowledged (sm_max_unacked, XEP-0198), a "
            "stream asking for one domain pair too many (max_pairs_per_stream), a "
            "connection to a PROXY-protocol listener from an untrusted address (proxy_trusted), an inbound DANE "
            "check over its limit (dane_lookups); max_verify_connections_per_target counts verifications that waited, "
            "max_deferred_acks XEP-0198 <r/>s answered together with a later one while the cluster bus hands off, "
            "max_bus_in_flight and nats_max_payload cluster bus stanzas bounced; srv_records, addresses_per_host "
            "and tlsa_records a remote's DNS answer cut to resolver.RECORD_LIMITS; connect_blocklist addresses "
            "DNS named in s2s.connect_blocklist.",
            ("limit",),
        )
        self.outbound_connections = r.counter(
            p + "outbound_connections_total",
            "Outbound TCP connections opened, by purpose stream|verify (a verify-only dialback connection).",
            ("purpose",),
        )
        self.dane_checks = r.counter(
            p + "dane_checks_total",
            "DANE checks of a peer's certificate against its TLSA records (RFC 7673), by direction in|out and "
            "result match|mismatch (out: the stream was closed)|failed (a look-up failed or timed out; out: "
            "closed)|no-tlsa (no validated usable TLSA record)|insecure (the SRV answer was not DNSSEC-validated)"
            "|limit (in: dane_lookups checks already in flight, limits_hit_total counts it too).",
            ("direction", "result"),
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
        self.stream_management = r.counter(
            p + "stream_management_total",
            "XEP-0198 on S2S streams, by event: enabled (a stream started counting), resent|bounced (a stanza a "
            "dead stream sent and its peer never acknowledged), ack_timeout (a stream closed for not acknowledging).",
            ("event",),
        )
        self.pings = r.counter(
            p + "pings_total",
            "XEP-0199 pings the relay sent on quiet authenticated S2S streams, by outcome sent|answered|timeout "
            "(no answer within s2s.ping_timeout: the stream was closed with <connection-timeout/>).",
            ("outcome",),
        )

        self.negotiation_seconds = r.histogram(
            p + "negotiation_seconds",
            "Time from a stream's TCP connection to its first authenticated pair, by direction in|out.",
            ("direction",),
        )
        self.verification_seconds = r.histogram(
            p + "dialback_verification_seconds",
            "Time to verify a peer's dialback key with its authoritative server, by result valid|invalid|error.",
            ("result",),
        )
        self.queue_wait_seconds = r.histogram(
            p + "queue_wait_seconds",
            "Time stanzas waited for an outbound stream to be negotiated, by outcome sent|bounced.",
            ("outcome",),
        )

    def render(self, *, openmetrics: bool = False) -> bytes:
        return self.registry.render(openmetrics=openmetrics)


async def _answer(render: Callable[[bool], Awaitable[tuple[str, bytes]]], reader: asyncio.StreamReader,
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
        openmetrics = b"application/openmetrics-text" in head.lower()  # the Accept header asks for it
        content_type, body = await render(openmetrics)
        status = "200 OK"
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


async def start_metrics_server(source: Registry | RelayMetrics | Callable[[bool], Awaitable[tuple[str, bytes]]],
                               host: str,
                               port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` on host:port; the caller closes the returned server.
    ``source`` is a registry, or a coroutine function making the exposition (a
    node's supervisor gathers its workers' in it): called with whether the
    scraper asked for OpenMetrics, it returns (content type, body)."""
    if isinstance(source, (Registry, RelayMetrics)):
        registry = source.registry if isinstance(source, RelayMetrics) else source

        async def render(openmetrics: bool) -> tuple[str, bytes]:
            return (OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE), registry.render(openmetrics=openmetrics)
    else:
        render = source
    return await asyncio.start_server(lambda r, w: _answer(render, r, w), host, port, limit=MAX_REQUEST_BYTES)
