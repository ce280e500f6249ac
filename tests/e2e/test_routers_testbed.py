"""Several routers over real SSH (issue 14): two router hosts and two engine hosts on the
testbed, deployed by `up` as an operator would. Each router routes to every engine; a rolling
change drains an engine out of both routers; a client that retries on the other router loses
no request when one router dies, nor through `restart --rolling` of everything.

Clients reach the routers by their own addresses (what DNS round robin gives a client), then
through one VIP that keepalived (Debian's package) moves to the other router host when the
router holding it stops, from the keepalived.conf that `up` rendered on each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from stackctl.testing import wait_until
from tests.e2e.test_deploy_testbed import REPO_ROOT, Run

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ENGINE_PORT, ROUTER_PORT = 8200, 8280
ROUTERS, ENGINES = 2, 2
TIMEOUT_S = 300


class Fleet:
    def __init__(self, testbed, root: Path):
        self.testbed, self.root = testbed, root
        self.routers = testbed.hosts[:ROUTERS]
        self.engines = testbed.hosts[ROUTERS:]
        self.engine: dict = {
            "kind": "sim",
            "port": ENGINE_PORT,
            "bind": "0.0.0.0",
            "health_timeout_s": 60,
            "lmcache": {"enabled": False},
            "sim": {"hardware": "a100-80gb", "time_scale": 10},
        }
        self.router: dict = {"port": ROUTER_PORT, "bind": "0.0.0.0", "health_interval_s": 0.5}

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.yaml"

    def urls(self) -> list[str]:
        return [f"http://{h.address}:{ROUTER_PORT}" for h in self.routers]

    def write_inventory(self, router: dict | None = None, **engine) -> None:
        self.engine.update(engine)
        self.router.update(router or {})
        hosts = [{"name": h.name, "address": h.address, "roles": ["router"]} for h in self.routers]
        hosts += [{"name": h.name, "address": h.address} for h in self.engines]
        inventory = {
            "cluster": "routers",
            "deploy_dir": self.testbed.deploy_dir,
            "python": sys.executable,
            "install": False,
            "service_user": None,  # as the SSH user, root: sys.executable may be root's only
            "ssh": self.testbed.inventory_ssh_block(),
            "model": {"name": MODEL},
            "engine": self.engine,
            "router": self.router,
            "hosts": hosts,
        }
        self.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def stackctl(self, *args: str) -> Run:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "stackctl", args[0], str(self.inventory), *args[1:]],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"},
        )
        return Run(
            list(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started
        )

    def status(self) -> dict:
        run = self.stackctl("status", "-o", "json")
        return json.loads(run.stdout)

    def router_pid(self, host) -> int:
        rows = next(e for e in self.status()["hosts"] if e["host"] == host.name)["programs"]
        return next(r["pid"] for r in rows if r["program"] == "router")

    def router_log(self, host) -> str:
        return (host.deploy_source / "logs" / "router.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def fleet(testbed_factory, tmp_path_factory):
    testbed = testbed_factory(ROUTERS + ENGINES)
    fleet = Fleet(testbed, tmp_path_factory.mktemp("routers"))
    fleet.write_inventory()
    fleet.first_up = fleet.stackctl("up", "--yes")
    try:
        yield fleet
    finally:
        fleet.stackctl("down", "--purge", "--yes")
        testbed.cleanup()


class RetryingClient:
    """Workers sending completions to the first URL, each retried on the second when it fails
    in any way (refused, cut, 5xx): what a client given both routers' addresses does. With one
    URL (a VIP), retried on it for up to ``patience_s``."""

    def __init__(self, urls: list[str], workers: int = 3, patience_s: float = 0):
        self.urls, self.patience_s = urls, patience_s
        self.stop = threading.Event()
        self.ok = self.retried = 0
        self.lost: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, args=(i,)) for i in range(workers)]

    @staticmethod
    def once(url: str, prompt: str) -> str | None:
        """None when the answer is whole, else what went wrong."""
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 16}).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                usage = json.loads(answer.read())["usage"]
            return None if usage["completion_tokens"] == 16 else f"short: {usage}"
        except urllib.error.HTTPError as exc:
            return f"{exc.code} {exc.read()[:100]!r}"
        except (OSError, ValueError, KeyError) as exc:  # refused, reset, cut, timed out
            return f"{type(exc).__name__}: {exc}"

    def _work(self, worker: int) -> None:
        for n in range(2000):  # bounded
            if self.stop.is_set():
                return
            prompt = f"user {worker} turn {n}: " + "how do several routers agree? " * 6
            first = self.once(self.urls[0], prompt)
            second = first and self.once(self.urls[-1], prompt)
            deadline = time.monotonic() + self.patience_s
            while second and time.monotonic() < deadline:
                time.sleep(0.25)
                second = self.once(self.urls[-1], prompt)
            with self.lock:
                if not first:
                    self.ok += 1
                elif not second:
                    self.ok, self.retried = self.ok + 1, self.retried + 1
                else:
                    self.lost.append(f"{first} / then {second}")

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_up_runs_a_router_on_each_router_host_and_verifies_each(fleet):
    run = fleet.first_up
    assert run.returncode == 0, run
    urls = fleet.urls()
    assert f"routers: {', '.join(urls)} (verified with a completion)" in run.stdout, run
    status = fleet.status()
    assert status["overall"] == "healthy", json.dumps(status, indent=1)[:3000]
    assert status["router_urls"] == urls
    rows = [r for e in status["hosts"] for r in e["programs"] if r["kind"] == "router"]
    assert [r["url"] for r in rows] == urls
    for row in rows:  # each router sees every engine, healthy
        names = sorted(e["name"] for e in row["engines"]["engines"] if e["healthy"])
        assert names == [f"{h.name}-0" for h in fleet.engines], row
    keys = {  # the one engine key, on every host
        (h.deploy_source / "secrets" / "engine_api_key").read_text() for h in fleet.testbed.hosts
    }
    assert len(keys) == 1 and len(next(iter(keys))) > 20
    for url in urls:
        assert RetryingClient.once(url, "hello") is None
    status_text = fleet.stackctl("status")
    for url in urls:
        assert f"router {url}: RUNNING, health ok, engines healthy 2/2" in status_text.stdout


def test_a_rolling_change_drains_each_engine_out_of_both_routers(fleet):
    logs_before = [len(fleet.router_log(h)) for h in fleet.routers]
    fleet.write_inventory(max_num_seqs=64)
    with RetryingClient(fleet.urls()) as client:
        time.sleep(1)
        run = fleet.stackctl("up", "--yes", "--rolling")
        time.sleep(1)
    assert run.returncode == 0, run
    assert client.ok > 20 and client.lost == [], (client.ok, client.lost[:5])
    assert client.retried == 0  # the routers stayed up: nothing needed the other one
    for host, before in zip(fleet.routers, logs_before, strict=True):
        log = fleet.router_log(host)[before:]
        for engine in fleet.engines:  # out of this router, and back
            assert f"removed ['{engine.name}-0']" in log, (host.name, log[-3000:])
            assert f"added ['{engine.name}-0']" in log, (host.name, log[-3000:])


def test_a_client_retrying_on_the_other_router_loses_nothing_when_one_dies(fleet):
    first = fleet.routers[0]
    pid = fleet.router_pid(first)
    with RetryingClient(fleet.urls()) as client:
        wait_until(lambda: client.ok >= 10, timeout=60, what="requests before the kill")
        fleet.testbed.exec_in(first, f"kill -9 {pid}")
        killed_at = client.ok
        wait_until(lambda: client.ok >= killed_at + 30, timeout=90, what="requests after it")
    assert client.lost == [], client.lost[:5]
    assert client.retried >= 1, "no request met the dead router: the test did not test failover"
    wait_until(lambda: fleet.router_pid(first) not in (None, pid), timeout=60, what="a new router")


def test_a_rolling_restart_of_everything_loses_nothing_for_a_retrying_client(fleet):
    with RetryingClient(fleet.urls()) as client:
        time.sleep(1)
        run = fleet.stackctl("restart", "--rolling", "--yes")
        time.sleep(1)
    assert run.returncode == 0, run
    assert client.lost == [], client.lost[:5]
    assert client.ok > 20
    assert fleet.status()["overall"] == "healthy"


# ---------------------------------------------------------------- one VIP in front (keepalived)


def vip_holders(fleet: Fleet, vip: str) -> list[str]:
    return [
        h.name
        for h in fleet.routers
        if f" {vip}/" in fleet.testbed.exec_in(h, "ip -4 -o addr show dev eth0").stdout
    ]


def start_keepalived(fleet: Fleet, host) -> None:
    """keepalived on ``host`` from the config `up` rendered, as Debian's keepalived.service runs
    it (daemonised; pid files of its own: the testbed's hosts share /run)."""
    conf = f"{fleet.testbed.deploy_dir}/config/keepalived.conf"
    run = f"{fleet.testbed.deploy_dir}/run"
    fleet.testbed.exec_in(
        host,
        f"keepalived --use-file={conf} --pid={run}/keepalived.pid "
        f"--vrrp_pid={run}/keepalived-vrrp.pid --checkers_pid={run}/keepalived-checkers.pid",
    )


def test_a_vip_moves_to_the_other_router_when_the_one_holding_it_stops(fleet):
    vip = str(fleet.testbed.network[200])
    fleet.write_inventory(router={"vip": {"address": f"{vip}/24", "interface": "eth0"}})
    run = fleet.stackctl("up", "--yes")
    assert run.returncode == 0, run
    for host in fleet.routers:
        conf = (host.deploy_source / "config" / "keepalived.conf").read_text()
        assert f"{vip}/24 dev eth0" in conf
        start_keepalived(fleet, host)
    wait_until(lambda: len(vip_holders(fleet, vip)) == 1, timeout=30, what="one VIP holder")
    (holder,) = vip_holders(fleet, vip)
    other = next(h for h in fleet.routers if h.name != holder)
    url = f"http://{vip}:{ROUTER_PORT}"
    with RetryingClient([url], patience_s=20) as client:
        wait_until(lambda: client.ok >= 10, timeout=60, what="requests through the VIP")
        stopped = time.monotonic()
        supervisorctl(fleet, holder, "stop", "router")  # down for good (kill -9: back in ~1 s)
        wait_until(lambda: vip_holders(fleet, vip) == [other.name], timeout=30, what="the move")
        moved_s = time.monotonic() - stopped
        at_move = client.ok
        wait_until(lambda: client.ok >= at_move + 20, timeout=90, what="requests after it")
    print(f"\n[vip] moved from {holder} to {other.name} {moved_s:.1f} s after its router stopped")
    assert client.lost == [], client.lost[:5]
    assert client.retried >= 1, "no request met the stopped router: failover was not tested"
    assert moved_s < 15
    supervisorctl(fleet, holder, "start", "router")  # back, healthy: it does not take the VIP back
    time.sleep(6)
    assert vip_holders(fleet, vip) == [other.name]


def supervisorctl(fleet: Fleet, host_name: str, *args: str) -> None:
    conf = f"{fleet.testbed.deploy_dir}/supervisor/supervisord.conf"
    command = [sys.executable, "-m", "supervisor.supervisorctl", "-c", conf, *args]
    fleet.testbed.exec_in(host_name, command)
