"""become and the service user: inventory keys, command building and quoting, preflight, diff."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from stackctl.apply import compute_diff
from stackctl.errors import InventoryError
from stackctl.facts import Facts
from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from stackctl.privilege import (
    Identity,
    handoff_command,
    own_dir_command,
    parse_preflight,
    preflight_command,
    useradd_command,
)

REPO = Path(__file__).resolve().parents[2]


def inventory(tmp_path: Path, **top) -> Path:
    data = {
        "cluster": "c",
        "model": {"name": "m"},
        "engine": {"kind": "sim"},
        "router": {"host": "a"},
        "hosts": [
            {"name": "a", "address": "10.0.0.1"},
            {"name": "b", "connection": "local", "engine": {"port": 8001}},
        ],
        **top,
    }
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_defaults_ssh_hosts_get_the_service_user_local_hosts_do_not(tmp_path):
    cluster = load_inventory(inventory(tmp_path))
    ssh, local = cluster.hosts
    assert (ssh.service_user, ssh.become, ssh.become_user) == ("stackctl", False, "root")
    assert local.service_user is None
    demo = load_inventory(REPO / "inventory" / "local.yaml")
    assert all(h.service_user is None and not h.become for h in demo.hosts)
    reference = load_inventory(REPO / "inventory" / "a100-8.yaml")
    assert all(h.service_user == "stackctl" and h.become for h in reference.hosts)


def test_per_host_overrides(tmp_path):
    path = inventory(tmp_path, become=True, service_user="svc")
    data = yaml.safe_load(path.read_text())
    data["hosts"][0].update(become=False, service_user=None, become_user="admin")
    path.write_text(yaml.safe_dump(data))
    a, b = load_inventory(path).hosts
    assert (a.become, a.service_user, a.become_user) == (False, None, "admin")
    assert (b.become, b.service_user) == (True, "svc")


@pytest.mark.parametrize(
    "top, message",
    [
        ({"service_user": "root"}, "service_user: programs must not run as root"),
        (
            {"service_user": "bad name; rm -rf /"},
            "service_user: 'bad name; rm -rf /' is not a usable user name",
        ),
        ({"become_user": "$(id)"}, "become_user: '$(id)' is not a usable user name"),
        ({"become": "yes"}, "become: expected true or false"),
    ],
)
def test_bad_accounts_are_inventory_errors(tmp_path, top, message):
    with pytest.raises(InventoryError) as err:
        load_inventory(inventory(tmp_path, **top))
    assert message in str(err.value) and ":" in str(err.value).split(message)[0]


def test_supervisord_conf_switches_to_the_service_user(tmp_path):
    ssh_plan, local_plan = plan_cluster(load_inventory(inventory(tmp_path)))
    conf = {f.path: f.content for f in ssh_plan.files}[ssh_plan.supervisor_conf]
    assert "\nuser=stackctl\n" in conf
    local_conf = {f.path: f.content for f in local_plan.files}[local_plan.supervisor_conf]
    assert "user=" not in local_conf


def ident(**kw) -> Identity:
    base = dict(
        host_name="h",
        login_user="ubuntu",
        login_uid=1000,
        become=True,
        service_user="stackctl",
        service_uid=999,
        sudo="ok",
    )
    return Identity(**{**base, **kw})


def test_as_root_and_as_service_commands_are_quoted():
    command = "echo 'it''s' \"$HOME\" && ls /opt; x=$(id)"
    sudo = ident()
    assert shlex.split(sudo.as_root(command)) == [
        "sudo",
        "-n",
        "-u",
        "root",
        "--",
        "sh",
        "-c",
        command,
    ]
    outer = shlex.split(sudo.as_service(command))
    assert outer[:7] == ["sudo", "-n", "-u", "root", "--", "sh", "-c"]
    assert shlex.split(outer[7]) == [
        "runuser",
        "-u",
        "stackctl",
        "--",
        "sh",
        "-c",
        f"cd / && {command}",
    ]
    root = ident(login_user="root", login_uid=0, become=False)
    assert root.as_root(command) == command
    assert shlex.split(root.as_service(command)) == [
        "runuser",
        "-u",
        "stackctl",
        "--",
        "sh",
        "-c",
        f"cd / && {command}",
    ]
    other = ident(
        become_user="admin"
    )  # a non-root become_user cannot runuser: sudo to the service user
    assert shlex.split(other.as_service(command)) == [
        "sudo",
        "-n",
        "-u",
        "stackctl",
        "--",
        "sh",
        "-c",
        f"cd / && {command}",
    ]
    assert ident(service_user=None).as_service(command) == command
    assert ident(login_user="stackctl").as_service(command) == command
    missing = ident(service_uid=None)  # before `up` creates it: as root, nothing of it exists yet
    assert missing.as_service(command) == missing.as_root(command) and not missing.handoff


def test_commands_really_run_through_sh_with_the_same_argv(tmp_path):
    """The wrappers keep every character: run the unwrapped inner command the way sh would."""
    command = f"printf '%s|' 'a b' \"$(echo c)\" '$d' > {shlex.quote(str(tmp_path / 'out'))}"
    inner = shlex.split(ident().as_service(command))[7]
    runuser_argv = shlex.split(inner)
    subprocess.run(["sh", "-c", runuser_argv[-1]], check=True)
    assert (tmp_path / "out").read_text() == "a b|c|$d|"


def test_preflight_round_trip_and_refusals(tmp_path):
    host = load_inventory(inventory(tmp_path, become=True)).hosts[0]
    script = preflight_command(host)
    assert "sudo -n -u root -- true" in script and "id -u -- stackctl" in script
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    me = parse_preflight(host, out)
    assert me.login_uid >= 0 and me.login_user

    ok = parse_preflight(
        host, "login_user=ubuntu\nlogin_uid=1000\nrunuser=yes\nservice_uid=998\nsudo=ok\n"
    )
    assert ok.problem() is None and ok.handoff and ok.service_uid == 998
    pw = parse_preflight(
        host,
        "login_user=ubuntu\nlogin_uid=1000\nrunuser=yes\nsudo=failed\nsudo_error=sudo: a password is required \n",
    )
    text = pw.problem()
    assert text.startswith(
        f"{host.name}: become is set but `sudo -n -u root` wants a password for the SSH user ubuntu"
    )
    assert "NOPASSWD" in text and "Nothing was changed" in text and "\n" not in text
    missing = parse_preflight(
        host, "login_user=ubuntu\nlogin_uid=1000\nrunuser=yes\nsudo=missing\n"
    )
    assert (
        "sudo is not installed" in missing.problem() and "apt-get install sudo" in missing.problem()
    )
    root = parse_preflight(
        host, "login_user=root\nlogin_uid=0\nrunuser=yes\n"
    )  # root needs no sudo
    assert root.problem() is None and root.service_uid is None
    no_become = load_inventory(inventory(tmp_path)).hosts[0]
    plain = parse_preflight(
        no_become, "login_user=ubuntu\nlogin_uid=1000\nrunuser=yes\nservice_uid=998\n"
    )
    assert "is not root and become is not set" in plain.problem()
    no_runuser = parse_preflight(no_become, "login_user=root\nlogin_uid=0\nservice_uid=998\n")
    assert "runuser" in no_runuser.problem()


def test_account_commands():
    assert useradd_command("stackctl", "/opt/stack ctl") == (
        "id -u -- stackctl >/dev/null 2>&1 || useradd --system --user-group --no-create-home --home-dir '/opt/stack ctl' "
        "--shell /usr/sbin/nologin stackctl || id -u -- stackctl >/dev/null"
    )
    assert (
        own_dir_command("/opt/x y", "stackctl", recursive=False)
        == "mkdir -p -- '/opt/x y' && chown -h -- stackctl: '/opt/x y'"
    )
    assert "chown -hR" in own_dir_command("/opt/x", "stackctl", recursive=True)
    text = handoff_command(ident(), "/var/tmp/s/abc", "/opt/x/.f.tmp", "/opt/x/f", 0o600)
    chown, rest = text.split(" && ", 1)
    assert shlex.split(chown)[-1] == "chown -- stackctl: /var/tmp/s/abc"
    assert (
        "install -m 600 -- /var/tmp/s/abc /opt/x/.f.tmp && mv -f -- /opt/x/.f.tmp /opt/x/f"
        in shlex.split(shlex.split(rest.split(";")[0])[7])[-1]
    )
    assert text.endswith("rm -f -- /var/tmp/s/abc; exit $rc")


def facts(account: dict, deploy_uid) -> Facts:
    raw = {
        "partial": False,
        "account": account,
        "deploy_dir_uid": deploy_uid,
        "venv_python": True,
        "packages": {},
        "secrets": {},
        "files": {},
        "listening_ports": [],
        "supervisor": {"running": True, "programs": {}},
    }
    return Facts.from_probe(raw)


def test_diff_creates_the_account_and_the_deploy_dir(tmp_path):
    cluster = load_inventory(inventory(tmp_path))
    plan = plan_cluster(cluster, ["a"])[0]

    def kinds(account, uid):
        diff = compute_diff(cluster, plan, facts(account, uid), {}, None)
        return {c.kind: c.detail for c in diff.changes if c.kind in ("user", "owner")}

    fresh = kinds({"manage": True, "user": "stackctl", "uid": None, "exists": False}, None)
    assert set(fresh) == {"user", "owner"} and fresh["owner"] == "create, owned by stackctl"
    legacy = kinds({"manage": True, "user": "stackctl", "uid": 998, "exists": True}, 0)
    assert set(legacy) == {"owner"} and "chown -R" in legacy["owner"]
    assert kinds({"manage": True, "user": "stackctl", "uid": 998, "exists": True}, 998) == {}
    assert kinds({"manage": False}, None) == {}
