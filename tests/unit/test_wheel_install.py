"""A plain, non-editable install from a wheel finds the role defaults and templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_plans(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)], check=True)
    wheel = next(dist.glob("stackctl-*.whl"))
    venv = tmp_path / "venv"
    # Dependencies come from this interpreter's site-packages; stackctl itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True)
    inventory = tmp_path / "a100-8.yaml"
    inventory.write_text((REPO / "inventory" / "a100-8.yaml").read_text())
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import stackctl, stackctl.resources as r; print(stackctl.__file__); print(r.roles_dir())"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where
    result = subprocess.run([str(venv / "bin/stackctl"), "plan", str(inventory), "--host", "gpu01"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[program:engine-0]" in result.stdout
    assert "max_local_cpu_size: 120.0" in result.stdout
