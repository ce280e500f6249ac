"""PNG plots of a benchmark report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the backend must be chosen before pyplot is imported
import matplotlib.pyplot as plt

from stackctl.bench.runner import AvailabilityResult

_MARKERS = "osD^v<>ph*"


def _by_profile(
    rows: Sequence[dict[str, Any]], key: str
) -> dict[str, tuple[list[float], list[float]]]:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        if row.get(key) is None:
            continue
        xs, ys = series.setdefault(row["profile"], ([], []))
        xs.append(row["qps_target"])
        ys.append(row[key])
    return series


def _line_plot(rows, key: str, ylabel: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for i, (profile, (xs, ys)) in enumerate(_by_profile(rows, key).items()):
        pairs = sorted(zip(xs, ys, strict=True))
        ax.plot(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            marker=_MARKERS[i % len(_MARKERS)],
            linewidth=2,
            markersize=6,
            label=profile,
        )
    failed = [r for r in rows if r.get("errors")]
    if failed and key == "ttft_mean_s":
        ax.scatter(
            [r["qps_target"] for r in failed if r.get(key) is not None],
            [r[key] for r in failed if r.get(key) is not None],
            s=120,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label="point with errors",
        )
    ax.set_xlabel("QPS (target)", fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.35)
    ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ttft_vs_qps(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean TTFT against QPS, one line per profile (the form of production-stack's figure)."""
    return _line_plot(rows, "ttft_mean_s", "Mean TTFT (s)", "Mean time to first token vs QPS", path)


def throughput_vs_qps(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    return _line_plot(
        rows, "generation_tokens_per_s", "Output tokens / s", "Generation throughput vs QPS", path
    )


def availability(result: AvailabilityResult, path: Path) -> Path:
    """Probe latency over time (top) and probe success (bottom), with marked events."""
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(8, 5), dpi=120, gridspec_kw={"height_ratios": [3, 1]}
    )
    bad = [p for p in result.probes if not p.ok]
    # NaN for failed probes breaks the line, so an outage shows as a gap, not a straight segment
    latency_ms = [
        1000 * p.latency_s if p.ok and p.latency_s is not None else math.nan for p in result.probes
    ]
    top.plot(
        [p.t_s for p in result.probes],
        latency_ms,
        marker="o",
        markersize=3,
        linewidth=1,
        label="probe latency (ok)",
    )
    top.set_ylabel("Latency (ms)", fontsize=11)
    top.set_ylim(bottom=0)
    top.set_title(
        f"Availability of {result.profile}: probe latency and success, background {result.qps:g} QPS",
        fontsize=12,
    )
    top.grid(True, alpha=0.35)
    bottom.step(
        [p.t_s for p in result.probes],
        [1 if p.ok else 0 for p in result.probes],
        where="post",
        color="tab:green",
        linewidth=1.5,
    )
    if bad:
        bottom.scatter(
            [p.t_s for p in bad],
            [0] * len(bad),
            marker="x",
            color="red",
            label="failed probe",
            zorder=3,
        )
        bottom.legend(loc="center right", fontsize=9)
    bottom.set_yticks([0, 1], ["fail", "ok"])
    bottom.set_ylim(-0.3, 1.3)
    bottom.set_xlabel("Time since start (s)", fontsize=11)
    bottom.grid(True, alpha=0.35)
    for t, label in result.events:
        for ax in (top, bottom):
            ax.axvline(t, color="grey", linestyle="--", linewidth=1)
        top.annotate(  # along the line, so that events tens of seconds apart stay legible
            label,
            (t, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-2, -4),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="top",
            fontsize=7,
            color="dimgrey",
        )
    top.legend(loc="lower right", fontsize=9)  # event labels hang from the top
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
