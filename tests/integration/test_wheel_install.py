"""The wheel stackctl writes for its hosts: reproducible, installable by plain pip, complete
(roles and templates), and writable again from a plain, non-editable install of itself."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

from stackctl.wheels import build_stackctl_wheel, wheel_bytes

REPO = Path(__file__).resolve().parents[2]


def _members(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _requires(members: dict[str, bytes]) -> list[str]:
    metadata = next(data for name, data in members.items() if name.endswith(".dist-info/METADATA"))
    return sorted(HeaderParser().parsestr(metadata.decode()).get_all("Requires-Dist") or [])


def test_wheel_is_reproducible_and_records_every_file(tmp_path):
    first = build_stackctl_wheel(tmp_path / "a")
    second = build_stackctl_wheel(tmp_path / "b")
    assert first.name == "stackctl-0.1.0-py3-none-any.whl"
    assert first.read_bytes() == second.read_bytes() == wheel_bytes()[1]
    members = _members(first)
    record = members["stackctl-0.1.0.dist-info/RECORD"].decode().splitlines()
    assert sorted(line.split(",")[0] for line in record) == sorted(members)
    assert "stackctl/_roles/engine/defaults.yaml" in members
    assert "stackctl/_templates/supervisord.conf.j2" in members
    assert not [n for n in members if "__pycache__" in n or n.endswith(".pyc")]
    assert (
        "stackctl = stackctl.cli:main"
        in members["stackctl-0.1.0.dist-info/entry_points.txt"].decode()
    )
    assert any(r.startswith("supervisor>=") for r in _requires(members))


@pytest.mark.slow
def test_wheel_installs_plans_and_rewrites_itself_from_the_plain_install(tmp_path):
    wheel = build_stackctl_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    # Dependencies come from this interpreter's site-packages (a .pth line each: appended to
    # sys.path after the venv's own, and their .pth files, such as an editable stackctl's, are
    # not run); stackctl itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (own,) = (venv / "lib").glob("python3*/site-packages")
    (own / "_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    inventory = tmp_path / "a100-8.yaml"
    inventory.write_text((REPO / "inventory" / "a100-8.yaml").read_text())
    where = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import stackctl, stackctl.resources as r; print(stackctl.__file__); print(r.roles_dir())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where
    result = subprocess.run(
        [str(venv / "bin/stackctl"), "plan", str(inventory), "-l", "gpu01"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "[program:engine-0]" in result.stdout
    assert "max_local_cpu_size: 120.0" in result.stdout
    # The installed copy (no setup.cfg, no sources) writes the wheel for the hosts from its own files.
    again = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import sys; from pathlib import Path; from stackctl.wheels import build_stackctl_wheel as b; print(b(Path(sys.argv[1])))",
            str(tmp_path / "again"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    original, rewritten = _members(wheel), _members(Path(again.stdout.strip()))

    def code(members):
        return {n: d for n, d in members.items() if not n.startswith("stackctl-0.1.0.dist-info/")}

    assert code(rewritten) == code(original)
    assert _requires(rewritten) == _requires(original)
