"""Throughput and latency against the number of streams (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(series: dict[str, list[dict]], path: Path, title: str) -> Path:
    """`series`: label -> load points (results of runner.run_point) of one target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for label, points in series.items():
        points = [p for p in points if p.get("throughput")]
        if not points:
            continue
        streams = [p["config"]["streams"] for p in points]
        top.plot(streams, [p["throughput"]["delivered_per_s"] or p["throughput"].get("sent_per_s", 0) for p in points],
                 marker="o", label=label)
        bottom.plot(streams, [p["latency_ms"]["p50"] for p in points], marker="o", label=f"{label} p50")
        bottom.plot(streams, [p["latency_ms"]["p99"] for p in points], marker="x", linestyle="--", label=f"{label} p99")
    top.set_ylabel("delivered stanzas/s")
    top.set_title(title)
    top.grid(True, alpha=0.3)
    top.legend()
    bottom.set_ylabel("end-to-end latency (ms)")
    bottom.set_xlabel("concurrent S2S streams")
    bottom.set_xscale("log")
    bottom.set_yscale("log")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
