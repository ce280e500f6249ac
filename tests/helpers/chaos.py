"""The chaos and load suite's machinery: a small local stack deployed by stackctl itself, a
measuring client, hostile connections and process probes (tests/e2e/test_chaos.py and
``python -m benchmarks.chaos`` share it).

Everything goes to loopback only. The stack is what `up` deploys on a ``connection: local``
fleet (simulator engines and the router under real supervisord); the client talks to the
router only (engines may demand the cluster's engine key), and faults are signals sent to the
pids supervisord reports. Every loop here is bounded by a duration, a count or a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from stackctl.bench.client import percentile
from stackctl.bench.pacing import run_paced
from stackctl.bench.scenario import Scenario
from stackctl.bench.workload import RequestSpec, Workload
from stackctl.inventory import load_inventory
from stackctl.plan import HostPlan, plan_cluster
from stackctl.testing import free_ports, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------------------- the stack


def stackctl(*args: str | Path, timeout: float = 300, env: Mapping[str, str] | None = None):
    """The real CLI in a subprocess (what an operator runs)."""
    return subprocess.run(
        [sys.executable, "-m", "stackctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def inventory_for(
    root: Path,
    engines: int,
    *,
    time_scale: float,
    router: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A local-fleet inventory: a router host and ``engines`` simulator hosts, free ports."""
    router_port, *engine_ports = free_ports(1 + engines)
    return {
        "cluster": "chaos",
        "python": "current",
        "install": False,
        "service_user": None,
        "become": False,
        "deploy_dir": str(root / "head"),
        "model": {"name": MODEL},
        "engine": {
            "kind": "sim",
            "bind": LOOPBACK,
            "lmcache": {"enabled": False},
            "sim": {"hardware": "a100-80gb", "time_scale": time_scale},
            **(engine or {}),
        },
        "router": {
            "host": "head",
            "port": router_port,
            "bind": LOOPBACK,
            "policy": "kv_aware",
            "health_interval_s": 0.5,
            "health_timeout_s": 1.0,
            **(router or {}),
        },
        "hosts": [{"name": "head", "connection": "local", "roles": ["router"]}]
        + [
            {
                "name": f"sim{i}",
                "connection": "local",
                "deploy_dir": str(root / f"sim{i}"),
                "engine": {"port": port},
            }
            for i, port in enumerate(engine_ports, start=1)
        ],
    }


@dataclass
class LocalStack:
    """A deployed local stack: where the router listens and how to reach each program."""

    root: Path
    inventory: Path
    router_url: str
    plans: dict[str, HostPlan]
    engines: list[tuple[str, str, str]]  # (host, supervisor program, router's engine name)
    up_seconds: float = 0.0

    def supervisorctl(self, host: str, *args: str, timeout: float = 20) -> str:
        result = subprocess.run(
            self.plans[host].supervisorctl(*args), capture_output=True, text=True, timeout=timeout
        )
        return result.stdout

    def pid(self, host: str, program: str) -> int:
        """The program's pid as supervisord reports it (0 when it is not running)."""
        out = self.supervisorctl(host, "pid", program).strip()
        return int(out) if out.isdigit() else 0

    def router_pid(self) -> int:
        return self.pid("head", "router")

    def signal(self, host: str, program: str, sig: int) -> int:
        """Send ``sig`` to the program's process; returns the pid it went to."""
        pid = self.pid(host, program)
        if pid <= 0:
            raise RuntimeError(f"{host}/{program} is not running: no pid to signal")
        os.kill(pid, sig)
        return pid

    def log_tail(self, host: str, program: str, lines: int = 40) -> str:
        path = Path(self.plans[host].log_file(program))
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_text(self, host: str, program: str) -> str:
        with contextlib.suppress(OSError):
            return Path(self.plans[host].log_file(program)).read_text(errors="replace")
        return ""

    def engines_view(self, timeout: float = 2.0) -> dict[str, bool]:
        """The router's /engines: engine name -> healthy."""
        import urllib.request

        with urllib.request.urlopen(f"{self.router_url}/engines", timeout=timeout) as resp:
            data = json.loads(resp.read())
        return {e["name"]: bool(e["healthy"]) for e in data["engines"]}

    def wait_all_healthy(self, timeout: float = 60.0) -> None:
        """Until supervisord runs every program and the router calls every engine healthy."""

        def ready() -> bool:
            view = self.engines_view()
            return len(view) == len(self.engines) and all(view.values())

        wait_until(
            ready,
            timeout,
            interval=0.2,
            what="every engine healthy in the router",
            ignore=(OSError, ValueError, KeyError),
            detail=lambda: self.log_tail("head", "router"),
        )

    def down(self) -> None:
        stackctl("down", self.inventory, "--purge", "--yes", timeout=180)


def deploy(
    root: Path,
    engines: int = 3,
    *,
    time_scale: float = 4.0,
    router: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
    timeout: float = 300,
) -> LocalStack:
    """`stackctl up` a local fleet under ``root``; raises with `up`'s output if it fails."""
    root.mkdir(parents=True, exist_ok=True)
    data = inventory_for(root, engines, time_scale=time_scale, router=router, engine=engine)
    path = root / "chaos.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.monotonic()
    result = stackctl("up", path, "--yes", timeout=timeout)
    took = time.monotonic() - started
    cluster = load_inventory(path)
    plans = {p.host.name: p for p in plan_cluster(cluster)}
    names = [
        (plan.host.name, program.name)
        for plan in plans.values()
        for program in plan.programs
        if program.kind == "engine"
    ]
    engine_names = [e.name for e in cluster.engines]
    stack = LocalStack(
        root,
        path,
        f"http://{LOOPBACK}:{data['router']['port']}",
        plans,
        [(host, program, name) for (host, program), name in zip(names, engine_names, strict=True)],
        took,
    )
    if result.returncode != 0:
        stack.down()
        raise RuntimeError(
            f"stackctl up failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return stack


# ----------------------------------------------------------------------------- processes


def proc_stats(pid: int) -> tuple[int, int]:
    """(open file descriptors, VmRSS in KiB) of a process, from /proc."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return fds, rss


def fd_soft_limit(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return int(value) if value.isdigit() else None
    return None


def raise_fd_limit(wanted: int) -> tuple[int, str]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit);
    returns (the soft limit now, a note when it could not reach ``wanted``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            return soft, f"setrlimit(RLIMIT_NOFILE, {target}) failed: {exc}"
        soft = target
    note = "" if soft >= wanted else f"hard limit {hard} is below the {wanted} wanted"
    return soft, note


@dataclass
class ProcSampler:
    """Samples a pid's fds and RSS every ``interval`` s in a task: peak and last values."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                fds, rss = proc_stats(self.pid)
                self.samples.append((time.monotonic(), fds, rss))
            await asyncio.sleep(self.interval)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> tuple[int, int]:
        window = [(f, r) for t, f, r in self.samples if since <= t <= until]
        return (max((f for f, _ in window), default=0), max((r for _, r in window), default=0))


# ----------------------------------------------------------------------------- the client


@dataclass
class Outcome:
    """One request as the client saw it (monotonic times)."""

    start: float
    end: float = 0.0
    status: int | None = None
    engine: str | None = None
    ttft: float | None = None  # None: no content token arrived
    error: str | None = None
    retry_after: str | None = None
    tag: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def streamed(self) -> bool:
        """Whether any content reached the client (after that, a failure is allowed)."""
        return self.ttft is not None


async def chat(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict] | tuple[dict, ...],
    max_tokens: int,
    *,
    timeout_s: float = 60.0,
    tag: str = "",
) -> tuple[Outcome, str]:
    """One streamed chat completion through the router: its Outcome and the answer text."""
    payload = {
        "model": MODEL,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    out = Outcome(start=time.monotonic(), tag=tag)
    parts: list[str] = []
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(5.0, timeout_s))
        async with session.post(
            f"{url}/v1/chat/completions", json=payload, timeout=timeout
        ) as resp:
            out.status = resp.status
            out.engine = resp.headers.get("x-stackctl-engine")
            out.retry_after = resp.headers.get("Retry-After")
            if resp.status >= 400:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200].strip()}"
                return out, ""
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    out.error = f"stream error: {str(chunk['error'])[:200]}"
                    break
                for choice in (chunk.get("choices") or ()) if isinstance(chunk, dict) else ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if out.ttft is None:
                            out.ttft = time.monotonic() - out.start
                        parts.append(text)
        if out.error is None and out.ttft is None:
            out.error = "no tokens received"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}".strip()
    finally:
        out.end = time.monotonic()
    return out, "".join(parts)


def small_scenario(**changes: Any) -> Scenario:
    """The multi-round QA workload shrunk to CI size (shared system prompt, growing chats)."""
    sizes: dict[str, Any] = {
        "users": 12,
        "rounds": 4,
        "system_prompt_tokens": 300,
        "history_tokens": 1500,
        "question_tokens": 12,
        "answer_tokens": 24,
        "warmup_s": 0,
    }
    return Scenario(name="chaos", **{**sizes, **changes})


@dataclass
class LoadRun:
    """The multi-round workload at ``qps`` for ``seconds`` (run_paced), every Outcome kept."""

    url: str
    qps: float
    seconds: float
    scenario: Scenario = field(default_factory=small_scenario)
    request_timeout_s: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    tag: Callable[[], str] = lambda: ""

    async def run(self, session: aiohttp.ClientSession, workload: Workload | None = None) -> None:
        workload = workload or Workload(self.scenario)

        async def send(spec: RequestSpec, *_: object) -> str | None:
            out, answer = await chat(
                session,
                self.url,
                spec.messages,
                spec.max_tokens,
                timeout_s=self.request_timeout_s,
                tag=self.tag(),
            )
            self.outcomes.append(out)
            return answer if out.ok else None

        await run_paced(
            workload, self.qps, self.seconds, send, drain_timeout_s=self.request_timeout_s + 5
        )


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    qps: float,
    seconds: float,
    *,
    system_prompt: str,
    prompt_tokens: int = 200,
    max_tokens: int = 24,
    timeout_s: float = 60.0,
    tag: str = "",
) -> list[Outcome]:
    """Independent requests arriving at ``qps`` for ``seconds`` whatever the answers do (at
    most qps x seconds of them): the load that finds out whether a stack queues without bound."""
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task] = []
    start = time.monotonic()
    count = int(qps * seconds)
    filler = " ".join(f"w{i % 97}" for i in range(prompt_tokens))

    async def one(k: int) -> None:
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": f"request {k}: {filler}"},
        ]
        out, _ = await chat(session, url, messages, max_tokens, timeout_s=timeout_s, tag=tag)
        outcomes.append(out)

    for k in range(count):
        await asyncio.sleep(max(0.0, start + k / qps - time.monotonic()))
        tasks.append(asyncio.create_task(one(k)))
    await asyncio.gather(*tasks)
    return outcomes


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    workers: int,
    seconds: float,
    *,
    system_prompt: str,
    prompt_tokens: int = 200,
    max_tokens: int = 24,
) -> float:
    """Completed requests per second with ``workers`` requests always in flight: what the
    stack serves when saturated."""
    done = 0
    deadline = time.monotonic() + seconds
    filler = " ".join(f"w{i % 97}" for i in range(prompt_tokens))

    async def worker(w: int) -> None:
        nonlocal done
        k = 0
        while time.monotonic() < deadline:
            messages = [
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": f"worker {w} request {k}: {filler}"},
            ]
            out, _ = await chat(session, url, messages, max_tokens, timeout_s=30)
            k += 1
            if out.ok and out.end <= deadline:
                done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done / max(1e-9, min(seconds, time.monotonic() - started))


class HealthProbe:
    """GET /health every ``period`` s (10 per second by default): the outage a client sees."""

    def __init__(self, url: str, period: float = 0.1, timeout: float = 0.5):
        self.url, self.period, self.timeout = url, period, timeout
        self.results: list[tuple[float, bool]] = []

    async def run(self, session: aiohttp.ClientSession, seconds: float) -> None:
        start = time.monotonic()
        tasks = []
        for k in range(int(seconds / self.period)):
            await asyncio.sleep(max(0.0, start + k * self.period - time.monotonic()))
            tasks.append(asyncio.create_task(self._one(session, time.monotonic())))
        await asyncio.gather(*tasks)
        self.results.sort()

    async def _one(self, session: aiohttp.ClientSession, at: float) -> None:
        ok = False
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with session.get(f"{self.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
        self.results.append((at, ok))

    def longest_outage(self) -> tuple[float, int]:
        """(seconds from the last success before the longest failure run to the first success
        after it, failed probes in it); (0, 0) when no probe failed."""
        best: tuple[float, int] = (0.0, 0)
        last_ok: float | None = None
        failed = 0
        for at, ok in self.results:
            if ok:
                if failed and last_ok is not None:
                    best = max(best, (at - last_ok, failed))
                last_ok, failed = at, 0
            else:
                failed += 1
        if failed:  # never recovered inside the run
            end = self.results[-1][0] if self.results else 0.0
            best = max(best, (end - (last_ok or end) + self.period, failed))
        return best


class EngineWatch:
    """Polls the router's /engines every ``period`` s: when each engine went out and back."""

    def __init__(self, url: str, period: float = 0.1):
        self.url, self.period = url, period
        self.changes: list[tuple[float, str, bool]] = []
        self._last: dict[str, bool] = {}

    async def run(
        self,
        session: aiohttp.ClientSession,
        seconds: float,
        until: Callable[[], bool] = lambda: False,
    ) -> None:
        """Poll for ``seconds`` at most, or until ``until()`` says what was awaited was seen."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            with contextlib.suppress(
                aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError
            ):
                timeout = aiohttp.ClientTimeout(total=1.0)
                async with session.get(f"{self.url}/engines", timeout=timeout) as resp:
                    data = await resp.json()
                now = time.monotonic()
                for e in data["engines"]:
                    healthy = bool(e["healthy"])
                    if self._last.get(e["name"], True) != healthy:
                        self.changes.append((now, e["name"], healthy))
                    self._last[e["name"]] = healthy
            await asyncio.sleep(self.period)

    def first(self, name: str, healthy: bool, after: float) -> float | None:
        """When ``name`` was first seen ``healthy`` (True: readmitted) after ``after``."""
        return next(
            (t for t, n, h in self.changes if n == name and h == healthy and t >= after), None
        )


# ----------------------------------------------------------------------------- hostile clients


@dataclass
class HostileConnections:
    """Idle TCP connections and slow-loris requests (a header byte every ``drip_s``) held open
    against the router; counts how many the router closed."""

    host: str
    port: int
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    readers: list[tuple[str, asyncio.StreamReader]] = field(default_factory=list)
    failed_to_open: int = 0
    closed_by_server: dict[str, int] = field(default_factory=lambda: {"idle": 0, "loris": 0})
    close_after_s: list[float] = field(default_factory=list)  # open -> the router's close
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _closing: bool = False

    async def open(self, idle: int, loris: int, *, batch: int = 200, sources: int = 100) -> None:
        """Open them ``batch`` at a time from ``sources`` loopback addresses (127.0.0.2 and
        up: many attackers, none of them the workload's 127.0.0.1, as the router's
        per-client cap counts connections by source address)."""
        kinds = ["idle"] * idle + ["loris"] * loris

        def connect(n: int):
            source = (f"127.0.0.{2 + n % sources}", 0)
            return asyncio.open_connection(self.host, self.port, local_addr=source)

        for i in range(0, len(kinds), batch):
            results = await asyncio.gather(
                *(connect(n) for n in range(i, min(i + batch, len(kinds)))),
                return_exceptions=True,
            )
            for kind, result in zip(kinds[i : i + batch], results, strict=True):
                if isinstance(result, BaseException):
                    self.failed_to_open += 1
                    continue
                reader, writer = result
                self.writers.append(writer)
                self.readers.append((kind, reader))
                if kind == "loris":
                    writer.write(
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                    )
                self._tasks.append(asyncio.create_task(self._watch(kind, reader)))

    async def _watch(self, kind: str, reader: asyncio.StreamReader) -> None:
        opened = time.monotonic()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.read(65536)  # returns at EOF: the router closed it (or answered)
        if not self._closing:
            self.closed_by_server[kind] += 1
            self.close_after_s.append(time.monotonic() - opened)

    async def drip(self, seconds: float, drip_s: float = 1.0) -> None:
        """Slow-loris: one more header byte on every loris connection each ``drip_s``."""
        deadline = time.monotonic() + seconds
        loris = [
            w for w, (kind, _) in zip(self.writers, self.readers, strict=True) if kind == "loris"
        ]
        while time.monotonic() < deadline:
            for writer in loris:
                if not writer.is_closing():
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write(b"a")
            await asyncio.sleep(min(drip_s, max(0.0, deadline - time.monotonic())))

    @property
    def open_count(self) -> int:
        return len(self.writers)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self.writers:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
        self.writers.clear()


# ----------------------------------------------------------------------------- figures


def p50(values: list[float]) -> float:
    return percentile(values, 50) if values else float("nan")


def p99(values: list[float]) -> float:
    return percentile(values, 99) if values else float("nan")


def ttfts(outcomes: list[Outcome], tag: str | None = None) -> list[float]:
    return [o.ttft for o in outcomes if o.ttft is not None and (tag is None or o.tag == tag)]


def errors_before_streaming(outcomes: list[Outcome]) -> list[Outcome]:
    """Failed requests no content of which had reached the client: the router must hide these."""
    return [o for o in outcomes if not o.ok and not o.streamed]
