"""The command line, run as a real process (`python -m router ...`)."""

from __future__ import annotations

import pytest

import re
from contextlib import contextmanager
import signal
import socket
import subprocess
import sys
import time

from router.cli import describe, main
from router.config import default_config, parse_config
from pki_helpers import load_credential

PROCESS_TIMEOUT = 60


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "router", *args], cwd=cwd, capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )


BAD = """
[server]
domains = ["ok.example", "bad..example"]
[s2s]
bidi = "sometimes"
[policy]
max_stanza_bytes = 100
"""
BAD_PATHS = ("server.domains[1]", "s2s.bidi", "policy.max_stanza_bytes")


def test_check_config_ok_prints_summary(tmp_path):
    (tmp_path / "relay.toml").write_text(
        '[server]\ndomains = ["relay.example"]\ndialback_secret = "0123456789abcdef"\n'
        '[policy]\nrequire_encryption = false\n'
        '[[component]]\ndomain = "bot.relay.example"\nsecret = "s"\n'
    )
    result = run_cli("check-config", "relay.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok\n")
    assert "relay.example: built-in ping and disco#info" in result.stdout
    assert "bot.relay.example: XEP-0114 component" in result.stdout
    assert "components (XEP-0114): 127.0.0.1:5347" in result.stdout


def test_check_config_lists_every_problem(tmp_path):
    (tmp_path / "bad.toml").write_text(BAD)
    result = run_cli("check-config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert "3 problem(s)" in result.stdout
    for path in BAD_PATHS:
        assert re.search(rf"^  {re.escape(path)}: ", result.stdout, re.M), path


def test_serve_refuses_a_bad_file_with_the_same_problems(tmp_path):
    (tmp_path / "bad.toml").write_text(BAD)
    result = run_cli("serve", "--config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    checked = run_cli("check-config", "bad.toml", cwd=tmp_path)
    assert result.stderr == checked.stdout


def test_gen_cert_writes_a_self_signed_pair(tmp_path):
    assert main(["gen-cert", "Relay.Example", "--out", str(tmp_path / "out")]) == 0
    cred = load_credential(tmp_path / "out" / "relay.example.crt", tmp_path / "out" / "relay.example.key")
    assert cred.cert.issuer == cred.cert.subject
    assert "relay.example" in str(cred.cert.subject)
    assert main(["gen-cert", "bad..domain", "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()


def test_gen_cert_never_overwrites_a_key_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["gen-cert", "relay.example", "--out", str(out)]) == 0
    key = (out / "relay.example.key").read_bytes()
    assert main(["gen-cert", "relay.example", "--out", str(out)]) == 1
    assert "not overwriting a key without --force" in capsys.readouterr().err
    assert (out / "relay.example.key").read_bytes() == key
    assert main(["gen-cert", "relay.example", "--out", str(out), "--force"]) == 0
    assert (out / "relay.example.key").read_bytes() != key


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"xmpp-router {version('router')}"


def test_describe_tells_how_to_connect_a_component(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = describe(default_config())
    assert "echo.localhost: echo service" in text
    assert "sink.localhost: sink service" in text
    assert "s2s: 127.0.0.1:5269" in text
    assert "[[component]]" in text and "127.0.0.1:5347" in text
    config = parse_config(
        '[[component]]\ndomain = "bot.example"\nsecret = "x"\n[listen]\ncomponent = false\n'
        '[server]\ndialback_secret = "0123456789abcdef"\n[routes]\n"peer.example" = "127.0.0.1:5999"\n',
        tmp_path,
    )
    text = describe(config)
    assert "components (XEP-0114): off" in text and "connect a component" not in text
    assert "static route peer.example -> 127.0.0.1:5999" in text


def _scrape(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@contextmanager
def serving(tmp_path, config: str):
    """``python -m router serve`` on ``config`` (written to relay.toml); killed if the test did not stop it."""
    (tmp_path / "relay.toml").write_text(config)
    process = subprocess.Popen([sys.executable, "-m", "router", "serve", "--config", "relay.toml"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT)
        process.stdout.close()
        process.stderr.close()


def test_serve_runs_listens_and_stops_on_sigterm(tmp_path):
    with serving(tmp_path, '[server]\ndomains = ["localhost"]\n[tls]\nself_signed = true\n'
                           '[listen]\ns2s = "127.0.0.1:0"\ncomponent = "127.0.0.1:0"\nmetrics = "127.0.0.1:0"\n'
                 ) as process:
        listening = {}
        deadline = time.monotonic() + PROCESS_TIMEOUT
        for _ in range(50):  # a handful of banner lines
            line = process.stdout.readline()
            if not line or time.monotonic() > deadline:
                break
            match = re.match(r"(\S+): listening on (\S+):(\d+)", line)
            if match:
                listening[match[1]] = (match[2], int(match[3]))
            if line.startswith("serving domains:"):
                break
        assert {"s2s", "component", "metrics"} <= set(listening), listening
        body = _scrape(*listening["metrics"])
        assert body.startswith("HTTP/1.1 200 OK")
        assert "# TYPE xmpp_router_streams_open gauge" in body
        # the state directory was created next to the config, with the shared secret
        assert (tmp_path / "state" / "dialback_secret").is_file()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT) == 0


def write_tls_config(tmp_path, cert, key, domain="relay.example", extra=""):
    (tmp_path / "relay.toml").write_text(
        f'[server]\ndomains = ["{domain}"]\nstate_dir = "state"\n'
        f'[tls.certificates."{domain}"]\ncert = "{cert}"\nkey = "{key}"\n{extra}')


def test_check_config_loads_every_certificate_and_writes_nothing(tmp_path):
    """Broken PEM, a key of another certificate, an expired certificate and one
    that names another domain are each reported, in one pass; the state
    directory (dialback secret, self-signed certificates) is not created."""
    import datetime

    from router.trust.pki import make_leaf

    now = datetime.datetime.now(datetime.timezone.utc)
    good = make_leaf(None, "relay.example", srv_ids=["relay.example"]).write(tmp_path, "good")
    other = make_leaf(None, "relay.example", srv_ids=["relay.example"]).write(tmp_path, "other")
    expired = make_leaf(None, "relay.example", srv_ids=["relay.example"], not_before=now - datetime.timedelta(days=30),
                        not_after=now - datetime.timedelta(days=1)).write(tmp_path, "expired")
    wrong = make_leaf(None, "elsewhere.example", srv_ids=["elsewhere.example"]).write(tmp_path, "wrong")
    (tmp_path / "broken.crt").write_text("not a certificate\n")
    cases = {
        "is not a PEM certificate": (tmp_path / "broken.crt", good[1]),
        "is not the key of the certificate": (good[0], other[1]),
        "expired on": expired,
        "does not name relay.example": wrong,
    }
    for expected, (cert, key) in cases.items():
        write_tls_config(tmp_path, cert, key)
        result = run_cli("check-config", "relay.toml", cwd=tmp_path)
        assert result.returncode == 1 and expected in result.stdout, (expected, result.stdout)
    write_tls_config(tmp_path, *good, extra='[tls]\nself_signed = true\n[services]\necho = ["echo.relay.example"]\n')
    result = run_cli("check-config", "relay.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "relay.example: certificate valid for" in result.stdout
    assert "dialback secret: created in" in result.stdout
    assert "echo.relay.example: a self-signed certificate is created in" in result.stdout
    assert not (tmp_path / "state").exists()


def test_check_config_refuses_a_policy_that_cannot_work(tmp_path):
    (tmp_path / "relay.toml").write_text('[server]\ndomains = ["relay.example"]\n'
                                         '[tls]\nsystem_trust = false\n[policy]\nrequire_encryption = false\n'
                                         'secure_auth = true\n')
    result = run_cli("check-config", "relay.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert "policy.secure_auth: some domains must authenticate with a trusted certificate" in result.stdout
    (tmp_path / "relay.toml").write_text('[server]\ndomains = ["relay.example"]\n')
    result = run_cli("check-config", "relay.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert "policy.require_encryption: is true but no local domain has a certificate" in result.stdout


def test_json_log_lines_on_stderr(tmp_path):
    """log.format = "json": every log line on stderr is one JSON object."""
    import json

    with serving(tmp_path, '[server]\ndomains = ["localhost"]\n[tls]\nself_signed = true\n[log]\nformat = "json"\n'
                           '[listen]\ns2s = "127.0.0.1:0"\ncomponent = "127.0.0.1:0"\nmetrics = false\n') as process:
        records = []
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while time.monotonic() < deadline and not any(r["message"].startswith("listening component") for r in records):
            line = process.stderr.readline()
            assert line, "the relay exited"
            records.append(json.loads(line))
        assert {"time", "level", "logger", "message"} <= set(records[-1])
        assert any(r["logger"] == "router.server" and r["message"].startswith("listening s2s on 127.0.0.1:")
                   for r in records)
        while not process.stdout.readline().startswith("serving domains:"):  # the banner: signals are handled
            assert time.monotonic() < deadline
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT) == 0
        assert all(json.loads(line) for line in process.stderr.read().splitlines())


def test_serve_workers_overrides_the_file_and_more_than_one_needs_the_bus(tmp_path):
    """``serve --workers N``: N from 1 to MAX_WORKERS, and more than one worker without
    [cluster] nats is refused like a bad file (exit 2, the problem on stderr)."""
    (tmp_path / "relay.toml").write_text('[server]\ndomains = ["localhost"]\n[tls]\nself_signed = true\n')
    result = run_cli("serve", "--config", "relay.toml", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "--workers: 2 workers need cluster.nats" in result.stderr
    result = run_cli("serve", "--config", "relay.toml", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2 and "must be a number from 1 to 256" in result.stderr
    result = run_cli("serve", "--config", "relay.toml", "--worker", "0", cwd=tmp_path)  # not from a supervisor
    assert result.returncode == 2 and "--worker is for the processes a node's supervisor starts" in result.stderr


def test_a_workers_log_lines_say_which_worker():
    import json
    import logging

    from router.cli import WORKER_LOG_FORMAT, JsonLines

    record = logging.LogRecord("router.server", logging.INFO, __file__, 1, "configuration reloaded", None, None)
    assert json.loads(JsonLines(3).format(record))["worker"] == 3
    assert "worker" not in json.loads(JsonLines().format(record))
    text = logging.Formatter(WORKER_LOG_FORMAT.format(worker=3)).format(record)
    assert text.endswith(" INFO worker=3 router.server: configuration reloaded")
