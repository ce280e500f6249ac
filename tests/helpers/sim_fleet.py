"""Start and stop simulator processes (``python -m stackctl.sim``) for tests and benchmarks.

Usage::

    from tests.helpers.sim_fleet import start_sims, LMCACHE_ARGS, lmcache_env

    with start_sims(2, time_scale=50, extra_args=LMCACHE_ARGS, env=lmcache_env(cpu_gb=20)) as sims:
        sims[0].url        # "http://127.0.0.1:PORT" (no trailing slash; the API is under /v1)

Each simulator gets a free loopback port, its output goes to a log file (``SimProcess.log_path``,
``SimProcess.log_tail()``; shown when a start fails, removed when stopped), and every process
is stopped (SIGTERM, then SIGKILL) when the ``with`` block ends, even on errors. ``start_sim``/``stop_sim`` do one at a time,
for pytest fixtures that manage their own lifetime.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stackctl.testing import WaitTimeout, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

# --kv-transfer-config that turns LMCache (the CPU tier) on, as vLLM takes it.
LMCACHE_ARGS = (
    "--kv-transfer-config",
    json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}),
)

DEFAULT_TIME_SCALE = 20.0


def lmcache_env(cpu_gb: float = 20.0, chunk_size: int = 256) -> dict[str, str]:
    """LMCache's environment for a local CPU tier of ``cpu_gb`` GB (pair with LMCACHE_ARGS)."""
    return {
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": str(cpu_gb),
        "LMCACHE_CHUNK_SIZE": str(chunk_size),
    }


@dataclass
class SimProcess:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_healthy(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url``/health until it answers 200; False on timeout or if ``proc`` exits."""

    def settled() -> bool | str:
        if proc is not None and proc.poll() is not None:
            return "exited"
        with urllib.request.urlopen(
            f"{url}/health", timeout=1.0
        ) as resp:  # not listening yet: OSError
            return resp.status == 200

    with contextlib.suppress(WaitTimeout):
        return wait_until(settled, timeout, what=f"{url}/health", ignore=OSError) is True
    return False


def _spawn(
    extra_args: Sequence[str], env: Mapping[str, str] | None, time_scale: float
) -> SimProcess:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p
    )
    port = free_port()
    args = [sys.executable, "-m", "stackctl.sim", "--host", "127.0.0.1", "--port", str(port),
            "--time-scale", str(time_scale), *extra_args]  # fmt: skip
    fd, log_name = tempfile.mkstemp(prefix=f"sim-{port}-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT
        )
    return SimProcess(
        url=f"http://127.0.0.1:{port}", port=port, proc=proc, log_path=Path(log_name), args=args
    )


def _await_healthy(sim: SimProcess, startup_timeout: float) -> str | None:
    """None when healthy, else the log tail (and the process is stopped)."""
    if wait_healthy(sim.url, startup_timeout, sim.proc):
        return None
    stop_sim(sim, keep_log=True)
    tail = sim.log_tail()
    with contextlib.suppress(OSError):
        sim.log_path.unlink()
    return tail or f"exit status {sim.proc.returncode}"


def start_sim(
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    time_scale: float = DEFAULT_TIME_SCALE,
    startup_timeout: float = 30.0,
    attempts: int = 3,
) -> SimProcess:
    """Start one simulator on a free 127.0.0.1 port and wait for /health (retrying a lost port race)."""
    error = ""
    for _ in range(attempts):
        sim = _spawn(extra_args, env, time_scale)
        error = _await_healthy(sim, startup_timeout)
        if error is None:
            return sim
        if "cannot listen" not in error:
            break
    raise RuntimeError(f"simulator did not become healthy:\n{error}")


def stop_sim(sim: SimProcess, timeout: float = 5.0, keep_log: bool = False) -> None:
    """Stop one simulator: SIGTERM, then SIGKILL after ``timeout`` seconds; remove its log
    unless ``keep_log`` (read ``sim.log_tail()`` before stopping if a test needs it)."""
    if sim.proc.poll() is None:
        sim.proc.terminate()
        try:
            sim.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            sim.proc.kill()
            sim.proc.wait(timeout)
    if not keep_log:
        with contextlib.suppress(OSError):
            sim.log_path.unlink()


@contextlib.contextmanager
def start_sims(
    n: int,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    time_scale: float = DEFAULT_TIME_SCALE,
    startup_timeout: float = 30.0,
) -> Iterator[list[SimProcess]]:
    """Start ``n`` simulators (same flags and env); yield them; stop them all on exit."""
    sims: list[SimProcess] = []
    try:
        spawned = [_spawn(extra_args, env, time_scale) for _ in range(n)]  # start in parallel
        for i, sim in enumerate(spawned):
            error = _await_healthy(sim, startup_timeout)
            if error is not None and "cannot listen" in error:  # lost a port race: once more
                sim = start_sim(
                    extra_args=extra_args,
                    env=env,
                    time_scale=time_scale,
                    startup_timeout=startup_timeout,
                )
            elif error is not None:
                sims.extend(spawned[i + 1 :])  # stopped by the finally clause
                raise RuntimeError(f"simulator did not become healthy:\n{error}")
            sims.append(sim)
        yield sims
    finally:
        for sim in sims:
            stop_sim(sim)
