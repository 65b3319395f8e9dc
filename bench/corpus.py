"""A deterministic, realistic server-to-server stream for the benchmarks.

Mix (by stanza count): ~55% chat messages of 250-400 bytes whose bodies carry
entities and non-ASCII text, ~25% presences with XEP-0115 caps, ~20% XEP-0199
pings, and 0.5% messages of 4-16 KiB carrying nested XHTML-IM.
"""

import random

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns:db='jabber:server:dialback' to='a.example' from='b.example' version='1.0' xml:lang='en'>"
)
FOOTER = b"</stream:stream>"

WORDS = [
    "hello", "world", "caf\u00e9", "na\u00efve", "\u00fcber", "\u4e2d\u6587", "\u043f\u0440\u0438\u0432\u0435\u0442",
    "\U0001f600", "&amp;", "&lt;3", "&gt;", "&quot;ok&quot;", "&apos;s", "&#233;t\u00e9", "fish", "chips", "meeting",
    "tomorrow", "link:", "https://example.org/a?b=1&amp;c=2", "\u00bfqu\u00e9?", "\u65e5\u672c\u8a9e",
]


def _words(rng, nbytes):
    out, size = [], 0
    while size < nbytes:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word.encode()) + 1
    return " ".join(out)


def _jid(rng, domain):
    return f"user{rng.randrange(10000)}@{domain}/res{rng.randrange(100)}"


def _chat(rng, i):
    head = (
        f"<message from='{_jid(rng, 'b.example')}' to='{_jid(rng, 'a.example')}' type='chat' id='m{i}'>"
        "<active xmlns='http://jabber.org/protocol/chatstates'/><body>"
    )
    tail = "</body><origin-id xmlns='urn:xmpp:sid:0' id='o%08d'/></message>" % i
    body = _words(rng, rng.randrange(250, 400) - len(head) - len(tail))
    return head + body + tail


def _presence(rng, i):
    return (
        f"<presence from='{_jid(rng, 'b.example')}' to='user{rng.randrange(10000)}@a.example' id='p{i}'>"
        f"<show>away</show><priority>{rng.randrange(-1, 50)}</priority>"
        "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://conversations.im'"
        f" ver='{rng.randbytes(20).hex()[:27]}='/></presence>"
    )


def _ping(rng, i):
    return f"<iq from='b.example' to='a.example' type='get' id='ping{i}'><ping xmlns='urn:xmpp:ping'/></iq>"


def _xhtml(rng, i):
    target = rng.randrange(4096, 16384)
    paragraphs = []
    size = 0
    while size < target:
        text = _words(rng, 200)
        para = (
            f"<p style='margin:0'><span style='font-weight:bold'>{text}</span>"
            f"<br/><em>{_words(rng, 60)}</em><a href='https://example.org/{i}'>link</a></p>"
        )
        paragraphs.append(para)
        size += len(para.encode()) * 2
    plain = _words(rng, size // 2)
    return (
        f"<message from='{_jid(rng, 'b.example')}' to='{_jid(rng, 'a.example')}' type='chat' id='x{i}'>"
        f"<body>{plain}</body><html xmlns='http://jabber.org/protocol/xhtml-im'>"
        f"<body xmlns='http://www.w3.org/1999/xhtml'>{''.join(paragraphs)}</body></html></message>"
    )


def make_stream(total_bytes=4 << 20, seed=6120):
    """Return ``(stream bytes, number of top-level stanzas)``; same seed, same bytes."""
    rng = random.Random(seed)
    parts, size, count = [HEADER], len(HEADER), 0
    while size < total_bytes:
        roll = rng.random()
        if roll < 0.005:
            stanza = _xhtml(rng, count)
        elif roll < 0.555:
            stanza = _chat(rng, count)
        elif roll < 0.805:
            stanza = _presence(rng, count)
        else:
            stanza = _ping(rng, count)
        data = stanza.encode()
        parts.append(data)
        size += len(data)
        count += 1
    parts.append(FOOTER)
    return b"".join(parts), count
