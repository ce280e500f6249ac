"""End to end: non-root SSH users with `become`, and programs running as the service user.

One 3-host testbed: h1 (router + engine) is reached as a non-root user with passwordless sudo
(become: true), h2 (engine) as root with become: false; both run their programs as the
`stackctl` system account. h3 is reached as a user whose sudo wants a password: it is refused
up front and nothing is created there. Hosts use the system python3 (every user can run it),
install into a venv from the test wheelhouse.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from stackctl.testing import wait_until
from tests.testbed.netns import SUDO_PASSWORD_USER, SUDO_USER, ensure_test_users

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE_USER = "stackctl"
HOST_PYTHON = "/usr/bin/python3"
KEYS_ENV = "STACKCTL_BECOME_API_KEYS"
PORT = 8500


def stackctl(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stackctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def write_inventory(path: Path, testbed, hosts: list[dict], **top) -> Path:
    inventory = {
        "cluster": "become",
        "deploy_dir": testbed.deploy_dir,
        "python": HOST_PYTHON,
        "install": True,
        "ssh": testbed.inventory_ssh_block(SUDO_USER),
        "become": True,
        **top,
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "engine": {
            "kind": "sim",
            "port": PORT,
            "bind": "0.0.0.0",
            "health_timeout_s": 60,
            "lmcache": {"enabled": False},
            "sim": {"hardware": "a100-80gb", "time_scale": 10},
        },
        "router": {
            "host": hosts[0]["name"],
            "port": PORT + 80,
            "bind": "0.0.0.0",
            "api_keys_env": KEYS_ENV,
        },
        "hosts": hosts,
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def proc_uids(testbed, host, pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process inside the host."""
    status = testbed.exec_in(host, f"cat /proc/{int(pid)}/status").stdout
    return [
        int(v)
        for v in next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    ]


def children(testbed, host, pid: int) -> list[int]:
    out = testbed.exec_in(host, f"pgrep -P {int(pid)}", check=False).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def bed(testbed_factory):
    ensure_test_users()
    testbed = testbed_factory(3)
    yield testbed
    testbed.cleanup()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {
        **os.environ,
        "COLUMNS": "200",
        KEYS_ENV: "sk-become-" + secrets.token_hex(8),
        "STACKCTL_CACHE": str(tmp_path_factory.mktemp("stackctl-cache")),
    }


def test_sudo_user_deploys_and_programs_run_as_the_service_user(bed, env, wheelhouse, tmp_path):
    h1, h2 = bed.hosts[0], bed.hosts[1]
    hosts = [
        {"name": h1.name, "address": h1.address, "roles": ["engine", "router"]},
        {"name": h2.name, "address": h2.address, "become": False, "ssh": {"user": "root"}},
    ]
    inventory = write_inventory(tmp_path / "inv.yaml", bed, hosts)
    stages_before = set(
        Path("/var/tmp").glob("stackctl-stage.*")
    )  # other runs on this machine may leave theirs
    started = time.monotonic()
    up = stackctl("up", str(inventory), "--yes", "--wheelhouse", str(wheelhouse), env=env)
    print(f"\n[become timing] up from nothing (2 hosts): {time.monotonic() - started:.1f} s")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "verified with a completion" in up.stdout, up.stdout + up.stderr
    service = pwd.getpwnam(SERVICE_USER)
    assert service.pw_uid != 0 and service.pw_shell.endswith("nologin")

    status = stackctl("status", str(inventory), "-o", "json", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    for entry in json.loads(status.stdout)["hosts"]:
        host = bed.host(entry["host"])
        supervisord = entry["supervisord"]["pid"]
        assert proc_uids(bed, host, supervisord) == [service.pw_uid] * 4, entry["host"]
        programs = [row["pid"] for row in entry["programs"]]
        assert sorted(programs) == sorted(children(bed, host, supervisord)) and programs, entry
        for pid in programs:
            assert proc_uids(bed, host, pid) == [service.pw_uid] * 4, (entry["host"], pid)

    for host in (h1, h2):  # everything in the deploy dir is the service user's
        root = host.deploy_source
        assert root.stat().st_uid == service.pw_uid
        foreign = [
            str(p.relative_to(root)) for p in root.rglob("*") if p.lstat().st_uid != service.pw_uid
        ]
        assert foreign == [], (host.name, foreign[:10])
    keys = h1.deploy_source / "secrets" / "router_api_keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600 and keys.stat().st_uid == service.pw_uid
    assert stat.S_IMODE((h1.deploy_source / "secrets").stat().st_mode) == 0o700
    assert not set(Path("/var/tmp").glob("stackctl-stage.*")) - stages_before, (
        "staged uploads left behind"
    )

    again = stackctl("up", str(inventory), "--yes", "--wheelhouse", str(wheelhouse), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    for host in (h1, h2):
        assert f"{host.name}: no changes" in again.stdout + again.stderr, (
            again.stdout + again.stderr
        )

    power_loss_then_unit_start(bed, (h1, h2), service.pw_uid, env)

    def status() -> subprocess.CompletedProcess:
        return stackctl("status", str(inventory), "-o", "json", env=env)

    wait_until(
        lambda: status().returncode == 0,
        30,
        interval=1,
        what="status to report healthy, without `up`",
        detail=lambda: (last := status()).stdout + last.stderr,
    )  # RUNNING once up for startsecs

    down = stackctl("down", str(inventory), "--purge", "--yes", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    for host in (h1, h2):
        assert not any(host.deploy_source.iterdir()), (
            host.name,
            list(host.deploy_source.iterdir()),
        )
        left = [pid for pid in bed.pids(host) if _uid_or_none(bed, host, pid) == service.pw_uid]
        assert left == [], (host.name, left)


def nothing_on(bed, host) -> None:
    assert not any(host.deploy_source.iterdir()), list(host.deploy_source.iterdir())
    time.sleep(0.3)  # the SSH session's own processes end with it
    others = [pid for pid in bed.pids(host) if pid not in (host.holder_pid, host.sshd_pid)]
    commands = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        for pid in others
        if Path(f"/proc/{pid}/cmdline").exists()
    }
    assert all(cmd.startswith(b"sshd") for cmd in commands.values()), commands


def test_sudo_that_wants_a_password_is_refused_before_any_change(bed, env, wheelhouse, tmp_path):
    h3 = bed.hosts[2]
    hosts = [{"name": h3.name, "address": h3.address, "roles": ["engine", "router"]}]
    inventory = write_inventory(
        tmp_path / "inv.yaml", bed, hosts, ssh=bed.inventory_ssh_block(SUDO_PASSWORD_USER)
    )
    up = stackctl("up", str(inventory), "--yes", "--wheelhouse", str(wheelhouse), env=env)
    output = up.stdout + up.stderr
    assert up.returncode != 0, output
    assert "Traceback" not in output, output
    flat = " ".join(output.replace("│", " ").split())
    assert (
        f"{h3.name}: become is set but `sudo -n -u root` wants a password for the SSH user {SUDO_PASSWORD_USER}"
        in flat
    ), output
    assert "NOPASSWD" in flat and "Nothing was changed on this host" in flat, output
    assert "refused" in up.stdout, output
    nothing_on(bed, h3)

    # the same user without become: it can neither create nor act as the service user
    inventory = write_inventory(
        tmp_path / "inv2.yaml",
        bed,
        hosts,
        ssh=bed.inventory_ssh_block(SUDO_PASSWORD_USER),
        become=False,
    )
    up = stackctl("up", str(inventory), "--yes", "--wheelhouse", str(wheelhouse), env=env)
    flat = " ".join((up.stdout + up.stderr).replace("│", " ").split())
    assert up.returncode != 0 and "Traceback" not in flat, flat
    assert f"the SSH user {SUDO_PASSWORD_USER} is not root and become is not set" in flat, flat
    nothing_on(bed, h3)


def unit_command(bed, host) -> tuple[str, list[str]]:
    """User= and ExecStart= of the cluster's unit, read from its copy on the host."""
    text = bed.exec_in(host, f"cat {bed.deploy_dir}/supervisor/stackctl-become.service").stdout
    values = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    argv = shlex.split(values["ExecStart"].replace("$$", "$").replace("%%", "%"))
    assert argv[-1] == "-n" and argv[0].startswith("/"), argv  # supervisord in the foreground
    return values["User"], argv


def http_status(url: str, body: dict | None = None, key: str | None = None) -> int | None:
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
    }
    request = urllib.request.Request(
        url, data=json.dumps(body).encode() if body else None, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def power_loss_then_unit_start(bed, hosts, service_uid: int, env: dict) -> None:
    """kill -9 supervisord and every program (as a power cut would), then start exactly what
    the unit starts, as the unit's user: the hosts come back healthy without `up`."""
    commands = {host.name: unit_command(bed, host) for host in hosts}
    for host in hosts:
        victims = [pid for pid in bed.pids(host) if _uid_or_none(bed, host, pid) == service_uid]
        assert len(victims) >= 2, (host.name, victims)  # supervisord and its programs
        bed.exec_in(host, f"kill -9 {' '.join(map(str, victims))}")
    wait_until(
        lambda: (
            not any(
                pid
                for host in hosts
                for pid in bed.pids(host)
                if _uid_or_none(bed, host, pid) == service_uid
            )
        ),
        15,
        interval=0.2,
        what="the killed processes to go away",
    )
    assert http_status(f"http://{hosts[0].address}:{PORT + 80}/health") is None  # nothing serves
    for host in hosts:
        user, argv = commands[host.name]
        assert user == SERVICE_USER
        start = shlex.join(["runuser", "-u", user, "--", *argv])
        bed.exec_in(host, f"setsid -f {start} >/dev/null 2>&1 </dev/null")
    engines = [f"http://{h.address}:{PORT}/health" for h in hosts]
    router = f"http://{hosts[0].address}:{PORT + 80}/v1/completions"
    body = {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "prompt": "back after a power cut",
        "max_tokens": 4,
    }
    wait_until(
        lambda: (
            all(http_status(u) == 200 for u in engines)
            and http_status(router, body, env[KEYS_ENV]) == 200
        ),
        90,
        interval=1,
        what="the engines and the router to serve again",
        detail=lambda: (
            f"engines, router: {[http_status(u) for u in engines] + [http_status(router, body, env[KEYS_ENV])]}"
        ),
    )


def _uid_or_none(bed, host, pid: int) -> int | None:
    try:
        return proc_uids(bed, host, pid)[0]
    except Exception:  # noqa: BLE001 - the process is gone (no status file, or no Uid line)
        return None
