"""End to end: `stackctl up/status/down` over real SSH on the multi-host testbed.

One 9-host testbed (h1 = head with the router, h2..h9 = one simulator engine each) is deployed
once from nothing and reused by the ordered tests below, each leaving the cluster in a known
state for the next. stackctl runs as a subprocess, as users run it. Small separate testbeds
cover ProxyJump and host keys. Run with ``-s`` to see the timings of `up` (also written to
``$STACKCTL_E2E_TIMINGS`` when set).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import yaml

from stackctl.testing import wait_until

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ENGINE_PORT, ROUTER_PORT = 8100, 8180
HF_ENV, KEYS_ENV = "STACKCTL_E2E_HF_TOKEN", "STACKCTL_E2E_API_KEYS"
STACKCTL_TIMEOUT = 420


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:  # what an assertion message shows
        return f"stackctl {' '.join(self.args)} -> rc {self.returncode} in {self.seconds:.1f}s\n{self.output[-6000:]}"


@dataclass
class Stack:
    """One deployment: the testbed, its inventory, the secrets, and every stackctl output."""

    testbed: object
    dir: Path
    wheelhouse: Path
    env: dict
    hf_token: str
    api_key: str
    engine: dict = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    last_status: dict | None = None

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yaml"

    @property
    def head(self):
        return self.testbed.hosts[0]

    @property
    def engine_hosts(self) -> list:
        return self.testbed.hosts[1:]

    @property
    def base_url(self) -> str:
        return f"http://{self.head.address}:{ROUTER_PORT}/v1"

    def write_inventory(self, **engine_overrides) -> None:
        self.engine.update(engine_overrides)
        hosts = [{"name": self.head.name, "address": self.head.address, "roles": ["router"]}]
        hosts += [{"name": h.name, "address": h.address} for h in self.engine_hosts]
        inventory = {
            "cluster": "e2e",
            "deploy_dir": self.testbed.deploy_dir,
            "python": sys.executable,
            "install": True,
            "service_user": None,  # programs run as the SSH user, root (sys.executable may be root's only)
            "ssh": self.testbed.inventory_ssh_block(),
            "model": {"name": MODEL, "hf_token_env": HF_ENV},
            "engine": self.engine,
            "router": {
                "host": self.head.name,
                "port": ROUTER_PORT,
                "policy": "kv_aware",
                "api_keys_env": KEYS_ENV,
                "health_interval_s": 0.5,
            },
            "hosts": hosts,
        }
        self.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def stackctl(self, *args: str, timeout: float = STACKCTL_TIMEOUT) -> Run:
        if args[0] in ("up", "down", "restart"):
            self.last_status = None  # the cluster may change
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "stackctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
        )
        run = Run(list(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
        self.runs.append(run)
        return run

    def up(self, *args: str) -> Run:
        return self.stackctl(
            "up", str(self.inventory), "--yes", "--wheelhouse", str(self.wheelhouse), *args
        )

    def status(self, *args: str) -> tuple[Run, dict]:
        run = self.stackctl("status", str(self.inventory), "-o", "json", *args, timeout=120)
        status = json.loads(run.stdout)
        if not args:
            self.last_status = status
        return run, status

    def healthy_status(self) -> dict:
        """The cluster's status, known healthy: the last test left it so (each ends checking it)."""
        if self.last_status is None or self.last_status["overall"] != "healthy":
            _, self.last_status = self.status()
        assert_all_healthy(self.last_status, len(self.testbed.hosts))
        return self.last_status

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key or self.api_key, max_retries=0, timeout=60
        )


def program_pids(status: dict) -> dict[tuple[str, str], int | None]:
    """(host, program) -> pid, from `status --json`."""
    return {
        (e["host"], row["program"]): row["pid"]
        for e in status["hosts"]
        for row in e.get("programs", [])
    }


def assert_all_healthy(status: dict, n_hosts: int) -> None:
    assert status["overall"] == "healthy", json.dumps(status, indent=1)[:4000]
    assert len(status["hosts"]) == n_hosts
    for entry in status["hosts"]:
        assert entry["reachable"] and entry["supervisord"]["running"], entry
        for row in entry["programs"]:
            assert row["state"] == "RUNNING" and row["healthy"] is True and row["pid"], (
                entry["host"],
                row,
            )


def report_timing(stack: Stack, name: str, seconds: float) -> None:
    stack.timings[name] = round(seconds, 1)
    print(f"\n[e2e timing] {name}: {seconds:.1f} s")
    if os.environ.get("STACKCTL_E2E_TIMINGS"):
        Path(os.environ["STACKCTL_E2E_TIMINGS"]).write_text(
            json.dumps(stack.timings, indent=2) + "\n"
        )


@pytest.fixture(scope="module")
def stack(testbed_factory, wheelhouse, tmp_path_factory):
    """8 engine hosts + a head, deployed once from nothing with `up` (the run is checked by the first test)."""
    testbed = testbed_factory(9)
    hf_token, api_key = "hf_e2e" + secrets.token_hex(12), "sk-e2e-" + secrets.token_hex(12)
    env = {
        **os.environ,
        HF_ENV: hf_token,
        KEYS_ENV: f"{api_key},sk-other-{secrets.token_hex(4)}",
        "COLUMNS": "200",
        "STACKCTL_CACHE": str(tmp_path_factory.mktemp("stackctl-cache")),
    }
    stack = Stack(
        testbed,
        tmp_path_factory.mktemp("e2e"),
        wheelhouse,
        env,
        hf_token,
        api_key,
        engine={
            "kind": "sim",
            "port": ENGINE_PORT,
            "bind": "0.0.0.0",
            "health_timeout_s": 120,
            "lmcache": {"enabled": True, "cpu_offload_gb": 20},
            "sim": {"hardware": "a100-80gb", "time_scale": 10},
        },
    )
    stack.write_inventory()
    stack.first_up = stack.up()
    report_timing(stack, "up from nothing (8 engine hosts + head)", stack.first_up.seconds)
    try:
        yield stack
    finally:
        if not any(r.args[:1] == ["down"] and r.returncode == 0 for r in stack.runs):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "stackctl",
                    "down",
                    str(stack.inventory),
                    "--purge",
                    "--yes",
                ],
                capture_output=True,
                timeout=180,
                env=env,
                cwd=REPO_ROOT,
            )
        testbed.cleanup()


# ---------------------------------------------------------------- the 8-host deployment, in order


def test_up_from_nothing_then_status_healthy_and_completions(stack):
    run = stack.first_up
    assert run.returncode == 0, run
    assert "verified with a completion" in run.stdout, run
    for host in stack.testbed.hosts:
        assert f"{host.name}: " in run.stderr and "changed" in run.stdout, run
    status_run, status = stack.status()
    assert status_run.returncode == 0, status_run
    assert_all_healthy(status, 9)
    router = next(row for e in status["hosts"] for row in e["programs"] if row["kind"] == "router")
    engines = (
        router["engines"].get("engines", router["engines"])
        if isinstance(router["engines"], dict)
        else router["engines"]
    )
    assert len(engines) == 8 and all(e.get("healthy") for e in engines), engines

    client = stack.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8
    )
    assert completion.choices[0].text and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    pieces, finish = [], None
    for chunk in client.completions.create(
        model=MODEL, prompt="Count to ten:", max_tokens=8, stream=True
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip() and finish == "length"
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content


def test_second_up_changes_nothing_and_restarts_nothing(stack):
    before = stack.healthy_status()
    run = stack.up()
    report_timing(stack, "up with nothing to change (8 engine hosts + head)", run.seconds)
    assert run.returncode == 0, run
    for host in stack.testbed.hosts:
        assert f"{host.name}: no changes" in run.output, run
    assert "changed " not in run.stdout.replace("unchanged", ""), run
    _, after = stack.status()
    assert_all_healthy(after, 9)
    assert program_pids(after) == program_pids(before)
    assert [e["supervisord"]["pid"] for e in after["hosts"]] == [
        e["supervisord"]["pid"] for e in before["hosts"]
    ]


def test_killed_engine_is_restarted_by_supervisord(stack):
    host = stack.engine_hosts[2]
    old = program_pids(stack.healthy_status())[(host.name, "engine-0")]
    stack.testbed.exec_in(host, f"kill -9 {old}")
    find = ["pgrep", "-f", f"stackctl.sim .*--port {ENGINE_PORT}"]
    wait_until(
        lambda: (
            stack.testbed.exec_in(host, find, check=False).stdout.split() not in ([], [str(old)])
        ),
        30,
        what=f"a new engine process on {host.name}",
        interval=0.2,
    )
    time.sleep(5)  # supervisord's startsecs: RUNNING after 5 s up

    def restarted():
        _, status = stack.status("--hosts", host.name)
        row = status["hosts"][0]["programs"][0]
        return (
            status
            if row["pid"] not in (None, old) and row["state"] == "RUNNING" and row["healthy"]
            else None
        )

    status = wait_until(
        restarted, 60, what=f"supervisord to restart engine-0 on {host.name}", interval=1
    )
    row = status["hosts"][0]["programs"][0]
    assert row["uptime"].startswith("0:00:"), row
    assert stack.testbed.exec_in(host, f"kill -0 {old}", check=False).returncode != 0
    _, everything = stack.status()
    assert_all_healthy(everything, 9)


class ClientLoop:
    """Workers sending completions (streaming and not) through the router until stopped."""

    def __init__(self, stack: Stack, workers: int = 3):
        self.client = stack.client()
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)
        ]

    def _work(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            prompt = f"request {worker}-{n}: " + "tell me about rolling upgrades " * 8
            try:
                if n % 2:
                    answer = self.client.completions.create(
                        model=MODEL, prompt=prompt, max_tokens=24
                    )
                    finish, tokens = answer.choices[0].finish_reason, answer.usage.completion_tokens
                else:
                    finish, tokens = None, 0
                    for chunk in self.client.completions.create(
                        model=MODEL, prompt=prompt, max_tokens=24, stream=True
                    ):
                        if chunk.choices:
                            tokens += 1
                            finish = chunk.choices[0].finish_reason or finish
                good = finish == "length" and tokens == 24
                with self.lock:
                    if good:
                        self.ok += 1
                    else:
                        self.errors.append(
                            f"{'stream' if n % 2 == 0 else 'plain'}: truncated: finish_reason={finish}, {tokens} tokens"
                        )
            except Exception as exc:  # noqa: BLE001 - every failure a client would see counts
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(90)


def test_rolling_change_keeps_serving_without_errors(stack):
    before = stack.healthy_status()
    old = program_pids(before)
    stack.write_inventory(max_num_seqs=128)
    with ClientLoop(stack) as loop:
        time.sleep(1)
        run = stack.up("--rolling", "--diff")
        time.sleep(1)
    report_timing(stack, "up --rolling, 8 engines restarted one by one", run.seconds)
    assert run.returncode == 0, run
    shown = [line.strip() for line in run.output.splitlines()]  # --diff: each host's changed line
    assert sum(line.startswith("+") and "--max-num-seqs 128" in line for line in shown) == 8, run
    assert loop.ok > 20, (loop.ok, loop.errors[:5])
    assert loop.errors == [], (
        f"{len(loop.errors)} client errors of {loop.ok + len(loop.errors)} requests: {loop.errors[:10]}"
    )
    _, after = stack.status()
    assert_all_healthy(after, 9)
    new = program_pids(after)
    for host in stack.engine_hosts:
        assert new[(host.name, "engine-0")] != old[(host.name, "engine-0")], host.name
    assert (
        new[(stack.head.name, "router")] == old[(stack.head.name, "router")]
    )  # its config did not change
    conf = (stack.engine_hosts[0].deploy_source / "supervisor/conf.d/engine-0.conf").read_text()
    assert "--max-num-seqs 128" in conf


def test_unreachable_host_is_reported_and_next_up_resumes(stack):
    down = stack.engine_hosts[3]
    before = stack.healthy_status()
    old = program_pids(before)
    stack.write_inventory(max_num_seqs=64)
    stack.testbed.stop_sshd(down)
    try:
        run = stack.up()
        assert run.returncode != 0, run
        assert f"{down.name}" in run.output and "unreachable" in run.stdout, run
        error_lines = [
            line for line in run.stdout.splitlines() if line.startswith(f"│ {down.name} ")
        ]
        assert error_lines and "connect" in error_lines[0] and down.address in run.stdout, run
        assert "verified with a completion" in run.stdout, (
            run
        )  # the router still serves through the others
        others = [h for h in stack.engine_hosts if h is not down]
        for host in others:
            assert any(
                line.startswith(f"│ {host.name} ") and "changed" in line
                for line in run.stdout.splitlines()
            ), run
        status_run, mid = stack.status()
        assert status_run.returncode == 2, status_run
        unreachable = [e for e in mid["hosts"] if not e["reachable"]]
        assert [e["host"] for e in unreachable] == [down.name] and down.name in unreachable[0][
            "error"
        ]
        mid_pids = program_pids(mid)
        assert all(mid_pids[(h.name, "engine-0")] != old[(h.name, "engine-0")] for h in others)
    finally:
        stack.testbed.start_sshd(down)
    run = stack.up()
    assert run.returncode == 0, run
    assert any(
        line.startswith(f"│ {down.name} ") and "changed" in line for line in run.stdout.splitlines()
    ), run
    for host in stack.testbed.hosts:
        if host is not down:
            assert f"{host.name}: no changes" in run.output, run
    _, after = stack.status()
    assert_all_healthy(after, 9)
    assert program_pids(after)[(down.name, "engine-0")] != old[(down.name, "engine-0")]


def router_engines(stack: Stack) -> list[dict]:
    """The router's own view (GET /engines, which wants a client key)."""
    request = urllib.request.Request(
        f"http://{stack.head.address}:{ROUTER_PORT}/engines",
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())["engines"]


def engine_of(engines: list[dict], host) -> dict:
    """The router's entry for the one engine on ``host`` (by its URL's address)."""
    (entry,) = [e for e in engines if f"//{host.address}:" in e["url"]]
    return entry


def up_results(run: Run) -> dict[str, str]:
    """host -> result, from `up`'s summary table."""
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[0] == "" and cells[1]:
            rows[cells[1]] = cells[2]
    return rows


def send_completions(stack: Stack, n: int, workers: int = 1) -> tuple[int, list[str]]:
    """``n`` completions through the router over ``workers`` threads: (ok, errors)."""
    client, lock = stack.client(), threading.Lock()
    ok, errors = [0], []

    def work(worker: int) -> None:
        for k in range(worker, n, workers):
            try:
                answer = client.completions.create(
                    model=MODEL, prompt=f"lost host {k}: " + "what now " * 6, max_tokens=8
                )
                good = answer.choices[0].finish_reason == "length"
                detail = f"truncated: {answer.choices[0].finish_reason}"
            except Exception as exc:  # noqa: BLE001 - every failure a client would see counts
                good, detail = False, f"{type(exc).__name__}: {exc}"
            with lock:
                if good:
                    ok[0] += 1
                else:
                    errors.append(detail)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return ok[0], errors


def test_lost_host_marked_down_status_shows_it_and_up_hosts_on_the_rest_works(stack):
    """A host's link goes down (no RST: every packet to it is dropped, as when it is lost)."""
    from stackctl.inventory import load_inventory
    from stackctl.router.config import HealthConfig

    lost = stack.engine_hosts[5]  # not the host the sshd test stops
    others = [h for h in stack.testbed.hosts if h is not lost]
    cluster = load_inventory(stack.inventory)
    health = HealthConfig()  # failures_to_eject is not an inventory key: the router's default
    interval, probe_timeout = cluster.router.health_interval_s, cluster.router.health_timeout_s
    # each failed check takes at most one interval plus the probe's timeout; 1.5 s of slack
    eject_bound = health.failures_to_eject * (interval + probe_timeout) + 1.5
    connect_timeout = cluster.host(lost.name).ssh.connect_timeout_s
    old = program_pids(stack.healthy_status())
    assert engine_of(router_engines(stack), lost)["healthy"] is True
    lost_conf = lost.deploy_source / "supervisor/conf.d/engine-0.conf"
    conf_before = lost_conf.read_text()
    new_seqs = (stack.engine.get("max_num_seqs") or 64) + 32  # a value no host has yet
    assert f"--max-num-seqs {new_seqs}" not in conf_before

    lost_at = time.monotonic()
    stack.testbed.set_link(lost, up=False)
    try:
        # (1) the router ejects its engine; clients in the window are failed over, not failed
        window: list[tuple[int, list[str]]] = []
        window_thread = threading.Thread(
            target=lambda: window.append(send_completions(stack, 12, workers=4)), daemon=True
        )
        window_thread.start()
        wait_until(
            lambda: engine_of(router_engines(stack), lost)["healthy"] is False,
            eject_bound,
            what=f"the router to eject the engine on {lost.name} (link down)",
            interval=0.05,
        )
        ejected_after = time.monotonic() - lost_at
        report_timing(stack, "host lost: router ejected its engine after", ejected_after)
        window_thread.join(120)
        assert window == [(12, [])], window
        engines = router_engines(stack)
        entry = engine_of(engines, lost)
        assert entry["last_error"], entry
        assert all(e["healthy"] for e in engines if e["name"] != entry["name"]), engines

        # (2) completions keep succeeding while the host is lost
        ok, errors = send_completions(stack, 20)
        assert errors == [] and ok == 20, errors[:5]
        assert engine_of(router_engines(stack), lost)["healthy"] is False

        # (3) status: that host unreachable, named in its error, within the connect timeout
        status_run, mid = stack.status()
        report_timing(stack, "status with a host lost", status_run.seconds)
        assert status_run.returncode == 2, status_run
        assert mid["overall"] == "unreachable"
        unreachable = [e for e in mid["hosts"] if not e["reachable"]]
        assert [e["host"] for e in unreachable] == [lost.name], unreachable
        assert lost.name in unreachable[0]["error"] and lost.address in unreachable[0]["error"]
        assert status_run.seconds < connect_timeout + 20, status_run
        router_row = next(
            row for e in mid["hosts"] for row in e["programs"] if row["kind"] == "router"
        )
        assert engine_of(router_row["engines"]["engines"], lost)["healthy"] is False

        # (4) `up --hosts` on the rest applies a change there and leaves the lost host alone
        stack.write_inventory(max_num_seqs=new_seqs)
        run = stack.up("--hosts", ",".join(h.name for h in others))
        report_timing(stack, "up --hosts on the 8 hosts left (7 engines changed)", run.seconds)
        assert run.returncode == 0, run
        assert "verified with a completion" in run.stdout, run
        results = up_results(run)
        assert lost.name not in results and lost.name not in run.output, run
        assert results == {h.name: "unchanged" if h is stack.head else "changed" for h in others}, (
            run
        )
        assert lost_conf.read_text() == conf_before
        still = stack.testbed.exec_in(
            lost, ["pgrep", "-f", f"stackctl.sim .*--port {ENGINE_PORT}"], check=False
        )
        assert str(old[(lost.name, "engine-0")]) in still.stdout.split(), still
        for host in others[1:]:
            conf = (host.deploy_source / "supervisor/conf.d/engine-0.conf").read_text()
            assert f"--max-num-seqs {new_seqs}" in conf, host.name
        _, rest = stack.status("--hosts", ",".join(h.name for h in others))
        assert_all_healthy(rest, len(others))
        assert all(
            program_pids(rest)[(h.name, "engine-0")] != old[(h.name, "engine-0")]
            for h in others[1:]
        )
    finally:
        stack.testbed.set_link(lost, up=True)
    back_at = time.monotonic()

    # (5) back: the router readmits the engine (after its backoff), a full `up` catches it up
    readmit_bound = health.max_backoff_s + interval + probe_timeout + 5
    wait_until(
        lambda: engine_of(router_engines(stack), lost)["healthy"] is True,
        readmit_bound,
        what=f"the router to readmit the engine on {lost.name} (link back up)",
        interval=0.1,
    )
    report_timing(
        stack, "host back: router readmitted its engine after", time.monotonic() - back_at
    )
    stack.testbed.wait_ssh(lost)
    run = stack.up()
    assert run.returncode == 0, run
    assert up_results(run) == {
        h.name: "changed" if h is lost else "unchanged" for h in stack.testbed.hosts
    }, run
    assert f"--max-num-seqs {new_seqs}" in lost_conf.read_text()
    _, after = stack.status()
    assert_all_healthy(after, 9)
    assert program_pids(after)[(lost.name, "engine-0")] != old[(lost.name, "engine-0")]


def test_secrets_stay_secret_and_router_requires_the_key(stack):
    with pytest.raises(openai.AuthenticationError):
        stack.client(api_key="sk-wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    request = urllib.request.Request(
        f"{stack.base_url}/completions",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode(),
    )
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(request, timeout=30)
    assert no_key.value.code == 401
    assert stack.client().completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text
    # an engine, reached directly without the cluster's engine key, refuses the same request
    engine = stack.engine_hosts[0]
    direct = urllib.request.Request(
        f"http://{engine.address}:{ENGINE_PORT}/v1/completions",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode(),
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(direct, timeout=30)
    assert refused.value.code == 401
    engine_key = (stack.head.deploy_source / "secrets/engine_api_key").read_bytes()
    assert len(engine_key) >= 40
    assert stack.runs
    secrets_ = {stack.hf_token.encode(), stack.api_key.encode(), engine_key}
    for run in stack.runs:
        for value in secrets_:
            assert value.decode() not in run.output, (
                f"secret in the output of stackctl {' '.join(run.args)}"
            )
    found = []
    for host in stack.testbed.hosts:
        root = host.deploy_source
        for path in root.rglob("*"):
            if (
                not path.is_file()
                or path.is_symlink()
                or {"venv", "wheels"} & set(path.relative_to(root).parts[:1])
            ):
                continue
            data = path.read_bytes()
            if any(value in data for value in secrets_):
                found.append(
                    (host.name, str(path.relative_to(root)), stat.S_IMODE(path.stat().st_mode))
                )
    assert sorted(found) == sorted(
        [(stack.head.name, "secrets/router_api_keys", 0o600)]
        + [(h.name, "secrets/engine_api_key", 0o600) for h in stack.testbed.hosts]
    ), found
    assert stat.S_IMODE((stack.head.deploy_source / "secrets").stat().st_mode) == 0o700
    patterns = stack.dir / "secret-patterns"  # in a file: grep's own command line must not match
    patterns.write_text(f"{stack.api_key}\n{stack.hf_token}\n")
    engine_pattern = stack.dir / "engine-key-pattern"
    engine_pattern.write_bytes(engine_key + b"\n")
    for host in stack.testbed.hosts:  # nor in any process's command line or environment
        leak = stack.testbed.exec_in(
            host, f"grep -lsaF -f {patterns} /proc/[0-9]*/cmdline /proc/[0-9]*/environ", check=False
        )
        assert leak.stdout.strip() == "", (host.name, leak.stdout)
        # the engine key: in no command line (an engine's own environment holds it, as
        # VLLM_API_KEY, which only its user and root can read)
        leak = stack.testbed.exec_in(
            host, f"grep -lsaF -f {engine_pattern} /proc/[0-9]*/cmdline", check=False
        )
        assert leak.stdout.strip() == "", (host.name, leak.stdout)


def test_down_purge_leaves_nothing(stack):
    run = stack.stackctl("down", str(stack.inventory), "--purge", "--yes", timeout=240)
    report_timing(stack, "down --purge", run.seconds)
    assert run.returncode == 0, run
    for host in stack.testbed.hosts:
        assert f"{host.name}: stopped and purged" in run.stdout, run
    time.sleep(0.5)  # the SSH session's own processes end with it
    for host in stack.testbed.hosts:
        left = {}
        for pid in stack.testbed.pids(host):
            try:
                left[pid] = (
                    Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                )
            except OSError:
                continue
        strays = {
            pid: cmd
            for pid, cmd in left.items()
            if pid != host.holder_pid and not cmd.startswith("sshd")
        }
        assert strays == {}, (host.name, strays)
        assert not any(host.deploy_source.iterdir()), (
            host.name,
            list(host.deploy_source.iterdir()),
        )
        assert stack.testbed.exec_in(host, f"ls -A {stack.testbed.deploy_dir}").stdout == ""
    again = stack.stackctl(
        "down", str(stack.inventory), "--purge", "--yes", "--hosts", stack.head.name, timeout=120
    )
    assert again.returncode == 0, (
        again
    )  # idempotent: an empty (or absent) deploy dir is purged already


# ---------------------------------------------------------------- small testbeds: ProxyJump, host keys


def small_inventory(path: Path, testbed, host, *, ssh: dict, port_base: int = 8300) -> Path:
    """One host running one engine and the router, programs run with this interpreter (no venv)."""
    inventory = {
        "cluster": "small",
        "deploy_dir": testbed.deploy_dir,
        "python": sys.executable,
        "install": False,
        "service_user": None,  # as the SSH user (root): sys.executable may be readable by root only
        "ssh": ssh,
        "model": {"name": MODEL},
        "engine": {
            "kind": "sim",
            "port": port_base,
            "bind": "0.0.0.0",
            "health_timeout_s": 60,
            "lmcache": {"enabled": False},
            "sim": {"hardware": "a100-80gb", "time_scale": 10},
        },
        "router": {"host": host.name, "port": port_base + 80, "bind": "0.0.0.0"},
        "hosts": [{"name": host.name, "address": host.address, "roles": ["engine", "router"]}],
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def stackctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stackctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def bastion_bed(testbed_factory):
    """A bastion plus h1 behind it (h1 accepts SSH only from the bastion)."""
    testbed = testbed_factory(1, bastion=True)
    yield testbed
    testbed.cleanup()


def test_proxyjump_up_status_down_through_the_bastion(bastion_bed, tmp_path):
    host = bastion_bed.hosts[0]
    assert host.proxy_jump == "bastion"
    direct = subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(bastion_bed.client_key),
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={bastion_bed.known_hosts}",
            "-o",
            "ConnectTimeout=5",
            f"root@{host.address}",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert direct.returncode != 0, "h1 must not accept SSH except through the bastion"
    inventory = small_inventory(
        tmp_path / "inv.yaml", bastion_bed, host, ssh=bastion_bed.inventory_ssh_block()
    )
    up = stackctl("up", str(inventory), "--yes")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "verified with a completion" in up.stdout
    status = stackctl("status", str(inventory), "-o", "json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert_all_healthy(json.loads(status.stdout), 1)
    again = stackctl("up", str(inventory), "--yes")
    assert again.returncode == 0 and f"{host.name}: no changes" in again.stdout + again.stderr, (
        again.stdout + again.stderr
    )
    down = stackctl("down", str(inventory), "--purge", "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(host.deploy_source.iterdir())


def test_host_keys_unknown_refused_accepted_on_request_changed_refused(bastion_bed, tmp_path):
    target = bastion_bed.bastion_host  # reached directly, no ssh config
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    ssh = {
        "user": "root",
        "port": 22,
        "key": str(bastion_bed.client_key),
        "known_hosts": str(known_hosts),
        "connect_timeout_s": 5,
    }
    inventory = small_inventory(tmp_path / "inv.yaml", bastion_bed, target, ssh=ssh)

    refused = stackctl("status", str(inventory))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    text = json.loads(stackctl("status", str(inventory), "-o", "json").stdout)["hosts"][0]["error"]
    assert (
        target.name in text and "host key is not in" in text and "--accept-new-host-keys" in text
    ), text
    assert known_hosts.read_text() == ""
    up = stackctl("up", str(inventory), "--yes")
    assert up.returncode != 0 and "host key is not in" in up.stdout + up.stderr, (
        up.stdout + up.stderr
    )

    accepted = stackctl("status", str(inventory), "--accept-new-host-keys")
    assert accepted.returncode != 2, (
        accepted.stdout + accepted.stderr
    )  # reachable (nothing deployed: degraded)
    recorded = known_hosts.read_text().split()
    public = Path(f"{target.host_key}.pub").read_text().split()
    assert recorded[1:3] == public[:2] and target.address in recorded[0], recorded
    assert stackctl("status", str(inventory)).returncode != 2  # now known: no flag needed

    other = (
        Path(f"{bastion_bed.hosts[0].host_key}.pub").read_text().split()
    )  # a different, valid key
    known_hosts.write_text(f"{recorded[0]} {other[0]} {other[1]}\n")
    changed = stackctl("status", str(inventory), "-o", "json", "--accept-new-host-keys")
    assert changed.returncode == 2, changed.stdout + changed.stderr
    error = json.loads(changed.stdout)["hosts"][0]["error"]
    assert "CHANGED" in error and target.name in error, error
    assert (
        known_hosts.read_text() == f"{recorded[0]} {other[0]} {other[1]}\n"
    )  # nothing was recorded
