"""benchmarks/router_overhead.py's bookkeeping for the KV-events targets: each target is
compared with the run without a router on its own engines, the engines' usage chunks are
counted, and a simulator engine's cache is sized from the workload."""

from __future__ import annotations

import json

import pytest

from benchmarks import router_overhead as bench


def row(target: str, round_no: int, rps: float, ttft: float) -> dict:
    return {
        "target": target,
        "concurrency": 32,
        "round": round_no,
        "errors": 0,
        "rps": rps,
        "ttft_p50": ttft,
        "ttft_p99": ttft,
        "lat_p50": ttft,
        "lat_p99": ttft,
        "cpu_ms_per_req": None,
        "engine_cpu_ms_per_req": None,
        "peak_rss_mb": None,
        "prefix_hit": 0.5,
        "max_share": 1.0,
        "engine_cached": None,
    }


def test_simulator_targets_are_compared_with_direct_sim_and_the_rest_with_direct():
    rows = [
        row("direct", 0, 1000.0, 0.020),
        row("direct-sim", 0, 500.0, 0.040),
        row("ours-kv", 0, 900.0, 0.022),
        row("ours-kv-events", 0, 400.0, 0.045),
    ]
    by_target = {s["target"]: s for s in bench.summarize(rows)}
    assert by_target["ours-kv"]["vs_direct"] == pytest.approx(0.9)
    assert by_target["ours-kv"]["added_ttft_p50"] == pytest.approx(0.002)
    assert by_target["ours-kv-events"]["vs_direct"] == pytest.approx(0.8)
    assert by_target["ours-kv-events"]["added_ttft_p50"] == pytest.approx(0.005)
    # a baseline is shown as such, not compared with the other one
    assert "| direct-sim | 32 | 500 | 1.00 | 40.00 |" in bench.table(bench.summarize(rows))


@pytest.mark.parametrize(
    "usage",
    [
        # the simulator's (orjson, no spaces) and the standard library's default spacing
        b'{"usage":{"prompt_tokens":360,"total_tokens":368,"completion_tokens":8,'
        b'"prompt_tokens_details":{"cached_tokens":272}}}',
        b'{"usage": {"prompt_tokens": 360, "prompt_tokens_details": {"cached_tokens": 272}}}',
    ],
)
def test_usage_chunks_are_counted_while_recording(usage):
    stats = bench.Stats(cache_groups=24)
    stream = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: ' + usage + b"\n\n"
    stats.observe_usage(stream)  # warm-up: not recorded
    stats.recording = True
    stats.observe_usage(stream)
    stats.observe_usage(b'data: {"choices":[]}\n\ndata: [DONE]\n\n')  # no usage chunk
    assert (stats.prompt_tokens, stats.cached_tokens) == (360, 272)


def test_a_simulator_engine_holds_the_modelled_requests_plus_its_share_in_flight():
    # "<|system|>" + 30 words + "<|user|> b" + "<|assistant|>" = 34 tokens, + 8 answered:
    # 3 blocks of 16 a request
    body = {
        "max_tokens": 8,
        "messages": [
            {"role": "system", "content": " ".join(["a"] * 30)},
            {"role": "user", "content": "b"},
        ],
    }
    bodies = [(0, json.dumps(body).encode())] * 10
    assert bench.sim_gpu_blocks(bodies, cache_groups=24, concurrency=32, engines=4) == 3 * 32
    assert bench.sim_gpu_blocks(bodies, cache_groups=24, concurrency=30, engines=4) == 3 * 32
