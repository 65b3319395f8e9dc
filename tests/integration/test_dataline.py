"""The cluster bus's data connection (router/cluster/dataline.py) against a real
nats-server: each message to its subscription's handler, big ones whole, NATS's
no-responders status, a server that requires a user and password, one that requires TLS, and
a server that goes away."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlparse

import pytest

from router.cluster.dataline import LineError, open_line
from router.cluster.natsproto import DIRECT_AT_LEAST, Msg
from router.trust.pki import make_leaf

from . import natsd
from .conftest import arun, settled
from .natsd import nats_server

TIMEOUT = 5.0


def ignore(*_) -> None:
    """A handler or loss callback a test does not look at."""


async def round_trip(url: str, credentials: str | None = None) -> None:
    """A message to ourselves arrives once, on the subscription it was published to;
    big ones (read straight into their own buffers) whole and in order with small ones."""
    inbox, answers, lost = [], [], []
    line = await open_line(urlparse(url), credentials and urlparse(credentials), "t.0",
                           {"t.inbox": inbox.append, "t.answer.*": answers.append}, lost.append, TIMEOUT)
    line.publish("t.inbox", bytearray(b"<batch/>"), "t.answer.1")
    line.publish("t.answer.1", b"[[1,null]]")
    assert await settled(lambda: inbox and answers, TIMEOUT)
    assert inbox == [Msg(0, "t.inbox", "t.answer.1", b"<batch/>")]
    assert answers == [Msg(1, "t.answer.1", "", b"[[1,null]]")]
    big = [os.urandom(size) for size in (DIRECT_AT_LEAST - 1, DIRECT_AT_LEAST, 300_001)]
    for payload in big:
        line.publish("t.inbox", payload)
        line.publish("t.inbox", b"<small/>")
    assert await settled(lambda: len(inbox) == 1 + 2 * len(big), TIMEOUT)
    assert [m.payload for m in inbox[1:]] == [p for payload in big for p in (payload, b"<small/>")]
    line.close()
    await asyncio.sleep(0.1)
    assert lost == []  # our own close is not a loss


def test_a_message_reaches_its_subscription_once_and_no_responders_is_a_status(nats_url):
    async def scenario():
        await round_trip(nats_url)
        answers = []
        line = await open_line(urlparse(nats_url), None, "t.0", {"t.answer.*": answers.append}, ignore, TIMEOUT)
        line.publish("t.member.gone", b"<batch/>", "t.answer.7")  # no one subscribes to it
        assert await settled(lambda: answers, TIMEOUT)
        assert [(m.subject, m.status, m.payload) for m in answers] == [("t.answer.7", 503, b"")]
        line.close()

    arun(scenario())


def test_a_server_that_requires_a_user_gets_it_from_the_url_or_the_configured_one(tmp_path):
    with nats_server(tmp_path, options=("--user", "relay", "--pass", "s3cret")) as url:
        host = urlparse(url).netloc

        async def scenario():
            await round_trip(f"nats://relay:s3cret@{host}")
            await round_trip(url, credentials=f"nats://relay:s3cret@{host}")  # a server nats-py discovered
            with pytest.raises(LineError, match="NATS refused the connection: Authorization Violation"):
                await open_line(urlparse(f"nats://relay:wrong@{host}"), None, "t.0", {}, ignore, TIMEOUT)

        arun(scenario())


def test_tls_is_used_for_a_tls_url_and_checked_against_the_trusted_cas(tmp_path, pki, monkeypatch):
    cert, key = make_leaf(pki.ca, "localhost", dns_ids=["localhost"]).write(tmp_path, "nats")
    with nats_server(tmp_path, options=("--tls", "--tlscert", str(cert), "--tlskey", str(key))) as url:
        port = urlparse(url).port

        async def scenario():
            with pytest.raises(LineError, match="CERTIFICATE_VERIFY_FAILED"):  # our CA is not the system's
                await open_line(urlparse(f"tls://localhost:{port}"), None, "t.0", {}, ignore, TIMEOUT)
            monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_path))
            await round_trip(f"tls://localhost:{port}")
            await round_trip(f"nats://localhost:{port}")  # the server's INFO says TLS is required

        arun(scenario())


def test_a_server_that_goes_away_is_told_once(tmp_path):
    with nats_server(tmp_path) as url:
        async def scenario():
            lost = []
            await open_line(urlparse(url), None, "t.0", {"t.inbox": ignore}, lost.append, TIMEOUT)
            await asyncio.to_thread(natsd.stop, urlparse(url).port)
            assert await settled(lambda: lost, TIMEOUT)
            await asyncio.sleep(0.1)
            assert len(lost) == 1 and "the connection to NATS was lost" in lost[0]

        arun(scenario())
