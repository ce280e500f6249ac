"""The stackctl wheel that `up` installs on router and simulator hosts.

It comes from ``--wheelhouse DIR`` when that holds one; otherwise it is built from the source
checkout stackctl runs from, once per content hash of the sources (cached).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from .errors import DeployError
from .resources import _SOURCE_ROOT

CACHE = Path(os.environ.get("STACKCTL_CACHE", "~/.cache/stackctl")).expanduser() / "wheels"


def _source_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for top in ("stackctl", "roles", "templates"):
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    for name in ("setup.cfg", "pyproject.toml"):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def build_stackctl_wheel() -> Path:
    root = _SOURCE_ROOT
    if not (root / "setup.cfg").is_file():
        raise DeployError("stackctl is not running from a source checkout, so it cannot build its own wheel for the hosts; pass --wheelhouse DIR holding a stackctl-*.whl (build one with `pip wheel --no-deps .`).")
    out = CACHE / _source_digest(root)
    existing = sorted(out.glob("stackctl-*.whl"))
    if existing:
        return existing[0]
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(root)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise DeployError(f"building the stackctl wheel failed:\n{result.stderr[-2000:]}")
    return sorted(out.glob("stackctl-*.whl"))[0]


def wheels_for_upload(wheelhouse: Path | None, need_stackctl: bool) -> list[Path]:
    """Every file to upload to the hosts' wheel directory (the wheelhouse, plus our wheel)."""
    files = []
    if wheelhouse is not None:
        if not wheelhouse.is_dir():
            raise DeployError(f"--wheelhouse {wheelhouse}: no such directory.")
        files = sorted(p for p in wheelhouse.iterdir() if p.is_file() and p.suffix in (".whl", ".gz", ".zip"))
    if need_stackctl and not any(p.name.startswith("stackctl-") for p in files):
        files.append(build_stackctl_wheel())
    return files
