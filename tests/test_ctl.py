"""The parts of the admin interface that need no relay: where the control socket
is (``[listen] control``, one per worker), ``ctl``'s command line, its rates
between two listings, and its text tables. The socket itself is tested against
a running relay in tests/integration/test_admin.py."""

from __future__ import annotations

import datetime
import io

import pytest

from router.admin import tables
from router.admin.ctl import compare, control_socket, main
from router.admin.protocol import socket_path
from router.cli import build_parser
from router.config import ConfigError, parse_config

BASE = """
[server]
domains = ["relay.test"]
dialback_secret = "0123456789abcdef0123"
state_dir = "var"
"""


def config(extra: str = "", base_dir=".") -> object:
    return parse_config(BASE + extra, base_dir, create_state=False)


def test_the_socket_is_in_the_state_directory_unless_configured(tmp_path):
    assert config(base_dir=tmp_path).listen.control == tmp_path / "var" / "control.sock"
    assert config("[listen]\ncontrol = 'run/ctl.sock'\n", tmp_path).listen.control == tmp_path / "run" / "ctl.sock"
    assert config("[listen]\ncontrol = '/run/xmpp-router/control.sock'\n").listen.control.as_posix() == \
        "/run/xmpp-router/control.sock"
    assert config("[listen]\ncontrol = false\n").listen.control is None
    for wrong in ("true", "''", "5"):
        with pytest.raises(ConfigError, match="listen.control"):
            config(f"[listen]\ncontrol = {wrong}\n")


def test_each_worker_of_a_node_has_its_own_socket(tmp_path):
    single = config(base_dir=tmp_path)
    assert socket_path(single, 0) == tmp_path / "var" / "control.sock"
    node = config("[cluster]\nworkers = 3\nnats = ['nats://127.0.0.1:4222']\n", tmp_path)
    assert [socket_path(node, worker).name for worker in range(3)] == [
        "control.sock.0", "control.sock.1", "control.sock.2"]
    assert socket_path(config("[listen]\ncontrol = false\n"), 0) is None


def test_ctl_finds_the_socket_from_the_config_file_and_worker(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(BASE + "[cluster]\nworkers = 2\nnats = ['nats://127.0.0.1:4222']\n")
    args = build_parser().parse_args(["ctl", "--config", str(path), "--worker", "1", "streams"])
    assert control_socket(args) == tmp_path / "var" / "control.sock.1"
    args = build_parser().parse_args(["ctl", "--socket", "/tmp/x.sock", "--config", str(path), "queues"])
    assert str(control_socket(args)) == "/tmp/x.sock"
    path.write_text(BASE + "[listen]\ncontrol = false\n")
    args = build_parser().parse_args(["ctl", "--config", str(path), "queues"])
    assert main(args, io.StringIO()) == 1  # no socket to talk to: said on stderr


def test_ctl_command_line():
    parse = build_parser().parse_args
    args = parse(["ctl", "--socket", "s", "close", "--domain", "example.net", "--condition", "policy-violation",
                  "--text", "bye", "--json"])
    assert (args.ctl_command, args.id, args.domain, args.condition, args.text, args.json) == (
        "close", None, "example.net", "policy-violation", "bye", True)
    assert parse(["ctl", "close", "12"]).id == 12
    assert parse(["ctl", "deny", "add", "*.spam.example", "--close"]).close
    assert parse(["ctl", "top", "--iterations", "2", "--interval", "0.5"]).iterations == 2
    for wrong in (["ctl", "close"], ["ctl", "close", "3", "--domain", "a.example"],
                  ["ctl", "close", "3", "--condition", "go-away"], ["ctl", "deny", "list", "a.example"],
                  ["ctl", "top", "--interval", "0"], ["ctl"]):
        with pytest.raises(SystemExit) as exit_:
            parse(wrong)
        assert exit_.value.code == 2


def listing(time: float, streams: list[dict], **totals) -> dict:
    base = {"stanzas_routed": 0, "stanzas_bounced": 0, "bytes_in": 0, "bytes_out": 0}
    return {"time": time, "worker": 0, "totals": {**base, **totals}, "streams": streams}


def counters(ident: int, bytes_in: int, bytes_out: int, queue: int = 0) -> dict:
    return {"id": ident, "kind": "s2s", "direction": "in", "domain": f"d{ident}.example", "bytes_in": bytes_in,
            "bytes_out": bytes_out, "queue": queue}


def test_top_rates_come_from_two_listings_busiest_first():
    before = listing(10.0, [counters(1, 1000, 1000), counters(2, 5000, 0)], stanzas_routed=100, bytes_in=6000)
    after = listing(12.0, [counters(1, 1200, 1400), counters(2, 100, 0, queue=7), counters(3, 3000, 3000)],
                    stanzas_routed=300, bytes_in=10300)
    rates, rows = compare(before, after)
    assert rates == {"stanzas_routed": 100.0, "stanzas_bounced": 0.0, "bytes_in": 2150.0, "bytes_out": 0.0}
    # stream 3 opened in between (counted from zero); stream 2 restarted (its bytes in start again: not negative)
    assert [(r["id"], r["in_rate"], r["out_rate"]) for r in rows] == [
        (3, 1500.0, 1500.0), (1, 100.0, 200.0), (2, 0.0, 0.0)]


def test_sizes_and_durations_read_at_a_glance():
    assert [tables.size(n) for n in (0, 1023, 1536, 5 * 1024 ** 3)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    assert [tables.duration(s) for s in (0, 42, 192, 3 * 3600 + 120, 90000, -3)] == [
        "0s", "42s", "3m12s", "3h2m", "1d1h", "0s"]
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    assert tables.expires_in({"not_after": "2030-01-31T00:00:00+00:00"}, now) == "30d0h"
    assert tables.expires_in({"not_after": "2029-12-31T00:00:00+00:00"}, now) == "expired"


def test_streams_table_has_a_row_per_stream_and_the_totals():
    stream = {"id": 7, "kind": "s2s", "direction": "out", "peer": "192.0.2.1:5269",
              "local_domains": ["relay.test"], "remote_domains": ["example.net"], "mechanism": "dialback",
              "bidi": False, "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "bits": 128},
              "peer_certificate": None, "age": 3700, "idle": 5, "bytes_in": 2048, "bytes_out": 10, "queue": 0,
              "stanzas_in": 4, "stanzas_out": 1, "authenticated": True, "closing": False, "paused": False,
              "inbound_pairs": [], "outbound_pairs": [["relay.test", "example.net"]]}
    totals = {"streams": 1, "s2s_in": 0, "s2s_out": 1, "components": 0, "stanzas_routed": 3,
              "stanzas_bounced": 0, "queued_stanzas": 0}
    text = tables.streams({"streams": [stream], "totals": totals})
    header, row, summary = text.splitlines()
    assert header.split()[:5] == ["ID", "KIND", "DIR", "REMOTE", "LOCAL"]
    assert row.split()[:9] == ["7", "s2s", "out", "example.net", "relay.test", "dialback", "no", "TLSv1.3", "-"]
    assert summary.startswith("1 stream(s): s2s in 0, out 1")
    shown = tables.stream(stream)
    assert "pairs out" in shown and "relay.test -> example.net" in shown and "1h1m" in shown
    assert "4/1" in row and "4 forwarded from it, 1 forwarded to it" in shown
