"""Locate the role and template directories, in a source checkout or an installed wheel.

In the repository they live at the top level (``roles/``, ``templates/``), as the layout
asks; the wheel ships them as the data packages ``stackctl._roles`` and ``stackctl._templates``
(see ``package_dir`` in setup.cfg).
"""

from __future__ import annotations

import importlib
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """Path of the ``roles`` or ``templates`` directory."""
    try:  # a data-only (namespace) package: its first search location is the directory
        return Path(list(importlib.import_module(f"stackctl._{name}").__path__)[0])
    except ModuleNotFoundError:
        candidate = _SOURCE_ROOT / name
        if candidate.is_dir():
            return candidate
        raise


def roles_dir() -> Path:
    return data_dir("roles")


def templates_dir() -> Path:
    return data_dir("templates")
