"""The systemd unit per cluster: rendered correctly and accepted by `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from stackctl.roles import systemd_command

REPO = Path(__file__).resolve().parents[2]


def unit_of(plan) -> str:
    return next(f.content for f in plan.files if f.path == plan.unit_file)


def keys(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI is set but systemd-analyze is missing (apt-get install systemd; scripts/test does it)",
                pytrace=False,
            )
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return tool


def verify(tool: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
    )


def test_a100_8_unit_values():
    plans = plan_cluster(load_inventory(REPO / "inventory" / "a100-8.yaml"))
    head, gpu = plans[0], plans[1]
    assert head.unit_name == gpu.unit_name == "stackctl-a100-8.service"
    assert gpu.system_unit_path == "/etc/systemd/system/stackctl-a100-8.service"
    values = keys(unit_of(gpu))
    assert (
        values["ExecStart"]
        == "/opt/stackctl/venv/bin/python -m supervisor.supervisord -c /opt/stackctl/supervisor/supervisord.conf -n"
    )
    assert (
        values["User"] == "stackctl"
        and values["Restart"] == "always"
        and values["KillMode"] == "mixed"
    )
    assert int(values["LimitNOFILE"]) >= 65536
    assert int(values["TimeoutStopSec"]) > max(p.stopwaitsecs for p in gpu.programs)
    assert values["WantedBy"] == "multi-user.target"
    local = plan_cluster(load_inventory(REPO / "inventory" / "local.yaml"))
    assert all(p.unit_name is None for p in local)  # the demo's local hosts install no unit


def test_systemd_quoting():
    assert (
        systemd_command(["/opt/a b/python", "100%", "$HOME", 'say "hi"'])
        == '"/opt/a b/python" "100%%" "$$HOME" "say \\"hi\\""'
    )


def test_a100_8_unit_passes_systemd_analyze_verify(tmp_path):
    """As rendered for the reference inventory; only its venv (absent here) may be reported."""
    tool = systemd_analyze()
    plan = plan_cluster(load_inventory(REPO / "inventory" / "a100-8.yaml"))[1]
    path = tmp_path / plan.unit_name
    path.write_text(unit_of(plan))
    result = verify(tool, path)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    allowed = f"{plan.unit_name}: Command /opt/stackctl/venv/bin/python is not executable: No such file or directory"
    assert all(line == allowed for line in problems), problems


def test_unit_with_an_existing_interpreter_verifies_clean(tmp_path):
    """The same template for an interpreter that exists (spaces and % in its path; a deploy
    dir may hold neither: it is written bare into supervisord.conf, so validate refuses that)."""
    tool = systemd_analyze()
    python = tmp_path / "py 100%" / "bin" / "python"
    python.parent.mkdir(parents=True)
    os.symlink(shutil.which("python3"), python)
    data = yaml.safe_load((REPO / "inventory" / "a100-8.yaml").read_text())
    data["deploy_dir"] = str(tmp_path / "deploy")
    data["install"], data["python"] = False, str(python)
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump(data))
    plan = plan_cluster(load_inventory(inventory))[0]
    path = tmp_path / plan.unit_name
    path.write_text(unit_of(plan))
    result = verify(tool, path)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
