"""A stand-in for nvidia-smi on testbed hosts: answers the queries stackctl's probe makes from a
JSON state file, so the GPU host checks run for real on machines without GPUs.

State (JSON)::

    {"driver_version": "580.65.06", "cuda_version": "13.0",
     "gpus": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA A100-SXM4-80GB", "memory_total_mib": 81920,
               "memory_used_mib": 0, "persistence_mode": "Enabled", "ecc_uncorrected": 0}],  # null: "[N/A]"
     "apps": [{"pid": 4242, "gpu_uuid": "GPU-...", "used_mib": 30000}]}

Answers, as nvidia-smi prints them: plain ``nvidia-smi`` (the header with driver and CUDA
version), ``--query-gpu=FIELDS`` and ``--query-compute-apps=FIELDS`` with
``--format=csv,noheader,nounits``. A field or option it does not know exits 2, as nvidia-smi
does, so a probe asking for something new fails loudly here too.

``install(bin_dir, state)`` writes ``bin_dir/nvidia-smi`` (a shell wrapper around this file)
and the state; a testbed host has ``bin_dir`` first on its SSH sessions' PATH
(``TestHost.bin_dir``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path


def default_state(n_gpus: int = 1) -> dict:
    """A healthy host: driver 580 (CUDA 13.0), idle GPUs, ECC clean, persistence mode on."""
    return {
        "driver_version": "580.65.06",
        "cuda_version": "13.0",
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-00000000-0000-4000-8000-{i:012d}",
                "name": "NVIDIA A100-SXM4-80GB",
                "memory_total_mib": 81920,
                "memory_used_mib": 0,
                "persistence_mode": "Enabled",
                "ecc_uncorrected": 0,
            }
            for i in range(n_gpus)
        ],
        "apps": [],
    }


def install(bin_dir: Path, state: dict, python: str = sys.executable) -> Path:
    """Put a fake nvidia-smi answering from ``state`` into ``bin_dir``; returns the state file."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_file = bin_dir / "nvidia-smi.json"
    write_state(state_file, state)
    wrapper = bin_dir / "nvidia-smi"
    wrapper.write_text(
        f'#!/bin/sh\nexec {shlex.quote(python)} {shlex.quote(__file__)} {shlex.quote(str(state_file))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return state_file


def write_state(state_file: Path, state: dict) -> None:
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file)


def _na(value) -> str:
    return "[N/A]" if value is None else str(value)


def _gpu_field(state: dict, gpu: dict, name: str) -> str:
    values = {
        "index": gpu["index"],
        "uuid": gpu["uuid"],
        "name": gpu["name"],
        "memory.total": gpu["memory_total_mib"],
        "memory.used": gpu["memory_used_mib"],
        "driver_version": state["driver_version"],
        "persistence_mode": gpu["persistence_mode"],
        "ecc.errors.uncorrected.volatile.total": gpu["ecc_uncorrected"],
    }
    if name not in values:
        raise KeyError(name)
    return _na(values[name])


def _app_field(app: dict, name: str) -> str:
    values = {"pid": app["pid"], "gpu_uuid": app["gpu_uuid"], "used_memory": app["used_mib"]}
    if name not in values:
        raise KeyError(name)
    return _na(values[name])


def header(state: dict) -> str:
    return (
        "+-----------------------------------------------------------------------------------------+\n"
        f"| NVIDIA-SMI {state['driver_version']:<22} Driver Version: {state['driver_version']:<14} "
        f"CUDA Version: {state['cuda_version']:<9}|\n"
        "+-----------------------------------------+------------------------+----------------------+\n"
    )


def answer(state: dict, args: list[str]) -> tuple[int, str]:
    """(exit code, output) of ``nvidia-smi ARGS`` on a host in ``state``."""
    if not args:
        return 0, header(state)
    options = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in args)
    if options.pop("--format", None) != "csv,noheader,nounits" or len(options) != 1:
        return 2, f"fake nvidia-smi: unsupported arguments {args}\n"
    ((query, fields),) = options.items()
    try:
        if query == "--query-gpu":
            rows = [[_gpu_field(state, gpu, f) for f in fields.split(",")] for gpu in state["gpus"]]
        elif query == "--query-compute-apps":
            rows = [[_app_field(app, f) for f in fields.split(",")] for app in state["apps"]]
        else:
            return 2, f"fake nvidia-smi: unsupported option {query}\n"
    except KeyError as exc:
        return 2, f'Field "{exc.args[0]}" is not a valid field to query.\n'
    return 0, "".join(", ".join(row) + "\n" for row in rows)


def main(argv: list[str]) -> int:
    state = json.loads(Path(argv[0]).read_text())
    code, text = answer(state, argv[1:])
    (sys.stdout if code == 0 else sys.stderr).write(text)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
