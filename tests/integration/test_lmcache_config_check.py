"""LMCache's own loader (in the vLLM test venv) accepts a good config and rejects bad keys.

Needs the vLLM CPU venv (tests/helpers/vllm_env.py): skipped locally when it cannot be
built, a failure when env CI is set.
"""

from __future__ import annotations

import pytest

from tests.helpers.lmcache_check import (
    LMCacheConfigError,
    check_lmcache_config,
    check_lmcache_configs,
)
from tests.helpers.vllm_env import read_stamp, vllm_venv_or_skip

# timeout: the first test may build the vLLM venv (3-11 min, see vllm_env.py)
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

GOOD = """\
chunk_size: 256
local_cpu: true
max_local_cpu_size: 2
"""

CASES = {
    "good": GOOD,
    "remote": GOOD + "remote_url: lm://127.0.0.1:65432\nremote_serde: naive\n",
    "unknown_key": GOOD.replace("max_local_cpu_size", "max_local_cpu_size_gb"),
    "bad_value": GOOD.replace("chunk_size: 256", "chunk_size: lots"),
    "invalid": GOOD + "min_retrieve_tokens: -1\n",
    "not_a_mapping": "- chunk_size\n- 256\n",
}


@pytest.fixture(scope="module")
def venv_python():
    venv = vllm_venv_or_skip()
    if not (read_stamp(venv) or {}).get("lmcache", True):
        pytest.fail(f"lmcache did not install in {venv}; see {venv}.build.log", pytrace=False)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def results(tmp_path_factory, venv_python):
    """All cases checked in one subprocess (importing LMCache takes ~15 s)."""
    d = tmp_path_factory.mktemp("lmcache")
    paths = []
    for name, text in CASES.items():
        paths.append(d / f"{name}.yaml")
        paths[-1].write_text(text)
    return dict(zip(CASES, check_lmcache_configs(paths, python=venv_python), strict=True))


def test_good_config_passes(results):
    r = results["good"]
    assert not isinstance(r, Exception), r
    assert r["values"] == {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 2.0}
    assert r["lmcache_version"].startswith("0.5.6")


def test_remote_url_config_passes(results):
    r = results["remote"]
    assert not isinstance(r, Exception), r
    assert r["values"]["remote_url"] == "lm://127.0.0.1:65432"


def test_unknown_key_fails_with_lmcache_message(results):
    # LMCache's loader only logs this warning and drops the key; the check makes it fatal.
    assert isinstance(results["unknown_key"], LMCacheConfigError)
    assert "Unknown configuration key: max_local_cpu_size_gb" in str(results["unknown_key"])


def test_unconvertible_value_fails(results):
    assert isinstance(results["bad_value"], LMCacheConfigError)
    assert "Failed to convert value for chunk_size" in str(results["bad_value"])


def test_validation_error_fails(results):
    assert isinstance(results["invalid"], LMCacheConfigError)
    assert "min_retrieve_tokens must be >= 0" in str(results["invalid"])


def test_not_a_mapping_fails(results):
    assert isinstance(results["not_a_mapping"], LMCacheConfigError)


def test_single_file_api_raises(tmp_path, venv_python):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_sizee: 2\n")
    with pytest.raises(LMCacheConfigError, match="Unknown configuration key: max_local_cpu_sizee"):
        check_lmcache_config(path, python=venv_python)


def test_rendered_plan_configs_pass_lmcache_loader(tmp_path, venv_python):
    """What `up` would write for the reference cluster, in both LMCache modes, loads cleanly."""
    from pathlib import Path

    import yaml

    from stackctl.inventory import load_inventory
    from stackctl.plan import plan_cluster

    repo = Path(__file__).resolve().parents[2]
    reference = repo / "inventory" / "a100-8.yaml"
    plan = next(p for p in plan_cluster(load_inventory(reference)) if p.host.name == "gpu01")
    spec = next(f for f in plan.files if f.path.endswith(".lmcache.yaml"))
    path = tmp_path / "local.lmcache.yaml"
    path.write_text(spec.content)
    (local,) = check_lmcache_configs([path], python=venv_python)
    assert not isinstance(local, Exception), local
    assert local["values"]["max_local_cpu_size"] == 120.0 and local["values"]["chunk_size"] == 256
    assert yaml.safe_load(path.read_text())["local_cpu"] is True


def test_server_mode_renders_what_lmcache_server_and_vllm_accept(tmp_path, venv_python):
    """lmcache.mode: server is LMCache 0.5.x's multi-process mode: `lmcache server` (its
    arguments parsed by LMCache's own parser and config builders) and engines whose
    LMCacheMPConnector points at it; no LMCache YAML file."""
    import json
    from pathlib import Path

    from stackctl.inventory import load_inventory
    from stackctl.plan import plan_cluster
    from tests.helpers.lmcache_check import check_lmcache_server_args

    repo = Path(__file__).resolve().parents[2]
    server_mode = tmp_path / "server.yaml"
    server_mode.write_text(
        (repo / "inventory" / "a100-8.yaml")
        .read_text()
        .replace("chunk_size: 256}", "chunk_size: 256, mode: server}")
    )
    plan = next(p for p in plan_cluster(load_inventory(server_mode)) if p.host.name == "gpu01")
    assert not any(f.path.endswith(".lmcache.yaml") for f in plan.files)
    server = plan.program("lmcache-server")
    assert server.command[1:4] == ("-m", "lmcache.cli.main", "server")
    checked = check_lmcache_server_args(list(server.command[4:]), python=venv_python)
    assert checked["mp"] == {"host": "127.0.0.1", "port": 65432, "chunk_size": 256}
    assert (
        checked["http"]["port"] == 65433
        and checked["l1_size_gb"] == 120.0
        and checked["eviction_policy"] == "LRU"
    )
    engine = plan.program("engine-0")
    argv = list(engine.command)
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "LMCacheMPConnector"
    assert kv["kv_connector_extra_config"] == {
        "lmcache.mp.host": "tcp://127.0.0.1",
        "lmcache.mp.port": 65432,
    }
    assert (
        "--disable-hybrid-kv-cache-manager" in argv
        and "LMCACHE_CONFIG_FILE" not in engine.environment
    )


def test_lmcache_server_args_check_rejects_what_lmcache_refuses(venv_python):
    from tests.helpers.lmcache_check import check_lmcache_server_args

    with pytest.raises(LMCacheConfigError, match="eviction-policy"):
        check_lmcache_server_args(["--port", "65432", "--l1-size-gb", "4"], python=venv_python)
    with pytest.raises(LMCacheConfigError, match="unrecognized arguments"):
        check_lmcache_server_args(
            [
                "--port",
                "65432",
                "--l1-size-gb",
                "4",
                "--eviction-policy",
                "LRU",
                "--l1-size-tb",
                "4",
            ],
            python=venv_python,
        )
