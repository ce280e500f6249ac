"""engine.env secrets ({from_env: VAR}): masked by `plan`, never in a supervisor file, read by
the engine's command from a 0600 file at start; and `down --purge` removes only what `up` made."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from supervisor.options import UnhosedConfigParser
from test_inventory import GOOD, run_cli, write

from stackctl.inventory import load_inventory
from stackctl.ops import purge_command
from stackctl.plan import owned_entries, plan_cluster
from stackctl.show import MASK, format_host_plan

SECRET = "wandb-secret-value-0123456789"
ENGINE_KEY = "engine-key-abcdefghijklmnopqrstuvwxyz-0123456789"


def inventory(tmp_path: Path, kind: str) -> Path:
    return write(
        tmp_path,
        f"""\
    cluster: t
    model: {{name: m}}
    engine: {{kind: {kind}, port: 8000, lmcache: {{enabled: false}}, env: {{WANDB_API_KEY: {{from_env: WANDB_KEY}}, WANDB_PROJECT: p1}}}}
    router: {{host: a}}
    hosts:
      - {{name: a, connection: local, deploy_dir: {tmp_path}/deploy, python: /usr/bin/python3, install: false}}
    """,
    )


@pytest.mark.parametrize("kind", ["vllm", "sim"])
def test_plan_masks_the_secret_and_the_conf_does_not_hold_it(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_KEY", SECRET)  # even when set, plan never reads it
    path = inventory(tmp_path, kind)
    code, out, err = run_cli(["plan", str(path)], capsys)
    assert code == 0, err
    assert SECRET not in out
    assert f"{tmp_path}/deploy/secrets/env.WANDB_API_KEY (mode 0600) <- $WANDB_KEY = {MASK}" in out
    plan = plan_cluster(load_inventory(path))[0]
    engine = next(p for p in plan.programs if p.kind == "engine")
    assert "WANDB_API_KEY" not in engine.environment and engine.environment["WANDB_PROJECT"] == "p1"
    for spec in plan.files:
        assert SECRET not in spec.content and "WANDB_KEY" not in spec.content
    assert all(SECRET not in line for line in format_host_plan(plan).splitlines())


@pytest.mark.parametrize("kind", ["vllm", "sim"])
def test_the_rendered_command_exports_the_secret_file(kind, tmp_path):
    """Run the command supervisord would run (parsed back from the rendered conf), with the
    engine itself replaced by `env`: the variable is there, read from the 0600 file."""
    plan = plan_cluster(load_inventory(inventory(tmp_path, kind)))[0]
    engine = next(p for p in plan.programs if p.kind == "engine")
    conf = next(f for f in plan.files if f.path == plan.program_file(engine.name))
    parser = UnhosedConfigParser()
    parser.read_string(conf.content)
    argv = shlex.split(parser.get(f"program:{engine.name}", "command").replace("%%", "%"))
    assert argv == list(engine.command)
    cut = argv.index("--") + 1  # what follows is the engine's own argv
    assert argv[cut : cut + 4] == [
        "/usr/bin/python3",
        "-m",
        "stackctl.sim" if kind == "sim" else "vllm.entrypoints.cli.main",
        "serve",
    ]
    for d in plan.dirs.values():
        os.makedirs(d, exist_ok=True)
    secret = Path(next(s.path for s in plan.secrets if s.env_var == "WANDB_KEY"))
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    engine_key = Path(plan.engine_key_file)  # every engine gets the cluster's engine key too
    engine_key.write_text(ENGINE_KEY)
    engine_key.chmod(0o600)
    run = subprocess.run(
        argv[:cut] + ["/usr/bin/env"],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert f"WANDB_API_KEY={SECRET}\n" in run.stdout
    assert f"VLLM_API_KEY={ENGINE_KEY}\n" in run.stdout  # vLLM's (and the simulator's) API key
    secret.unlink()  # a missing secret file: the engine is not started at all
    run = subprocess.run(
        argv[:cut] + ["/usr/bin/env"],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode != 0 and "WANDB_API_KEY" not in run.stdout


def test_without_engine_env_secrets_only_the_engine_key_is_exported(tmp_path):
    path = write(tmp_path, GOOD)
    for plan in plan_cluster(load_inventory(path)):
        for program in plan.programs:
            if program.kind != "engine":
                assert "export-secrets" not in program.command
                continue
            start = program.command.index("export-secrets") + 1
            end = program.command.index("--", start)
            assert program.command[start:end] == ("VLLM_API_KEY", plan.engine_key_file)


def _purge(plan, tmp_path) -> None:
    subprocess.run(["/bin/sh", "-c", purge_command(plan)], check=True, timeout=30)


def _made_by_up(deploy: Path) -> None:
    for entry in owned_entries(str(deploy)):
        os.makedirs(f"{entry}/sub", exist_ok=True)
        Path(f"{entry}/sub/file").write_text("x")


@pytest.mark.parametrize("service_user", [None, "stackctl"])
def test_purge_removes_what_up_made_and_then_the_empty_deploy_dir(service_user, tmp_path):
    plan = plan_cluster(load_inventory(inventory(tmp_path, "sim")))[0]
    plan = dataclasses.replace(plan, host=dataclasses.replace(plan.host, service_user=service_user))
    deploy = Path(plan.deploy_dir)
    _made_by_up(deploy)
    if service_user:  # the account's home is the deploy dir: its caches are stackctl's too
        (deploy / ".cache" / "pip").mkdir(parents=True)
        (deploy / "..x").write_text("x")
    _purge(plan, tmp_path)
    assert not deploy.exists()
    _purge(plan, tmp_path)  # idempotent: nothing there is fine


def test_purge_leaves_what_it_did_not_make(tmp_path):
    plan = plan_cluster(load_inventory(inventory(tmp_path, "sim")))[0]
    deploy = Path(plan.deploy_dir)
    _made_by_up(deploy)
    (deploy / "notes.txt").write_text("mine")
    (deploy / ".profile").write_text("mine")  # no service account here: dot-files are not ours
    (tmp_path / "sibling").write_text("next door")
    _purge(plan, tmp_path)
    assert sorted(p.name for p in deploy.iterdir()) == [".profile", "notes.txt"]
    assert (tmp_path / "sibling").read_text() == "next door"
