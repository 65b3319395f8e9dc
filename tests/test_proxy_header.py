"""The PROXY protocol parser (router.net.proxy_header): every example of HAProxy's
proxy-protocol.txt in versions 1 and 2, whole, byte by byte and with the peer's
data after them; LOCAL and UNKNOWN; what it refuses, and how much it keeps."""

from __future__ import annotations

import struct

import pytest

from router.net.proxy_header import (MAX_V2_LENGTH, V1_MAX_BYTES, V2_SIGNATURE, ProxyHeader, ProxyHeaderError,
                                     ProxyHeaderParser)

XMPP = b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' to='relay.test'>"
IPV6_MAX = ":".join(["ffff"] * 8)


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"", length: int | None = None) -> bytes:
    """A binary header: signature, version 2 and ``command``, ``family``, length, addresses, TLVs."""
    body = addresses + tlvs
    length = len(body) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", length) + body


def tcp4(source: str, destination: str, sport: int, dport: int) -> bytes:
    addresses = bytes(map(int, source.split("."))) + bytes(map(int, destination.split(".")))
    return addresses + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V6_SOURCE = bytes.fromhex("20010db8000000000000000000000001")
V6_DESTINATION = bytes.fromhex("20010db8000000000000000000000002")

VALID = {
    # §2.1's example, before an HTTP request
    "v1 tcp4": (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                ProxyHeader(1, ("192.168.0.1", 56324), ("192.168.0.11", 443))),
    # §2.1's longest lines
    "v1 tcp4 longest": (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
                        ProxyHeader(1, ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    "v1 tcp6 longest": (f"PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode(),
                        ProxyHeader(1, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))),
    "v1 tcp6 compressed": (b"PROXY TCP6 2001:DB8::1 2001:db8::2 0 5269\r\n",
                           ProxyHeader(1, ("2001:db8::1", 0), ("2001:db8::2", 5269))),
    "v1 tcp6 ipv4-mapped": (b"PROXY TCP6 ::ffff:203.0.113.7 ::1 40000 5269\r\n",
                            ProxyHeader(1, ("203.0.113.7", 40000), ("::1", 5269))),
    "v1 unknown short": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    "v1 unknown worst case": (f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode(),
                              ProxyHeader(1, None, None)),
    # the bytes HAProxy writes (seriousben/experiment-proxy-protocol's capture)
    "v2 tcp4": (bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050"),
                ProxyHeader(2, ("172.19.0.1", 42578), ("172.19.0.3", 80))),
    "v2 tcp6": (v2(0x1, 0x21, V6_SOURCE + V6_DESTINATION + struct.pack("!HH", 40000, 5269)),
                ProxyHeader(2, ("2001:db8::1", 40000), ("2001:db8::2", 5269))),
    "v2 tcp6 ipv4-mapped": (v2(0x1, 0x21, bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 9]) + V6_DESTINATION
                               + struct.pack("!HH", 1, 2)),
                            ProxyHeader(2, ("198.51.100.9", 1), ("2001:db8::2", 2))),
    "v2 tcp4 with TLVs": (v2(0x1, 0x11, tcp4("203.0.113.7", "10.0.0.5", 51000, 5269),
                             tlv(0x01, b"xmpp-server") + tlv(0x02, b"relay.test") + tlv(0x04, b"")
                             + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))),
                          ProxyHeader(2, ("203.0.113.7", 51000), ("10.0.0.5", 5269))),
    # §2.2: LOCAL: "use the real connection endpoints and discard the protocol block"
    "v2 local": (v2(0x0, 0x00, b""), ProxyHeader(2, None, None)),
    "v2 local with addresses": (v2(0x0, 0x11, tcp4("10.0.0.1", "10.0.0.2", 1, 2)), ProxyHeader(2, None, None)),
    "v2 local with an unknown family": (v2(0x0, 0xFF, b""), ProxyHeader(2, None, None)),
    # §2.2: what a receiver does not support falls back to UNSPEC: the connection's address
    "v2 unspec": (v2(0x1, 0x00, b""), ProxyHeader(2, None, None)),
    "v2 udp4": (v2(0x1, 0x12, tcp4("10.0.0.1", "10.0.0.2", 53, 53)), ProxyHeader(2, None, None)),
    "v2 unix stream": (v2(0x1, 0x31, b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")),
                       ProxyHeader(2, None, None)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_whole_header_parses_and_gives_back_what_follows(name):
    data, header = VALID[name]
    assert ProxyHeaderParser().feed(data) == (header, b"")
    assert ProxyHeaderParser().feed(data + XMPP) == (header, XMPP)


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_header_byte_by_byte_is_complete_at_its_last_byte(name):
    data, header = VALID[name]
    parser = ProxyHeaderParser()
    assert [parser.feed(data[i : i + 1]) for i in range(len(data) - 1)] == [None] * (len(data) - 1)
    assert parser.feed(data[-1:] + XMPP) == (header, XMPP)


@pytest.mark.parametrize("name", sorted(VALID))
def test_reading_what_it_wants_never_takes_a_byte_after_the_header(name):
    """A direct-TLS connection reads no more than ``wanted``: the ClientHello after
    the header stays in the socket for TLS."""
    data, header = VALID[name]
    parser, offset, result = ProxyHeaderParser(), 0, None
    for _ in range(len(data)):
        wanted = parser.wanted
        assert wanted >= 1
        result = parser.feed(data[offset : offset + wanted])
        offset += wanted
        if result is not None:
            break
    assert result == (header, b"") and offset == len(data)


def test_v1_header_with_the_peer_data_in_the_same_read_hands_all_of_it_on():
    stream = XMPP * 100  # more than the header may be, in one read
    header, rest = ProxyHeaderParser().feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 5269\r\n" + stream)
    assert header.source == ("203.0.113.7", 40000) and rest == stream


MALFORMED = {
    "xmpp without a header": (XMPP, "does not start with a PROXY protocol header"),
    "a TLS ClientHello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "does not start with a PROXY"),
    "lower case": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "does not start with a PROXY"),
    "two spaces after PROXY": (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "names the protocol ''"),
    "unknown protocol": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "names the protocol 'TCP5'"),
    "unknown glued": (b"PROXY UNKNOWNX\r\n", "names the protocol 'UNKNOWNX'"),
    "missing port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "3 fields after TCP4"),
    "trailing space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "5 fields after TCP4"),
    "two spaces between fields": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "5 fields after TCP4"),
    "ipv4 heading zero": (b"PROXY TCP4 192.168.000.1 5.6.7.8 1 2\r\n", "source address '192.168.000.1'"),
    "ipv4 three numbers": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address '1.2.3'"),
    "ipv4 over 255": (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "destination address '5.6.7.256'"),
    "ipv6 under TCP4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source address '::1' is not an IPv4"),
    "ipv4 under TCP6": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "destination address '5.6.7.8' is not an IPv6"),
    "ipv6 scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address 'fe80::1%eth0'"),
    "port heading zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "port '080'"),
    "port over 65535": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port '65536'"),
    "port sign": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port '+1'"),
    "not ascii": ("PROXY TCP4 1.2.3.4 5.6.7.8 1 ２\r\n".encode(), "not US-ASCII"),
    "bare LF": (b"PROXY UNKNOWN\n" + XMPP, "line feed without a carriage return"),
    "bare CR": (b"PROXY UNKNOWN\rX\r\n", "carriage return without a line feed"),
    "no CRLF in 107 bytes": (b"PROXY UNKNOWN " + b"x" * 100, "no CRLF within the first 107 bytes"),
    "CRLF one byte too late": (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF within the first 107 bytes"),
    "v2 version 1": (V2_SIGNATURE + b"\x11\x11\x00\x0c" + tcp4("1.2.3.4", "5.6.7.8", 1, 2), "version 1 (2 expected)"),
    "v2 command 2": (v2(0x2, 0x11, tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "command 0x2"),
    "v2 family 4": (v2(0x1, 0x41, tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "family and protocol 0x41"),
    "v2 protocol 3": (v2(0x1, 0x13, tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "family and protocol 0x13"),
    "v2 tcp4 block too short": (v2(0x1, 0x11, bytes(8)), "8 bytes of addresses, TCP over IPv4 needs 12"),
    "v2 tcp6 block too short": (v2(0x1, 0x21, bytes(12)), "12 bytes of addresses, TCP over IPv6 needs 36"),
    "v2 over the length cap": (v2(0x1, 0x11, b"", length=MAX_V2_LENGTH + 1), "announces 4097 bytes"),
    "v2 signature then garbage": (V2_SIGNATURE[:5] + b"X", "does not start with a PROXY"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_header_is_refused_with_a_text_saying_why(name):
    data, text = MALFORMED[name]
    with pytest.raises(ProxyHeaderError, match=text.replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")):
        ProxyHeaderParser().feed(data)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_header_fed_byte_by_byte_is_refused_no_later_than_whole(name):
    data, _ = MALFORMED[name]
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        for i in range(len(data)):
            parser.feed(data[i : i + 1])


def test_v1_keeps_at_most_107_bytes_waiting_for_its_crlf():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 15)) is None  # 106 bytes: CRLF may still come
    with pytest.raises(ProxyHeaderError, match="first 107 bytes"):
        parser.feed(b"x")
    # the longest line that fits: its CR is the 106th byte
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 16) + b"\r\n"
    assert len(longest) == V1_MAX_BYTES and ProxyHeaderParser().feed(longest)[0] == ProxyHeader(1, None, None)


def test_v2_refuses_an_oversize_length_before_reading_its_body():
    parser = ProxyHeaderParser()
    assert parser.feed(V2_SIGNATURE + b"\x21\x11") is None
    with pytest.raises(ProxyHeaderError, match=f"at most {MAX_V2_LENGTH}"):
        parser.feed(struct.pack("!H", 65535))  # nothing of the 65535 bytes was waited for
    largest = v2(0x1, 0x11, tcp4("1.2.3.4", "5.6.7.8", 1, 2), tlv(0x04, bytes(MAX_V2_LENGTH - 15)))
    assert ProxyHeaderParser().feed(largest)[0].source == ("1.2.3.4", 1)


def test_a_partial_header_is_incomplete_not_wrong():
    for data, _ in VALID.values():
        for cut in (1, 5, 12, 13, 15, len(data) - 1):
            if cut < len(data):
                assert ProxyHeaderParser().feed(data[:cut]) is None
