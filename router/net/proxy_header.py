"""The PROXY protocol header a load balancer puts before a connection's data
(HAProxy's proxy-protocol.txt, version 1 text and version 2 binary), parsed sans-IO.

``ProxyHeaderParser.feed(data)`` takes bytes as they arrive and returns ``None``
while the header is incomplete, ``(header, rest)`` once it is complete (``rest``:
the bytes after it, the peer's own data), or raises ``ProxyHeaderError`` saying
what is wrong. It keeps at most what one header may hold: 107 bytes in version 1
(§2.1 "If the CRLF sequence is not found in the first 107 characters, the
receiver should declare the line invalid"), 16 + ``MAX_V2_LENGTH`` in version 2.
``wanted`` says how much may be read without reading past the header, for a
connection whose next bytes belong to someone else (a TLS ClientHello).
No I/O: ``router.net.s2s`` reads the socket.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V1_PREFIX = b"PROXY "  # §2.1: "PROXY", then "exactly one space"
V1_MAX_BYTES = 107  # §2.1: the worst case, "PROXY UNKNOWN" with IPv6 addresses, CRLF included
V1_MIN_BYTES = len(b"PROXY UNKNOWN\r\n")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2: "a constant 12 bytes block"
V2_FIXED_BYTES = 16  # signature, version and command, family and protocol, length
# §2.2 allows 65535 bytes of addresses and TLVs; a load balancer sends addresses and a few
# short TLVs (ALPN, authority, unique id, TLS facts): more is refused, not buffered.
MAX_V2_LENGTH = 4096
LOCAL, PROXY = 0x0, 0x1  # §2.2: the command, the low 4 bits of the 13th byte
TCP4, TCP6 = 0x11, 0x21  # §2.2: "TCP over IPv4", "TCP over IPv6"
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")  # §2.1: "Heading zeroes are not permitted"


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header; the text says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. ``source``: the client's address and port; None when the
    header carries none (v1 UNKNOWN, v2 LOCAL, or an address family other than TCP
    over IPv4/IPv6): then the connection's own address stands (§2.1, §2.2)."""

    version: int  # 1 (text) or 2 (binary)
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


class ProxyHeaderParser:
    """Reads one PROXY header from the start of a connection."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def wanted(self) -> int:
        """Bytes the header needs at least before it can be complete: a read of at
        most this many never takes bytes that follow the header."""
        buffer = self._buffer
        if not buffer:
            return V1_MIN_BYTES  # the shorter of the two versions
        if buffer[0] == V1_PREFIX[0]:  # a line ends with CRLF: at least its LF is still to come
            return max(V1_MIN_BYTES - len(buffer), 1 if buffer.endswith(b"\r") else 2)
        if len(buffer) < V2_FIXED_BYTES:
            return V2_FIXED_BYTES - len(buffer)
        return V2_FIXED_BYTES + int.from_bytes(buffer[14:16], "big") - len(buffer)

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; ``(header, rest)`` once the header is complete, else None."""
        buffer = self._buffer
        buffer += data
        if V2_SIGNATURE.startswith(buffer[: len(V2_SIGNATURE)]):  # an empty buffer too
            return self._v2() if len(buffer) >= V2_FIXED_BYTES else None
        if V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]):
            return self._v1() if len(buffer) >= len(V1_PREFIX) else None
        # §2.2: "otherwise the protocol is not covered by this specification and the
        # connection must be dropped"
        raise ProxyHeaderError(f"the connection does not start with a PROXY protocol header: "
                               f"{bytes(buffer[:16])!r}")

    # ------------------------------------------------------------------ version 1
    def _v1(self) -> tuple[ProxyHeader, bytes] | None:
        buffer = self._buffer
        window = buffer[:V1_MAX_BYTES]
        cr, lf = window.find(b"\r"), window.find(b"\n")
        # §2.1: "The receiver must not tolerate a single CR or LF character to end the line"
        if lf >= 0 and (cr < 0 or lf < cr):
            raise ProxyHeaderError("the PROXY line has a line feed without a carriage return before it")
        if cr < 0 or cr + 2 > V1_MAX_BYTES:  # no CR yet, or one whose LF would come too late
            if len(buffer) >= V1_MAX_BYTES:
                raise ProxyHeaderError(f"no CRLF within the first {V1_MAX_BYTES} bytes of the PROXY line")
            return None
        if cr + 1 == len(buffer):
            return None  # the LF is still to come
        if buffer[cr + 1] != 0x0A:
            raise ProxyHeaderError("the PROXY line has a carriage return without a line feed after it")
        line, rest = bytes(buffer[len(V1_PREFIX) : cr]), bytes(buffer[cr + 2 :])
        if not line.isascii():
            raise ProxyHeaderError("the PROXY line is not US-ASCII")
        fields = line.decode("ascii").split(" ")
        if fields[0] == "UNKNOWN":  # §2.1: "the receiver must ignore anything presented before the CRLF"
            return ProxyHeader(1, None, None), rest
        if fields[0] not in ("TCP4", "TCP6"):
            raise ProxyHeaderError(f"the PROXY line names the protocol {fields[0]!r} (TCP4, TCP6 or UNKNOWN)")
        if len(fields) != 5:
            raise ProxyHeaderError(f"the PROXY line has {len(fields) - 1} fields after {fields[0]} (4 expected, "
                                   f"one space apart)")
        family = ipaddress.IPv4Address if fields[0] == "TCP4" else ipaddress.IPv6Address
        source = _v1_address(family, fields[1], "source")
        destination = _v1_address(family, fields[2], "destination")
        return ProxyHeader(1, (source, _v1_port(fields[3])), (destination, _v1_port(fields[4]))), rest

    # ------------------------------------------------------------------ version 2
    def _v2(self) -> tuple[ProxyHeader, bytes] | None:
        buffer = self._buffer
        version, command = buffer[12] >> 4, buffer[12] & 0x0F
        if version != 2:  # §2.2: "it must always be sent as \x2 and the receiver must only accept this value"
            raise ProxyHeaderError(f"the binary PROXY header has version {version} (2 expected)")
        if command not in (LOCAL, PROXY):  # §2.2: "Receivers must drop connections presenting unexpected values"
            raise ProxyHeaderError(f"the binary PROXY header has the command {command:#x} (LOCAL 0x0 or PROXY 0x1)")
        length = int.from_bytes(buffer[14:16], "big")
        if length > MAX_V2_LENGTH:
            raise ProxyHeaderError(f"the binary PROXY header announces {length} bytes of addresses and TLVs "
                                   f"(at most {MAX_V2_LENGTH} accepted)")
        end = V2_FIXED_BYTES + length
        if len(buffer) < end:
            return None
        rest = bytes(buffer[end:])
        if command == LOCAL:  # §2.2: "must use the real connection endpoints and discard the protocol block"
            return ProxyHeader(2, None, None), rest
        family = buffer[13]
        if family >> 4 > 3 or family & 0x0F > 2:  # §2.2: other values "must be rejected as invalid"
            raise ProxyHeaderError(f"the binary PROXY header has the address family and protocol {family:#04x}")
        if family not in (TCP4, TCP6):
            # §2.2: a receiver "automatically falls back to the UNSPEC mode for the valid
            # combinations above that it does not support" (UDP, UNIX sockets, UNSPEC)
            return ProxyHeader(2, None, None), rest
        size = 4 if family == TCP4 else 16
        if length < 2 * size + 4:
            raise ProxyHeaderError(f"the binary PROXY header has {length} bytes of addresses, "
                                   f"TCP over IPv{4 if size == 4 else 6} needs {2 * size + 4}")
        block = bytes(buffer[V2_FIXED_BYTES:end])  # addresses, ports, then TLVs (skipped: §2.2 "may choose to skip")
        ports = 2 * size
        source = _source_ip(ipaddress.ip_address(block[:size]))
        destination = str(ipaddress.ip_address(block[size:ports]))
        return ProxyHeader(2, (source, int.from_bytes(block[ports : ports + 2], "big")),
                           (destination, int.from_bytes(block[ports + 2 : ports + 4], "big"))), rest


def _v1_address(family: type, text: str, which: str) -> str:
    """An address of the line's family (§2.1: IPv4 "exactly 4 integers", no heading zeroes)."""
    try:
        if "%" in text:  # a scope is no part of the canonical format
            raise ValueError(text)
        address = family(text)
    except ValueError:
        raise ProxyHeaderError(f"the PROXY line's {which} address {text!r} is not an IPv"
                               f"{4 if family is ipaddress.IPv4Address else 6} address") from None
    return _source_ip(address) if which == "source" else str(address)


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"the PROXY line's port {text!r} is not a decimal number 0..65535 "
                               f"without heading zeroes")
    return int(text)


def _source_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as connection limits count it: a dual-stack balancer's IPv4
    client (an IPv4-mapped IPv6 address) is that IPv4 address."""
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)
