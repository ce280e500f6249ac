"""Report computations (percentiles, per-point rows, ratios), metrics deltas and plot files."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from stackctl.bench.client import Record, StreamOutcome, fill_record, percentile
from stackctl.bench.metrics import cache_stats, parse_counters
from stackctl.bench.report import comparison_rows, point_rows, write_report
from stackctl.bench.runner import (
    AvailabilityResult,
    PointResult,
    Probe,
    SweepResult,
    load_results,
    save_sweep,
)


def record(
    profile="naive", qps=1.0, ttft=1.0, output=10, error=None, user=0, round_=1, phase="measure"
):
    return Record(
        profile=profile,
        qps_target=qps,
        phase=phase,
        user=user,
        round=round_,
        scheduled_s=0.0,
        start_s=0.0,
        start_time=0.0,
        launch_lag_s=0.0,
        waited_for_idle_user=False,
        max_tokens=10,
        prompt_tokens_sent=100,
        prompt_tokens=100,
        cached_tokens=50,
        output_tokens=output,
        ttft_s=None if error else ttft,
        e2e_s=ttft + 0.5,
        error=error,
        status=500 if error else 200,
    )


def point(profile, qps, elapsed=10.0, gpu=None):
    return PointResult(
        profile,
        qps,
        {
            "achieved_qps": qps,
            "elapsed_s": elapsed,
            "lag_p99_s": 0.001,
            "lag_max_s": 0.002,
            "waited_for_idle_user": 0,
            "missed": 0,
        },
        {"gpu_hit_rate": gpu, "cpu_hit_rate": None},
    )


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [random.Random(i).uniform(0, 10) for i in range(37)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_point_rows_statistics():
    records = [record(ttft=t) for t in (1.0, 2.0, 3.0, 4.0)] + [record(error="HTTP 500: boom")]
    records.append(record(phase="warmup", ttft=100.0))  # warm-up never counts
    rows = point_rows(records, [point("naive", 1.0, elapsed=8.0, gpu=0.75)])
    assert len(rows) == 1
    row = rows[0]
    assert row["requests"] == 5 and row["errors"] == 1 and row["ok"] == 4
    assert row["ttft_mean_s"] == pytest.approx(2.5)
    assert row["ttft_p50_s"] == pytest.approx(2.5)
    assert row["ttft_p90_s"] == pytest.approx(3.7)
    assert row["generation_tokens_per_s"] == pytest.approx(40 / 8.0)
    assert row["gpu_hit_rate"] == 0.75
    assert row["reported_cached_fraction"] == pytest.approx(0.5)


def test_comparison_ratio_naive_over_optimized():
    records = [record("naive", q, ttft=t) for q, t in ((1.0, 2.0), (2.0, 6.0))]
    records += [record("optimized", q, ttft=t) for q, t in ((1.0, 1.0), (2.0, 1.5))]
    rows = point_rows(records, [])
    baseline, table = comparison_rows(rows)
    assert baseline == "naive"
    assert [e["qps_target"] for e in table] == [1.0, 2.0]
    assert table[0]["ratio naive/optimized"] == pytest.approx(2.0)
    assert table[1]["ratio naive/optimized"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="nope"):
        comparison_rows(rows, "nope")


def test_fill_record_reads_usage_and_gaps():
    out = StreamOutcome(
        answer="a b",
        ttft_s=0.2,
        e2e_s=0.5,
        gaps=[0.1, 0.2, 0.3],
        content_chunks=4,
        usage={
            "prompt_tokens": 120,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 96},
        },
        status=200,
    )
    r = fill_record(record(), out)
    assert (r.prompt_tokens, r.cached_tokens, r.output_tokens) == (120, 96, 4)
    assert r.itl_mean_s == pytest.approx(0.2) and r.itl_max_s == pytest.approx(0.3)
    r2 = fill_record(
        record(), StreamOutcome(ttft_s=0.1, e2e_s=0.2, gaps=[], content_chunks=3, usage=None)
    )
    assert r2.output_tokens == 3 and r2.cached_tokens is None


METRICS = """# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {q}
vllm:prefix_cache_queries_created{{engine="0",model_name="m"}} 1.7e9
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {h}
vllm:external_prefix_cache_queries_total{{engine="0",model_name="m"}} {eq}
vllm:external_prefix_cache_hits_total{{engine="0",model_name="m"}} {eh}
vllm:generation_tokens_total{{engine="0",model_name="m"}} {g}
vllm:num_requests_running{{engine="0",model_name="m"}} 3
"""


def test_parse_counters_and_hit_rates():
    before = {
        "a": parse_counters(METRICS.format(q=100, h=10, eq=100, eh=0, g=5)),
        "b": parse_counters(METRICS.format(q=50, h=0, eq=0, eh=0, g=0)),
    }
    after = {
        "a": parse_counters(METRICS.format(q=1100, h=810, eq=1100, eh=200, g=105)),
        "b": parse_counters(METRICS.format(q=30, h=20, eq=0, eh=0, g=7)),  # restarted: reset
        "c": "ClientConnectorError: refused",
    }
    assert before["a"]["vllm:prefix_cache_queries_total"] == 100
    stats = cache_stats(before, after)
    assert stats.engines == 2
    assert stats.gpu_queries == 1000 + 30 and stats.gpu_hits == 800 + 20
    assert stats.gpu_hit_rate == pytest.approx(820 / 1030)
    assert stats.cpu_hit_rate == pytest.approx(200 / 1000)
    assert stats.generation_tokens == 100 + 7
    assert "c" in stats.errors
    # a: 1000 prompt tokens, b: 30 (after its reset): the busiest has 1000 of a fair 515
    assert stats.busiest_share == pytest.approx(1000 / 515)
    assert stats.summary()["busiest_engine_share"] == stats.busiest_share
    assert cache_stats({"a": before["a"]}, {"a": before["a"]}).busiest_share is None  # idle


def test_write_report_files(tmp_path):
    records = []
    for profile, scale in (("naive", 1.0), ("optimized", 0.4)):
        for qps in (0.5, 1.0, 2.0):
            records += [
                record(profile, qps, ttft=scale * qps * (1 + i / 10), user=i) for i in range(5)
            ]
    records.append(record("naive", 2.0, error="HTTP 503: no engine"))
    points = [point(p, q, gpu=0.5) for p in ("naive", "optimized") for q in (0.5, 1.0, 2.0)]
    availability = AvailabilityResult(
        "optimized",
        1.0,
        6.0,
        [
            Probe(float(t), t not in (2, 3), None if t in (2, 3) else 0.05 + t / 100, 200, None)
            for t in range(6)
        ],
        [record("optimized", 1.0, phase="background")],
        [(2.0, "stop engine gpu01-0")],
    )
    paths = write_report(tmp_path, records, points, [availability])
    for key in (
        "requests_csv",
        "summary_json",
        "summary_md",
        "ttft_plot",
        "throughput_plot",
        "availability_optimized",
    ):
        assert paths[key].exists(), key
    for key in ("ttft_plot", "throughput_plot", "availability_optimized"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with paths["requests_csv"].open() as handle:
        assert len(list(csv.DictReader(handle))) == len(records) + 1
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["baseline"] == "naive" and len(summary["points"]) == 6
    assert summary["availability"][0]["probes_ok"] == 4
    assert summary["availability"][0]["longest_failure_streak"] == 2
    md = paths["summary_md"].read_text()
    assert "| naive | 2 |" in md and "naive/optimized" in md and "2.50×" in md


def test_saved_sweeps_reload(tmp_path):
    sweep = SweepResult("naive", [record()], [point("naive", 1.0)])
    save_sweep(tmp_path, sweep)
    save_sweep(tmp_path, SweepResult("opt/1", [record("opt/1")], [point("opt/1", 1.0)]))
    records, points, availability = load_results(tmp_path)
    assert sorted(r.profile for r in records) == ["naive", "opt/1"]
    assert len(points) == 2 and availability == []


def test_without_matplotlib_the_report_has_everything_but_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    records = [record(p, 1.0, ttft=t) for p, t in (("naive", 1.0), ("optimized", 0.5))]
    paths = write_report(tmp_path, records, [point(p, 1.0) for p in ("naive", "optimized")])
    assert sorted(paths) == ["requests_csv", "summary_json", "summary_md"]
    assert "naive/optimized" in paths["summary_md"].read_text()
    assert not list(tmp_path.glob("*.png"))


def test_bench_says_plots_are_missing_before_it_deploys(tmp_path, monkeypatch):
    from stackctl import benchcmd
    from stackctl.errors import StackctlError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    said = []

    def up(*args, **kwargs):
        said.append("deploying")
        raise StackctlError("stop here")

    monkeypatch.setattr(benchcmd, "up", up)
    options = benchcmd.BenchOptions(
        inventory=Path(__file__).parents[2] / "inventory" / "local.yaml",
        profiles=["naive"],
        out_dir=tmp_path,
    )
    with pytest.raises(StackctlError):
        benchcmd.run_bench(options, lambda message: True, said.append)
    assert "matplotlib is not installed" in said[0] and "stackctl[bench]" in said[0]
    assert said.index("deploying") > 0
