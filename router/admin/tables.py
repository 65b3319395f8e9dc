"""The control socket's answers as text for people: the tables and lines ``ctl``
prints (``--json`` prints the answers as they are instead)."""

from __future__ import annotations

import datetime
from typing import Any, Sequence

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in UNITS:
        if abs(count) < 1024 or unit == UNITS[-1]:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """Two most significant units: 42 -> "42s", 192 -> "3m12s", 90000 -> "1d1h"."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return "".join(f"{value}{unit}" for value, unit in parts[:2])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart."""
    cells = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


def expires_in(certificate: dict[str, Any], now: datetime.datetime | None = None) -> str:
    """How long a described peer certificate stays valid: "89d", or "expired"."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    left = (datetime.datetime.fromisoformat(certificate["not_after"]) - now).total_seconds()
    return duration(left) if left > 0 else "expired"


def totals_line(totals: dict[str, Any]) -> str:
    return (f"{totals['streams']} stream(s): s2s in {totals['s2s_in']}, out {totals['s2s_out']}, "
            f"components {totals['components']}; stanzas routed {totals['stanzas_routed']:.0f}, "
            f"bounced {totals['stanzas_bounced']:.0f}; queued {totals['queued_stanzas']}")


def _domains(names: Sequence[str]) -> str:
    return ",".join(names) or "-"


def streams(result: dict[str, Any]) -> str:
    rows = [[s["id"], s["kind"], s["direction"], _domains(s["remote_domains"]), _domains(s["local_domains"]),
             s["mechanism"] or "no", "yes" if s["bidi"] else "no", s["tls"]["version"] if s["tls"] else "-",
             expires_in(s["peer_certificate"]) if s.get("peer_certificate") else "-",
             duration(s["age"]), duration(s["idle"]), size(s["bytes_in"]), size(s["bytes_out"]),
             f"{s['stanzas_in']}/{s['stanzas_out']}", size(s["queue"]), s["peer"]] for s in result["streams"]]
    headers = ("ID", "KIND", "DIR", "REMOTE", "LOCAL", "AUTH", "BIDI", "TLS", "CERT", "AGE", "IDLE", "IN", "OUT",
               "STANZAS IN/OUT", "QUEUE", "PEER")
    return table(headers, rows) + "\n" + totals_line(result["totals"])


def stream(s: dict[str, Any]) -> str:
    """``ctl show``: one stream, a line per fact."""
    state = "closing" if s["closing"] else "authenticated" if s["authenticated"] else "negotiating"
    lines = [("stream", f"{s['id']}: {s['kind']} {s['direction']}, {state}"),
             ("peer", s["peer"]),
             ("local domains", _domains(s["local_domains"])),
             ("remote domains", _domains(s["remote_domains"])),
             ("authentication", s["mechanism"] or "none"),
             ("bidi (XEP-0288)", "yes" if s["bidi"] else "no")]
    for label, key, arrow in (("pairs in", "inbound_pairs", "<-"), ("pairs out", "outbound_pairs", "->")):
        if key in s:
            lines.append((label, ", ".join(f"{local} {arrow} {remote}" for local, remote in s[key]) or "-"))
    tls = s["tls"]
    lines.append(("tls", f"{tls['version']} {tls['cipher']} ({tls['bits']} bits)" if tls else "none"))
    cert = s.get("peer_certificate")
    if cert:
        lines.append(("peer certificate", f"{cert['subject']} (issuer {cert['issuer']})"))
        lines.append(("certificate expires", f"{cert['not_after']} (in {expires_in(cert)})"))
    lines += [("age", duration(s["age"])),
              ("idle", f"{duration(s['idle'])} since anything was received"),
              ("bytes in", f"{size(s['bytes_in'])} (since the last stream restart)"),
              ("bytes out", size(s["bytes_out"])),
              ("stanzas", f"{s['stanzas_in']} forwarded from it, {s['stanzas_out']} forwarded to it"),
              ("queue", size(s["queue"]) + (" (paused: above the write high-water mark)" if s["paused"] else ""))]
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in lines)


def queues(result: list[dict[str, Any]]) -> str:
    if not result:
        return "no stanza waiting and no remote domain in backoff"
    rows = [[q["domain"], q["queued"], duration(max((p["oldest"] for p in q["pairs"]), default=0)),
             q["failures"], duration(q["retry_in"]),
             ", ".join(f"{p['local']} ({p['queued']})" for p in q["pairs"]) or "-"] for q in result]
    return table(("DOMAIN", "QUEUED", "OLDEST", "FAILURES", "RETRY IN", "FROM (QUEUED)"), rows)


def closed(result: dict[str, Any], target: str) -> str:
    ids = result["closed"]
    if not ids:
        return f"no open stream of {target}"
    return f"closing {len(ids)} stream(s): {', '.join(map(str, ids))}"


def deny(result: dict[str, Any], pattern: str, added: bool) -> str:
    lines = [f"{pattern} {'denied' if added else 'no longer denied'} until the next reload or restart",
             f"deny entries now: {', '.join(result['deny']) or 'none'}"]
    if result.get("closed"):
        lines.append(f"closing {len(result['closed'])} stream(s): {', '.join(map(str, result['closed']))}")
    return "\n".join(lines)


def top(totals: dict[str, Any], rates: dict[str, float], rows: list[dict[str, Any]], title: str) -> str:
    """One screen of ``ctl top``: the relay's totals and rates, then the busiest streams."""
    header = [f"{title}  {totals_line(totals)}",
              f"stanzas {rates['stanzas_routed']:.1f}/s  bounced {rates['stanzas_bounced']:.1f}/s  "
              f"in {size(rates['bytes_in'])}/s  out {size(rates['bytes_out'])}/s", ""]
    body = table(("ID", "KIND", "DIR", "DOMAIN", "IN/s", "OUT/s", "QUEUE"),
                 [[r["id"], r["kind"], r["direction"], r["domain"], size(r["in_rate"]), size(r["out_rate"]),
                   size(r["queue"])] for r in rows])
    return "\n".join(header) + body
