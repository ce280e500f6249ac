"""Benchmark report: per-request CSV, summary JSON, markdown tables and PNG plots.

All numbers are computed here from the records and point statistics the runner saved; none
are typed in. TTFT statistics use successful requests only; errors are counted beside them.
Each point's requests are also split into users' first turns (cold: nothing of the
conversation could be cached) and returning turns, with their counts and TTFT apart.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from stackctl.bench.client import Record, percentile
from stackctl.bench.runner import (
    AvailabilityResult,
    PointResult,
    Warmup,
    load_results,
    load_warmups,
)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _profiles_in_order(items: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item.profile, None)
    return list(seen)


def turn_split(group: Sequence[Record]) -> dict[str, Any]:
    """First turns and returning turns of one point: how many (all requests), and TTFT mean and
    p50 of each (successful ones). Records saved before ``first_turn`` existed are in neither."""
    split: dict[str, Any] = {}
    for count, name, first in (
        ("first_turns", "first_turn", True),
        ("returning_turns", "returning", False),
    ):
        turns = [r for r in group if r.first_turn is first]
        ttfts = [r.ttft_s for r in turns if r.ok and r.ttft_s is not None]
        split[count] = len(turns)
        split[f"{name}_ttft_mean_s"] = _mean(ttfts)
        split[f"{name}_ttft_p50_s"] = percentile(ttfts, 50) if ttfts else None
    return split


def point_rows(records: Sequence[Record], points: Sequence[PointResult]) -> list[dict[str, Any]]:
    """One row per (profile, target QPS) with latency, throughput, pacing and cache figures."""
    by_point: dict[tuple[str, float], list[Record]] = defaultdict(list)
    for record in records:
        if record.phase == "measure":
            by_point[(record.profile, record.qps_target)].append(record)
    point_info = {(p.profile, p.qps_target): p for p in points}
    keys = set(by_point) | set(point_info)
    order = {name: i for i, name in enumerate(_profiles_in_order(list(records) + list(points)))}
    rows = []
    for profile, qps in sorted(keys, key=lambda k: (order.get(k[0], 0), k[1])):
        group = by_point.get((profile, qps), [])
        ok = [r for r in group if r.ok]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        itls = [r.itl_mean_s for r in ok if r.itl_mean_s is not None]
        output = sum(r.output_tokens or 0 for r in ok)
        pacing = point_info[(profile, qps)].pacing if (profile, qps) in point_info else {}
        cache = point_info[(profile, qps)].cache if (profile, qps) in point_info else {}
        elapsed = pacing.get("elapsed_s") or _span(group)
        prompt_with_cache = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
        rows.append(
            {
                "profile": profile,
                "qps_target": qps,
                "achieved_qps": pacing.get(
                    "achieved_qps", len(group) / elapsed if elapsed else None
                ),
                "requests": len(group),
                "ok": len(ok),
                "errors": len(group) - len(ok),
                "ttft_mean_s": _mean(ttfts),
                "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
                "ttft_p90_s": percentile(ttfts, 90) if ttfts else None,
                "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
                **turn_split(group),
                "itl_mean_s": _mean(itls),
                "e2e_mean_s": _mean([r.e2e_s for r in ok if r.e2e_s is not None]),
                "prompt_tokens_mean": _mean([r.prompt_tokens or r.prompt_tokens_sent for r in ok]),
                "output_tokens": output,
                "generation_tokens_per_s": output / elapsed if elapsed else None,
                "reported_cached_fraction": (
                    sum(r.cached_tokens or 0 for r in prompt_with_cache)
                    / sum(r.prompt_tokens or 0 for r in prompt_with_cache)
                    if prompt_with_cache
                    else None
                ),
                "gpu_hit_rate": cache.get("gpu_hit_rate"),
                "cpu_hit_rate": cache.get("cpu_hit_rate"),
                "busiest_engine_share": cache.get("busiest_engine_share"),
                "lag_p99_s": pacing.get("lag_p99_s"),
                "lag_max_s": pacing.get("lag_max_s"),
                "waited_for_idle_user": pacing.get("waited_for_idle_user"),
                "missed_arrivals": pacing.get("missed"),
                "loop_lag_max_s": pacing.get("loop_lag_max_s"),
                "elapsed_s": elapsed,
            }
        )
    return rows


def _span(group: Sequence[Record]) -> float | None:
    if not group:
        return None
    first = min(r.scheduled_s for r in group)
    last = max(r.start_s + (r.e2e_s or 0.0) for r in group)
    return last - first or None


def comparison_rows(
    rows: Sequence[dict[str, Any]], baseline: str | None = None
) -> tuple[str | None, list[dict]]:
    """Mean TTFT per QPS for each profile and the ratio baseline / profile (> 1: faster)."""
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    if baseline is None:
        baseline = "naive" if "naive" in profiles else (profiles[0] if profiles else None)
    elif baseline not in profiles:
        raise ValueError(
            f"baseline profile {baseline!r} has no results (profiles: {', '.join(profiles)})"
        )
    if baseline is None:  # no rows at all
        return None, []
    table: dict[float, dict[str, Any]] = {}
    for row in rows:
        table.setdefault(row["qps_target"], {"qps_target": row["qps_target"]})[row["profile"]] = (
            row["ttft_mean_s"]
        )
    out = []
    for qps in sorted(table):
        entry = table[qps]
        base = entry.get(baseline)
        for profile in profiles:
            if profile == baseline:
                continue
            value = entry.get(profile)
            entry[f"ratio {baseline}/{profile}"] = base / value if base and value else None
        out.append(entry)
    return baseline, out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(
    rows: Sequence[dict[str, Any]],
    baseline: str | None,
    comparison: Sequence[dict],
    availability: Sequence[AvailabilityResult] = (),
    title: str = "Benchmark report",
    warmups: Sequence[Warmup] = (),
) -> str:
    lines = [f"# {title}"]
    sweep = [
        "",
        "## Per profile and QPS",
        "",
        "TTFT in seconds over successful requests. Throughput: output tokens/s over the point "
        "(window + drain). Lag: how late the client sent requests (p99/max, s); "
        "waits: arrivals that found no idle user. Busiest: the busiest engine's prompt tokens "
        "over the engines' mean (1.00: balanced).",
        "",
        "| profile | QPS target | achieved | requests | errors | TTFT mean | p50 | p90 | p99 "
        "| gen tok/s | GPU hit | CPU hit | busiest | lag p99 | lag max | waits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if rows:  # an availability run alone has no sweep to tabulate
        lines += sweep
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['qps_target']:g} | {_fmt(r['achieved_qps'], 2)} | {r['requests']} "
            f"| {r['errors']} | {_fmt(r['ttft_mean_s'])} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p90_s'])} "
            f"| {_fmt(r['ttft_p99_s'])} | {_fmt(r['generation_tokens_per_s'], 1)} | {_pct(r['gpu_hit_rate'])} "
            f"| {_pct(r['cpu_hit_rate'])} | {_fmt(r.get('busiest_engine_share'), 2)} "
            f"| {_fmt(r['lag_p99_s'])} | {_fmt(r['lag_max_s'])} "
            f"| {_fmt(r['waited_for_idle_user'])} |"
        )
    if rows:
        lines += [
            "",
            "## First and returning turns",
            "",
            "A user's first turn is cold (nothing of its conversation can be cached); a returning "
            "turn extends a conversation the engines have seen. Counts of all requests, TTFT (s) "
            "of successful ones.",
            "",
            "| profile | QPS target | first turns | returning | first TTFT mean | p50 "
            "| returning TTFT mean | p50 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['profile']} | {r['qps_target']:g} | {r['first_turns']} | {r['returning_turns']} "
            f"| {_fmt(r['first_turn_ttft_mean_s'])} | {_fmt(r['first_turn_ttft_p50_s'])} "
            f"| {_fmt(r['returning_ttft_mean_s'])} | {_fmt(r['returning_ttft_p50_s'])} |"
            for r in rows
        ]
    if warmups:
        lines += ["", "## Warm-up", ""] + [f"- {w.describe()}" for w in warmups]
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    if len(profiles) > 1 and baseline:
        others = [p for p in profiles if p != baseline]
        lines += [
            "",
            f"## Mean TTFT (s) by QPS, ratio {baseline} / other (> 1: other is faster)",
            "",
            "| QPS | "
            + " | ".join(profiles)
            + " | "
            + " | ".join(f"{baseline}/{p}" for p in others)
            + " |",
            "|---:|" + "---:|" * (len(profiles) + len(others)),
        ]
        for entry in comparison:
            cells = [_fmt(entry.get(p)) for p in profiles]
            cells += [
                _fmt(entry.get(f"ratio {baseline}/{p}"), 2)
                + ("×" if entry.get(f"ratio {baseline}/{p}") else "")
                for p in others
            ]
            lines.append(f"| {entry['qps_target']:g} | " + " | ".join(cells) + " |")
    for result in availability:
        s = result.summary()
        lines += [
            "",
            f"## Availability: {result.profile} ({s['seconds']:g} s at {s['qps']:g} QPS)",
            "",
            f"- probes ok: {s['probes_ok']}/{s['probes']} ({_pct(s['success_rate'])}), "
            f"longest failure streak: {s['longest_failure_streak']} probe(s)",
            f"- probe latency p50 {_fmt(s['latency_p50_s'])} s, p99 {_fmt(s['latency_p99_s'])} s",
            f"- background requests ok: {s['background_ok']}/{s['background_requests']}; "
            f"errors before their first token: {s['background_errors_before_first_token']}, "
            f"after it: {s['background_errors_after_first_token']}",
        ]
        if s["kills"]:
            pids = [f["pid"] for f in s["faults"] if f.get("kind") == "kill"]
            lines.append(
                f"- engine processes killed: {s['kills']} "
                f"({len(set(pids))} distinct pids; each is an event below)"
            )
        lines += [f"- event at {e['t_s']:.1f} s: {e['label']}" for e in s["events"]]
    return "\n".join(lines) + "\n"


def write_requests_csv(path: Path, records: Sequence[Record]) -> Path:
    names = [f.name for f in fields(Record)]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for record in records:
            writer.writerow(record.to_dict())
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


PLOTS_MISSING = (
    "matplotlib is not installed, so the report will have no plots (the CSV, JSON and "
    "markdown table are written as usual); `pip install 'stackctl[bench]'` adds them."
)


def plots_available() -> bool:
    """matplotlib is optional (the ``bench`` extra): without it the report has everything but PNGs."""
    return importlib.util.find_spec("matplotlib") is not None


def write_report(
    out_dir: str | Path,
    records: Sequence[Record],
    point_metrics: Sequence[PointResult],
    availability: Sequence[AvailabilityResult] = (),
    baseline_profile: str | None = None,
    title: str = "stackctl benchmark: multi-round QA",
    warmups: Sequence[Warmup] = (),
) -> dict[str, Path]:
    """Write requests.csv, summary.json, summary.md and, with matplotlib, the plots; return their
    paths by name. ``warmups``: how each sweep's warm-up ended (summary.json's ``warmups``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = point_rows(records, point_metrics)
    baseline, comparison = comparison_rows(rows, baseline_profile)
    background = [r for a in availability for r in a.records]
    paths = {"requests_csv": write_requests_csv(out / "requests.csv", list(records) + background)}
    summary = {
        "baseline": baseline,
        "points": rows,
        "comparison": comparison,
        "point_metrics": [p.to_dict() for p in point_metrics],
        "availability": [a.summary() for a in availability],
        "warmups": [w.to_dict() for w in warmups],
    }
    paths["summary_json"] = out / "summary.json"
    paths["summary_json"].write_text(json.dumps(_json_safe(summary), indent=2), encoding="utf-8")
    paths["summary_md"] = out / "summary.md"
    paths["summary_md"].write_text(
        markdown(rows, baseline, comparison, availability, title, warmups), encoding="utf-8"
    )
    if not plots_available():
        return paths
    from stackctl.bench import plots  # matplotlib is imported only when a report is written

    if rows:
        paths["ttft_plot"] = plots.ttft_vs_qps(rows, out / "ttft_vs_qps.png")
        paths["throughput_plot"] = plots.throughput_vs_qps(rows, out / "throughput_vs_qps.png")
    for result in availability:
        name = f"availability_{result.profile}".replace("/", "_")
        paths[name] = plots.availability(result, out / f"{name}.png")
    return paths


def rebuild_report(
    out_dir: str | Path,
    baseline_profile: str | None = None,
    title: str = "stackctl benchmark: multi-round QA",
) -> dict[str, Path]:
    """Write the report from everything saved under ``out_dir/raw`` (all profiles so far)."""
    records, points, availability = load_results(out_dir)
    warmups = load_warmups(out_dir)
    return write_report(out_dir, records, points, availability, baseline_profile, title, warmups)
