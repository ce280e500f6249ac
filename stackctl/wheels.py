"""Wheels for the hosts: the stackctl wheel, and which part of a wheelhouse each host needs.

The stackctl wheel (router and simulator hosts) comes from ``--wheelhouse DIR`` when that
holds one; otherwise it is built from the source checkout stackctl runs from, once per content
hash of the sources (cached). Each host is sent only the wheels its requirements reach.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from .errors import DeployError
from .facts import package_name
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


_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical_name(name: str) -> str:
    """PEP 503 normalized distribution name (``Foo_Bar`` and ``foo-bar`` are one project)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=None)
def _wheel_requires(path: Path, mtime_ns: int) -> tuple[str, ...]:
    """Names in the wheel's ``Requires-Dist``, markers and extras ignored."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(wheel.read(metadata).decode("utf-8", "replace"))
    names = (_REQUIREMENT_NAME.match(r) for r in headers.get_all("Requires-Dist") or [])
    return tuple(canonical_name(m.group(1)) for m in names if m)


def wheels_needed(files: list[Path], requirements: list[str]) -> list[Path]:
    """The part of a wheelhouse one host needs: the wheels of ``requirements`` and, transitively,
    of everything their metadata requires. Markers and extras are not evaluated, so this may
    take a little more than pip will install, never less; files that are not wheels (sdists)
    are always kept. Spares the router node the GBs of torch and vLLM wheels."""
    by_name: dict[str, list[Path]] = {}
    needed = [f for f in files if f.suffix != ".whl"]
    for wheel in files:
        if wheel.suffix == ".whl":
            by_name.setdefault(canonical_name(wheel.name.split("-", 1)[0]), []).append(wheel)
    todo = [canonical_name(package_name(r)) for r in requirements]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for wheel in by_name.get(name, ()):
            needed.append(wheel)
            try:
                todo.extend(_wheel_requires(wheel, wheel.stat().st_mtime_ns))
            except (OSError, zipfile.BadZipFile, StopIteration) as exc:
                raise DeployError(f"wheelhouse file {wheel} is not a readable wheel ({exc}); remove or replace it.") from exc
    return sorted(needed)
