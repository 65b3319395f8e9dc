"""Every default of the configuration, named, with the reason for its value."""

from __future__ import annotations

from router.trust import policy as policy_module

# The embedded default serves only this domain: it needs no DNS and no real
# certificate, and every XMPP server resolves it to loopback.
DEFAULT_DOMAIN = "localhost"
# Relative to the working directory, so `make run` keeps its key material
# beside the checkout and reuses it on the next run.
DEFAULT_STATE_DIR = "state"
# Name of the generated dialback secret inside the state directory; a file (not
# a random value per process) so every worker on the machine shares it: any process that
# may answer a db:verify must know the secret (XEP-0220 §1.3).
DIALBACK_SECRET_FILENAME = "dialback_secret"
# 32 random bytes (hex) = 256 bits, the HMAC-SHA256 key size of XEP-0185.
DIALBACK_SECRET_BYTES = 32
# Generated self-signed certificates live here, one `<domain>.crt/.key` pair each.
CERT_SUBDIR = "certs"

# IANA port for xmpp-server (RFC 6120 §3.2.2); loopback so a default start
# never exposes the relay to the network by accident.
DEFAULT_S2S_LISTEN = "127.0.0.1:5269"
# XEP-0114's customary component port (Prosody, ejabberd); loopback because the
# component handshake is a plain shared secret without TLS.
DEFAULT_COMPONENT_LISTEN = "127.0.0.1:5347"
# Prometheus exporter port range (9100-9999); loopback, scrape locally or proxy.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9105"
# XEP-0368 suggests 5270 for xmpps-server; off unless configured.
DEFAULT_S2S_DIRECT_TLS_LISTEN = None
# The control socket of `python -m router ctl`, inside the state directory: a Unix
# socket (mode 0600) so only the relay's own user can list and close streams.
DEFAULT_CONTROL_SOCKET = "control.sock"

# Offer STARTTLS but accept dialback over plain TCP too: the embedded default
# talks to self-signed local peers; production configs set required = true.
DEFAULT_TLS_REQUIRED = False
# Use the system CA store in addition to configured trust anchors, so real
# peers with public certificates authenticate via SASL EXTERNAL.
DEFAULT_TLS_SYSTEM_TRUST = True
# Only the embedded default creates certificates by itself; a config file
# names its certificates so a missing one is an error, not a silent fallback.
DEFAULT_TLS_SELF_SIGNED = False

BIDI_MODES = ("encrypted", "always", "off")
# XEP-0288 saves one TCP connection per peer; only over TLS by default because
# XEP-0288 §2.1 requires STARTTLS to complete first when TLS is used.
DEFAULT_BIDI = "encrypted"
# XEP-0192 <required/> on every feature that is mandatory at that stage: the
# project's brief (seed XEP-0192), so on by default; Prosody 0.12 and ejabberd
# 23.01 ignore unknown feature children. Turn off for a peer that chokes on them
# (RFC 6120 itself defines <required/> only inside <starttls/>, which stays).
DEFAULT_REQUIRED_FLAGS = True
# TCP connect to one address; RFC 6120 gives no number, 10 s tolerates slow
# links while moving on to the next SRV target quickly.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Close an idle S2S stream after this long without traffic; RFC 6120 §4.6.3
# asks to be liberal, Prosody and ejabberd use about 10 minutes.
DEFAULT_IDLE_TIMEOUT = 600.0
# Whitespace keepalive interval; checks "not more than once every 5 minutes"
# (RFC 6120 §4.6.4), so 300 s.
DEFAULT_KEEPALIVE_INTERVAL = 300.0
# TCP keepalive on S2S sockets: probes after 2 minutes of silence, then 3 probes 10 s
# apart, so a peer that vanished (a NAT that forgot the connection, a host gone) is
# found in under 3 minutes even on a stream where neither side writes.
DEFAULT_TCP_KEEPALIVE = 120.0
# RFC 8305 §5 "Connection Attempt Delay": 250 ms between starting connection
# attempts to the next address of a target (IPv6 and IPv4 interleaved), as Prosody 13.
DEFAULT_HAPPY_EYEBALLS_DELAY = 0.25
# Addresses never connected to when DNS names them (a remote domain's DNS is the
# remote's to write: without this, anyone could make the relay open connections into
# its own network). Loopback, private, link-local, shared, documentation, benchmarking,
# multicast and reserved ranges: Synapse's ip_range_blacklist default, with 0.0.0.0/8,
# 240.0.0.0/4 and the IPv6 forms that carry an IPv4 address (IPv4-compatible, IPv4-mapped,
# 6to4) added. [routes] are not checked.
DEFAULT_CONNECT_BLOCKLIST = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::1/128", "::ffff:0:0/96", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10",
    "ff00::/8",
)
# XEP-0198 on S2S, acks without resumption (Prosody 13's smacks_enabled_s2s, on by
# default): stanzas a dead stream sent and the peer never acknowledged are re-sent
# on a new stream or bounced, never lost silently.
DEFAULT_STREAM_MANAGEMENT = True
# What a dead stream sent and its peer never acknowledged is re-sent on another stream
# (it may then arrive twice, when only the ack was lost); false bounces it instead, as
# Prosody does by default (smacks_s2s_resend = false): then it may be bounced yet delivered.
DEFAULT_SM_RESEND = True
# Ask for an ack after this many unacknowledged stanzas: a few round trips' worth at
# full speed, so the re-send buffer of a busy stream stays small.
DEFAULT_SM_ACK_EVERY = 500
# ... and at most this long after the first unacknowledged stanza.
DEFAULT_SM_ACK_INTERVAL = 5.0
# An ack request unanswered this long means the peer is gone: the stream is closed.
DEFAULT_SM_ACK_TIMEOUT = 60.0
# Unacknowledged stanzas kept for re-sending, per stream; a peer that lets more pile up
# (it reads but does not ack) only hurts itself: its stream is closed.
DEFAULT_SM_MAX_UNACKED = 10000
# XEP-0478: advertise our stanza size limit and idle timeout, obey the peer's.
DEFAULT_ADVERTISE_LIMITS = True
# XEP-0199: ping an authenticated stream idle this long (0: off) ...
DEFAULT_PING_INTERVAL = 120.0
# ... and close it as dead when the pong has not come in this long.
DEFAULT_PING_TIMEOUT = 60.0
# Bound on the time a stream may stay unauthenticated (RFC 6120 §4.6.3: closing on a
# local timeout policy; Prosody's connect timeout is 60 s).
DEFAULT_NEGOTIATION_TIMEOUT = 60.0
# After sending </stream:stream>, wait this long for the peer's close (RFC 6120 §4.4).
DEFAULT_CLOSE_TIMEOUT = 10.0
# Stanzas held per remote domain while its outbound stream is negotiated;
# bounded so a dead peer cannot eat memory (bounced beyond this).
DEFAULT_QUEUE_MAX_STANZAS = 1000
# Queued stanzas older than this are bounced with <remote-server-timeout/>.
DEFAULT_QUEUE_MAX_AGE = 60.0
# Remote domain pairs waiting for a stream at once: each is a DNS look-up and a
# connection attempt; far above any component's legitimate fan-out, low enough
# that a gateway tricked into addressing every domain cannot exhaust the relay.
DEFAULT_MAX_OUTBOUND_QUEUES = 10000
# Reconnect back-off: RFC 6120 §3.3 asks for a random wait and exponential
# back-off; start at 1 s, cap at 60 s (the RFC's 0-60 s window).
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_MAX = 60.0
# Transport write buffer marks: stop reading from the sources feeding a stream
# above the high mark, resume below the low mark (asyncio defaults are 64 KiB).
DEFAULT_WRITE_HIGH_WATER = 1024 * 1024
DEFAULT_WRITE_LOW_WATER = 256 * 1024
# Bytes one stream may have waiting to be written (transport buffer plus the
# iteration's queue): four high-water marks leave room for bursts of the largest
# stanzas; past it the destination is not slow but not reading, and stanzas to
# it bounce with <resource-constraint/> instead of queueing.
DEFAULT_WRITE_QUEUE_MAX = 4 * 1024 * 1024
# A stream that stays above its high-water mark this long after hitting its
# queue limit is closed with <resource-constraint/>: between ejabberd's
# send_timeout (15 s) and Prosody's (180 s, net.server_epoll).
DEFAULT_WRITE_STALL_TIMEOUT = 60.0

# [limits]: work a peer can start before it has proven anything.
# Inbound S2S connections at once; above the 10,000 idle streams the relay is
# benchmarked with, and lowered at start to what the process's file-descriptor
# limit allows (so the relay refuses with a stream error, never by failing accept()).
DEFAULT_MAX_CONNECTIONS = 16384
# Per remote IP: a server hosting many domains without multiplexing opens one
# stream per domain pair (ejabberd's max_s2s_connections_number is 1 per pair),
# so a few hundred; one address cannot take every slot.
DEFAULT_MAX_CONNECTIONS_PER_IP = 256
# Streams not yet authenticated, overall: each costs a TLS handshake and a
# negotiation; legitimate ones finish in well under negotiation_timeout.
DEFAULT_MAX_PRE_AUTH_CONNECTIONS = 1000
# Dialback verifications in flight (each a DNS look-up and possibly an outbound
# connection), overall, per remote IP and per stream. A peer multiplexing many
# domains over one stream asks for a few at once, not thousands.
DEFAULT_MAX_PENDING_VERIFICATIONS = 1000
DEFAULT_MAX_PENDING_VERIFICATIONS_PER_IP = 64
DEFAULT_MAX_PENDING_VERIFICATIONS_PER_STREAM = 16
# Domain pairs one stream may carry from its peer (each dialback-verified): a server
# multiplexing its virtual hosts (XEP-0288, XEP-0220 piggybacking) brings a few, a
# hostile one with a wildcard zone and its own authoritative server could bring any
# number, each an entry of the route table.
DEFAULT_MAX_PAIRS_PER_STREAM = 1000
# Verify-only connections open at once to one authoritative server address;
# more verifications wait for a free one.
DEFAULT_MAX_VERIFY_CONNECTIONS_PER_TARGET = 4

# DANE (RFC 7673) needs DNSSEC-validated answers (the AD flag of a validating
# resolver the relay trusts, usually on loopback): off unless the operator says so.
DEFAULT_DANE = False
# PROXY protocol (HAProxy v1/v2) is opt-in per listener; only these sources may send
# the header (the load balancer), anyone else is refused.
DEFAULT_PROXY_TRUSTED = ("127.0.0.0/8", "::1/128")

# RFC 6120 §13.12: a stanza size limit MUST NOT be below 10000 bytes.
MIN_STANZA_BYTES = 10000
# 512 KiB, as Prosody (router.trust.policy's default, the tokenizer's too).
DEFAULT_MAX_STANZA_BYTES = policy_module.DEFAULT_MAX_STANZA_BYTES
# Before authentication a peer sends only small negotiation elements (router.trust.policy's default).
DEFAULT_PRE_AUTH_MAX_STANZA_BYTES = policy_module.DEFAULT_PRE_AUTH_MAX_STANZA_BYTES
# RFC 7590 and Prosody's default: no authentication over plain TCP. Self-signed
# peers still federate: dialback runs fine inside an unverified TLS session.
DEFAULT_REQUIRE_ENCRYPTION = True
# Accept dialback when the certificate does not verify (XEP-0344 style); true
# demands SASL EXTERNAL with a valid certificate from every peer.
DEFAULT_SECURE_AUTH = False
AUTH_MODES = (policy_module.AUTH_SECURE, policy_module.AUTH_DIALBACK)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"
# Raw XML per stream is a debugging aid that leaks message contents; off.
DEFAULT_LOG_RAW_XML = False
# Text lines read well on a terminal and in journald; "json" is one object per
# line for log shippers (Loki, Elasticsearch, Vector).
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"

# Built-in service subdomains of the embedded default.
DEFAULT_ECHO_DOMAIN = "echo.localhost"
DEFAULT_SINK_DOMAIN = "sink.localhost"



# [cluster]: one process, no bus, unless asked (the embedded default stays one process)
DEFAULT_WORKERS = 1
MAX_WORKERS = 256
DEFAULT_SUBJECT_PREFIX = "xmpp-router"
DEFAULT_STREAMS_PER_DOMAIN = 1  # one stream per remote domain and node keeps its stanzas in order
DEFAULT_BUS_TIMEOUT = 5.0  # a worker that has not answered in 5 s is gone or stuck: bounce, do not wait
DEFAULT_MAX_BUS_IN_FLIGHT = 10000  # about 4 MiB of stanzas awaiting an answer, per worker
