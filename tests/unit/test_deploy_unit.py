"""`up` (stackctl/deploy.py) on a local fleet through the fake connector: the real probe, real
files in temp deploy dirs, a fake supervisord whose programs are in-process fake engines and a
fake router (tests/helpers/fake_connector.py). No SSH, root or network namespaces.

What is checked is what an operator sees: each host's outcome (status, step, error), the files
on disk, which commands ran on which host in which order, and the router's reloads.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
import yaml

import stackctl.connect
from stackctl.deploy import INTERRUPTED, UpOptions, up
from stackctl.errors import StackctlError
from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from stackctl.progress import Progress
from stackctl.testing import wait_until
from tests.helpers.fake_connector import FakeFleet, write_inventory

ENGINE_HOSTS = ("sim1", "sim2")
SUPERVISORD = r"-m supervisor\.supervisord "


@pytest.fixture
def fleet(monkeypatch):
    fleet = FakeFleet(fake_supervisor=True)
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    yield fleet
    fleet.stop()


@pytest.fixture
def sigint_guard():
    """A SIGINT that reaches the test instead of `up`'s handler fails the test, not the session."""

    def stray(signum, frame):
        raise AssertionError("SIGINT was not handled by `up`")

    previous = signal.signal(signal.SIGINT, stray)
    yield
    signal.signal(signal.SIGINT, previous)


def deploy(path: Path, confirm=lambda question: True, **options):
    return up(load_inventory(path), UpOptions(yes=True, **options), Progress(quiet=True), confirm)


def statuses(result) -> dict[str, str]:
    return {name: o.status for name, o in result.outcomes.items()}


def daemon_starts(fleet, host):
    return [c for c in fleet.runs(host) if "-m supervisor.supervisord " in c.text]


def test_fresh_up_writes_the_plan_and_starts_the_router_after_the_engines(tmp_path, fleet):
    path, ports = write_inventory(tmp_path)
    result = deploy(path)
    assert result.ok and result.verified, result
    assert statuses(result) == {"head": "changed", "sim1": "changed", "sim2": "changed"}
    for plan in plan_cluster(
        load_inventory(path)
    ):  # every planned file landed, byte for byte, with its mode
        for spec in plan.files:
            on_disk = Path(spec.path)
            assert on_disk.read_text() == spec.content, spec.path
            assert on_disk.stat().st_mode & 0o777 == spec.mode, spec.path
    # the router host installs alongside the engines, but its programs start once they are healthy
    router_start = daemon_starts(fleet, "head")[0].seq
    for host in ENGINE_HOSTS:
        health = fleet.probes(host, "wait")
        assert health and health[0].seq < router_start, host
    completion = fleet.probes("head", "http")[-1]
    assert completion.seq > router_start and completion.request["requests"][0]["url"].endswith(
        "/v1/completions"
    )
    assert all(fleet.closed(h) for h in ("head", *ENGINE_HOSTS))


def test_second_up_changes_and_restarts_nothing(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    assert deploy(path).ok
    before = len(fleet.calls)
    history = len(fleet.supervisor.history)
    result = deploy(path)
    assert result.ok and statuses(result) == {"head": "unchanged", "sim1": "unchanged"}
    later = fleet.calls[before:]
    assert [c for c in later if c.op == "put"] == []
    assert fleet.supervisor.history[history:] == []  # no supervisorctl at all: nothing restarted


def test_a_changed_router_config_is_reloaded_not_restarted(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    assert deploy(path).ok
    router = fleet.supervisor.services[("head", "router")]
    inventory = yaml.safe_load(path.read_text())
    inventory["router"]["policy"] = "round_robin"
    path.write_text(yaml.safe_dump(inventory))
    history = len(fleet.supervisor.history)
    result = deploy(path)
    assert result.ok and statuses(result) == {"head": "changed", "sim1": "unchanged"}
    assert (
        "round_robin"
        in Path(plan_cluster(load_inventory(path), ["head"])[0].router_config).read_text()
    )
    verbs = fleet.supervisor.history[history:]
    assert ("head", "signal", "HUP router") in verbs
    assert not [v for v in verbs if v[1] in ("restart", "stop", "started")], verbs
    assert len(router.reloads) == 2  # loaded at start, then once more on SIGHUP


def test_check_shows_what_would_change_and_touches_nothing(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    asked = []
    result = deploy(path, confirm=asked.append, check=True)
    assert statuses(result) == {"head": "would-change", "sim1": "would-change"}
    assert asked == [] and fleet.puts() == []
    assert {c.action for c in fleet.runs() if c.request} == {"facts"}
    assert not any((tmp_path / name).exists() for name in ("head", "sim1"))


def test_not_confirmed_is_an_error_and_changes_nothing(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    questions = []

    def no(question):
        questions.append(question)
        return False

    with pytest.raises(StackctlError, match="not confirmed") as caught:
        deploy(path, confirm=no)
    assert caught.value.exit_code == 1
    assert len(questions) == 1 and "on 2 host(s)" in questions[0]
    assert fleet.puts() == [] and not any((tmp_path / name).exists() for name in ("head", "sim1"))
    assert all(fleet.closed(h) for h in ("head", "sim1"))


def test_an_unreachable_host_is_reported_and_the_others_deploy(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.unreachable("sim1")
    result = deploy(path)
    assert statuses(result) == {"head": "changed", "sim1": "unreachable"}
    sim1 = result.outcomes["sim1"]
    assert (
        sim1.step == "connect/facts" and "sim1" in sim1.error and "No route to host" in sim1.error
    )
    assert result.verified and not result.ok  # the router serves, but one host is missing
    assert not (tmp_path / "sim1").exists()


def test_a_port_taken_by_another_process_refuses_that_host_only(tmp_path, fleet):
    path, ports = write_inventory(tmp_path, engine_hosts=1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["sim1"]))
        squatter.listen()
        result = deploy(path)
    assert statuses(result) == {"head": "changed", "sim1": "refused"}
    sim1 = result.outcomes["sim1"]
    assert (
        sim1.step == "checks"
        and f"port {ports['sim1']}" in sim1.error
        and "already taken" in sim1.error
    )
    assert fleet.puts("sim1") == [] and not (tmp_path / "sim1").exists()


def test_a_failed_step_names_host_step_and_output_and_the_others_carry_on(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.fail(
        r"^mkdir -p ", host="sim1", stderr="mkdir: cannot create directory '/x': Permission denied"
    )
    result = deploy(path)
    assert statuses(result) == {"head": "changed", "sim1": "failed"}
    sim1 = result.outcomes["sim1"]
    assert sim1.step == "directories"
    assert (
        "Permission denied" in sim1.error
        and "mkdir -p" in sim1.error
        and "Traceback" not in sim1.error
    )
    assert (
        fleet.puts("sim1") == [] and daemon_starts(fleet, "sim1") == []
    )  # nothing after the failed step
    assert result.verified and not result.ok


def test_a_failed_router_host_is_not_started_and_verify_says_why(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.fail(r"^mkdir -p ", host="head", stderr="No space left on device")
    result = deploy(path)
    assert statuses(result) == {"head": "failed", "sim1": "changed"}
    assert daemon_starts(fleet, "head") == [] and fleet.probes("head", "http") == []
    assert not result.verified and "router host head was failed" in result.verify_error


def test_a_connection_lost_mid_apply_fails_that_host(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.lose_connection(SUPERVISORD, host="sim1")
    result = deploy(path)
    assert statuses(result) == {"head": "changed", "sim1": "failed"}
    sim1 = result.outcomes["sim1"]
    assert (
        sim1.step == "start supervisord"
        and "sim1" in sim1.error
        and "connection failed" in sim1.error
    )
    assert fleet.probes("sim1", "wait") == []  # no health wait on a host that is gone


def test_a_command_past_its_timeout_fails_the_host_with_that_command(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.timeout(r"^mkdir -p ", host="sim1", after=0.2)
    result = deploy(path)
    sim1 = result.outcomes["sim1"]
    assert sim1.status == "failed" and sim1.step == "directories" and "mkdir -p" in sim1.error
    assert result.outcomes["head"].status == "changed"


def test_an_engine_that_never_becomes_healthy_fails_with_its_log(tmp_path, fleet):
    path, _ = write_inventory(
        tmp_path, engine_hosts=1, hosts={"sim1": {"engine": {"health_timeout_s": 0.3}}}
    )
    fleet.supervisor.configure("sim1", "engine-0", health_status=503)
    log = plan_cluster(load_inventory(path), ["sim1"])[0].log_file("engine-0")
    fleet.before(
        SUPERVISORD,
        lambda host, command: Path(log).write_text("loading\nRuntimeError: CUDA out of memory\n"),
        host="sim1",
    )
    result = deploy(path)
    sim1 = result.outcomes["sim1"]
    assert sim1.status == "failed" and sim1.step == "wait for engines"
    assert "engine-0" in sim1.error and "did not become healthy" in sim1.error
    assert "CUDA out of memory" in sim1.error  # the log's tail, read back from the host
    assert result.outcomes["head"].status == "changed" and result.verified


def test_a_failed_completion_through_the_router_fails_verify(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.supervisor.configure("head", "router", completion_status=502)
    result = deploy(path)
    assert statuses(result) == {"head": "changed", "sim1": "changed"}
    assert not result.verified and not result.ok
    assert "completion through the router failed: 502" in result.verify_error


def test_hosts_leaving_out_the_router_still_verify_through_it(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    assert deploy(path).ok
    result = deploy(path, hosts=["sim1"])
    assert list(result.outcomes) == ["sim1"] and result.ok
    assert (
        len(fleet.probes("head", "facts")) == 1
    )  # the second run gathered nothing there: it only verified
    assert fleet.probes("head", "http")[-1].seq > fleet.probes("sim1", "facts")[-1].seq


def test_ctrl_c_during_facts_changes_nothing(tmp_path, fleet, sigint_guard):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.interrupt(r"^ls -1 ", host="sim1")  # right after sim1's probe
    result = deploy(path)
    assert result.interrupted and not result.ok
    assert (
        "changed" not in statuses(result).values()
        and "interrupted" not in statuses(result).values()
    )
    assert fleet.puts() == [] and not any(c.text.startswith("mkdir") for c in fleet.runs())
    wait_until(
        lambda: all(fleet.closed(h) for h in ("head", "sim1")), 5, what="every connection closed"
    )


def test_ctrl_c_during_apply_names_the_half_done_host_and_starts_nothing_more(
    tmp_path, fleet, sigint_guard
):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    fleet.interrupt(SUPERVISORD, host="sim1")
    result = deploy(path)
    assert result.interrupted and not result.ok
    sim1 = result.outcomes["sim1"]
    assert (
        sim1.status == "interrupted"
        and sim1.step == "start supervisord"
        and sim1.error == INTERRUPTED
    )
    assert (
        daemon_starts(fleet, "head") == []
    )  # the router's start comes after the engines': never reached
    assert fleet.probes("head", "http") == []  # and no verify
    wait_until(
        lambda: all(fleet.closed(h) for h in ("head", "sim1")), 5, what="every connection closed"
    )


def _change_engines(path: Path) -> None:
    inventory = yaml.safe_load(path.read_text())
    inventory["engine"]["sim"] = {
        "time_scale": 7.0
    }  # in the engines' command lines: a restart each
    path.write_text(yaml.safe_dump(inventory))


@pytest.mark.slow  # two `up`s, the second one host at a time through the router: 2-3 s
def test_rolling_up_drains_one_engine_host_at_a_time(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    assert deploy(path).ok
    router = fleet.supervisor.services[("head", "router")]
    assert router.reloads == [["sim1-0", "sim2-0"]]
    _change_engines(path)
    history = len(fleet.supervisor.history)
    result = deploy(path, rolling=True)
    assert result.ok, result
    assert statuses(result) == {"head": "unchanged", "sim1": "changed", "sim2": "changed"}
    # out of the router, restarted, back in; then the next host
    assert router.reloads[1:] == [
        ["sim2-0"],
        ["sim1-0", "sim2-0"],
        ["sim1-0"],
        ["sim1-0", "sim2-0"],
    ]
    steps = [
        (h, verb)
        for h, verb, _ in fleet.supervisor.history[history:]
        if verb in ("update", "signal")
    ]
    assert steps == [
        ("head", "signal"),
        ("sim1", "update"),
        ("head", "signal"),
        ("head", "signal"),
        ("sim2", "update"),
        ("head", "signal"),
    ]
    plan = plan_cluster(load_inventory(path), ["head"])[0]
    assert Path(plan.router_config).read_text() == next(
        f.content for f in plan.files if f.path == plan.router_config
    )


@pytest.mark.slow  # two `up`s, the second one host at a time through the router: 2-3 s
def test_rolling_up_waits_for_a_drained_engine_to_go_idle(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    assert deploy(path).ok
    engine = fleet.supervisor.services[("sim1", "engine-0")]
    engine.busy_polls = 2  # its next two /metrics say one request still runs
    polled = []
    fleet.before(
        r"supervisorctl .* reread",
        lambda host, command: polled.append(sum(r["path"] == "/metrics" for r in engine.requests)),
        host="sim1",
    )
    _change_engines(path)
    assert deploy(path, rolling=True).ok
    assert polled == [3]  # busy, busy, idle: only then was it restarted


@pytest.mark.slow
def test_rolling_up_stops_at_the_first_failed_engine_host(tmp_path, fleet):
    path, _ = write_inventory(tmp_path)
    assert deploy(path).ok
    _change_engines(path)
    fleet.fail(r"supervisorctl .* reread", host="sim1", stderr="error: <class 'OSError'>")
    before = len(fleet.calls)
    result = deploy(path, rolling=True)
    assert result.outcomes["sim1"].status == "failed"
    assert result.outcomes["sim2"].status != "changed"  # not taken down while sim1 is out
    assert [c for c in fleet.calls[before:] if c.op == "put" and c.host == "sim2"] == []
    assert (
        result.outcomes["sim2"].status == "pending"
        and "stopped at sim1" in result.outcomes["sim2"].error
    )
    assert not result.ok
