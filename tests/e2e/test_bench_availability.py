"""`stackctl bench --availability --kill-engine-every` end to end (issue 13): the real CLI
deploys a local fleet of simulator engines under supervisord, kills an engine every few seconds
while the workload runs, and the probes through the router must not notice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from tests.helpers.chaos import inventory_for, stackctl

SECONDS, EVERY = 40, 8
SCENARIO = {
    "name": "kills",
    "users": 8,
    "rounds": 4,
    "system_prompt_tokens": 200,
    "history_tokens": 2000,
    "question_tokens": 10,
    "answer_tokens": 20,
    "qps": [4.0],
    "duration_s": 10,
    "warmup_s": 0,
    "seed": 1,
    "request_timeout_s": 30,
    "drain_timeout_s": 15,
}


def _pids(inventory: Path) -> dict[tuple[str, str], int | None]:
    """(host, program) -> pid, from `stackctl status -o json` (supervisord's view)."""
    done = stackctl("status", inventory, "-p", "optimized", "-o", "json", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr  # healthy: every program RUNNING
    return {
        (host["host"], row["program"]): row["pid"]
        for host in json.loads(done.stdout)["hosts"]
        for row in host["programs"]
    }


@pytest.mark.slow  # ~60-90 s: two deploys, a 40 s run
def test_engine_kills_do_not_fail_a_probe(tmp_path):
    data = inventory_for(tmp_path, 3, time_scale=4.0)
    data["profiles"] = {"optimized": {"router": {"policy": "kv_aware"}}}
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    try:
        # deployed first, so that the pids before the run are known; bench's `up` changes nothing
        up = stackctl("up", inventory, "-p", "optimized", "--yes", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        before = _pids(inventory)
        bench = stackctl(
            "bench",
            inventory,
            "--availability",
            SECONDS,
            "--kill-engine-every",
            EVERY,
            "--compare",
            "optimized",
            "--scenario",
            scenario,
            "--yes",
            "--out",
            out,
            timeout=300,
        )
        assert bench.returncode == 0, bench.stdout + bench.stderr
        after = _pids(inventory)
        cluster = load_inventory(inventory, "optimized")
        supervisord_logs = {
            plan.host.name: Path(plan.log_file("supervisord")).read_text()
            for plan in plan_cluster(cluster)
        }
    finally:
        stackctl("down", inventory, "--purge", "--yes", timeout=180)

    summary = json.loads((out / "summary.json").read_text())["availability"][0]
    kills = [f for f in summary["faults"] if f["kind"] == "kill"]
    assert summary["kills"] == len(kills) == 4, summary["events"]  # at 8, 16, 24 and 32 s
    assert all("failed" not in e["label"] for e in summary["events"]), summary["events"]
    pids = [k["pid"] for k in kills]
    assert len(set(pids)) == len(pids), kills  # every kill hit a process not killed before
    engines = [(k["host"], k["program"]) for k in kills]
    assert len(set(engines[:3])) == 3 and engines[3] == engines[0], engines  # round-robin
    first = {engine: k["pid"] for engine, k in reversed(list(zip(engines, kills, strict=True)))}
    for engine, pid in first.items():
        assert before[engine] == pid, (engine, before, kills)  # the pid supervisord ran then
    # killing it again found a new process: supervisord had restarted it
    assert kills[3]["pid"] != kills[0]["pid"]
    # and every killed engine runs again under a new pid, while the router ran throughout
    assert all(after[engine] not in (None, *pids) for engine in first), (after, pids)
    assert after[("head", "router")] == before[("head", "router")], (before, after)
    for host, log in supervisord_logs.items():  # each host's supervisord saw its kills
        died = re.findall(r"exited: (\S+) \(terminated by SIGKILL", log)
        assert sorted(died) == sorted(p for h, p in engines if h == host), (host, log[-2000:])

    assert summary["probes"] == SECONDS
    assert summary["success_rate"] == 1.0, summary
    assert summary["background_requests"] >= SECONDS, summary  # the workload ran throughout
    md = (out / "summary.md").read_text()
    assert f"engine processes killed: {len(kills)}" in md
    assert f"kill -9 {kills[0]['host']}/{kills[0]['program']} (pid {kills[0]['pid']})" in md


def test_kill_engine_every_needs_availability(tmp_path):
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump(inventory_for(tmp_path, 1, time_scale=4.0)))
    done = stackctl("bench", inventory, "--kill-engine-every", 8, "--yes", "--out", tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--kill-engine-every needs --availability" in done.stderr
    assert not (tmp_path / "summary.json").exists()
