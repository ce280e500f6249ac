"""Several routers (issue 14): every host whose roles name `router` runs one, each routing to
every engine; `router.host` still names one (earlier inventories). `router.vip`: what keepalived
needs is checked at load, and each router host's plan carries its keepalived.conf."""

from __future__ import annotations

import pytest

from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from tests.unit.test_inventory import assert_bad, run_cli, write

TWO = """\
cluster: t
model: {name: meta-llama/Llama-3.1-8B-Instruct}
engine: {kind: sim, port: 8000}
router: {port: 8080}
hosts:
  - {name: head-a, address: 10.0.0.10, roles: [router]}
  - {name: head-b, address: 10.0.0.11, roles: [router]}
  - {name: gpu01, address: 10.0.0.21, gpus: [0, 1]}
  - {name: gpu02, address: 10.0.0.22, gpus: [0]}
"""
VIP = "router: {port: 8080, vip: {address: 10.0.0.100/24, interface: eth0}}"


def test_every_host_with_the_router_role_runs_a_router_routing_to_every_engine(tmp_path):
    cluster = load_inventory(write(tmp_path, TWO))
    assert [h.name for h in cluster.router_hosts] == ["head-a", "head-b"]
    assert cluster.router_host.name == "head-a"  # the first: keeps the engine key, bench's target
    assert cluster.router_url == "http://10.0.0.10:8080"
    plans = {p.host.name: p for p in plan_cluster(cluster)}
    for name in ("head-a", "head-b"):
        plan = plans[name]
        assert [p.name for p in plan.programs] == ["router"]
        config = next(f.content for f in plan.files if f.path == plan.router_config)
        for engine in ("gpu01-0", "gpu01-1", "gpu02-0"):
            assert f"name: {engine}" in config, (name, config)
        assert plan.engine_key_file in [s.path for s in plan.secrets]  # the same key as engines'
    for name in ("gpu01", "gpu02"):
        assert "router" not in [p.name for p in plans[name].programs]


def test_router_host_and_roles_add_up(tmp_path):
    # the older spelling on an engine host, plus a router-only host
    text = TWO.replace("router: {port: 8080}", "router: {port: 8080, host: gpu02}")
    text = text.replace(
        "roles: [router]}\n  - {name: head-b, address: 10.0.0.11, roles: [router]}",
        "roles: [router]}\n  - {name: head-b, address: 10.0.0.11, roles: [engine]}",
    )
    cluster = load_inventory(write(tmp_path, text))
    assert [h.name for h in cluster.router_hosts] == ["head-a", "gpu02"]
    plan = plan_cluster(cluster, ["gpu02"])[0]
    assert sorted(p.name for p in plan.programs) == ["engine-0", "router"]


def test_validate_names_every_router(tmp_path, capsys):
    code, out, err = run_cli(["validate", str(write(tmp_path, TWO))], capsys)
    assert code == 0, err
    assert (
        "routers (kv_aware) on head-a at http://10.0.0.10:8080, head-b at http://10.0.0.11:8080"
        in out
    )


def test_a_cluster_without_a_router_is_refused_saying_how_to_add_one(tmp_path, capsys):
    text = TWO.replace("roles: [router]", "roles: [engine]")
    assert_bad(tmp_path, capsys, text, "no host runs the router", "roles: [router]", "router.host")


def test_an_unknown_router_host_is_refused(tmp_path, capsys):
    text = TWO.replace("router: {port: 8080}", "router: {port: 8080, host: head-c}")
    assert_bad(tmp_path, capsys, text, "router host 'head-c' is not one of the hosts", line=4)


def test_two_routers_on_one_machine_would_share_its_port(tmp_path, capsys):
    text = """\
    cluster: t
    model: {name: m}
    engine: {kind: sim, port: 8000}
    router: {port: 8080}
    hosts:
      - {name: a, connection: local, roles: [router], deploy_dir: /tmp/t-a}
      - {name: b, connection: local, roles: [router], deploy_dir: /tmp/t-b}
      - {name: c, connection: local, deploy_dir: /tmp/t-c}
    """
    assert_bad(
        tmp_path,
        capsys,
        text,
        "the router of b would listen on port 8080",
        "one router per machine",
    )


@pytest.mark.parametrize(
    "vip, fragments",
    [
        ("{address: 10.0.0.300/24, interface: eth0}", ("is not an IP address", "10.0.0.100/24")),
        ("{address: 10.0.0.100/24}", ("needs the network interface", "interface: eth0")),
        ("{address: 10.0.0.100/24, interface: 'eth0 x'}", ("needs the network interface",)),
        ("{address: 10.0.0.100/24, interface: eth0, virtual_router_id: 0}", ("use 1-255",)),
        ("{address: 10.0.0.100/24, interface: eth0, advert_int_s: 0.5}", ("whole seconds",)),
        ("{address: 10.0.0.10/24, interface: eth0}", ("is the address of host 'head-a'",)),
        (
            "{address: 'fd00::100/64', interface: eth0}",
            ("is not an IPv6 address", "cluster_address"),
        ),
    ],
)
def test_a_vip_keepalived_could_not_serve_is_refused(tmp_path, capsys, vip, fragments):
    text = TWO.replace("router: {port: 8080}", f"router: {{port: 8080, vip: {vip}}}")
    assert_bad(tmp_path, capsys, text, *fragments)


def test_a_vip_needs_ip_addresses_of_the_routers_and_separate_machines(tmp_path, capsys):
    named = TWO.replace("router: {port: 8080}", VIP).replace("10.0.0.11,", "head-b.example,")
    assert_bad(tmp_path, capsys, named, "'head-b.example' is not an IPv4 address", line=7)
    local = TWO.replace("router: {port: 8080}", VIP).replace(
        "{name: head-b, address: 10.0.0.11,",
        "{name: head-b, connection: local, deploy_dir: /tmp/t-b,",
    )
    assert_bad(tmp_path, capsys, local, "connection: local", "separate machines")


def test_a_dns_named_router_may_give_its_cluster_address(tmp_path):
    text = TWO.replace("router: {port: 8080}", VIP).replace(
        "address: 10.0.0.11,", "address: head-b.example, cluster_address: 10.0.0.11,"
    )
    assert len(load_inventory(write(tmp_path, text)).router_hosts) == 2


def test_each_router_host_gets_its_keepalived_conf_and_engine_hosts_none(tmp_path):
    cluster = load_inventory(write(tmp_path, TWO.replace("router: {port: 8080}", VIP)))
    plans = {p.host.name: p for p in plan_cluster(cluster)}
    confs = {}
    for name, plan in plans.items():
        conf = [f.content for f in plan.files if f.path == plan.keepalived_conf]
        if name.startswith("gpu"):
            assert conf == []
            continue
        (confs[name],) = conf
        # the router's own health, through env (a venv's python is a link keepalived resolves)
        health = f'"/usr/bin/env {plan.python} -m stackctl.router.healthcheck http://127.0.0.1:8080/health"'
        assert health in confs[name]
        assert "10.0.0.100/24 dev eth0" in confs[name]
    assert "priority 200" in confs["head-a"] and "priority 190" in confs["head-b"]
    assert "unicast_peer {\n        10.0.0.11\n" in confs["head-a"]
    assert "unicast_peer {\n        10.0.0.10\n" in confs["head-b"]
