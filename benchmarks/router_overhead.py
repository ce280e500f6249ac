"""Router overhead: closed-loop streaming chat load directly against 4 zero-cost fake engines
and through each router, side by side in one run.

    python -m benchmarks.router_overhead                 # all targets, concurrency 32 and 128
    python -m benchmarks.router_overhead --targets direct ours-kv --duration 5

Targets: ``direct`` (the client spreads requests over the engines itself), ``ours-rr`` and
``ours-kv`` (stackctl router, round_robin / kv_aware), ``ours-kv-aiohttp`` (kv_aware with
aiohttp's ClientSession as the upstream client instead of the lean one: the router run by
benchmarks/aiohttp_upstream.py), ``vllm-rr`` and ``vllm-cache``
(``vllm-router`` from PyPI, round_robin / cache_aware; skipped when not installed, pass
``--vllm-router PATH`` or put ``vllm-router`` on PATH).

Workload: each prompt is ~2 KB of chat: a system prompt picked from ``--groups`` shared
prefixes (75% of the characters) plus a unique user message (25%). Each engine is modelled as
holding at most ``--engine-cache-groups`` shared prefixes (LRU, tracked by the client from the
engine name each answer carries); "prefix hit" is the fraction of requests whose shared
prefix went to an engine that held it. With 64 groups and room for 24 per engine, a
cache-blind policy hits ~24/64 while a prefix-aware one can hit ~1.0.

The machine is noisy (shared hosts swing throughput by 20% from one 10 s window to the next),
so the whole list of targets is run ``--rounds`` times (default 3), each round measuring
``direct`` right before the routers; the table gives per target the median over rounds, and
"vs direct" / "+added" are medians of the per-round ratios and differences against that
round's ``direct`` (the range of the ratio in brackets).

Router CPU is utime+stime from /proc/PID/stat (the router and its children) over the
measured window divided by the requests completed; peak RSS is VmHWM. With ``--pin`` (the
default when the machine has 2+ cores) the router runs on core 0 and the engines and client
on core 1, so a router's CPU never slows the engines or the client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from stackctl.testing import free_ports, wait_until_async

ROOT = Path(__file__).resolve().parents[1]
*ENGINE_PORTS, ROUTER_PORT = free_ports(5)  # picked once per run, reused by every target
MODEL = "bench-model"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------------
def _taskset(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


def start_engines(core):
    procs = []
    for i, port in enumerate(ENGINE_PORTS):
        procs.append(
            subprocess.Popen(
                _taskset(core)
                + [
                    sys.executable,
                    "-m",
                    "tests.helpers.fake_engine",
                    "--port",
                    str(port),
                    "--name",
                    f"e{i}",
                    "--model",
                    MODEL,
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def write_our_config(policy: str, directory: str, options: dict | None = None) -> str:
    import yaml

    path = os.path.join(directory, f"router-{policy}.yaml")
    config = {
        "listen": {"host": "127.0.0.1", "port": ROUTER_PORT},
        "policy": policy,
        "engines": [
            {"name": f"e{i}", "url": f"http://127.0.0.1:{p}", "model": MODEL}
            for i, p in enumerate(ENGINE_PORTS)
        ],
        "health": {"interval_s": 2.0, "timeout_s": 2.0},
    }
    if options and policy == "kv_aware":
        config["policy_options"] = options
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def router_command(
    target: str, vllm_router: str | None, directory: str, kv_options: dict | None = None
) -> list[str] | None:
    if target.startswith("ours-"):
        policy = "round_robin" if target == "ours-rr" else "kv_aware"
        # ours-kv-aiohttp: the same router with aiohttp's ClientSession as upstream client
        module = "benchmarks.aiohttp_upstream" if target == "ours-kv-aiohttp" else "stackctl.router"
        return [
            sys.executable,
            "-m",
            module,
            "--config",
            write_our_config(policy, directory, kv_options),
            "--log-level",
            "WARNING",
        ]
    if target in ("vllm-rr", "vllm-cache"):
        if not vllm_router:
            return None
        policy = "round_robin" if target == "vllm-rr" else "cache_aware"
        return [
            vllm_router,
            "--host",
            "127.0.0.1",
            "--port",
            str(ROUTER_PORT),
            "--policy",
            policy,
            "--worker-urls",
            *[f"http://127.0.0.1:{p}" for p in ENGINE_PORTS],
        ]
    raise ValueError(target)


async def wait_ready(url: str, timeout: float = 60.0) -> None:
    async with aiohttp.ClientSession() as s:

        async def ok() -> bool:
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200

        await wait_until_async(
            ok, timeout, interval=0.2, what=url, ignore=(aiohttp.ClientError, TimeoutError)
        )


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# -- workload -------------------------------------------------------------------------------
def make_bodies(n: int, groups: int, seed: int = 7) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]

    def text(chars):
        out, size = [], 0
        while size < chars:
            w = rng.choice(vocab)
            out.append(w)
            size += len(w) + 1
        return " ".join(out)

    systems = [f"[group {g}] " + text(1536) for g in range(groups)]
    bodies = []
    for i in range(n):
        g = rng.randrange(groups)
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": 8,
            "messages": [
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": f"request {i}: " + text(500)},
            ],
        }
        bodies.append((g, json.dumps(body).encode()))
    return bodies


class Stats:
    def __init__(self, cache_groups: int):
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.errors = 0
        self.hits = self.lookups = 0
        self.cache_groups = cache_groups
        self.caches: dict[bytes, collections.OrderedDict] = collections.defaultdict(
            collections.OrderedDict
        )
        self.recording = False
        self.per_engine: collections.Counter = collections.Counter()

    def observe_prefix(self, engine: bytes, group: int) -> None:
        cache = self.caches[engine]
        hit = group in cache
        cache[group] = None
        cache.move_to_end(group)
        if len(cache) > self.cache_groups:
            cache.popitem(last=False)
        if self.recording:
            self.lookups += 1
            self.hits += hit
            self.per_engine[engine] += 1


MARK = b'"system_fingerprint": "'


async def closed_loop(
    urls: list[str],
    bodies,
    concurrency: int,
    warmup: float,
    duration: float,
    cache_groups: int,
    sample=lambda: 0.0,
):
    """Run the load; returns (stats, seconds measured, ``sample()`` delta over them)."""
    stats = Stats(cache_groups)
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Content-Type": "application/json"}
    counter = iter(range(10**12))
    loop = asyncio.get_running_loop()
    stop_at = [float("inf")]

    async def worker(session):
        while loop.time() < stop_at[0]:
            i = next(counter)
            group, body = bodies[i % len(bodies)]
            url = urls[i % len(urls)]
            start = loop.time()
            first = None
            engine = b"?"
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    async for chunk in resp.content.iter_any():
                        if first is None:
                            first = loop.time()
                            at = chunk.find(MARK)
                            if at >= 0:
                                end = chunk.find(b'"', at + len(MARK))
                                engine = chunk[at + len(MARK) : end]
                    ok = resp.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            end_t = loop.time()
            if not ok or first is None:
                stats.errors += stats.recording
                continue
            stats.observe_prefix(engine, group)
            if stats.recording:
                stats.ttft.append(first - start)
                stats.latency.append(end_t - start)

    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        stats.recording = True
        s0, t0 = sample(), loop.time()
        await asyncio.sleep(duration)
        stats.recording = False
        elapsed, s1 = loop.time() - t0, sample()
        stop_at[0] = 0
        await asyncio.gather(*tasks)
    return stats, elapsed, s1 - s0


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- driver ---------------------------------------------------------------------------------
async def run_target(target, args, bodies, directory):
    rows = []
    proc = None
    if target == "direct":
        urls = [f"http://127.0.0.1:{p}/v1/chat/completions" for p in ENGINE_PORTS]
    else:
        cmd = router_command(target, args.vllm_router, directory, args.kv_options)
        if cmd is None:
            print(f"skipping {target}: vllm-router not found", file=sys.stderr)
            return rows
        with open(
            os.path.join(directory, f"{target}.log"), "w"
        ) as log:  # the router keeps its own copy
            proc = subprocess.Popen(
                _taskset(args.router_core) + cmd,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        await wait_ready(f"http://127.0.0.1:{ROUTER_PORT}/health")
        urls = [f"http://127.0.0.1:{ROUTER_PORT}/v1/chat/completions"]
    try:
        for concurrency in args.concurrency:
            sample = (lambda: cpu_seconds(proc.pid)) if proc else (lambda: 0.0)
            stats, elapsed, cpu = await closed_loop(
                urls,
                bodies,
                concurrency,
                args.warmup,
                args.duration,
                args.engine_cache_groups,
                sample,
            )
            n = len(stats.latency)
            rows.append(
                {
                    "target": target,
                    "concurrency": concurrency,
                    "requests": n,
                    "errors": stats.errors,
                    "rps": n / elapsed,
                    "ttft_p50": pct(stats.ttft, 0.5),
                    "ttft_p99": pct(stats.ttft, 0.99),
                    "lat_p50": pct(stats.latency, 0.5),
                    "lat_p99": pct(stats.latency, 0.99),
                    "cpu_ms_per_req": cpu * 1000 / n if proc and n else None,
                    "peak_rss_mb": peak_rss_mb(proc.pid) if proc else None,
                    "prefix_hit": stats.hits / stats.lookups if stats.lookups else float("nan"),
                    "max_share": (
                        max(stats.per_engine.values()) * len(ENGINE_PORTS) / n
                        if n
                        else float("nan")
                    ),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        if proc:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rows


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarize(rows) -> list[dict]:
    """One row per (target, concurrency): medians over rounds; ratios against the same round's direct."""
    direct = {(r["round"], r["concurrency"]): r for r in rows if r["target"] == "direct"}
    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[(r["target"], r["concurrency"])].append(r)
    out = []
    for (target, conc), runs in groups.items():
        pairs = [(r, direct.get((r["round"], conc))) for r in runs]
        pairs = [(r, d) for r, d in pairs if d is not None]
        summary = {
            key: median([r[key] for r in runs])
            for key in (
                "rps",
                "ttft_p50",
                "ttft_p99",
                "lat_p50",
                "lat_p99",
                "cpu_ms_per_req",
                "peak_rss_mb",
                "prefix_hit",
                "max_share",
            )
        }
        ratios = [r["rps"] / d["rps"] for r, d in pairs]
        summary.update(
            target=target,
            concurrency=conc,
            rounds=len(runs),
            errors=sum(r["errors"] for r in runs),
            vs_direct=median(ratios),
            vs_direct_range=(min(ratios), max(ratios)) if ratios else None,
            added_ttft_p50=median([r["ttft_p50"] - d["ttft_p50"] for r, d in pairs]),
            added_lat_p50=median([r["lat_p50"] - d["lat_p50"] for r, d in pairs]),
        )
        out.append(summary)
    return out


def table(summaries) -> str:
    lines = [
        "| target | conc | req/s | vs direct [range] | TTFT p50 ms (added) | TTFT p99 ms | "
        "latency p50 ms (added) | latency p99 ms | router CPU ms/req | peak RSS MB | "
        "prefix hit | max engine share | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summaries:
        is_direct = r["target"] == "direct"
        lo, hi = r["vs_direct_range"] or (None, None)
        rel = "1.00" if is_direct else (f"{r['vs_direct']:.2f} [{lo:.2f}-{hi:.2f}]" if lo else "-")
        add_t = (
            ""
            if is_direct or r["added_ttft_p50"] is None
            else f" ({r['added_ttft_p50'] * 1000:+.2f})"
        )
        add_l = (
            ""
            if is_direct or r["added_lat_p50"] is None
            else f" ({r['added_lat_p50'] * 1000:+.2f})"
        )
        cpu = f"{r['cpu_ms_per_req']:.3f}" if r["cpu_ms_per_req"] is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['rps']:.0f} | {rel} | "
            f"{r['ttft_p50'] * 1000:.2f}{add_t} | {r['ttft_p99'] * 1000:.2f} | "
            f"{r['lat_p50'] * 1000:.2f}{add_l} | {r['lat_p99'] * 1000:.2f} | {cpu} | {rss} | "
            f"{r['prefix_hit']:.2f} | {r['max_share']:.2f} | {r['errors']} |"
        )
    return "\n".join(lines)


async def amain(args) -> int:
    if args.client_core is not None:
        os.sched_setaffinity(0, {args.client_core})
    bodies = make_bodies(4096, args.groups)
    engines = start_engines(args.client_core)
    rows = []
    try:
        for port in ENGINE_PORTS:
            await wait_ready(f"http://127.0.0.1:{port}/health")
        with tempfile.TemporaryDirectory() as directory:
            for round_no in range(args.rounds):
                for target in args.targets:
                    for row in await run_target(target, args, bodies, directory):
                        rows.append({**row, "round": round_no})
    finally:
        for p in engines:
            p.terminate()
        for p in engines:
            p.wait()
    summaries = summarize(rows)
    print(table(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summaries}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["direct", "ours-rr", "ours-kv", "ours-kv-aiohttp", "vllm-rr", "vllm-cache"],
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times the whole target list is run (medians are reported)",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--groups", type=int, default=64, help="shared system prompts")
    parser.add_argument(
        "--engine-cache-groups",
        type=int,
        default=24,
        help="shared prefixes one engine can hold (LRU) for the hit rate",
    )
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"))
    parser.add_argument(
        "--kv-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy_options for our kv_aware router, e.g. beta=0.5",
    )
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.kv_options = {
        k: float(v) if "." in v else int(v) for k, v in (o.split("=", 1) for o in args.kv_option)
    }
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    args.router_core, args.client_core = (0, 1) if pin else (None, None)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
