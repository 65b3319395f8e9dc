"""The NATS client protocol of the bus's data connection (router/cluster/natsproto.py):
each server operation read whole, byte by byte, and with trailing data; what is
not the server talking refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.cluster import natsproto
from router.cluster.natsproto import Info, Msg, NatsReader, Ok, Ping, Pong, ProtocolError, ServerError

NO_RESPONDERS = b"NATS/1.0 503\r\n\r\n"
WIRE = [
    (b'INFO {"server_id":"x","max_payload":1048576,"headers":true}\r\n',
     Info({"server_id": "x", "max_payload": 1048576, "headers": True})),
    (b"MSG r.member.n2.0 1 r.answer.n1.0.ab.7 12\r\nhello\r\nworld\r\n",
     Msg(1, "r.member.n2.0", "r.answer.n1.0.ab.7", b"hello\r\nworld")),
    (b"MSG r.answer.n1.0.ab.7 2 0\r\n\r\n", Msg(2, "r.answer.n1.0.ab.7", "", b"")),
    (b"HMSG r.answer.n1.0.ab.8 2 %d %d\r\n%s\r\n" % (len(NO_RESPONDERS), len(NO_RESPONDERS), NO_RESPONDERS),
     Msg(2, "r.answer.n1.0.ab.8", "", b"", 503)),
    (b"HMSG s 3 r 18 21\r\nNATS/1.0\r\nA: b\r\n\r\nabc\r\n", Msg(3, "s", "r", b"abc", None)),
    (b"PING\r\n", Ping()),
    (b"PONG\r\n", Pong()),
    (b"+OK\r\n", Ok()),
    (b"-ERR 'Authorization Violation'\r\n", ServerError("Authorization Violation")),
    (b"msg lower 4 2\r\nok\r\n", Msg(4, "lower", "", b"ok")),
]


def read(reader: NatsReader, data: bytes, size: int = 1 << 30) -> list:
    """``data`` read as the data connection reads: into the reader's own buffer
    (`get_buffer`, `buffer_updated`), at most ``size`` bytes per read."""
    events, view = [], memoryview(data)
    while view:
        room = reader.get_buffer(size)
        n = min(size, len(room), len(view))
        room[:n] = view[:n]
        del room
        events += reader.buffer_updated(n)
        view = view[n:]
    return events


@pytest.mark.parametrize("data, event", WIRE)
def test_each_operation_is_read_whole(data, event):
    assert read(NatsReader(), data) == [event]


def test_byte_by_byte_gives_the_same_events():
    reader, events = NatsReader(), []
    for byte in b"".join(data for data, _ in WIRE):
        events += read(reader, bytes([byte]))
    assert events == [event for _, event in WIRE]


def test_trailing_data_waits_for_the_rest_of_its_message():
    reader = NatsReader()
    assert read(reader, b"PING\r\nMSG s 1 10\r\n0123") == [Ping()]
    assert read(reader, b"45678") == []
    assert read(reader, b"9\r\nPO") == [Msg(1, "s", "", b"0123456789")]
    assert read(reader, b"NG\r\n") == [Pong()]


def test_a_payload_is_its_bytes_whatever_they_look_like():
    payload = b"MSG x 1 3\r\nPING\r\n-ERR\r\n"
    data = b"MSG s 1 %d\r\n%s\r\n" % (len(payload), payload)
    assert read(NatsReader(), data) == [Msg(1, "s", "", payload)]


@pytest.mark.parametrize("size", [1, 7, 4096, 100_003])
def test_reads_into_its_buffer_give_every_message_whole(size):
    """Many messages, more than the buffer holds, two of them big: the buffer is moved
    as reads need, and a big payload read in its own."""
    payloads = [bytes([65 + i % 26]) * (i % 2000) for i in range(600)]
    payloads[300:300] = [b"b" * natsproto.DIRECT_AT_LEAST, b"c" * 300_001]
    data = b"PING\r\n".join(b"MSG s %d %d\r\n%s\r\n" % (i, len(p), p) for i, p in enumerate(payloads)) + b"PONG\r\n"
    expected = [e for i, p in enumerate(payloads) for e in (Msg(i, "s", "", p), Ping())][:-1] + [Pong()]
    assert read(NatsReader(), data, size) == expected


def test_a_big_payload_is_read_straight_into_its_own_buffer_then_its_crlf():
    reader, size = NatsReader(), natsproto.DIRECT_AT_LEAST + 10
    assert read(reader, b"MSG s 1 %d\r\n" % size + b"x" * 10) == []
    room = reader.get_buffer(-1)
    assert len(room) == size - 10  # the read stops where the payload does
    room[:] = b"y" * (size - 10)
    [msg] = reader.buffer_updated(size - 10)
    assert msg == Msg(1, "s", "", b"x" * 10 + b"y" * (size - 10)) and msg.payload is room.obj
    del room
    assert read(reader, b"\r") == []
    assert read(reader, b"\nPING\r\n") == [Ping()]


def test_a_big_payload_not_followed_by_crlf_is_refused():
    reader, size = NatsReader(), natsproto.DIRECT_AT_LEAST
    read(reader, b"MSG s 1 %d\r\n" % size)
    assert len(read(reader, b"x" * size)) == 1
    with pytest.raises(ProtocolError, match="not followed by CRLF"):
        read(reader, b"PING\r\n")


def test_a_payload_is_its_own_copy_the_buffer_is_used_again():
    reader = NatsReader()
    first = read(reader, b"MSG s 1 5\r\nfirst\r\n")[0].payload
    read(reader, b"MSG s 1 5\r\nlater\r\n")
    assert type(first) is bytearray and first == b"first"


@pytest.mark.parametrize("data, why", [
    (b"HELLO\r\n", "unknown operation"),
    (b"MSG s 1\r\n", "malformed MSG"),
    (b"MSG s one 3\r\nabc\r\n", "malformed MSG"),
    (b"MSG s 1 -3\r\n", "malformed MSG"),
    (b"HMSG s 1 9 3\r\n", "malformed HMSG"),
    (b"MSG s 1 3\r\nabcd\r\n", "not followed by CRLF"),
    (b"INFO [1]\r\n", "not a JSON object"),
    (b"INFO {\r\n", "not JSON"),
    (b"MSG " + b"s" * natsproto.MAX_CONTROL_LINE, "control line longer"),
    (b"MSG " + b"s" * natsproto.MAX_CONTROL_LINE + b" 1 0\r\n\r\n", "control line longer"),
    (b"MSG s 1 %d\r\n" % (natsproto.MAX_PAYLOAD + 1), "over NATS's limit"),
    (b"MSG s\x80 1 0\r\n\r\n", "subject or reply is not UTF-8"),
    (b"HMSG s 1 r\xff 0 0\r\n\r\n", "subject or reply is not UTF-8"),
])
def test_what_a_server_does_not_send_is_refused(data, why):
    with pytest.raises(ProtocolError, match=why):
        read(NatsReader(), data)


WIRE_BYTES = b"".join(data for data, _ in WIRE)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(WIRE_BYTES) - 1), st.integers(0, 255), st.integers(1, 64), st.binary(max_size=40))
def test_any_byte_changed_gives_events_or_a_protocol_error(at, value, size, tail):
    """Whatever the server sends, the data connection gets events or a ProtocolError
    (and ends with its reason), never another exception out of the reader."""
    data = WIRE_BYTES[:at] + bytes([value]) + WIRE_BYTES[at + 1:] + tail
    try:
        read(NatsReader(), data, size)
    except ProtocolError:
        pass


def test_a_publish_is_chunks_around_the_payload_it_does_not_copy():
    payload = bytearray(b"<batch/>")
    chunks = natsproto.publish("r.member.n2.0", payload, "r.answer.n1.0.ab.9")
    assert chunks[1] is payload
    assert b"".join(chunks) == b"PUB r.member.n2.0 r.answer.n1.0.ab.9 8\r\n<batch/>\r\n"
    assert b"".join(natsproto.publish("r.answer.n1.0.ab.9", b"[]")) == b"PUB r.answer.n1.0.ab.9 2\r\n[]\r\n"


def test_connect_and_subscribe_are_one_line_each():
    line = natsproto.connect({"verbose": False, "headers": True, "name": "n1.0 data"})
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1
    assert json.loads(line[len(b"CONNECT "):]) == {"verbose": False, "headers": True, "name": "n1.0 data"}
    assert natsproto.subscribe("r.answer.n1.0.ab.*", 1) == b"SUB r.answer.n1.0.ab.* 1\r\n"
