"""Router memory under huge requests: N concurrent ~15 MiB chat bodies through a router
process in front of one fake engine, admission off (as before issue 13) and with the defaults.

    python -m benchmarks.admission_memory              # 8 and 32 concurrent bodies
    python -m benchmarks.admission_memory --counts 8

Reports the router's RSS before, its peak (VmHWM) and after, the answers' statuses and the
prefix-index chunks the prompts left on the engine (0 also when the engine was ejected: the
fake engine refuses bodies over 1 MiB, with 413 or, mid-upload, a reset that is a 502).
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from stackctl.testing import free_port

REPO = Path(__file__).resolve().parents[1]
OFF = {
    "admission": {"max_inflight": None, "max_prompt_chars": None, "max_body_bytes_inflight": None},
    "policy_options": {"max_indexed_chars": 10**9},
}


def memory_mib(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) / 1024
    return values


async def wait_healthy(url: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not become healthy within {timeout:.0f} s")


async def run(label: str, extra: dict, n: int, workdir: Path) -> None:
    engine_port, router_port = free_port(), free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.fake_engine", "--port", str(engine_port)]
        + ["--model", "m"],
        cwd=REPO,
    )
    config = {
        "listen": {"host": "127.0.0.1", "port": router_port},
        "policy": "kv_aware",
        "engines": [{"name": "e0", "url": f"http://127.0.0.1:{engine_port}", "model": "m"}],
        "timeouts": {"first_byte_s": 120},
        **extra,
    }
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    router = subprocess.Popen(
        [sys.executable, "-m", "stackctl.router", "--config", str(path)],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    base = f"http://127.0.0.1:{router_port}"
    try:
        await wait_healthy(f"http://127.0.0.1:{engine_port}/health")
        await wait_healthy(f"{base}/health")
        before = memory_mib(router.pid)
        text = "x" * (15 * 1024 * 1024 - 200)
        message = {"role": "user", "content": text}
        body = json.dumps({"model": "m", "messages": [message], "max_tokens": 4}).encode()
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def one() -> int:
                headers = {"Content-Type": "application/json"}
                async with s.post(f"{base}/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    return r.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(one() for _ in range(n)))
            took = time.monotonic() - started
            async with s.get(f"{base}/engines") as r:
                chunks = (await r.json())["engines"][0]["prefix_index_chunks"]
        after = memory_mib(router.pid)
        counts = {status: statuses.count(status) for status in sorted(set(statuses))}
        print(
            f"{label:8} x{n:<3} statuses {counts}; RSS before {before['VmRSS']:.0f} MiB, "
            f"peak {after['VmHWM']:.0f} MiB, after {after['VmRSS']:.0f} MiB; {took:.2f} s; "
            f"prefix_index_chunks {chunks}"
        )
    finally:
        for proc in (router, engine):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:  # a drain that does not end: stop it
                proc.kill()
                proc.wait(5)


async def main(counts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            await run("off", OFF, n, Path(tmp))
            await run("defaults", {}, n, Path(tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 32])
    asyncio.run(main(parser.parse_args().counts))
