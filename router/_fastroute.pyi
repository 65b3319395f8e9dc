"""The stanza router's hot path, compiled (see _fastroute.pyx): the per-read path of
an authenticated stream and the gathered writes of every stream."""

from typing import Any, Callable, Mapping

FLUSH_AT: int
COPY_AT_MOST: int  # a stanza up to this size is forwarded as a bytes copy, a larger one as a view

class Router:
    local_domains: frozenset[str]
    awaited_ids: set[str]  # ids of answers the relay waits for (XEP-0199 pings): they leave the compiled path
    # the cluster bus's routes: a component domain or a (from, to) pair -> (output profile, candidate Outboxes)
    bus_routes: dict[Any, tuple[Any, tuple[Outbox, ...]]] | None
    def __init__(self, local: dict[str, Any], remote: dict[Any, Any], slow_route: Callable[..., None],
                 domain_of: Callable[[str], str], recent: dict[str, str], closed_stages: tuple[Any, ...],
                 schedule: Callable[..., Any]) -> None: ...
    def stanzas_routed(self) -> Mapping[tuple[str], int]: ...
    def bytes_received(self) -> Mapping[tuple[str], int]: ...
    def bytes_sent(self) -> Mapping[tuple[str], int]: ...
    def take_batch(self, payload: bytes | bytearray, slow_take: Callable[[str, str, bytes], tuple[str, str] | None]
                   ) -> tuple[str, list[tuple[str, str] | None]]: ...
    def flush_writes(self) -> None: ...

class SentKeep:
    """XEP-0198's per-write keep of one stream (the base of router.net.acks.StreamAcks)."""
    stream: Any
    kept: list[bytes]
    ack_every: int
    max_unacked: int
    keeping: bool
    overflow_noted: bool
    requested_at: float | None
    waiting_since: float | None
    def __init__(self, stream: Any, ack_every: int, max_unacked: int) -> None: ...
    @property
    def pending(self) -> int: ...
    def drop(self, count: int) -> None: ...
    def take_all(self) -> list[bytes]: ...

class StreamCore:
    """The compiled base of router.net.stream.XmlStream: its per-read path's fields and methods."""
    relay: Any
    router: Router
    loop: Any
    transport: Any
    tokenizer: Any  # router._fastparse.Tokenizer
    session: Any
    inbound_pairs: tuple[Any, ...] | frozenset[Any] | None  # what the session lets through on the compiled path
    side_buffer: bytearray | None
    acks: SentKeep | None
    _unsent: list[Any] | None
    _unsent_bytes: int
    handed: int
    stanzas_in: int
    stanzas_out: int
    peer_max_bytes: int
    last_rx: float
    last_tx: float
    closing: bool
    paused: bool
    raw_xml: bool
    join_writes: bool
    link: int  # 0: S2S, 1: component
    def session_changed(self) -> None: ...  # the session's watch
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def forward(self, batches: dict[Any, list[Any]]) -> None: ...
    def write_chunks(self, chunks: list[Any]) -> None: ...  # stanzas: counted, kept by XEP-0198
    def write(self, data: bytes) -> None: ...  # not a stanza: not counted
    def flush(self) -> None: ...

class Outbox:
    member: str
    count: int
    def __init__(self, sender: str, member: str, due: Callable[[Outbox], None], max_bytes: int) -> None: ...
    def put(self, item: tuple[Any, ...]) -> None: ...
    def take(self) -> list[tuple[bytearray, int]]: ...

def pick_index(sender: str, n: int) -> int: ...
def decode_batch(payload: bytes | bytearray) -> tuple[str, list[tuple[str, str, bytes]]]: ...
