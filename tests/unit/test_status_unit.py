"""`status` (stackctl/status.py) against a real supervisord per host whose programs are fake
engines and a fake router (tests/helpers/fake_services.py), through the fake connector and the
real probe: the rows an operator reads, and the overall verdict and exit code."""

from __future__ import annotations

import json

import pytest

import stackctl.connect
from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from stackctl.status import cluster_status, exit_code
from tests.helpers.fake_connector import FakeFleet, RealSupervisord, http_get, write_inventory

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
def fleet(monkeypatch):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    return fleet


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One cluster for the module, each host in another state: head runs the router; sim1 has
    engine-0 running, engine-1 stopped and engine-2 not loaded; sim2's engine serves garbage
    as /metrics; sim3 has no supervisord. Real supervisords, started together."""
    root = tmp_path_factory.mktemp("status")
    garbage = root / "metrics.txt"
    garbage.write_text("vllm:num_requests_running{ this is not prometheus\n")
    path, _ = write_inventory(root, engine_hosts=3, hosts={"sim1": {"gpus": [0, 1, 2]}})
    cluster = load_inventory(path)
    head, sim1, sim2, _ = plan_cluster(cluster)
    supervisors = [
        RealSupervisord(head),
        RealSupervisord(sim1, {"engine-0": [], "engine-1": []}),
        RealSupervisord(sim2, {"engine-0": ["--metrics-text", str(garbage)]}),
    ]
    try:
        for supervisor in supervisors:
            supervisor.start(wait=False)
        for supervisor in supervisors:
            supervisor.wait()
        supervisors[1].ctl("stop", "engine-1")
        yield cluster
    finally:
        for supervisor in supervisors:
            supervisor.kill()


def rows(status: dict, host: str) -> dict[str, dict]:
    return {row["program"]: row for row in entry(status, host)["programs"]}


def entry(status: dict, host: str) -> dict:
    return next(e for e in status["hosts"] if e["host"] == host)


def test_rows_for_running_stopped_and_missing_programs(running, fleet):
    status = cluster_status(running, hosts=["head", "sim1"])
    sim1 = plan_cluster(running, ["sim1"])[0]
    sim = rows(status, "sim1")
    up, stopped, missing = sim["engine-0"], sim["engine-1"], sim["engine-2"]
    assert up["state"] == "RUNNING" and up["healthy"] is True
    assert up["pid"] == int(
        http_get(sim1.program("engine-0").port, "/pid")
    )  # parsed from supervisorctl's detail
    assert up["uptime"] is not None and up["port"] == sim1.program("engine-0").port
    assert up["model"] == MODEL
    assert up["metrics"]["running"] == 0 and up["metrics"]["prefix_hit_rate"] == pytest.approx(0.25)
    assert stopped["state"] == "STOPPED" and stopped["pid"] is None and stopped["healthy"] is False
    assert (
        missing["state"] == "NOT LOADED"
        and missing["healthy"] is False
        and "metrics" not in missing
    )
    router = rows(status, "head")["router"]
    assert router["state"] == "RUNNING" and router["healthy"] is True
    assert [e["name"] for e in router["engines"]["engines"]] == [
        "sim1-0",
        "sim1-1",
        "sim1-2",
        "sim2-0",
        "sim3-0",
    ]
    assert status["overall"] == "degraded" and exit_code(status) == 1
    assert fleet.closed("head") and fleet.closed("sim1")


def test_everything_running_and_healthy_is_exit_0(running, fleet):
    status = cluster_status(running, hosts=["head"])
    assert status["overall"] == "healthy" and exit_code(status) == 0, json.dumps(status, indent=1)
    head = entry(status, "head")
    assert head["reachable"] and head["supervisord"]["running"] and head["supervisord"]["pid"]
    assert (
        head["systemd"]["enabled"] is None
    )  # local hosts have no unit: nothing starts them at boot
    assert status["router_url"] == running.router_url


def test_a_host_without_supervisord_is_degraded(running, fleet):
    status = cluster_status(running, hosts=["head", "sim3"])
    sim3 = entry(status, "sim3")
    assert sim3["reachable"] and sim3["supervisord"] == {"running": False, "pid": None}
    assert {row["state"] for row in sim3["programs"]} == {"NO SUPERVISORD"}
    assert status["overall"] == "degraded" and exit_code(status) == 1


def test_an_unreachable_host_is_exit_2_with_its_error(running, fleet):
    fleet.unreachable("sim1")
    status = cluster_status(running, hosts=["head", "sim1"])
    sim1 = entry(status, "sim1")
    assert sim1["reachable"] is False and sim1["programs"] == []
    assert "sim1" in sim1["error"] and "No route to host" in sim1["error"]
    assert rows(status, "head")["router"]["state"] == "RUNNING"  # the other host is still shown
    assert status["overall"] == "unreachable" and exit_code(status) == 2


def test_a_connection_lost_after_the_facts_is_an_error_on_that_host(running, fleet):
    fleet.lose_connection(r'"action": "http"', host="head")
    status = cluster_status(running, hosts=["head"])
    head = entry(status, "head")
    assert head["reachable"] and "connection failed" in head["error"] and "head" in head["error"]
    assert status["overall"] == "degraded" and exit_code(status) == 1


def test_unparseable_metrics_are_reported_without_hiding_the_row(running, fleet):
    status = cluster_status(running, hosts=["sim2"])
    assert [e["host"] for e in status["hosts"]] == ["sim2"]
    row = rows(status, "sim2")["engine-0"]
    assert row["state"] == "RUNNING" and row["healthy"] is True
    assert "metrics" not in row and row["metrics_error"].startswith("unparseable /metrics")
