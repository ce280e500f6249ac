"""The cluster's engine key through `up` on the fake connector: made once, written 0600 on the
router host and every engine host, never in a command line, supervisor file, environment= or
plan; read back (not made again) by a second `up`, from any operator's machine; refused when
it could only be made without the router host; given by the operator with engine_key_env.
And engines listening on a host's cluster_address."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import stackctl.connect
from stackctl.deploy import UpOptions, up
from stackctl.errors import StackctlError
from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from stackctl.progress import Progress
from stackctl.show import format_host_plan, plan_document, write_plan_tree
from stackctl.status import cluster_status
from tests.helpers.fake_connector import FakeFleet, write_inventory

HOSTS = ("head", "sim1", "sim2")


@pytest.fixture
def fleet(monkeypatch):
    fleet = FakeFleet(fake_supervisor=True)
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    yield fleet
    fleet.stop()


def deploy(path: Path, **options):
    return up(
        load_inventory(path), UpOptions(yes=True, **options), Progress(quiet=True), lambda q: True
    )


def keys_on_hosts(path: Path) -> dict[str, str]:
    """Each host's engine key file: its content, checked to be mode 0600."""
    out = {}
    for plan in plan_cluster(load_inventory(path)):
        file = Path(plan.engine_key_file)
        assert file.stat().st_mode & 0o777 == 0o600, file
        out[plan.host.name] = file.read_text()
    return out


def test_up_makes_one_key_for_every_host_and_it_is_nowhere_but_in_the_0600_files(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    result = deploy(path)
    assert result.ok and result.verified, result
    keys = keys_on_hosts(path)
    assert set(keys) == set(HOSTS) and len(set(keys.values())) == 1
    key = keys["head"]
    assert len(key) >= 40  # secrets.token_urlsafe(32)
    plans = plan_cluster(load_inventory(path))
    secret_files = {p.engine_key_file for p in plans}
    for plan in plans:  # every planned file, command line, environment and the plan's views
        for spec in plan.files:
            assert key not in spec.content, spec.path
        for program in plan.programs:
            assert key not in " ".join(program.command) and key not in json.dumps(
                program.environment
            )
        assert key not in format_host_plan(plan)
    assert key not in json.dumps(plan_document(load_inventory(path), plans))
    write_plan_tree(plans, tmp_path / "tree")
    for file in (tmp_path / "tree").rglob("*"):
        assert not file.is_file() or key not in file.read_text(), file
    for call in fleet.calls:  # every command run and upload path: the key was never in one
        assert key not in call.text, call
    on_disk = [  # and on the hosts, only the secret files hold it (the conf.d files do not)
        f
        for h in HOSTS
        for f in (tmp_path / h).rglob("*")
        if f.is_file() and key in f.read_text(errors="replace")
    ]
    assert sorted(map(str, on_disk)) == sorted(secret_files)
    engine_conf = Path(plans[1].program_file("engine-0")).read_text()
    assert "VLLM_API_KEY" in engine_conf and plans[1].engine_key_file in engine_conf
    router_yaml = yaml.safe_load(Path(plans[0].router_config).read_text())
    assert router_yaml["engine_key_file"] == plans[0].engine_key_file


def test_a_second_up_reads_the_key_back_and_changes_nothing(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    assert deploy(path).ok
    first = keys_on_hosts(path)
    before = len(fleet.calls)
    result = deploy(path)  # a new run, as from another machine: no state but the hosts'
    assert result.ok and {o.status for o in result.outcomes.values()} == {"unchanged"}
    assert keys_on_hosts(path) == first
    later = fleet.calls[before:]
    assert [c for c in later if c.op == "put"] == []
    reads = [c for c in later if c.op == "run" and c.text.startswith("cat -- ")]
    assert [c.host for c in reads] == ["head"]  # the router host's copy, once


def test_an_engine_host_with_a_stale_key_gets_the_router_hosts(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    assert deploy(path).ok
    key = keys_on_hosts(path)["head"]
    sim2 = plan_cluster(load_inventory(path), ["sim2"])[0]
    Path(sim2.engine_key_file).write_text("stale")
    result = deploy(path)
    assert {n: o.status for n, o in result.outcomes.items()} == {
        "head": "unchanged",
        "sim1": "unchanged",
        "sim2": "changed",
    }
    assert set(keys_on_hosts(path).values()) == {key}
    assert ("sim2", "restart", "engine-0") in fleet.supervisor.history


def test_hosts_without_the_router_host_use_a_key_they_hold_or_refuse_to_make_one(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    refused = deploy(path, hosts=["sim1"])  # a fresh cluster without its router host
    sim1 = refused.outcomes["sim1"]
    assert not refused.ok and (sim1.status, sim1.step) == ("refused", "engine key")
    assert "kept on the router host head" in sim1.error and "-l sim1,head" in sim1.error
    assert "engine_key_env" in sim1.error and fleet.puts() == []
    assert deploy(path).ok
    key = keys_on_hosts(path)["head"]
    Path(plan_cluster(load_inventory(path), ["head"])[0].engine_key_file).unlink()
    result = deploy(path, hosts=["sim1"])  # sim1's own copy is the cluster's
    assert result.ok and result.outcomes["sim1"].status == "unchanged"
    assert Path(plan_cluster(load_inventory(path), ["sim1"])[0].engine_key_file).read_text() == key


def test_an_unreachable_router_host_does_not_get_a_new_key_made_behind_its_back(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.unreachable("head")
    result = deploy(path)
    assert result.outcomes["head"].status == "unreachable"
    assert result.outcomes["sim1"].status == "refused"
    assert "which is unreachable" in result.outcomes["sim1"].error
    assert not result.ok and fleet.puts() == []


def test_engine_key_env_gives_the_key(tmp_path, fleet, monkeypatch):
    path, _ = write_inventory(tmp_path, engine_hosts=1, router={"engine_key_env": "MY_ENGINE_KEY"})
    with pytest.raises(StackctlError, match="MY_ENGINE_KEY is not set"):
        deploy(path)
    monkeypatch.setenv("MY_ENGINE_KEY", "operator-managed-key-0123456789")
    assert deploy(path).ok
    assert set(keys_on_hosts(path).values()) == {"operator-managed-key-0123456789"}
    assert not [c for c in fleet.calls if c.text.startswith("cat -- ")]  # nothing read back
    monkeypatch.setenv("MY_ENGINE_KEY", "rotated-key-0123456789")
    result = deploy(path)  # a rotation: both hosts rewrite it, the engine restarts
    assert result.ok and set(keys_on_hosts(path).values()) == {"rotated-key-0123456789"}
    assert os.environ["MY_ENGINE_KEY"] not in " ".join(c.text for c in fleet.calls)


def test_status_and_the_drain_ask_for_engines_with_a_client_key(tmp_path, fleet, monkeypatch):
    """With client keys, the router's /engines wants one: `status` and the rolling drain send
    the keys file's first key (the probe's bearer_file, read on the router host)."""
    monkeypatch.setenv("ROUTER_KEYS", "client-key-1,client-key-2")
    path, _ = write_inventory(tmp_path, engine_hosts=1, router={"api_keys_env": "ROUTER_KEYS"})
    assert deploy(path).ok
    router = fleet.supervisor.services[("head", "router")]
    status = cluster_status(load_inventory(path))
    row = next(p for e in status["hosts"] for p in e["programs"] if p["kind"] == "router")
    assert [e["name"] for e in row["engines"]["engines"]] == ["sim1-0"]
    inventory = yaml.safe_load(path.read_text())
    inventory["engine"]["env"] = {"SOME_SETTING": "2"}  # restarts the engine: drained first
    path.write_text(yaml.safe_dump(inventory))
    assert deploy(path, rolling=True).ok
    asked = [r["authorization"] for r in router.requests if r["path"] == "/engines"]
    assert len(asked) >= 3 and set(asked) == {"Bearer client-key-1"}, asked


CLUSTER_NET = """\
cluster: t
model: {name: meta-llama/Llama-3.1-8B-Instruct}
router: {host: head}
hosts:
  - {name: head, address: 203.0.113.10, roles: [router]}
  - {name: gpu01, address: 203.0.113.11, cluster_address: 10.1.0.11}
  - {name: gpu02, address: 203.0.113.12}
  - {name: gpu03, address: 203.0.113.13, cluster_address: 10.1.0.13, engine: {bind: 0.0.0.0}}
"""


def test_engines_listen_on_the_cluster_address_when_the_host_names_one(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(CLUSTER_NET)
    cluster = load_inventory(path)
    plans = {p.host.name: p for p in plan_cluster(cluster)}
    expect = {  # host: (what the engine listens on, where the router and its host ask it)
        "gpu01": ("10.1.0.11", "http://10.1.0.11:8000"),
        "gpu02": ("0.0.0.0", "http://127.0.0.1:8000"),  # no cluster address: as before
        "gpu03": ("0.0.0.0", "http://127.0.0.1:8000"),  # an explicit bind wins
    }
    head = plans["head"]
    router = yaml.safe_load(next(f.content for f in head.files if f.path == head.router_config))
    urls = {e["name"]: e["url"] for e in router["engines"]}
    for name, (bind, local) in expect.items():
        engine = plans[name].program("engine-0")
        argv = list(engine.command)
        assert argv[argv.index("--host") + 1] == bind, name
        assert engine.health_url == f"{local}/health", name
    assert urls == {
        "gpu01-0": "http://10.1.0.11:8000",  # the cluster network, not the SSH address
        "gpu02-0": "http://203.0.113.12:8000",
        "gpu03-0": "http://10.1.0.13:8000",
    }


def test_a_rolling_up_that_brings_the_key_gives_it_to_the_router_first(tmp_path, fleet):
    """A running cluster without a key (as before engine keys): the router host's copy is
    written before the first drain, so the running router sends it before any engine needs it."""
    path, _ = write_inventory(tmp_path)
    assert deploy(path).ok
    plans = {p.host.name: p for p in plan_cluster(load_inventory(path))}
    for plan in plans.values():
        Path(plan.engine_key_file).unlink()
    before = len(fleet.calls)
    result = deploy(path, rolling=True)
    assert result.ok, result
    later = fleet.calls[before:]
    key_puts = [c for c in later if c.op == "put" and c.text == plans["head"].engine_key_file]
    first_drain = next(  # the drain's first router.yaml write
        c for c in later if c.op == "put" and c.text == plans["head"].router_config
    )
    first_restart = next(c for c in later if c.op == "run" and " restart " in c.text)
    assert key_puts and key_puts[0].seq < first_drain.seq < first_restart.seq
    assert key_puts[0].mode == 0o600
    assert len(set(keys_on_hosts(path).values())) == 1


def test_the_engine_key_cannot_be_set_around_stackctl(tmp_path, capsys):
    from stackctl.cli import main

    for engine in ("{env: {VLLM_API_KEY: abc}}", "{extra_args: [--api-key, abc]}"):
        path = tmp_path / "inv.yaml"
        path.write_text(
            CLUSTER_NET.replace("router: {host: head}", f"engine: {engine}\nrouter: {{host: head}}")
        )
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err
        assert "router.engine_key_env" in err and "Traceback" not in err, err
