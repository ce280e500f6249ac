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

KV events (issue 14), opt-in: ``direct-sim``, ``ours-kv-sim`` (kv_aware, ``kv_index: estimate``)
and ``ours-kv-events`` (kv_aware, ``kv_index: events``) run against 4 simulator engines
(``python -m stackctl.sim``, a fast profile at ``--sim-time-scale`` so modelled time is near
zero) that publish vLLM-format KV events on ipc:// sockets, as a local fleet `up` deployed
with ``kv_index: events`` does; only the events router subscribes, and both routers tokenize
with the simulator's tokenizer (no ``tokenizer_dir``, as `up` renders it for a sim fleet).
Each row (target and concurrency) gets 4 fresh engines and router (empty caches, event seq
from 0), so both routers start from identical engines; the engines' caches hold
``--engine-cache-groups`` whole requests plus those the row's concurrency keeps in flight on
one engine (``--sim-gpu-blocks`` overrides), so they evict about as the modelled LRU does.
Their "vs direct" and "added" are against ``direct-sim`` (the same engines without a router;
added before them when not listed), not ``direct``:

    python -m benchmarks.router_overhead --targets direct-sim ours-kv-sim ours-kv-events

Two columns come with them: "engine cached" (the cached prompt tokens the engines report in
``usage.prompt_tokens_details.cached_tokens``, over prompt tokens) and "engine CPU ms/req"
(all 4 engines', e.g. what publishing events to a subscriber costs them).

Workload: each prompt is ~2 KB of chat: a system prompt picked from ``--groups`` shared
prefixes (75% of the characters) plus a unique user message (25%). Each engine is modelled as
holding at most ``--engine-cache-groups`` shared prefixes (LRU, tracked by the client from the
engine name each answer carries, else the router's engine header, else the URL's engine);
"prefix hit" is the fraction of requests whose shared prefix went to an engine that held it.
With 64 groups and room for 24 per engine, a cache-blind policy hits ~24/64 while a
prefix-aware one can hit ~1.0. (Every request here is a new conversation sharing only a
system prompt: kv_aware places it where that system prompt is cached while the placements
stay balanced.)

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
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from stackctl.router.app import ENGINE_HEADER
from stackctl.testing import free_ports, wait_until_async

ROOT = Path(__file__).resolve().parents[1]
_PORTS = free_ports(9)  # picked once per run, reused by every target
ENGINE_PORTS, ROUTER_PORT, SIM_PORTS = _PORTS[:4], _PORTS[4], _PORTS[5:]
MODEL = "bench-model"
#: Targets on simulator engines that publish KV events: the kv_index of each one's router
#: (None: no router, the client spreads requests itself, the baseline of the others).
SIM_TARGETS: dict[str, str | None] = {
    "direct-sim": None,
    "ours-kv-sim": "estimate",
    "ours-kv-events": "events",
}
SIM_HARDWARE, SIM_MODEL_PROFILE = "h100-80gb", "tinyllama-1.1b"  # the fastest profiles
SIM_BLOCK_SIZE = 16
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------------
def _taskset(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


def _module_process(core, module: str, args: list[str], log=subprocess.DEVNULL):
    """``python -m module args`` pinned to ``core``, from the checkout's root."""
    argv = _taskset(core) + [sys.executable, "-m", module, *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def start_engines(core):
    return [
        _module_process(
            core,
            "tests.helpers.fake_engine",
            ["--port", str(port), "--name", f"e{i}", "--model", MODEL],
        )
        for i, port in enumerate(ENGINE_PORTS)
    ]


def baseline(target: str) -> str:
    """The target without a router on the same engines as ``target``."""
    return "direct-sim" if target in SIM_TARGETS else "direct"


def sim_gpu_blocks(
    bodies: list[tuple[int, bytes]], cache_groups: int, concurrency: int, engines: int
) -> int:
    """GPU KV blocks for one simulator engine: ``cache_groups`` whole requests (what the
    modelled LRU behind "prefix hit" holds of shared prefixes) plus the requests its share of
    ``concurrency`` keeps in flight, whose blocks are pinned, so none waits for room."""
    from stackctl.tokenizer import count_tokens, render_chat

    sample = [json.loads(body) for _, body in bodies[:256]]
    tokens = sum(count_tokens(render_chat(b["messages"])) + b["max_tokens"] for b in sample)
    per_request = math.ceil(tokens / (len(sample) * SIM_BLOCK_SIZE))
    return per_request * (cache_groups + math.ceil(concurrency / engines))


def sim_endpoints(directory: str, i: int):
    """Engine ``i``'s KV event endpoints: Unix sockets, as `up` gives a local fleet."""
    from stackctl.inventory import KvEventEndpoints

    pub, replay = f"ipc://{directory}/kv-e{i}.sock", f"ipc://{directory}/kv-e{i}-replay.sock"
    return KvEventEndpoints(pub, replay, pub, replay)


def start_sim_engines(core, directory: str, blocks: int, time_scale: float):
    from stackctl.plan import kv_events_config

    procs = []
    for i, port in enumerate(SIM_PORTS):
        events = json.dumps(kv_events_config(sim_endpoints(directory, i)), separators=(",", ":"))
        args = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL]
        args += ["--hardware", SIM_HARDWARE, "--model-profile", SIM_MODEL_PROFILE]
        args += ["--time-scale", str(time_scale), "--block-size", str(SIM_BLOCK_SIZE)]
        args += ["--num-gpu-blocks-override", str(blocks), "--kv-events-config", events]
        with open(os.path.join(directory, f"sim-e{i}.log"), "w") as log:
            procs.append(_module_process(core, "stackctl.sim", args, log))
    return procs


def stop(procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def write_our_config(
    policy: str,
    directory: str,
    options: dict | None = None,
    kv_index: str | None = None,
    sim_blocks: int = 0,
) -> str:
    """router.yaml for the fake engines, or (``kv_index`` given) for the simulator engines:
    their capacity declared as `up` declares a sim engine's, their event endpoints only
    with ``kv_index: events`` (as `up` renders them: a router subscribes to any it is given)."""
    import yaml

    path = os.path.join(directory, f"router-{policy}-{kv_index or 'fake'}.yaml")
    engines: list[dict]
    if kv_index is None:
        engines = [
            {"name": f"e{i}", "url": f"http://127.0.0.1:{p}", "model": MODEL}
            for i, p in enumerate(ENGINE_PORTS)
        ]
    else:
        engines = []
        for i, p in enumerate(SIM_PORTS):
            entry = {
                "name": f"e{i}",
                "url": f"http://127.0.0.1:{p}",
                "model": MODEL,
                "cache_capacity_tokens": sim_blocks * SIM_BLOCK_SIZE,
            }
            if kv_index == "events":
                endpoints = sim_endpoints(directory, i)
                entry["kv_events"], entry["kv_events_replay"] = endpoints.connect, endpoints.replay
            engines.append(entry)
    config = {
        "listen": {"host": "127.0.0.1", "port": ROUTER_PORT},
        "policy": policy,
        "engines": engines,
        "health": {"interval_s": 2.0, "timeout_s": 2.0},
    }
    if kv_index is not None:
        config["kv_index"] = kv_index
    if options and policy == "kv_aware":
        config["policy_options"] = options
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def router_command(
    target: str,
    vllm_router: str | None,
    directory: str,
    kv_options: dict | None = None,
    sim_blocks: int = 0,
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
            write_our_config(policy, directory, kv_options, SIM_TARGETS.get(target), sim_blocks),
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
def make_bodies(n: int, groups: int, seed: int = 7, usage: bool = False) -> list[tuple[int, bytes]]:
    """``n`` requests (shared-prefix group, body); ``usage``: ask for the usage chunk."""
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
        if usage:
            body["stream_options"] = {"include_usage": True}
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
        self.prompt_tokens = self.cached_tokens = 0  # as the engines' usage chunks report

    def observe_usage(self, stream: bytes) -> None:
        """Add the prompt and cached tokens of a streamed answer's usage chunk (if any)."""
        prompt, cached = USAGE_PROMPT.search(stream), USAGE_CACHED.search(stream)
        if self.recording and prompt and cached:
            self.prompt_tokens += int(prompt.group(1))
            self.cached_tokens += int(cached.group(1))

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
USAGE_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
USAGE_CACHED = re.compile(rb'"cached_tokens":\s*(\d+)')


async def closed_loop(
    urls: list[str],
    bodies,
    concurrency: int,
    warmup: float,
    duration: float,
    cache_groups: int,
    sample=lambda: (0.0,),
    usage: bool = False,
):
    """Run the load; returns (stats, seconds measured, ``sample()``'s deltas over them).

    The engine of an answer is the one its ``system_fingerprint`` names (fake engines), else
    the one the router's engine header names, else the URL's (``direct`` on engines that do
    not name themselves). ``usage``: read each answer whole for its usage chunk."""
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
            chunks = []
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    async for chunk in resp.content.iter_any():
                        if first is None:
                            first = loop.time()
                            at = chunk.find(MARK)
                            if at >= 0:
                                end = chunk.find(b'"', at + len(MARK))
                                engine = chunk[at + len(MARK) : end]
                            elif ENGINE_HEADER in resp.headers:
                                engine = resp.headers[ENGINE_HEADER].encode()
                            elif len(urls) > 1:
                                engine = f"e{i % len(urls)}".encode()
                        if usage:
                            chunks.append(chunk)
                    ok = resp.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            end_t = loop.time()
            if not ok or first is None:
                stats.errors += stats.recording
                continue
            stats.observe_prefix(engine, group)
            if usage:
                stats.observe_usage(b"".join(chunks))
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
    return stats, elapsed, tuple(b - a for a, b in zip(s0, s1, strict=True))


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- driver ---------------------------------------------------------------------------------
async def run_target(target, args, bodies, directory):
    """The rows of ``target``. A simulator target runs each concurrency on 4 engines (and a
    router) started for it alone, their caches sized for it (:func:`sim_gpu_blocks`)."""
    if target not in SIM_TARGETS:
        return await _run_target(target, args, bodies, directory, args.concurrency)
    rows = []
    for concurrency in args.concurrency:
        blocks = args.sim_gpu_blocks or sim_gpu_blocks(
            bodies, args.engine_cache_groups, concurrency, len(SIM_PORTS)
        )
        engines = start_sim_engines(args.client_core, directory, blocks, args.sim_time_scale)
        try:
            for port in SIM_PORTS:
                try:
                    await wait_ready(f"http://127.0.0.1:{port}/health")
                except AssertionError:
                    for i in range(len(SIM_PORTS)):
                        log = Path(directory, f"sim-e{i}.log").read_text()[-2000:]
                        print(f"--- sim-e{i}.log\n{log}", file=sys.stderr)
                    raise
            rows += await _run_target(
                target, args, bodies, directory, [concurrency], engines, blocks
            )
        finally:
            stop(engines)
    return rows


async def kv_views() -> dict:
    """The events router's views of the engines (/engines): states and what went wrong."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{ROUTER_PORT}/engines") as r,
    ):
        views = [e["kv_events"] or {} for e in (await r.json())["engines"]]
    out: dict = {"states": sorted(str(v.get("state")) for v in views)}
    for key in ("gpu_blocks", "batches", "replayed", "gaps", "restarts", "orphans", "malformed"):
        out[key] = sum(v.get(key) or 0 for v in views)
    return out


async def _run_target(target, args, bodies, directory, concurrencies, engines=(), sim_blocks=0):
    rows = []
    proc = None
    if target == "direct":
        urls = [f"http://127.0.0.1:{p}/v1/chat/completions" for p in ENGINE_PORTS]
    elif target == "direct-sim":
        urls = [f"http://127.0.0.1:{p}/v1/chat/completions" for p in SIM_PORTS]
    else:
        cmd = router_command(target, args.vllm_router, directory, args.kv_options, sim_blocks)
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
        for concurrency in concurrencies:

            def sample():
                router = cpu_seconds(proc.pid) if proc else 0.0
                return router, sum(cpu_seconds(p.pid) for p in engines)

            stats, elapsed, (cpu, engines_cpu) = await closed_loop(
                urls,
                bodies,
                concurrency,
                args.warmup,
                args.duration,
                args.engine_cache_groups,
                sample,
                usage=target in SIM_TARGETS,
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
                    # the simulator engines' (all 4); fake engines are not measured
                    "engine_cpu_ms_per_req": engines_cpu * 1000 / n if engines and n else None,
                    "peak_rss_mb": peak_rss_mb(proc.pid) if proc else None,
                    "prefix_hit": stats.hits / stats.lookups if stats.lookups else float("nan"),
                    "max_share": (
                        max(stats.per_engine.values()) * len(ENGINE_PORTS) / n
                        if n
                        else float("nan")
                    ),
                    "engine_cached": (
                        stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else None
                    ),
                }
            )
            if SIM_TARGETS.get(target) == "events":
                rows[-1]["kv_views"] = await kv_views()
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
    """One row per (target, concurrency): medians over rounds; ratios against the same
    round's run without a router on the same engines (:func:`baseline`)."""
    direct = {
        (r["target"], r["round"], r["concurrency"]): r
        for r in rows
        if r["target"] in ("direct", "direct-sim")
    }
    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[(r["target"], r["concurrency"])].append(r)
    out = []
    for (target, conc), runs in groups.items():
        pairs = [(r, direct.get((baseline(target), r["round"], conc))) for r in runs]
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
                "engine_cached",
                "engine_cpu_ms_per_req",
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


def _added(r, key: str) -> str:
    value = r[key]
    return (
        "" if r["target"] == baseline(r["target"]) or value is None else f" ({value * 1000:+.2f})"
    )


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _vs_direct(r) -> str:
    if r["target"] == baseline(r["target"]):
        return "1.00"
    lo, hi = r["vs_direct_range"] or (None, None)
    return f"{r['vs_direct']:.2f} [{lo:.2f}-{hi:.2f}]" if lo else "-"


#: The table's columns: (header, cell); those named in SIM_COLUMNS only with simulator rows.
COLUMNS = (
    ("target", lambda r: r["target"]),
    ("conc", lambda r: str(r["concurrency"])),
    ("req/s", lambda r: f"{r['rps']:.0f}"),
    ("vs direct [range]", _vs_direct),
    ("TTFT p50 ms (added)", lambda r: f"{r['ttft_p50'] * 1000:.2f}{_added(r, 'added_ttft_p50')}"),
    ("TTFT p99 ms", lambda r: f"{r['ttft_p99'] * 1000:.2f}"),
    ("latency p50 ms (added)", lambda r: f"{r['lat_p50'] * 1000:.2f}{_added(r, 'added_lat_p50')}"),
    ("latency p99 ms", lambda r: f"{r['lat_p99'] * 1000:.2f}"),
    ("router CPU ms/req", lambda r: _or_dash(r["cpu_ms_per_req"], ".3f")),
    ("engine CPU ms/req", lambda r: _or_dash(r["engine_cpu_ms_per_req"], ".3f")),
    ("peak RSS MB", lambda r: _or_dash(r["peak_rss_mb"], ".0f")),
    ("prefix hit", lambda r: f"{r['prefix_hit']:.2f}"),
    ("engine cached", lambda r: _or_dash(r["engine_cached"], ".2f")),
    ("max engine share", lambda r: f"{r['max_share']:.2f}"),
    ("errors", lambda r: str(r["errors"])),
)
SIM_COLUMNS = ("engine CPU ms/req", "engine cached")


def table(summaries) -> str:
    """The markdown table; with simulator rows, two columns more: "engine CPU ms/req" (all 4
    engines') and "engine cached" (the engines' cached prompt tokens / prompt tokens)."""
    sim = any(r["engine_cached"] is not None for r in summaries)
    columns = [c for c in COLUMNS if sim or c[0] not in SIM_COLUMNS]
    lines = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in summaries]
    return "\n".join(lines)


async def amain(args) -> int:
    if args.client_core is not None:
        os.sched_setaffinity(0, {args.client_core})
    bodies = make_bodies(4096, args.groups)
    sim_bodies = make_bodies(4096, args.groups, usage=True)  # the same prompts
    on_fake = any(t not in SIM_TARGETS for t in args.targets)
    engines = start_engines(args.client_core) if on_fake else []
    rows = []
    try:
        for port in ENGINE_PORTS if on_fake else ():
            await wait_ready(f"http://127.0.0.1:{port}/health")
        with tempfile.TemporaryDirectory() as directory:
            for round_no in range(args.rounds):
                for target in args.targets:
                    which = sim_bodies if target in SIM_TARGETS else bodies
                    for row in await run_target(target, args, which, directory):
                        rows.append({**row, "round": round_no})
    finally:
        stop(engines)
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
    parser.add_argument(
        "--sim-time-scale",
        type=float,
        default=1000.0,
        help="simulator engines' --time-scale (modelled time / this = real time)",
    )
    parser.add_argument(
        "--sim-gpu-blocks",
        type=int,
        help="simulator engines' GPU KV blocks (default: room for --engine-cache-groups "
        "requests plus those in flight)",
    )
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if any(SIM_TARGETS.get(t) for t in args.targets) and "direct-sim" not in args.targets:
        first = next(i for i, t in enumerate(args.targets) if t in SIM_TARGETS)
        args.targets.insert(first, "direct-sim")
        print("adding direct-sim: the simulator targets' baseline", file=sys.stderr)
    args.kv_options = {
        k: float(v) if "." in v else int(v) for k, v in (o.split("=", 1) for o in args.kv_option)
    }
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    args.router_core, args.client_core = (0, 1) if pin else (None, None)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
