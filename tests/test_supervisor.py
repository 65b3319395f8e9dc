"""The pure parts of a node's supervisor (router.cluster.supervisor): the node's
metrics merged from its workers', a worker's view of the configuration, and the
reserved ports that accept nothing until a worker listens on them."""

from __future__ import annotations

import errno
import socket

import pytest

from router.cluster.supervisor import as_worker, merge_metrics, reserve
from router.config import Endpoint, parse_config
from router.metrics import RelayMetrics

CONFIG = """
[server]
domains = ["n1.test"]
dialback_secret = "0123456789abcdef"
[policy]
require_encryption = false
[listen]
s2s = "127.0.0.1:0"
component = "127.0.0.1:0"
metrics = "127.0.0.1:9100"
"""


def worker_metrics(pre_auth: int, bounced: int) -> str:
    metrics = RelayMetrics()
    metrics.pre_auth_streams.set(pre_auth)
    metrics.stanzas_bounced.inc("service-unavailable", by=bounced)
    return metrics.render().decode()


def test_merged_metrics_label_every_sample_with_its_worker_and_state_each_family_once():
    text = merge_metrics({0: worker_metrics(3, 1), 1: worker_metrics(5, 2)})
    lines = text.splitlines()
    assert lines.count("# TYPE xmpp_router_pre_auth_streams gauge") == 1
    assert sum(line.startswith("# HELP xmpp_router_pre_auth_streams ") for line in lines) == 1
    family = lines.index("# TYPE xmpp_router_pre_auth_streams gauge")
    assert lines[family + 1:family + 3] == ['xmpp_router_pre_auth_streams{worker="0"} 3.0',
                                            'xmpp_router_pre_auth_streams{worker="1"} 5.0']
    assert 'xmpp_router_stanzas_bounced_total{worker="0",condition="service-unavailable"} 1.0' in lines
    assert 'xmpp_router_stanzas_bounced_total{worker="1",condition="service-unavailable"} 2.0' in lines
    samples = [line for line in lines if not line.startswith("#")]
    assert samples and all('{worker="' in line for line in samples)
    families = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(families) == len(set(families))
    assert {name.removesuffix("_total") for name in RelayMetrics().registry.metrics} <= \
        {name.removesuffix("_total") for name in families}
    assert "process_resident_memory_bytes" in families  # the process collector's, per worker


def test_a_worker_listens_where_the_supervisor_reserved_with_its_own_metrics(tmp_path):
    config = parse_config(CONFIG, tmp_path)
    worker = as_worker(config, {"s2s": ("127.0.0.1", 40001), "component": ("127.0.0.1", 40002)}, 4)
    assert worker.listen.s2s == Endpoint("127.0.0.1", 40001)
    assert worker.listen.component == Endpoint("127.0.0.1", 40002)
    assert worker.listen.s2s_direct_tls is None
    assert worker.listen.metrics == Endpoint("127.0.0.1", 0)  # the node's port is the supervisor's
    assert worker.cluster.workers == 4
    without_metrics = parse_config(CONFIG.replace('metrics = "127.0.0.1:9100"', "metrics = false"), tmp_path)
    assert as_worker(without_metrics, {}, 2).listen.metrics is None


def test_a_reserved_port_accepts_nothing_until_a_worker_listens_on_it(tmp_path):
    reserved = reserve(parse_config(CONFIG, tmp_path))
    try:
        assert set(reserved) == {"s2s", "component"}
        address = reserved["s2s"].getsockname()
        assert address[1] != 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()
        with socket.socket() as other, pytest.raises(OSError) as refused:  # not a worker: no SO_REUSEPORT
            other.bind(address)
        assert refused.value.errno == errno.EADDRINUSE
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(address)
            listener.listen()
            listener.settimeout(5)
            for _ in range(10):  # every connection goes to the listening worker
                with socket.create_connection(address, timeout=5):
                    listener.accept()[0].close()
    finally:
        for sock in reserved.values():
            sock.close()
