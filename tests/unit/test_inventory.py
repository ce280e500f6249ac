"""Inventory loading: every kind of bad input gets file:line, key path, a fix, and exit code 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stackctl.cli import main
from stackctl.errors import InventoryError
from stackctl.inventory import check_secrets, load_inventory

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
cluster: t
ssh: {user: ubuntu}
model: {name: meta-llama/Llama-3.1-8B-Instruct, hf_token_env: HF_TOKEN}
engine: {kind: vllm, port: 8000}
router: {host: head, port: 8080, api_keys_env: ROUTER_KEYS}
hosts:
  - {name: head, address: 10.0.0.10, roles: [router]}
  - {name: gpu01, address: 10.0.0.11, gpus: [0, 1]}
profiles:
  naive: {router: {policy: round_robin}, engine: {lmcache: {enabled: false}}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(args, capsys):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad(tmp_path, capsys, text, *fragments, line=None, args=("validate",)):
    path = write(tmp_path, text)
    code, out, err = run_cli([*args, str(path)], capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert err.startswith("error: ")
    where = f"{path}:{line}:" if line else str(path)
    assert where in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_good_inventory_loads_and_merges_layers(tmp_path):
    cluster = load_inventory(write(tmp_path, GOOD))
    assert [e.name for e in cluster.engines] == ["gpu01-0", "gpu01-1"]
    assert [e.port for e in cluster.engines] == [8000, 8001]
    assert [e.gpus for e in cluster.engines] == [(0,), (1,)]
    assert cluster.engine.lmcache.chunk_size == 256  # from roles/engine/defaults.yaml
    assert cluster.router.policy == "kv_aware"
    naive = load_inventory(write(tmp_path, GOOD), profile="naive")
    assert naive.router.policy == "round_robin"
    assert naive.engine.lmcache.enabled is False
    assert naive.engine.lmcache.cpu_offload_gb == 120  # deep merge keeps siblings


def test_tensor_parallel_groups_gpus(tmp_path):
    cluster = load_inventory(
        write(
            tmp_path,
            GOOD.replace(
                "engine: {kind: vllm, port: 8000}",
                "engine: {kind: vllm, port: 8000, tensor_parallel_size: 2}",
            ),
        )
    )
    assert [e.gpus for e in cluster.engines] == [(0, 1)]


def test_host_engine_override(tmp_path):
    text = GOOD.replace(
        "gpus: [0, 1]}", "gpus: [0, 1], engine: {port: 9000, gpu_memory_utilization: 0.5}}"
    )
    cluster = load_inventory(write(tmp_path, text))
    host = cluster.host("gpu01")
    assert [e.port for e in host.engines] == [9000, 9001]
    assert host.engine.gpu_memory_utilization == 0.5
    assert cluster.engine.gpu_memory_utilization == 0.9


@pytest.mark.parametrize("example", ["a100-8.yaml", "local.yaml"])
def test_examples_validate(example, capsys):
    code, out, err = run_cli(["validate", str(REPO / "inventory" / example)], capsys)
    assert code == 0, err
    assert "OK" in out


def test_yaml_syntax_error(tmp_path, capsys):
    assert_bad(
        tmp_path, capsys, "cluster: t\nhosts: [\n  {name: a\nmodel: x\n", "not valid YAML", line=4
    )


def test_unknown_key_with_suggestion(tmp_path, capsys):
    text = GOOD.replace("engine: {kind: vllm, port: 8000}", "engine: {kind: vllm, prot: 8000}")
    assert_bad(
        tmp_path, capsys, text, "engine.prot", "unknown key 'prot'", "Did you mean 'port'?", line=4
    )


def test_unknown_nested_key_in_host(tmp_path, capsys):
    text = GOOD.replace("gpus: [0, 1]}", "gpu: [0, 1]}")
    assert_bad(tmp_path, capsys, text, "hosts[1].gpu", "Did you mean 'gpus'?", line=8)


def test_wrong_type(tmp_path, capsys):
    text = GOOD.replace("port: 8000}", 'port: "eight"}')
    assert_bad(tmp_path, capsys, text, "engine.port", "expected an integer", "'eight'", line=4)


def test_wrong_enum(tmp_path, capsys):
    text = GOOD.replace("router: {host: head,", "router: {policy: kv-aware, host: head,")
    assert_bad(tmp_path, capsys, text, "router.policy", "Did you mean 'kv_aware'?", line=5)


def test_missing_required_key(tmp_path, capsys):
    text = GOOD.replace(
        "model: {name: meta-llama/Llama-3.1-8B-Instruct, hf_token_env: HF_TOKEN}\n", ""
    )
    assert_bad(tmp_path, capsys, text, "'model' is missing")


def test_missing_host_name(tmp_path, capsys):
    text = GOOD.replace("{name: gpu01, address", "{address")
    assert_bad(tmp_path, capsys, text, "hosts[1]", "'name' is missing", line=8)


def test_duplicate_host_name(tmp_path, capsys):
    text = GOOD.replace("{name: gpu01, address: 10.0.0.11", "{name: head, address: 10.0.0.11")
    assert_bad(tmp_path, capsys, text, "hosts[1].name", "'head' is used twice", line=8)


def test_duplicate_address(tmp_path, capsys):
    text = GOOD.replace("10.0.0.11", "10.0.0.10")
    assert_bad(tmp_path, capsys, text, "hosts[1].address", "10.0.0.10", "used twice", line=8)


def test_duplicate_yaml_key(tmp_path, capsys):
    assert_bad(tmp_path, capsys, GOOD + "cluster: again\n", "'cluster' appears twice", line=11)


def test_engines_sharing_a_port(tmp_path, capsys):
    text = GOOD.replace(
        "roles: [router]}", "roles: [router, engine], gpus: [0], engine: {port: 8080}}"
    )
    assert_bad(tmp_path, capsys, text, "port 8080", "already uses", line=7)


def test_local_hosts_share_one_machine_for_ports(tmp_path, capsys):
    text = """\
    cluster: t
    model: {name: m}
    engine: {kind: sim}
    router: {host: a}
    hosts:
      - {name: a, connection: local, deploy_dir: /tmp/a}
      - {name: b, connection: local, deploy_dir: /tmp/b}
    """
    assert_bad(tmp_path, capsys, text, "port 8000", "same machine", line=7)


def test_router_host_missing(tmp_path, capsys):
    text = GOOD.replace("router: {host: head,", "router: {host: haed,")
    assert_bad(
        tmp_path,
        capsys,
        text,
        "router.host",
        "'haed' is not one of the hosts",
        "Did you mean 'head'?",
        line=5,
    )


def test_no_engine_hosts(tmp_path, capsys):
    text = GOOD.replace("  - {name: gpu01, address: 10.0.0.11, gpus: [0, 1]}\n", "")
    assert_bad(tmp_path, capsys, text, "no host runs an engine", line=6)


def test_unknown_profile(tmp_path, capsys):
    assert_bad(
        tmp_path,
        capsys,
        GOOD,
        "profile 'naiv' is not defined",
        "Did you mean 'naive'?",
        args=("plan", "--profile", "naiv"),
    )


def test_gpu_listed_twice(tmp_path, capsys):
    text = GOOD.replace("gpus: [0, 1]", "gpus: [0, 0]")
    assert_bad(tmp_path, capsys, text, "hosts[1].gpus[1]", "GPU index 0 is listed twice", line=8)


def test_tensor_parallel_not_dividing(tmp_path, capsys):
    text = GOOD.replace("gpus: [0, 1]}", "gpus: [0, 1, 2], engine: {tensor_parallel_size: 2}}")
    assert_bad(
        tmp_path, capsys, text, "hosts[1].gpus", "3 GPU(s)", "tensor_parallel_size 2", line=8
    )


def test_bad_value_in_profile_points_at_profile(tmp_path, capsys):
    text = GOOD.replace(
        "engine: {lmcache: {enabled: false}}", "engine: {gpu_memory_utilization: 1.5}"
    )
    assert_bad(
        tmp_path,
        capsys,
        text,
        "gpu_memory_utilization is 1.5",
        line=10,
        args=("validate", "--profile", "naive"),
    )


def test_secret_value_instead_of_name(tmp_path, capsys):
    text = GOOD.replace("hf_token_env: HF_TOKEN", "hf_token_env: hf_abc-123")
    assert_bad(
        tmp_path, capsys, text, "model.hf_token_env", "not an environment variable name", line=3
    )


def test_missing_env_var_is_reported_at_up_not_plan(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("ROUTER_KEYS", "k1")
    cluster = load_inventory(path)  # plan-time load is fine without the secret
    with pytest.raises(InventoryError) as info:
        check_secrets(cluster)
    assert "HF_TOKEN is not set" in str(info.value) and "model.hf_token_env" in str(info.value)
    assert check_secrets(cluster, {"HF_TOKEN": "t", "ROUTER_KEYS": "k"}) == {
        "HF_TOKEN": "t",
        "ROUTER_KEYS": "k",
    }


def test_missing_file(tmp_path, capsys):
    code, out, err = run_cli(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "no such file" in err and "Traceback" not in err


def test_unknown_sim_hardware(tmp_path, capsys):
    text = GOOD.replace(
        "engine: {kind: vllm, port: 8000}",
        "engine: {kind: sim, port: 8000, sim: {hardware: a100-80}}",
    )
    assert_bad(tmp_path, capsys, text, "engine.sim.hardware", "Did you mean 'a100-80gb'?", line=4)


def test_unknown_host_in_plan_filter(tmp_path, capsys):
    code, out, err = run_cli(["plan", str(write(tmp_path, GOOD)), "--hosts", "gpu09"], capsys)
    assert code == 2 and "--hosts: no host named or matching gpu09" in err


def test_loopback_engines_unreachable_from_the_router(tmp_path, capsys):
    text = GOOD.replace(
        "engine: {kind: vllm, port: 8000}", "engine: {kind: vllm, port: 8000, bind: 127.0.0.1}"
    )
    assert_bad(tmp_path, capsys, text, "hosts[1]", "could not reach them", "engine.bind", line=8)
