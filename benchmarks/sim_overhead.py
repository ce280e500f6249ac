#!/usr/bin/env python3
"""How much the simulator's own overhead distorts the times it models.

Starts one simulator (pinned to one CPU core where the OS allows) and fires ``--concurrency``
streaming completions at it (their starts spread over ``--ramp-s`` seconds) from a client
pinned to another core. It compares what the client observes (mean TTFT and end-to-end)
with the ideal: the same requests, arriving when the client sent them, replayed on the
engine's virtual clock (the timing model with zero overhead). The simulator's own
histograms are shown too; they follow its step deadlines, so they drift from the ideal
only when it falls behind its timeline. Also reports the simulator's CPU use.

    python -m benchmarks.sim_overhead --concurrency 200 --prompt-tokens 256 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from stackctl.sim.config import parse_args
from stackctl.sim.engine import SimEngine, SimRequest
from stackctl.sim.timing import TimingModel
from stackctl.testing import read_metrics
from tests.helpers.sim_fleet import start_sim, stop_sim

SIM_FLAGS = ["--max-num-seqs", "256"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def histogram_sums(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as resp:
        totals = read_metrics(await resp.text()).totals()
    return {name: value for name, value in totals.items() if name.endswith(("_sum", "_count"))}


async def ping(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(f"{url}/health") as resp:
        await resp.read()


async def one_request(
    session, url, prompt, max_tokens, delay: float, t0: float
) -> tuple[float, float, int, float, float]:
    await asyncio.sleep(delay)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    ttft, events = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        headers = (
            time.perf_counter() - start
        )  # the simulator sends headers once it took the request
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                events += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return ttft, time.perf_counter() - start, events, headers, start - t0


def ideal_means(prompts: list[str], results: list[tuple], args) -> tuple[float, float]:
    """Mean TTFT and e2e (real seconds) of the same requests, arriving when the client sent
    them, on the engine's virtual clock: the timing model with zero overhead."""
    config = parse_args(
        ["--time-scale", str(args.time_scale), *SIM_FLAGS, *args.sim_args], environ={}
    )
    engine = SimEngine(config.engine_config(), TimingModel(config.hardware, config.model_profile))
    requests = [SimRequest(str(i), p.split(), args.max_tokens) for i, p in enumerate(prompts)]
    engine.replay([(r[4] * args.time_scale, req) for r, req in zip(results, requests, strict=True)])
    ttft = statistics.fmean(req.first_token_time - req.arrival for req in requests)
    e2e = statistics.fmean(req.finish_time - req.arrival for req in requests)
    return ttft / args.time_scale, e2e / args.time_scale


async def run(url: str, pid: int, args) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        # Open the connections first (keep-alive), as a router's pool would have them.
        await asyncio.gather(*(ping(session, url) for _ in range(args.concurrency)))
        before = await histogram_sums(session, url)
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        prompts = [
            " ".join(f"r{i}w{j}" for j in range(args.prompt_tokens))
            for i in range(args.concurrency)
        ]
        n, t0 = len(prompts), time.perf_counter()
        results = await asyncio.gather(
            *(
                one_request(session, url, p, args.max_tokens, args.ramp_s * i / n, t0)
                for i, p in enumerate(prompts)
            )
        )
        wall = time.perf_counter() - wall0
        cpu = cpu_seconds(pid) - cpu0
        after = await histogram_sums(session, url)
    n = len(results)

    def modelled_mean(name: str) -> float:
        count = after[f"{name}_count"] - before.get(f"{name}_count", 0)
        return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / count / args.time_scale

    ideal_ttft, ideal_e2e = ideal_means(prompts, results, args)
    observed_ttft = statistics.fmean(r[0] for r in results)
    observed_e2e = statistics.fmean(r[1] for r in results)
    model_ttft = modelled_mean("vllm:time_to_first_token_seconds")
    model_e2e = modelled_mean("vllm:e2e_request_latency_seconds")
    return {
        "concurrency": n,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "time_scale": args.time_scale,
        "ramp_s": args.ramp_s,
        "wall_s": round(wall, 2),
        "sim_cpu_s": round(cpu, 2),
        "sim_cpu_share_of_one_core": round(cpu / wall, 3),
        "sim_cpu_ms_per_request": round(cpu / n * 1000, 2),
        "sse_events": sum(r[2] for r in results),
        "mean_ttft_observed_s": round(observed_ttft, 4),
        "mean_ttft_ideal_s": round(ideal_ttft, 4),
        "mean_ttft_sim_metrics_s": round(model_ttft, 4),
        "ttft_distortion": round(observed_ttft / ideal_ttft - 1, 4),
        "mean_e2e_observed_s": round(observed_e2e, 4),
        "mean_e2e_ideal_s": round(ideal_e2e, 4),
        "mean_e2e_sim_metrics_s": round(model_e2e, 4),
        "e2e_distortion": round(observed_e2e / ideal_e2e - 1, 4),
        "max_e2e_observed_s": round(max(r[1] for r in results), 3),
        "mean_time_to_response_headers_s": round(statistics.fmean(r[3] for r in results), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument(
        "--ramp-s", type=float, default=1.0, help="spread the request starts over this many seconds"
    )
    parser.add_argument(
        "--sim-cpu", type=int, default=0, help="core to pin the simulator to (-1: no pinning)"
    )
    parser.add_argument(
        "--client-cpu", type=int, default=1, help="core to pin this client to (-1: no pinning)"
    )
    parser.add_argument("sim_args", nargs="*", help="extra simulator flags (after --)")
    args = parser.parse_args()
    sim = start_sim(time_scale=args.time_scale, extra_args=[*SIM_FLAGS, *args.sim_args])
    try:
        cores = os.sched_getaffinity(0)
        if args.sim_cpu in cores:
            os.sched_setaffinity(sim.proc.pid, {args.sim_cpu})
        if args.client_cpu in cores:
            os.sched_setaffinity(0, {args.client_cpu})
        result = asyncio.run(run(sim.url, sim.proc.pid, args))
    finally:
        stop_sim(sim, keep_log=True)
    behind = [line for line in sim.log_tail(10_000).splitlines() if "behind its timeline" in line]
    result["sim_timeline_resync_warnings"] = len(behind)
    sim.log_path.unlink(missing_ok=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
