"""A new user's install: a fresh venv with nothing but pip (no `wheel`), a plain non-editable
install of stackctl, and `up` to testbed hosts with a wheelhouse of the dependencies only:
stackctl must write the wheel it ships to the hosts itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stackctl.wheels import build_stackctl_wheel
from tests.helpers.wheelhouse import link_wheels

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _run(argv: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory, wheelhouse):
    """A venv made by plain `python -m venv`, stackctl installed from a wheel (not editable)."""
    root = tmp_path_factory.mktemp("fresh")
    deps = root / "deps"
    deps.mkdir()
    link_wheels(wheelhouse, deps)
    for ours in deps.glob("stackctl-*.whl"):
        ours.unlink()
    dist = build_stackctl_wheel(root / "dist")
    venv = root / "venv"
    base = Path(sys.base_prefix) / "bin" / "python3"
    assert _run([base, "-m", "venv", venv]).returncode == 0
    python = venv / "bin" / "python"
    no_wheel = _run([python, "-c", "import wheel"])
    assert no_wheel.returncode != 0, "the fresh venv must not have the `wheel` package"
    install = _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            deps,
            dist,
        ]
    )
    assert install.returncode == 0, install.stderr
    return {"root": root, "venv": venv, "deps": deps}


def test_plain_install_deploys_to_ssh_hosts_without_a_stackctl_wheel(
    fresh_install, testbed_factory
):
    testbed = testbed_factory(2)
    head, engine = testbed.hosts
    venv, root = fresh_install["venv"], fresh_install["root"]
    where = _run([venv / "bin/python", "-c", "import stackctl; print(stackctl.__file__)"], cwd=root)
    assert where.stdout.startswith(str(venv)), where  # the plain install, not this checkout
    inventory = root / "inventory.yaml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "cluster": "fresh",
                "deploy_dir": testbed.deploy_dir,
                "python": "python3",
                "install": True,
                "ssh": testbed.inventory_ssh_block(),
                "model": {"name": MODEL},
                "engine": {
                    "kind": "sim",
                    "port": 8400,
                    "bind": "0.0.0.0",
                    "health_timeout_s": 60,
                    "lmcache": {"enabled": False},
                    "sim": {"hardware": "a100-80gb", "time_scale": 10},
                },
                "router": {"host": head.name, "port": 8480, "health_interval_s": 0.5},
                "hosts": [
                    {"name": head.name, "address": head.address, "roles": ["router"]},
                    {"name": engine.name, "address": engine.address},
                ],
            },
            sort_keys=False,
        )
    )
    env = {**os.environ, "COLUMNS": "200", "STACKCTL_CACHE": str(root / "cache")}
    stackctl = venv / "bin" / "stackctl"
    try:
        up = _run(
            [stackctl, "up", inventory, "--yes", "--wheelhouse", fresh_install["deps"]],
            cwd=root,
            env=env,
            timeout=600,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert "verified with a completion" in up.stdout
        shipped = list((root / "cache" / "wheels").rglob("stackctl-*.whl"))
        assert len(shipped) == 1, shipped  # written by the plain install itself
        status = _run([stackctl, "status", inventory, "-o", "json"], cwd=root, env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["overall"] == "healthy"
        again = _run(
            [stackctl, "up", inventory, "--yes", "--wheelhouse", fresh_install["deps"]],
            cwd=root,
            env=env,
        )
        assert (
            again.returncode == 0 and f"{engine.name}: no changes" in again.stdout + again.stderr
        ), again.stdout + again.stderr
    finally:
        _run([stackctl, "down", inventory, "--purge", "--yes"], cwd=root, env=env)
