"""The simulator's command line: vLLM's flags, its own, LMCache's settings, bad flags."""

import json
import subprocess
import sys

import pytest

from stackctl.sim import profiles
from stackctl.sim.__main__ import main
from stackctl.sim.config import load_lmcache_settings, parse_args

LMCACHE = [
    "--kv-transfer-config",
    json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}),
]


def test_defaults_are_vllms_on_the_reference_profile():
    config = parse_args([], environ={})
    assert config.hardware is profiles.A100_80GB and config.model_profile is profiles.LLAMA_31_8B
    assert config.num_gpu_blocks == profiles.gpu_kv_capacity_blocks(
        profiles.A100_80GB, profiles.LLAMA_31_8B, 0.9
    )
    assert config.enable_prefix_caching and config.lmcache is None
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (
        16,
        256,
        2048,
    )
    assert config.max_model_len == 131072 and config.time_scale == 1.0
    assert config.served_model_name == config.model


def test_vllm_flags_are_honoured():
    config = parse_args(
        ["--model", "meta-llama/Llama-3.1-70B-Instruct", "--served-model-name", "llama", "big",
         "--tensor-parallel-size", "4", "--gpu-memory-utilization", "0.8", "--max-model-len", "32768",
         "--max-num-seqs", "64", "--max-num-batched-tokens", "4096", "--no-enable-prefix-caching",
         "--hardware", "h100-80gb", "--time-scale", "25", "--seed", "3"],
        environ={},
    )  # fmt: skip
    assert config.model_profile is profiles.LLAMA_31_70B and config.hardware is profiles.H100_80GB
    assert config.served_model_names == ["llama", "big"] and config.served_model_name == "llama"
    assert config.num_gpu_blocks == profiles.gpu_kv_capacity_blocks(
        profiles.H100_80GB, profiles.LLAMA_31_70B, 0.8, 4
    )
    assert not config.enable_prefix_caching
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens) == (
        32768,
        64,
        4096,
    )
    assert config.time_scale == 25 and config.seed == 3


def test_token_counts_take_vllms_suffixes():
    assert parse_args(["--max-model-len", "32k"], environ={}).max_model_len == 32000
    assert parse_args(["--max-model-len", "32K"], environ={}).max_model_len == 32768
    assert (
        parse_args(["--max-num-batched-tokens", "8192"], environ={}).max_num_batched_tokens == 8192
    )


def test_unknown_vllm_flags_are_ignored_with_a_warning(caplog):
    config = parse_args(
        ["--dtype", "bfloat16", "--disable-log-requests", "--port", "9000"], environ={}
    )
    assert config.port == 9000
    assert config.ignored_flags == ["--dtype", "bfloat16", "--disable-log-requests"]
    assert "--dtype bfloat16" in caplog.text


def test_cpu_tier_needs_the_lmcache_connector_and_local_cpu():
    env = {
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "20",
        "LMCACHE_CHUNK_SIZE": "512",
    }
    assert parse_args([], environ=env).lmcache is None  # no connector: LMCache is not loaded
    config = parse_args(LMCACHE, environ=env)
    assert (config.lmcache.chunk_size, config.lmcache.max_local_cpu_size) == (512, 20.0)
    assert config.engine_config().cpu_capacity_chunks == 20 * 2**30 // (131072 * 512)
    assert parse_args(LMCACHE, environ={**env, "LMCACHE_LOCAL_CPU": "False"}).lmcache is None
    tp2 = parse_args(
        [*LMCACHE, "--tensor-parallel-size", "2"], environ=env
    )  # one CPU backend per rank
    assert tp2.engine_config().cpu_capacity_chunks == 2 * config.engine_config().cpu_capacity_chunks
    other = [
        "--kv-transfer-config",
        json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"}),
    ]
    assert parse_args(other, environ=env).lmcache is None


def test_lmcache_defaults_and_yaml_file(tmp_path):
    assert load_lmcache_settings({}).max_local_cpu_size == 5.0  # LMCache's defaults
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 40\n")
    settings = load_lmcache_settings({"LMCACHE_CONFIG_FILE": str(path)})
    assert (settings.chunk_size, settings.local_cpu, settings.max_local_cpu_size) == (
        256,
        True,
        40.0,
    )
    path.write_text("local_cpu: false\n")
    assert parse_args(LMCACHE, environ={"LMCACHE_CONFIG_FILE": str(path)}).lmcache is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-num-seqs", "0"],
        ["--gpu-memory-utilization", "1.5"],
        ["--time-scale", "-1"],
        ["--kv-transfer-config", "{not json"],
        ["--hardware", "tpu-v9"],
        [
            "--max-model-len",
            "40000",
            "--num-gpu-blocks-override",
            "1000",
        ],  # cache smaller than one request
        ["--model", "meta-llama/Llama-3.1-70B-Instruct"],  # 141 GB of weights on one 80 GB GPU
        ["--port", "70000"],
        ["--max-model-len", "1.5x"],
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_bad_lmcache_file_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    assert main(LMCACHE) == 2
    assert "LMCACHE_CONFIG_FILE" in capsys.readouterr().err


def test_module_entry_point_reports_bad_flags_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "stackctl.sim", "--max-num-batched-tokens", "lots"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--max-num-batched-tokens" in proc.stderr and "Traceback" not in proc.stderr
