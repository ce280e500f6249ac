"""`restart`, `restart --rolling`, `down [--purge]` and `logs` (stackctl/ops.py) against real
supervisords whose programs are fake engines and a fake router (tests/helpers/fake_services.py),
through the fake connector and the real probe. Observed: the programs' pids (each fake answers
``/pid``), the router's reloads of router.yaml on SIGHUP (``/_state``), ports, files on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import stackctl.connect
from stackctl.errors import StackctlError
from stackctl.inventory import load_inventory
from stackctl.ops import down, logs, restart
from stackctl.plan import plan_cluster
from tests.helpers.fake_connector import (
    FakeFleet,
    RealSupervisord,
    http_get,
    wait_listening,
    write_inventory,
)


@pytest.fixture
def fleet(monkeypatch):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    return fleet


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """head (router), sim1 and sim2 (one engine each), under real supervisords for the whole
    module. sim1's engine answers /health with 503 while ``<root>/sim1-unhealthy`` exists at its
    start, and waits at most 1.5 s for health (two polls of the probe's wait, 1 s apart)."""
    root = tmp_path_factory.mktemp("ops")
    path, _ = write_inventory(root, hosts={"sim1": {"engine": {"health_timeout_s": 1.5}}})
    cluster = load_inventory(path)
    head, sim1, sim2 = plan_cluster(cluster)
    supervisors = [
        RealSupervisord(head),
        RealSupervisord(sim1, {"engine-0": ["--unhealthy-if", str(root / "sim1-unhealthy")]}),
        RealSupervisord(sim2),
    ]
    try:
        for supervisor in supervisors:
            supervisor.start(wait=False)
        for supervisor in supervisors:
            supervisor.wait()
        yield cluster, root, dict(zip(("head", "sim1", "sim2"), supervisors, strict=True))
    finally:
        for supervisor in supervisors:
            supervisor.kill()


def pids(cluster) -> dict[str, int]:
    """The pid of each host's program (one a host here), once it listens again after a restart."""
    plans = plan_cluster(cluster)
    for plan in plans:
        wait_listening(plan.programs[0].port)
    return {plan.host.name: int(http_get(plan.programs[0].port, "/pid")) for plan in plans}


def reloads(cluster) -> list[list[str]]:
    router = plan_cluster(cluster, ["head"])[0].program("router")
    return json.loads(http_get(router.port, "/_state"))["reloads"]


def test_restart_one_program_restarts_only_it(running, fleet):
    cluster, _, _ = running
    before = pids(cluster)
    assert restart(cluster, ["sim1"], "engine-0") == {"sim1": None}
    after = pids(cluster)
    assert after["sim1"] != before["sim1"]
    assert after["sim2"] == before["sim2"] and after["head"] == before["head"]
    assert [c.host for c in fleet.calls if c.op == "connect"] == ["sim1"]


def test_restart_of_an_unknown_program_is_refused_before_connecting(running, fleet):
    cluster, _, _ = running
    with pytest.raises(StackctlError) as caught:
        restart(cluster, None, "engine-9")
    assert caught.value.exit_code == 2
    assert "engine-9" in str(caught.value) and "engine-0, router" in str(caught.value)
    with pytest.raises(StackctlError, match="not confirmed") as declined:
        restart(cluster, None, None, confirm=lambda: False)
    assert declined.value.exit_code == 1
    assert fleet.calls == []


def test_restart_reports_the_host_it_could_not_reach_and_restarts_the_rest(running, fleet):
    cluster, _, _ = running
    fleet.unreachable("sim2")
    before = pids(cluster)
    result = restart(cluster, ["sim1", "sim2"], None)
    assert (
        result["sim1"] is None and "sim2" in result["sim2"] and "cannot connect" in result["sim2"]
    )
    after = pids(cluster)
    assert after["sim1"] != before["sim1"] and after["sim2"] == before["sim2"]


@pytest.mark.slow  # a drain, restart and health wait per host, one after the other: 2-4 s
def test_rolling_restart_drains_each_engine_host_through_the_router(running, fleet):
    cluster, _, _ = running
    before, loads = pids(cluster), len(reloads(cluster))
    assert restart(cluster, ["sim1", "sim2"], None, rolling=True) == {"sim1": None, "sim2": None}
    after = pids(cluster)
    assert after["head"] == before["head"]  # the router was told (SIGHUP), not restarted
    assert after["sim1"] != before["sim1"] and after["sim2"] != before["sim2"]
    # each host out of the router, restarted, back in; one host at a time, in inventory order
    assert reloads(cluster)[loads:] == [
        ["sim2-0"],
        ["sim1-0", "sim2-0"],
        ["sim1-0"],
        ["sim1-0", "sim2-0"],
    ]
    head = plan_cluster(cluster, ["head"])[0]
    assert Path(head.router_config).read_text() == next(
        f.content for f in head.files if f.path == head.router_config
    )


@pytest.mark.slow  # a drain, restart and health wait per host, one after the other: 2-4 s
def test_rolling_restart_stops_at_the_first_host_that_fails_and_puts_it_back(running, fleet):
    cluster, root, supervisors = running
    before, loads = pids(cluster), len(reloads(cluster))
    flag = root / "sim1-unhealthy"
    flag.touch()
    try:
        result = restart(cluster, ["sim1", "sim2"], None, rolling=True)
    finally:
        flag.unlink()
    assert (
        "sim1" in result["sim1"]
        and "did not become healthy" in result["sim1"]
        and "stackctl logs -l sim1" in result["sim1"]
    )
    assert result["sim2"] == "not restarted: stopped after sim1 failed"
    assert pids(cluster)["sim2"] == before["sim2"]
    assert reloads(cluster)[loads:] == [["sim2-0"], ["sim1-0", "sim2-0"]]  # sim1 was put back
    supervisors["sim1"].ctl("restart", "engine-0")  # healthy again for the next tests


def test_rolling_restart_without_the_router_host_restarts_nothing(running, fleet):
    cluster, _, _ = running
    fleet.unreachable("head")
    before = pids(cluster)
    result = restart(cluster, ["sim1", "sim2"], None, rolling=True)
    assert set(result) == {"sim1", "sim2"}
    assert all(
        message.startswith("not restarted: ") and "head" in message for message in result.values()
    )
    assert pids(cluster) == before


def test_logs_prints_the_tail_of_each_programs_log(running, fleet, capfd):
    cluster, _, _ = running
    logs(cluster, ["sim1", "sim2"], "engine-0", 5, follow=False)
    out = capfd.readouterr().out
    ports = {
        plan.host.name: plan.program("engine-0").port
        for plan in plan_cluster(cluster, ["sim1", "sim2"])
    }
    assert "=== sim1" in out and "=== sim2" in out
    assert f"fake engine listening on 127.0.0.1:{ports['sim1']}" in out
    assert out.index("=== sim1") < out.index(f"127.0.0.1:{ports['sim1']}") < out.index("=== sim2")
    with pytest.raises(StackctlError, match="no program 'engine-7'") as caught:
        logs(cluster, ["sim1"], "engine-7", 5, follow=False)
    assert caught.value.exit_code == 2


def test_down_purge_removes_what_up_made_keeps_the_rest_and_refuses_foreign_dirs(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    cluster = load_inventory(path)
    _, sim1, sim2 = plan_cluster(cluster)
    RealSupervisord(sim1).write()  # a stopped deployment: the planned supervisord.conf and programs
    (Path(sim1.deploy_dir) / "operator-notes.txt").write_text("mine")
    Path(sim2.deploy_dir).mkdir()
    (Path(sim2.deploy_dir) / "precious.db").write_text("not stackctl's")
    result = down(cluster, None, purge=True)
    assert result["head"] is None  # nothing there: nothing to do
    assert result["sim1"] is None
    assert sorted(os.listdir(sim1.deploy_dir)) == ["operator-notes.txt"]
    assert (
        "sim2" in result["sim2"]
        and "refusing to purge" in result["sim2"]
        and sim2.deploy_dir in result["sim2"]
    )
    assert (Path(sim2.deploy_dir) / "precious.db").read_text() == "not stackctl's"


@pytest.mark.slow  # a real supervisord takes seconds (its 1 s ticks) to start and to exit
def test_down_stops_the_programs_and_supervisord(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    cluster = load_inventory(path)
    _, sim1 = plan_cluster(cluster)
    supervisor = RealSupervisord(sim1).start()
    try:
        pid = supervisor.pid
        assert down(cluster, ["sim1"], purge=False) == {"sim1": None}
        with pytest.raises(OSError):
            os.kill(pid, 0)  # supervisord is gone, not only its programs
        wait_listening(sim1.program("engine-0").port, timeout=1, up=False)
        assert Path(sim1.supervisor_conf).exists()  # without --purge the deploy dir stays
    finally:
        supervisor.kill()
