"""The probe (stackctl/probe.py): its JSON answers for a fresh and a prepared deploy dir, GPUs
through a fake nvidia-smi, HTTP and health waits against fake engines, and the model copy's
prepare/finish/state cycle.

The probe runs on hosts as a child interpreter, sent packed in the command line. The first tests
run it that way (``facts.run_probe`` through the local connector) and check that the wire gives
what the module's own functions give; the others call those functions in this process, which is
the same code and lets coverage see it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stackctl import probe
from stackctl.connect import LocalConnector
from stackctl.facts import run_probe
from stackctl.testing import free_port
from tests.helpers import fake_nvidia_smi
from tests.helpers.fake_connector import write_inventory
from tests.helpers.fake_services import FakeService

VOLATILE = ("mem_available_bytes", "disk_free_bytes", "listening_ports")


def spec(deploy: Path, python: str = "/nonexistent/venv/bin/python", **more) -> dict:
    """A `facts` request for a deploy dir laid out as `up` lays it out."""
    return {
        "action": "facts",
        "deploy_dir": str(deploy),
        "python": python,
        "supervisor_conf": f"{deploy}/supervisor/supervisord.conf",
        "supervisor_pidfile": f"{deploy}/run/supervisord.pid",
        "unit": None,
        "unit_path": None,
        "files": [f"{deploy}/supervisor/supervisord.conf", f"{deploy}/config/router.yaml"],
        "secrets": [f"{deploy}/secrets/router_api_keys"],
        "installed_marker": f"{deploy}/venv/.stackctl-wheel",
        **more,
    }


@pytest.fixture
def conn(tmp_path):
    from stackctl.inventory import load_inventory

    path, _ = write_inventory(tmp_path, engine_hosts=1)
    return LocalConnector(load_inventory(path).host("sim1"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_facts_of_a_fresh_deploy_dir_over_the_wire(conn, tmp_path):
    deploy = tmp_path / "fresh" / "deploy"
    request = spec(deploy)
    answer = run_probe(conn, sys.executable, request)
    assert answer["files"] == {path: {"sha256": None, "mode": None} for path in request["files"]}
    assert answer["secrets"] == {request["secrets"][0]: None}
    assert (
        answer["venv_python"] is False
        and answer["deploy_dir_uid"] is None
        and answer["installed_marker"] is None
    )
    assert answer["supervisor"] == {"running": False, "pid": None, "programs": {}}
    assert (
        answer["python_info"]["version"] == list(sys.version_info[:3])
        and answer["python_info"]["venv"] is True
    )
    assert answer["disk_free_bytes"] > 0  # of the nearest existing parent
    assert "gpus" not in answer and "packages" not in answer and "model" not in answer  # not asked
    local = probe.facts(request)  # the module in this process answers the same
    assert {k: v for k, v in answer.items() if k not in VOLATILE} == {
        k: v for k, v in json.loads(json.dumps(local)).items() if k not in VOLATILE
    }


def test_facts_of_a_prepared_deploy_dir_over_the_wire(conn, tmp_path):
    deploy = tmp_path / "deploy"
    for sub in ("supervisor", "config", "secrets", "venv"):
        (deploy / sub).mkdir(parents=True)
    conf, router, keys = (
        deploy / "supervisor/supervisord.conf",
        deploy / "config/router.yaml",
        deploy / "secrets/router_api_keys",
    )
    conf.write_bytes(b"[supervisord]\n")
    router.write_bytes(b"engines: []\n")
    keys.write_bytes(b"k1\n")
    conf.chmod(0o644)
    router.chmod(0o640)
    keys.chmod(0o600)
    (deploy / "venv/.stackctl-wheel").write_text("abc123\n")
    answer = run_probe(conn, sys.executable, spec(deploy, python=sys.executable))
    assert answer["files"] == {
        str(conf): {"sha256": sha(b"[supervisord]\n"), "mode": 0o644},
        str(router): {"sha256": sha(b"engines: []\n"), "mode": 0o640},
    }
    assert answer["secrets"] == {str(keys): sha(b"k1\n")}  # a hash only, never the value
    assert "k1" not in json.dumps(answer)
    assert answer["installed_marker"] == "abc123" and answer["venv_python"] is True
    assert answer["deploy_dir_uid"] == os.getuid()


def test_packages_are_read_from_the_programs_interpreter(tmp_path):
    answer = probe.facts(
        spec(tmp_path, python=sys.executable, packages=["pyyaml", "no-such-package-xyz"])
    )
    import yaml

    assert answer["packages"] == {"pyyaml": yaml.__version__, "no-such-package-xyz": None}
    assert (
        probe.facts(spec(tmp_path, packages=["pyyaml"]))["packages"] is None
    )  # no venv yet: nothing to ask


def test_a_listening_port_is_seen(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port in probe.facts(spec(tmp_path))["listening_ports"]


def test_a_stale_pidfile_is_not_a_running_supervisord(tmp_path):
    (tmp_path / "run").mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run/supervisord.pid").write_text(
        f"{gone.pid}\n"
    )  # supervisord was killed: its pid is free
    assert probe.facts(spec(tmp_path, python=sys.executable))["supervisor"] == {
        "running": False,
        "pid": None,
        "programs": {},
    }
    (tmp_path / "run/supervisord.pid").write_text("garbage\n")
    assert probe.facts(spec(tmp_path, python=sys.executable))["supervisor"]["running"] is False


def test_a_live_pid_that_is_not_supervisord_is_not_taken_for_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "supervisor").mkdir()
    (tmp_path / "supervisor/supervisord.conf").write_text(
        f"[supervisorctl]\nserverurl=unix://{tmp_path}/run/supervisor.sock\n"
    )
    other = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "run/supervisord.pid").write_text(f"{other.pid}\n")
        supervisor = probe.facts(spec(tmp_path, python=sys.executable))["supervisor"]
    finally:
        other.kill()
        other.wait()
    assert not any(name.startswith("unix://") for name in supervisor["programs"]), supervisor
    assert supervisor["running"] is False


# ------------------------------------------------------------------ GPUs


@pytest.fixture
def nvidia_smi(tmp_path, monkeypatch):
    """A fake nvidia-smi first on PATH (tests/helpers/fake_nvidia_smi.py); returns its state file."""
    bin_dir = tmp_path / "bin"
    state = fake_nvidia_smi.default_state(2)
    state_file = fake_nvidia_smi.install(bin_dir, state)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state_file, state


def test_gpus_and_whose_processes_run_on_them_over_the_wire(conn, tmp_path, nvidia_smi):
    state_file, state = nvidia_smi
    ours = subprocess.Popen(
        ["sleep", "30"], start_new_session=True
    )  # an engine's leftover, in its recorded group
    try:
        pgid_file = tmp_path / "engine-0.pgid"
        pgid_file.write_text(f"{ours.pid}\n")
        state["gpus"][1]["ecc_uncorrected"] = None  # ECC off: "[N/A]"
        state["apps"] = [
            {"pid": ours.pid, "gpu_uuid": state["gpus"][0]["uuid"], "used_mib": 30000},
            {"pid": 1, "gpu_uuid": state["gpus"][1]["uuid"], "used_mib": 500},
        ]
        fake_nvidia_smi.write_state(state_file, state)
        answer = run_probe(
            conn, sys.executable, spec(tmp_path, gpus=True, engine_pgid_files=[str(pgid_file)])
        )["gpus"]
    finally:
        ours.kill()
        ours.wait()
    assert [g["index"] for g in answer["gpus"]] == [0, 1]
    assert (
        answer["gpus"][0]["memory_total_mib"] == 81920
        and answer["gpus"][0]["driver_version"] == "580.65.06"
    )
    assert [g["ecc_uncorrected"] for g in answer["gpus"]] == [0, None]
    assert answer["cuda_version"] == "13.0"
    assert [(a["pid"], a["ours"]) for a in answer["apps"]] == [(ours.pid, True), (1, False)]
    assert answer["apps"][0]["command"] == "sleep"


def test_no_nvidia_smi_is_an_error_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert probe.facts(spec(tmp_path, gpus=True))["gpus"] == {"error": "nvidia-smi not found"}


def test_a_failing_nvidia_smi_reports_what_it_said(tmp_path, monkeypatch):
    broken = tmp_path / "nvidia-smi"
    broken.write_text(
        '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver." >&2\nexit 9\n'
    )
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert probe.facts(spec(tmp_path, gpus=True))["gpus"] == {
        "error": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    }


def test_an_unexpected_nvidia_smi_answer_is_an_error(tmp_path, monkeypatch):
    odd = tmp_path / "nvidia-smi"
    odd.write_text("#!/bin/sh\necho '0, GPU-1, only three fields'\n")
    odd.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert probe.gpus()["error"].startswith("unexpected nvidia-smi --query-gpu line")


# ------------------------------------------------------------------ HTTP from the host


@pytest.fixture
def engine():
    service = FakeService(free_port(), name="e1").start()
    yield service
    service.stop()


def test_http_gets_posts_and_sends_the_routers_key(conn, engine, tmp_path):
    keys = tmp_path / "router_api_keys"
    keys.write_text("k-first,k-second\n")
    base = f"http://127.0.0.1:{engine.port}"
    closed = f"http://127.0.0.1:{free_port()}"
    answers = run_probe(
        conn,
        sys.executable,
        {
            "action": "http",
            "requests": [
                {"url": f"{base}/health"},
                {
                    "url": f"{base}/v1/completions",
                    "body": json.dumps({"prompt": "x"}),
                    "bearer_file": str(keys),
                    "max_body": 10,
                },
                {"url": f"{base}/nothing-here"},
                {"url": closed, "timeout": 2},
            ],
        },
    )
    health, completion, missing, refused = answers
    assert health["status"] == 200 and health["url"] == f"{base}/health" and health["seconds"] >= 0
    assert completion["status"] == 200 and len(completion["body"]) == 10  # cut at max_body
    assert missing["status"] == 404
    assert refused["status"] is None and "Connection refused" in refused["body"]
    assert [(r["method"], r["path"], r["authorization"]) for r in engine.requests] == [
        ("GET", "/health", None),
        ("POST", "/v1/completions", "Bearer k-first"),
        ("GET", "/nothing-here", None),
    ]


def test_http_sends_the_first_key_of_a_named_keys_file(conn, engine, tmp_path):
    keys = tmp_path / "router_api_keys"
    keys.write_text("team-a sk-a\nteam-b sk-b\n")  # what `up` writes for router.clients
    request = {"url": f"http://127.0.0.1:{engine.port}/health", "bearer_file": str(keys)}
    run_probe(conn, sys.executable, {"action": "http", "requests": [request]})
    assert [r["authorization"] for r in engine.requests] == ["Bearer sk-a"]


def test_wait_returns_the_healthy_and_the_last_answer_of_the_others(engine):
    engine.health_status = 200
    healthy, dead = (
        f"http://127.0.0.1:{engine.port}/health",
        f"http://127.0.0.1:{free_port()}/health",
    )
    answer = probe.wait({"urls": [healthy, dead], "timeout": 0.3, "interval": 0.1})
    assert answer["healthy"] == [healthy] and answer["unhealthy"] == [dead]
    assert answer["last"][dead]["status"] is None and answer["last"][healthy]["status"] == 200
    assert (
        sum(r["path"] == "/health" for r in engine.requests) == 1
    )  # a healthy URL is not asked again


# ------------------------------------------------------------------ model copies


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


WEIGHTS = {"config.json": b"{}", "model.safetensors": b"0123456789", "tokenizer.json": b'{"t": 1}'}
MANIFEST = {
    "format": 1,
    "model": "org/m",
    "origin": "test",
    "files": {k: len(v) for k, v in WEIGHTS.items()},
}


def test_a_model_copy_is_assembled_checked_and_renamed_into_place(tmp_path):
    target = tmp_path / "models" / "org" / "m"
    model = {"path": str(target), "name": "org/m", "managed": True}
    assert probe.model_state(model)["complete"] is False
    prepared = probe.model_prepare(model)
    partial = Path(prepared["partial"])
    assert prepared["bytes"] == 0 and partial.is_dir() and partial.parent == target.parent
    write_files(partial, {**WEIGHTS, "stray.safetensors": b"old"})
    finished = probe.model_finish({**model, "manifest": MANIFEST})
    assert finished == {"ok": True, "files": 3, "bytes": sum(len(v) for v in WEIGHTS.values())}
    assert not partial.exists()
    assert sorted(os.listdir(target)) == sorted(
        [*WEIGHTS, probe.MODEL_MANIFEST]
    )  # the stray weight was removed
    state = probe.model_state(model)
    assert state["complete"] is True and state["problems"] == [] and state["manifest"] is True
    assert probe.model_state({**model, "name": "org/other"})["problems"] == [
        "its manifest is for model 'org/m', not 'org/other'"
    ]


def test_a_short_file_keeps_the_copy_partial(tmp_path):
    target = tmp_path / "m"
    model = {"path": str(target), "name": "org/m", "managed": True}
    partial = Path(probe.model_prepare(model)["partial"])
    write_files(partial, {**WEIGHTS, "model.safetensors": b"012"})
    finished = probe.model_finish({**model, "manifest": MANIFEST})
    assert finished == {"ok": False, "problems": ["model.safetensors has 3 of its 10 bytes"]}
    assert partial.is_dir() and not target.exists()
    assert probe.model_prepare(model)["bytes"] == len(b"{}") + 3 + len(
        b'{"t": 1}'
    )  # a re-run resumes from it


def test_an_unfinished_copy_at_the_target_is_resumed_not_trusted(tmp_path):
    target = tmp_path / "m"
    write_files(
        target, {"config.json": b"{}", "model.safetensors": b"01234"}
    )  # no manifest: never finished
    model = {"path": str(target), "name": "org/m", "managed": True}
    state = probe.model_state(model)
    assert state["complete"] is False and "never finished" in state["problems"][0]
    prepared = probe.model_prepare(model)
    assert not target.exists() and prepared["bytes"] == 7  # moved aside to resume from
    facts = probe.facts(spec(tmp_path, model=model))
    assert facts["model_present"] is False and facts["model"]["partial_bytes"] == 7


def test_an_operator_provided_model_dir_needs_config_and_weights(tmp_path):
    target = tmp_path / "mine"
    model = {"path": str(target), "name": "org/m", "managed": False}
    assert probe.model_state(model)["problems"] == [f"{target} does not exist"]
    write_files(target, {"model.safetensors": b"x"})
    assert probe.model_state(model)["problems"] == [f"{target} has no config.json"]
    write_files(target, {"config.json": b"{}", "model.safetensors": b""})
    assert probe.model_state(model)["problems"] == [
        f"{target} has no weights (*.safetensors, *.bin or *.pt)"
    ]
    write_files(target, {"model.safetensors": b"w"})
    assert probe.model_state(model)["complete"] is True
