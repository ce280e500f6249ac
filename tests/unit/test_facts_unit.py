"""`gather` (stackctl/facts.py) through the fake connector and the real probe: what `up` learns
about a host, checked where `up` uses it (``compute_diff``'s changes and refusals), and the
partial facts of a host whose interpreter cannot run the probe (the shell's 127 and 126)."""

from __future__ import annotations

from pathlib import Path

import pytest

import stackctl.connect
from stackctl.apply import compute_diff
from stackctl.connect import CommandError, connect
from stackctl.facts import gather, supervisor_facts
from stackctl.inventory import check_secrets, load_inventory
from stackctl.plan import plan_cluster
from tests.helpers.fake_connector import FakeFleet, write_inventory


@pytest.fixture
def fleet(monkeypatch):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    return fleet


def facts_and_diff(path: Path, host: str = "sim1"):
    cluster = load_inventory(path)
    plan = plan_cluster(cluster, [host])[0]
    conn = connect(plan.host)
    try:
        facts = gather(conn, plan, needs_gpus=False)
    finally:
        conn.close()
    return plan, facts, compute_diff(cluster, plan, facts, check_secrets(cluster), None)


def changes(diff) -> list[tuple[str, str, str]]:
    return [(str(c.kind), c.target, c.detail) for c in diff.changes]


def test_a_fresh_host_needs_every_file_and_supervisord(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    plan, facts, diff = facts_and_diff(path)
    assert (
        not facts.partial
        and not facts.supervisor_running
        and facts.program_state("engine-0") is None
    )
    assert diff.problems == []
    key = plan.secrets[0]  # the engine key: the only secret here
    assert [key.path] == [s.path for s in plan.secrets] == [plan.engine_key_file]
    assert changes(diff) == [
        ("secret", key.path, f"engine API key from {key.source} (mode 0600, value not shown)")
    ] + [("file", f.path, "new") for f in plan.files] + [
        ("supervisord", plan.supervisor_conf, "start")
    ]
    assert len(fleet.probes("sim1", "facts")) == 1  # one round trip for the facts (plus a listing)


def test_files_as_planned_are_no_change_and_a_changed_mode_is_seen(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    plan = plan_cluster(load_inventory(path), ["sim1"])[0]
    for spec in plan.files:
        Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.path).write_text(spec.content)
        Path(spec.path).chmod(spec.mode)
    lmcache = next(f for f in plan.files if f.path.endswith(".lmcache.yaml"))
    Path(lmcache.path).chmod(0o666)
    _, facts, diff = facts_and_diff(path)
    assert facts.files[plan.supervisor_conf].mode == 0o644
    assert [c for c in changes(diff) if c[0] == "file"] == [("file", lmcache.path, "mode")]


def test_a_program_file_no_longer_planned_is_removed(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    plan = plan_cluster(load_inventory(path), ["sim1"])[0]
    Path(plan.program_dir).mkdir(parents=True)
    (Path(plan.program_dir) / "engine-7.conf").write_text("[program:engine-7]\n")
    (Path(plan.program_dir) / "notes.txt").write_text("not a program\n")
    _, facts, diff = facts_and_diff(path)
    stale = f"{plan.program_dir}/engine-7.conf"
    assert list(facts.stale_program_files) == [stale]
    assert ("remove", stale, "program no longer planned") in changes(diff)


def test_a_missing_interpreter_gives_partial_facts_and_a_refusal_naming_it(tmp_path, fleet):
    path, _ = write_inventory(
        tmp_path, engine_hosts=1, hosts={"sim1": {"python": "/opt/nowhere/bin/python3.12"}}
    )
    _, facts, diff = facts_and_diff(path)
    assert facts.partial
    assert len(diff.problems) == 1 and diff.changes == []
    problem = diff.problems[0]
    assert "`/opt/nowhere/bin/python3.12` was not found" in problem and "python:" in problem
    assert "No such file or directory" in problem  # the shell's own words
    assert len(fleet.runs("sim1")) == 1  # nothing more is asked of a host that cannot run the probe


def test_an_interpreter_that_cannot_be_run_is_told_apart(tmp_path, fleet):
    python = tmp_path / "python3"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o644)  # there, not executable: the shell's 126
    path, _ = write_inventory(tmp_path, engine_hosts=1, hosts={"sim1": {"python": str(python)}})
    _, facts, diff = facts_and_diff(path)
    assert facts.partial and len(diff.problems) == 1
    assert f"`{python}` cannot be run" in diff.problems[0] and "executable" in diff.problems[0]


def test_an_interpreter_that_fails_otherwise_is_an_error_with_its_output(tmp_path, fleet):
    python = tmp_path / "python3"
    python.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    python.chmod(0o755)
    path, _ = write_inventory(tmp_path, engine_hosts=1, hosts={"sim1": {"python": str(python)}})
    with pytest.raises(CommandError) as caught:
        facts_and_diff(path)
    assert caught.value.result.exited == 1 and "init_fs_encoding" in str(caught.value)


def test_a_service_user_to_create_and_a_deploy_dir_to_give_it(tmp_path, fleet):
    """Root connecting, a service account that does not exist yet (sudo/useradd cannot run in a
    unit test: the preflight's answer is scripted, the probe is real)."""
    fleet.answer(r"login_user=", "login_user=root\nlogin_uid=0\nrunuser=yes\n")
    path, _ = write_inventory(tmp_path, engine_hosts=1, hosts={"sim1": {"service_user": "svc"}})
    plan, _, diff = facts_and_diff(path)
    found = changes(diff)
    assert found[0] == (
        "user",
        "svc",
        f"create system account (home {plan.deploy_dir}, no login shell)",
    )
    assert found[1] == ("owner", plan.deploy_dir, "create, owned by svc")


def test_an_existing_deploy_dir_of_another_owner_is_handed_over(tmp_path, fleet):
    fleet.answer(
        r"login_user=", "login_user=svc\nlogin_uid=54321\nrunuser=yes\nservice_uid=54321\n"
    )
    path, _ = write_inventory(tmp_path, engine_hosts=1, hosts={"sim1": {"service_user": "svc"}})
    plan = plan_cluster(load_inventory(path), ["sim1"])[0]
    Path(plan.deploy_dir).mkdir()  # ours (this test's uid), not svc's
    _, _, diff = facts_and_diff(path)
    found = changes(diff)
    assert not [c for c in found if c[0] == "user"]  # the account exists
    assert ("owner", plan.deploy_dir, "give it and everything in it to svc (chown -R)") in found


def test_supervisor_facts_alone_for_status_and_down(tmp_path, fleet):
    path, _ = write_inventory(tmp_path, engine_hosts=1)
    plan = plan_cluster(load_inventory(path), ["sim1"])[0]
    conn = connect(plan.host)
    try:
        facts = supervisor_facts(conn, plan)
    finally:
        conn.close()
    assert not facts.supervisor_running and facts.files == {}  # files are not asked for
    request = fleet.probes("sim1", "facts")[0].request
    assert request["supervisor_conf"] == plan.supervisor_conf and "files" not in request
