"""The local fleet end to end, as the demo runs it: up, status, up again, bench, down --purge.

Everything goes through the real CLI, supervisord and simulator processes (connection: local,
the same code path as SSH without the network), with a fast simulator clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from stackctl.testing import free_ports

pytestmark = pytest.mark.slow


def stackctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stackctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    router_port, *engine_ports = free_ports(3)
    inventory = {
        "cluster": "local-test",
        "python": "current",
        "install": False,
        "deploy_dir": str(root / "head"),
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "engine": {
            "kind": "sim",
            "bind": "127.0.0.1",
            "sim": {"hardware": "a100-80gb", "time_scale": 20.0},
        },
        "router": {
            "host": "head",
            "port": router_port,
            "bind": "127.0.0.1",
            "health_interval_s": 0.5,
        },
        "hosts": [{"name": "head", "connection": "local", "roles": ["router"]}]
        + [
            {
                "name": f"sim{i}",
                "connection": "local",
                "deploy_dir": str(root / f"sim{i}"),
                "engine": {"port": port},
            }
            for i, port in enumerate(engine_ports, start=1)
        ],
        "profiles": {
            "naive": {
                "router": {"policy": "round_robin"},
                "engine": {"lmcache": {"enabled": False}},
            },
            "optimized": {
                "router": {"policy": "kv_aware"},
                "engine": {"lmcache": {"enabled": True}},
            },
        },
    }
    path = root / "local.yaml"
    path.write_text(yaml.safe_dump(inventory))
    yield path, root
    stackctl("down", path, "--purge", "--yes", timeout=120)


def status_json(path: Path) -> dict:
    result = stackctl("status", path, "-o", "json")
    return {"code": result.returncode, **json.loads(result.stdout)}


def post_status(url: str, body: dict) -> int:
    """The HTTP status of a JSON POST without any Authorization header."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def check_engines_are_authenticated(path: Path, root: Path) -> None:
    """An engine refuses a direct completion without the engine key while the router serves
    it; the key is one 0600 file per host and on no process's command line."""
    inventory = yaml.safe_load(path.read_text())
    body = {"model": inventory["model"]["name"], "prompt": "are you there", "max_tokens": 2}
    for host in inventory["hosts"][1:]:
        url = f"http://127.0.0.1:{host['engine']['port']}/v1/completions"
        assert post_status(url, body) == 401, url
    router = f"http://127.0.0.1:{inventory['router']['port']}/v1/completions"
    assert post_status(router, body) == 200
    files = [root / h["name"] / "secrets" / "engine_api_key" for h in inventory["hosts"]]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    keys = {f.read_text() for f in files}
    assert len(keys) == 1 and len(next(iter(keys))) >= 40
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30)
    assert ps.returncode == 0 and next(iter(keys)) not in ps.stdout


def pids(status: dict) -> dict[tuple[str, str], int]:
    return {(h["host"], p["program"]): p["pid"] for h in status["hosts"] for p in h["programs"]}


def test_up_status_idempotent_bench_down(fleet, tmp_path):
    path, root = fleet
    check = stackctl(
        "up", path, "--check"
    )  # CI's question: would `up` change anything? (it changes nothing)
    assert check.returncode == 3, check.stdout + check.stderr
    assert "would-change" in check.stdout and not any(
        (root / name).exists() for name in ("head", "sim1", "sim2")
    )
    first = stackctl("up", path, "--yes")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "verified with a completion" in first.stdout

    status = status_json(path)
    assert status["code"] == 0 and status["overall"] == "healthy", status
    before = pids(status)
    assert len(before) == 3 and all(before.values())
    engine_rows = [p for h in status["hosts"] for p in h["programs"] if p["kind"] == "engine"]
    assert all(row["metrics"]["prefix_queries"] is not None for row in engine_rows)
    check_engines_are_authenticated(path, root)

    second = stackctl("up", path, "--yes")
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("no changes") == 3, second.stderr
    assert pids(status_json(path)) == before  # nothing restarted
    check = stackctl("up", path, "--check", "-o", "json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert {h["status"] for h in json.loads(check.stdout)["hosts"]} == {"unchanged"}

    rolled = stackctl("restart", path, "--rolling", "--yes", "-l", "sim*")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert (
        rolled.stderr.count("drain: out of the router") == 2
        and rolled.stderr.count("drain: back in the router") == 2
    ), rolled.stderr
    after = status_json(path)
    assert after["code"] == 0, after
    now = pids(after)
    assert (
        now[("head", "router")] == before[("head", "router")]
    )  # the router was not restarted, only told
    assert all(now[key] != before[key] for key in before if key[0] != "head"), (before, now)
    before = now
    log = stackctl("logs", path, "-l", "sim1", "--program", "engine-0", "-n", "5")
    assert log.returncode == 0 and log.stdout.strip(), log.stderr

    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "users": 6,
                "rounds": 3,
                "system_prompt_tokens": 200,
                "history_tokens": 2000,
                "question_tokens": 10,
                "answer_tokens": 8,
                "qps": [2.0, 4.0],
                "duration_s": 3,
                "warmup_s": 2,
                "warmup_qps": 4.0,
            }
        )
    )
    out = tmp_path / "out"
    bench = stackctl(
        "bench",
        path,
        "--compare",
        "naive,optimized",
        "--scenario",
        scenario,
        "--out",
        out,
        "--yes",
        timeout=600,
    )
    assert bench.returncode == 0, bench.stdout + bench.stderr
    for name in (
        "requests.csv",
        "summary.json",
        "summary.md",
        "ttft_vs_qps.png",
        "throughput_vs_qps.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert "naive/optimized" in (out / "summary.md").read_text()
    assert summary  # the report's own tests check its numbers

    down = stackctl("down", path, "--purge", "--yes")
    assert down.returncode == 0, down.stderr
    assert not any((root / name).exists() for name in ("head", "sim1", "sim2"))
    gone = status_json(path)
    assert gone["code"] == 1 and gone["overall"] == "degraded"


def test_bad_bench_input_is_a_clear_error(fleet, tmp_path):
    path, _ = fleet
    result = stackctl("bench", path, "--qps", "one,two", "--yes")
    assert (
        result.returncode == 2
        and "--qps one,two" in result.stderr
        and "Traceback" not in result.stderr
    )
    scenario = tmp_path / "bad.yaml"
    scenario.write_text("users: many\n")
    result = stackctl("bench", path, "--scenario", scenario, "--yes")
    assert result.returncode == 2 and "users" in result.stderr and "Traceback" not in result.stderr
    result = stackctl("bench", path, "--compare", "naive,fast", "--yes")
    assert result.returncode == 2 and "profile 'fast' is not defined" in result.stderr
