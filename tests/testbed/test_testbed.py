"""Tests of the multi-host SSH testbed itself (and of the wheelhouse helper)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from stackctl.testing import wait_until
from tests.helpers import wheelhouse as wh
from tests.testbed.netns import PREFIX, STATE_DIR, Testbed, cleanup_stale, list_links, list_netns

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_testbed = pytest.mark.testbed


def tcp_answers(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_running(pid: int) -> bool:
    """Alive and not a zombie (orphans are reaped by whatever init this machine has, if any)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def traces_of(testbed: Testbed) -> list[str]:
    """Whatever of this testbed is still on the machine."""
    left = [ns for ns in list_netns() if ns.startswith(f"{PREFIX}-{testbed.run_id}-")]
    left += [link for link in list_links() if link.startswith(testbed.bridge)]
    left += [str(p) for p in (testbed.dir, STATE_DIR / f"{testbed.run_id}.json") if p.exists()]
    return left


# Never probe a testbed address after its bridge is gone: the packets would take the default route.

# ---------------------------------------------------------------- hosts, network, namespaces


@needs_testbed
def test_each_host_has_its_own_address_hostname_and_loopback(testbed):
    for host in testbed.hosts:
        out = testbed.ssh(host, "hostname; ip -4 -o addr show eth0; ip -o link show lo").stdout
        assert out.splitlines()[0] == host.name
        assert f"inet {host.address}/24" in out
        assert "UP" in out.splitlines()[-1]
    assert [h.address for h in testbed.hosts] == [
        f"10.213.{testbed.slot}.{11 + i}" for i in range(3)
    ]


@needs_testbed
def test_hosts_reach_each_other_and_not_the_outside(testbed):
    h1, h2 = testbed.hosts[:2]
    banner = testbed.exec_in(h1, f"exec 3<>/dev/tcp/{h2.address}/22 && head -c4 <&3", check=False)
    assert banner.stdout == "SSH-", banner.stderr
    routes = testbed.exec_in(h1, ["ip", "route"]).stdout
    assert "default" not in routes


@needs_testbed
def test_loopback_listener_and_processes_stay_in_their_host(testbed):
    h1, h2 = testbed.hosts[:2]
    testbed.ssh(h1, "nohup python3 -m http.server 18777 --bind 127.0.0.1 >/dev/null 2>&1&")
    probe = "exec 3<>/dev/tcp/127.0.0.1/18777"

    def listening(host) -> bool:
        return testbed.exec_in(host, ["bash", "-c", probe], check=False).returncode == 0

    wait_until(lambda: listening(h1), 10, interval=0.1, what="http.server to come up on h1")
    assert not listening(h2)
    # the python process itself, not a shell whose command line mentions it
    server = int(
        testbed.exec_in(
            h1, ["pgrep", "-f", "^[^ ]*python[^ ]* -m http.server 18777"]
        ).stdout.split()[0]
    )
    assert server in testbed.pids(h1) and server not in testbed.pids(h2)
    testbed.exec_in(h1, ["kill", "-9", str(server)])
    # SIGKILL is delivered asynchronously
    wait_until(
        lambda: not listening(h1),
        5,
        interval=0.1,
        what="the killed server to stop accepting connections",
    )


@needs_testbed
def test_deploy_dir_is_private_to_each_host(testbed):
    h1, h2, _ = testbed.hosts
    testbed.ssh(h1, "echo from-h1 > /opt/stackctl/marker")
    assert (h1.deploy_source / "marker").read_text() == "from-h1\n"
    assert testbed.ssh(h2, "test -e /opt/stackctl/marker", check=False).returncode == 1
    assert not Path("/opt/stackctl/marker").exists()
    assert testbed.exec_in(h1, "cat /opt/stackctl/marker").stdout == "from-h1\n"
    (h1.deploy_source / "marker").unlink()


# ---------------------------------------------------------------- authentication and host keys


@needs_testbed
def test_fabric_connects_with_strict_host_keys(testbed):
    h1 = testbed.hosts[0]
    with testbed.fabric_connection(h1, use_ssh_config=False) as conn:
        assert conn.run("hostname", hide=True, in_stream=False).stdout.strip() == "h1"


@needs_testbed
def test_unknown_or_wrong_host_key_is_rejected(testbed, tmp_path):
    import fabric

    h1, h2 = testbed.hosts[:2]
    wrong = tmp_path / "known_hosts"
    h2_line = next(
        line for line in testbed.known_hosts.read_text().splitlines() if line.startswith("h2,")
    )
    wrong.write_text(h2_line.replace(f"h2,{h2.address}", f"h1,{h1.address}") + "\n")
    for known_hosts, error in (
        (None, paramiko.SSHException),
        (wrong, paramiko.BadHostKeyException),
    ):
        conn = fabric.Connection(
            h1.address, user="root", connect_kwargs={"key_filename": str(h1.key_path)}
        )
        if known_hosts:
            conn.client.load_host_keys(str(known_hosts))
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        with pytest.raises(error):
            conn.open()


@needs_testbed
def test_only_key_authentication_is_offered(testbed):
    denied = subprocess.run(
        [
            "ssh",
            "-F",
            str(testbed.ssh_config),
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "h1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert denied.returncode == 255
    assert "Permission denied (publickey)" in denied.stderr


# ---------------------------------------------------------------- unreachable hosts


@needs_testbed
def test_stopped_sshd_refuses_then_comes_back(testbed):
    h3 = testbed.hosts[2]
    holder = h3.holder_pid
    testbed.stop_sshd(h3)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((h3.address, 22), timeout=2)
    finally:
        testbed.start_sshd(h3)
    assert h3.holder_pid == holder
    assert testbed.ssh(h3, "hostname").stdout.strip() == "h3"


@needs_testbed
def test_link_down_makes_host_time_out(testbed):
    h3 = testbed.hosts[2]
    testbed.set_link(h3, up=False)
    try:
        with pytest.raises((socket.timeout, OSError)) as caught:
            socket.create_connection((h3.address, 22), timeout=0.5)
        assert not isinstance(caught.value, ConnectionRefusedError)
    finally:
        testbed.set_link(h3, up=True)
    testbed.wait_ssh(h3)


# ---------------------------------------------------------------- bastion / ProxyJump


@needs_testbed
def test_host_behind_bastion_only_through_proxyjump(testbed_factory):
    import fabric

    jumped = testbed_factory(1, bastion=True)
    h1 = jumped.hosts[0]
    assert h1.proxy_jump == "bastion"
    direct = jumped.fabric_connection(h1, use_ssh_config=False)
    with pytest.raises(paramiko.AuthenticationException):
        direct.open()
    with jumped.fabric_connection(h1) as conn:  # ssh_config: ProxyJump bastion, strict on both hops
        assert isinstance(conn.gateway, fabric.Connection)
        assert conn.run("hostname", hide=True, in_stream=False).stdout.strip() == "h1"
    assert jumped.ssh(h1, "hostname").stdout.strip() == "h1"  # OpenSSH honours it too


# ---------------------------------------------------------------- cleanup


@needs_testbed
def test_cleanup_removes_everything_even_after_a_failure():
    with pytest.raises(RuntimeError):
        with Testbed(1) as testbed:
            testbed.ssh("h1", "nohup sleep 300 >/dev/null 2>&1 &")
            sleepers = testbed.pids("h1")
            assert len(sleepers) >= 3  # holder, sshd, the sleep
            raise RuntimeError("test failed")
    assert traces_of(testbed) == []
    assert not [pid for pid in sleepers if is_running(pid)]


def start_testbed_in_subprocess() -> tuple[subprocess.Popen, dict]:
    code = (
        "import json, sys, time; from tests.testbed.netns import Testbed; "
        "tb = Testbed(1).start(); print(json.dumps(tb.describe()), flush=True); time.sleep(300)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    return child, json.loads(child.stdout.readline())


@needs_testbed
def test_sigterm_still_cleans_up():
    child, described = start_testbed_in_subprocess()
    assert described["hosts"][0]["netns"] in list_netns()
    child.terminate()
    assert child.wait(30) == 128 + signal.SIGTERM
    assert (
        described["hosts"][0]["netns"] not in list_netns() and not Path(described["dir"]).exists()
    )


@needs_testbed
def test_cleanup_stale_removes_a_crashed_run():
    crashed, described = start_testbed_in_subprocess()
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    netns = described["hosts"][0]["netns"]
    assert netns in list_netns()
    removed = cleanup_stale()
    assert f"netns {netns}" in removed
    assert netns not in list_netns() and not Path(described["dir"]).exists()
    assert described["bridge"] not in list_links()


@needs_testbed
def test_script_up_writes_json_and_down_removes_it(tmp_path):
    def script(*args):
        return subprocess.run(
            [sys.executable, "-m", "tests.testbed", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    up = script("up", "1", "--json", str(tmp_path / "tb.json"))
    assert up.returncode == 0, up.stderr
    described = json.loads((tmp_path / "tb.json").read_text())
    host = described["hosts"][0]
    assert tcp_answers(host["address"], 22)
    assert described["ssh"]["known_hosts"].endswith("known_hosts")
    down = script("down")
    assert down.returncode == 0 and f"netns {host['netns']}" in down.stdout
    assert host["netns"] not in list_netns() and described["bridge"] not in list_links()


@needs_testbed
def test_inventory_ssh_block_and_inventory_file(testbed, tmp_path):
    block = testbed.inventory_ssh_block()
    assert block["user"] == "root" and block["port"] == 22
    assert Path(block["key"]).is_file() and Path(block["known_hosts"]).is_file()
    inventory = json.loads(
        testbed.write_inventory(tmp_path / "inv.yaml", engine_hosts=2).read_text()
    )
    assert [h["name"] for h in inventory["hosts"]] == ["h1", "h2"]


# ---------------------------------------------------------------- wheelhouse


def _fake_repo(root: Path) -> Path:
    (root / "stackctl").mkdir(parents=True)
    (root / "stackctl" / "__init__.py").write_text("__version__ = '0'\n")
    (root / "setup.cfg").write_text(
        "[options]\ninstall_requires =\n    fabric>=3.2\n"
        '    uvloop>=0.19; sys_platform != "win32"\n'
    )
    return root


def test_wheelhouse_keys_follow_sources_and_requirements(tmp_path):
    repo = _fake_repo(tmp_path)
    deps, project = wh.deps_key(repo), wh.project_key(repo)
    (repo / "stackctl" / "__init__.py").write_text("__version__ = '1'\n")
    assert wh.project_key(repo) != project and wh.deps_key(repo) == deps
    (repo / "setup.cfg").write_text(
        "[metadata]\nname = stackctl\n" + (repo / "setup.cfg").read_text()
    )
    assert wh.deps_key(repo) == deps
    (repo / "setup.cfg").write_text((repo / "setup.cfg").read_text() + "    click>=8.1\n")
    assert wh.deps_key(repo) != deps
    assert wh.runtime_requirements(repo) == [
        "fabric>=3.2",
        'uvloop>=0.19; sys_platform != "win32"',
        "click>=8.1",
    ]


@needs_testbed
@pytest.mark.slow
def test_stackctl_installs_from_wheelhouse_on_a_host_without_internet(testbed, wheelhouse):
    h2 = testbed.hosts[1]
    started = time.monotonic()
    testbed.ssh(
        h2,
        "python3 -m venv /opt/stackctl/venv && PIP_CONFIG_FILE=/dev/null "
        f"/opt/stackctl/venv/bin/pip install -q --no-index --find-links {wheelhouse} stackctl",
        timeout=300,
    )
    elapsed = time.monotonic() - started
    out = testbed.ssh(
        h2,
        "/opt/stackctl/venv/bin/python -c "
        "'import stackctl, fabric, aiohttp, supervisor; print(stackctl.__file__)'",
    ).stdout
    assert out.startswith("/opt/stackctl/venv/")
    print(f"venv + install from wheelhouse on {h2.name}: {elapsed:.1f}s")
    testbed.exec_in(h2, "rm -rf /opt/stackctl/venv")


# ---------------------------------------------------------------- skip here, fail under CI


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("1", pytest.fail.Exception)])
def test_missing_testbed_skips_locally_but_fails_under_ci(monkeypatch, ci, outcome):
    from tests.testbed import fixtures as conftest

    monkeypatch.setattr(conftest, "environment_problem", lambda: "not root")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="not root"):
        conftest.require_testbed()
