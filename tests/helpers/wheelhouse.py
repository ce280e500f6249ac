"""A wheelhouse of stackctl + its runtime dependencies, for installing on hosts without internet.

Cached under $STACKCTL_WHEEL_CACHE (default ~/.cache/stackctl-tests/wheelhouse) in two parts:
  deps-<hash of install_requires + python>/    dependency wheels, reused until requirements change
  project-<hash of setup.cfg + sources>/        the stackctl wheel (stackctl.wheels), rebuilt when any
                                                source changes
build_wheelhouse(dest) hard-links (or copies) both into dest, so dest is a plain --find-links dir.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stackctl.wheels import build_stackctl_wheel

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("stackctl", "roles", "templates")
BUILD_FILES = ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md")


def cache_root() -> Path:
    default = Path.home() / ".cache" / "stackctl-tests" / "wheelhouse"
    return Path(os.environ.get("STACKCTL_WHEEL_CACHE", default))


def runtime_requirements(repo: Path = REPO_ROOT) -> list[str]:
    """install_requires from setup.cfg, markers included, one requirement per entry."""
    parser = configparser.ConfigParser()
    parser.read(repo / "setup.cfg")
    raw = parser.get("options", "install_requires", fallback="")
    return [
        line.strip()
        for line in raw.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _hash_files(paths: list[Path], repo: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in paths if p.is_file()):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def deps_key(repo: Path = REPO_ROOT) -> str:
    """Only the requirements and the interpreter matter: other setup.cfg edits reuse the wheels."""
    digest = hashlib.sha256("\n".join(runtime_requirements(repo)).encode())
    digest.update(f"{sys.implementation.cache_tag} {sys.platform}".encode())
    return digest.hexdigest()[:16]


def project_key(repo: Path = REPO_ROOT) -> str:
    sources = [repo / name for name in BUILD_FILES]
    for directory in SOURCE_DIRS:
        sources += [
            p
            for p in (repo / directory).rglob("*")
            if "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        ]
    return _hash_files(sources, repo)


@contextlib.contextmanager
def locked(root: Path):
    """One builder at a time: parallel test sessions share the cache."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pip(*args: str, python: Path | str = sys.executable) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def build_once(final: Path, build) -> Path:
    """Build into a temp dir next to final, then rename: a crash never leaves a half cache."""
    if final.is_dir():
        return final
    scratch = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(scratch)
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _build_deps(out: Path, repo: Path) -> None:
    requirements = out / "requirements.txt"
    requirements.write_text("\n".join(runtime_requirements(repo)) + "\n")
    _pip("wheel", "--wheel-dir", str(out), "-r", str(requirements))


def _prune_projects(root: Path, keep: Path, newest: int = 3) -> None:
    """Sources change all day: keep only the few newest project wheels."""
    projects = sorted(
        (p for p in root.glob("project-*") if p.is_dir() and "." not in p.name),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in [p for p in projects if p != keep][newest - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def link_wheels(source: Path, dest: Path) -> None:
    """Hard-link (or copy) every wheel of ``source`` into ``dest``, keeping what is there."""
    for wheel in source.glob("*.whl"):
        target = dest / wheel.name
        if target.exists():
            continue
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)


def build_wheelhouse(dest: Path | str | None = None, repo: Path = REPO_ROOT) -> Path:
    """Return a directory holding the stackctl wheel and wheels of all its runtime dependencies."""
    root = cache_root()
    with locked(root):
        deps = build_once(root / f"deps-{deps_key(repo)}", lambda out: _build_deps(out, repo))
        project_dir = root / f"project-{project_key(repo)}"
        if not project_dir.is_dir():  # the wheel `up` itself would send (stackctl.wheels)
            build_once(project_dir, lambda out: build_stackctl_wheel(out))
            _prune_projects(root, keep=project_dir)
        project = project_dir
    dest = Path(dest) if dest is not None else root / f"house-{deps.name[5:]}-{project.name[8:]}"
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("stackctl-*.whl"):
        stale.unlink()
    link_wheels(deps, dest)
    link_wheels(project, dest)
    return dest
