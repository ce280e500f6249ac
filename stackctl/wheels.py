"""Wheels for the hosts: the stackctl wheel, and which part of a wheelhouse each host needs.

The stackctl wheel (router and simulator hosts) comes from ``--wheelhouse DIR`` when that
holds one; otherwise stackctl writes it itself from the files it runs from. stackctl is pure
Python, so a wheel is a zip of its modules, its role and template data and a few metadata
files (PEP 427): writing it needs no build backend, no `wheel` package and no network, and
works the same from a checkout, an editable install or a plain wheel install. The archive is
reproducible (sorted entries, fixed timestamps), so the same sources give the same bytes and
hosts are not reinstalled for nothing. Each host is sent only the wheels its requirements reach.
"""

from __future__ import annotations

import base64
import configparser
import functools
import hashlib
import importlib.metadata
import io
import os
import zipfile
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import Version

from . import __version__
from .errors import DeployError
from .resources import _SOURCE_ROOT, data_dir

CACHE = Path(os.environ.get("STACKCTL_CACHE", "~/.cache/stackctl")).expanduser() / "wheels"
PACKAGE = "stackctl"
DATA_PACKAGES = {"roles": "_roles", "templates": "_templates"}  # setup.cfg's package_dir
DATA_SUFFIXES = (".yaml", ".j2")  # setup.cfg's package_data
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: reproducible archives
WHEEL_TAG = "py3-none-any"


def package_name(requirement: str) -> str:
    """The project a requirement names (``vllm==0.32.0`` -> ``vllm``)."""
    return Requirement(requirement).name


def _package_files() -> dict[str, bytes]:
    """Archive path -> content of every file the wheel ships, read from where stackctl runs."""
    package_dir = Path(__file__).resolve().parent
    files: dict[str, bytes] = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if rel.parts[0] not in DATA_PACKAGES.values():
            files[f"{PACKAGE}/{rel.as_posix()}"] = path.read_bytes()
    for name, package in DATA_PACKAGES.items():
        root = data_dir(name)
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in DATA_SUFFIXES:
                files[f"{PACKAGE}/{package}/{path.relative_to(root).as_posix()}"] = (
                    path.read_bytes()
                )
    return files


def _metadata() -> tuple[str, str]:
    """METADATA and entry_points.txt: from setup.cfg in a checkout, else from the installed
    distribution (a plain install has no setup.cfg, only its own metadata)."""
    setup_cfg = _SOURCE_ROOT / "setup.cfg"
    if setup_cfg.is_file():
        return _metadata_from_setup_cfg(setup_cfg)
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DeployError(
            "stackctl runs from neither a source checkout nor an installed distribution, so it cannot write its own wheel for the hosts; install it with pip (see README) or pass --wheelhouse DIR holding a stackctl-*.whl."
        ) from None
    if dist.version != __version__:
        raise DeployError(
            f"the installed stackctl metadata says version {dist.version} but the code is {__version__}; reinstall stackctl (pip install --force-reinstall ...) or pass --wheelhouse DIR holding a stackctl-*.whl."
        )
    return dist.read_text("METADATA") or "", dist.read_text("entry_points.txt") or ""


def _metadata_from_setup_cfg(path: Path) -> tuple[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(path)
    meta = Message()
    meta["Metadata-Version"] = "2.1"
    meta["Name"] = PACKAGE
    meta["Version"] = __version__
    meta["Summary"] = cfg.get("metadata", "description", fallback="")
    meta["License"] = cfg.get("metadata", "license", fallback="")
    meta["Requires-Python"] = cfg.get("options", "python_requires", fallback=">=3.11")
    for line in _lines(cfg.get("options", "install_requires", fallback="")):
        meta["Requires-Dist"] = line
    for extra, requirements in (
        cfg["options.extras_require"].items() if cfg.has_section("options.extras_require") else ()
    ):
        meta["Provides-Extra"] = extra
        for line in _lines(requirements):
            req = Requirement(line)
            marker = f"({req.marker}) and " if req.marker else ""
            req.marker = None
            meta["Requires-Dist"] = f'{req}; {marker}extra == "{extra}"'
    entry_points = ""
    if cfg.has_section("options.entry_points"):
        for group, text in cfg["options.entry_points"].items():
            entry_points += f"[{group}]\n" + "".join(f"{line}\n" for line in _lines(text)) + "\n"
    return meta.as_string(), entry_points


def _lines(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_bytes() -> tuple[str, bytes]:
    """The stackctl wheel's file name and bytes, written from the running code."""
    version = str(Version(__version__))
    dist_info = f"{PACKAGE}-{version}.dist-info"
    metadata, entry_points = _metadata()
    files = _package_files()
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: stackctl {version}\nRoot-Is-Purelib: true\nTag: {WHEEL_TAG}\n".encode()
    )
    if entry_points:
        files[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    files[f"{dist_info}/top_level.txt"] = f"{PACKAGE}\n".encode()
    record = (
        "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
        + f"{dist_info}/RECORD,,\n"
    )
    files[f"{dist_info}/RECORD"] = record.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():  # RECORD last, as PEP 427 recommends
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return f"{PACKAGE}-{version}-{WHEEL_TAG}.whl", buffer.getvalue()


def build_stackctl_wheel(out_dir: Path | None = None) -> Path:
    """Write the stackctl wheel (once per content: cached under its sha256) and return its path."""
    name, data = wheel_bytes()
    out = out_dir or CACHE / hashlib.sha256(data).hexdigest()[:16]
    path = out / name
    if not (path.is_file() and path.read_bytes() == data):
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def wheels_for_upload(wheelhouse: Path | None, need_stackctl: bool) -> list[Path]:
    """Every file to upload to the hosts' wheel directory (the wheelhouse, plus our wheel)."""
    files = []
    if wheelhouse is not None:
        if not wheelhouse.is_dir():
            raise DeployError(f"--wheelhouse {wheelhouse}: no such directory.")
        files = sorted(
            p for p in wheelhouse.iterdir() if p.is_file() and p.suffix in (".whl", ".gz", ".zip")
        )
    if need_stackctl and stackctl_wheel(files) is None:
        files.append(build_stackctl_wheel())
    return files


def stackctl_wheel(files: list[Path]) -> Path | None:
    """The stackctl wheel among ``files`` (what ``wheels_for_upload`` returned), if any."""
    return next((f for f in files if _wheel_project(f) == PACKAGE), None)


def requires_stackctl(requirements: list[str]) -> bool:
    return any(canonicalize_name(package_name(r)) == PACKAGE for r in requirements)


def _wheel_project(path: Path) -> str | None:
    """The canonical project name of a wheel file, None for anything else (an sdist)."""
    if path.suffix != ".whl":
        return None
    try:
        return canonicalize_name(parse_wheel_filename(path.name)[0])
    except InvalidWheelFilename as exc:
        raise DeployError(f"wheelhouse file {path}: {exc}; rename or remove it.") from None


@functools.cache
def _wheel_requires(path: Path, mtime_ns: int) -> tuple[NormalizedName, ...]:
    """Projects in the wheel's ``Requires-Dist``, markers and extras ignored."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(
            n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        )
        headers = HeaderParser().parsestr(wheel.read(metadata).decode("utf-8", "replace"))
    names = []
    for line in headers.get_all("Requires-Dist") or []:
        try:
            names.append(canonicalize_name(Requirement(line).name))
        except InvalidRequirement:
            continue  # a malformed entry in someone else's wheel: pip will say so if it matters
    return tuple(names)


def wheels_needed(files: list[Path], requirements: list[str]) -> list[Path]:
    """The part of a wheelhouse one host needs: the wheels of ``requirements`` and, transitively,
    of everything their metadata requires. Markers and extras are not evaluated, so this may
    take a little more than pip will install, never less; files that are not wheels (sdists)
    are always kept. Spares the router node the GBs of torch and vLLM wheels."""
    by_name: dict[str, list[Path]] = {}
    needed = [f for f in files if f.suffix != ".whl"]
    for wheel in files:
        project = _wheel_project(wheel)
        if project:
            by_name.setdefault(project, []).append(wheel)
    todo = [canonicalize_name(package_name(r)) for r in requirements]
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
                raise DeployError(
                    f"wheelhouse file {wheel} is not a readable wheel ({exc}); remove or replace it."
                ) from exc
    return sorted(needed)
