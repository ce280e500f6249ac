"""Connectors (stackctl/connect.py): quoting through a real shell, the local transport's results
and errors, atomic uploads, `-v` tracing, the become preflight, and the SSH transport against an
in-process SSH server (tests/helpers/fake_sshd.py): host keys verified, recorded only when asked,
a changed key refused, failures named by host without a traceback."""

from __future__ import annotations

import os
import shlex
import stat
import sys
import time
from pathlib import Path

import invoke
import paramiko
import pytest
import yaml

import stackctl.connect
from stackctl.connect import (
    CommandError,
    ConnectError,
    LocalConnector,
    SSHConnector,
    connect,
    q,
    set_verbosity,
)
from stackctl.facts import run_probe
from stackctl.inventory import load_inventory
from stackctl.privilege import BecomeError
from stackctl.testing import free_port
from tests.helpers.fake_connector import FakeFleet
from tests.helpers.fake_sshd import FakeSSHD

NASTY = [
    "plain",
    "two words",
    "it's",
    '"double" and \\backslash\\',
    "$(touch /tmp/stackctl-pwned) `id` $HOME ${PATH}",
    "; rm -rf / #",
    "a\nnew line\tand tab",
    "glob * ? [a-z] ~",
    "-n",
    "",
    "ünïcødé ✓",
]


def local_cluster(tmp_path: Path, **host):
    inventory = {
        "cluster": "c",
        "model": {"name": "m"},
        "engine": {"kind": "sim", "bind": "127.0.0.1"},
        "router": {"host": "h"},
        "hosts": [
            {
                "name": "h",
                "connection": "local",
                "deploy_dir": str(tmp_path / "deploy"),
                "python": "current",
                "install": False,
                **host,
            }
        ],
    }
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inventory))
    return load_inventory(path)


@pytest.fixture
def local(tmp_path):
    return LocalConnector(local_cluster(tmp_path).host("h"))


@pytest.mark.parametrize("value", NASTY)
def test_q_passes_any_string_through_the_shell_unchanged(local, value):
    assert local.run(f"printf %s {q(value)}").stdout == value
    assert (
        local.run(f"set -- {q(value)} x; echo $#").stdout.strip() == "2"
    )  # one word, never split or globbed


def test_q_quotes_non_strings_too(local):
    assert local.run(f"printf %s {q(8080)} {q(Path('/a b'))}").stdout == "8080/a b"


def test_a_failing_command_raises_with_its_exit_code_command_and_output(local):
    with pytest.raises(CommandError) as caught:
        local.run("echo starting; for i in $(seq 1 30); do echo line $i >&2; done; exit 3")
    error = caught.value
    assert error.result.exited == 3 and not error.result.ok
    text = str(error)
    assert text.startswith("command exited with 3: echo starting")
    assert (
        "line 30" in text and "line 16" in text and "line 15\n" not in text
    )  # the last 15 lines of stderr
    result = local.run("exit 4", check=False)
    assert result.exited == 4 and not result.ok


def test_stdin_reaches_the_command(local):
    assert local.run("tr a-z A-Z", stdin="hello\n").stdout == "HELLO\n"


def test_a_command_past_its_timeout_fails(local):
    with pytest.raises(CommandError) as caught:
        local.run("sleep 5", timeout=0.2)
    assert not caught.value.result.ok and "sleep 5" in str(caught.value)


def test_a_timeout_says_it_timed_out(local):
    with pytest.raises(CommandError, match=r"command timed out after 0.2 s: sleep 5"):
        local.run("sleep 5", timeout=0.2)


def test_put_bytes_is_atomic_with_the_mode_asked_for(local, tmp_path):
    target = tmp_path / "new" / "dir" / "secret"
    old = os.umask(0o077)
    try:
        local.put_bytes(b"one", str(target), 0o644)
    finally:
        os.umask(old)
    assert (
        target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o644
    )  # not narrowed by umask
    inode = target.stat().st_ino
    local.put_bytes(b"two", str(target), 0o600)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert os.listdir(target.parent) == ["secret"]  # no temp file left behind


def test_verbose_traces_commands_and_paths_but_never_contents(local, tmp_path, capfd):
    set_verbosity(1)
    try:
        run_probe(local, sys.executable, {"action": "http", "requests": []})
        local.put_bytes(b"hunter2-secret", str(tmp_path / "token"), 0o600)
    finally:
        set_verbosity(0)
    err = capfd.readouterr().err
    assert "[h] $ " in err and " chars>" in err  # the packed probe is shown as its size
    assert f"[h] put {tmp_path / 'token'} (mode 0600, 14 bytes)" in err
    assert "hunter2" not in err
    local.run("true")
    assert capfd.readouterr().err == ""  # quiet again


def test_connect_local_without_accounts_runs_no_preflight(tmp_path, monkeypatch):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    conn = connect(local_cluster(tmp_path).host("h"))
    try:
        assert conn.run("echo ok").stdout == "ok\n"
    finally:
        conn.close()
    assert fleet.commands("h") == ["echo ok"] and fleet.closed("h")


PREFLIGHT = r"login_user="


def test_become_that_needs_a_password_is_refused_naming_the_host_and_closes(tmp_path, monkeypatch):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    fleet.answer(
        PREFLIGHT,
        "login_user=ops\nlogin_uid=1000\nrunuser=yes\nsudo=failed\nsudo_error=sudo: a password is required\n",
    )
    host = local_cluster(tmp_path, become=True, service_user="svc").host("h")
    with pytest.raises(BecomeError) as caught:
        connect(host)
    text = str(caught.value)
    assert (
        text.startswith("h: ")
        and "wants a password" in text
        and "NOPASSWD" in text
        and "Nothing was changed" in text
    )
    assert fleet.closed("h")
    assert len(fleet.commands("h")) == 1  # only the preflight ran


def test_a_service_user_that_exists_gets_commands_unwrapped_when_it_is_the_login_user(
    tmp_path, monkeypatch
):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    fleet.answer(PREFLIGHT, "login_user=svc\nlogin_uid=1234\nrunuser=yes\nservice_uid=1234\n")
    conn = connect(local_cluster(tmp_path, service_user="svc").host("h"))
    try:
        assert conn.run("echo hi").stdout == "hi\n"
        assert fleet.commands("h")[-1] == "echo hi"
    finally:
        conn.close()


def test_root_acts_as_the_service_user_through_runuser(tmp_path, monkeypatch):
    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)
    fleet.answer(PREFLIGHT, "login_user=root\nlogin_uid=0\nrunuser=yes\nservice_uid=990\n")
    fleet.answer(r"^runuser ", "as svc\n")
    conn = connect(local_cluster(tmp_path, service_user="svc").host("h"))
    try:
        assert conn.run("echo 'it''s'").stdout == "as svc\n"
    finally:
        conn.close()
    assert shlex.split(fleet.commands("h")[-1]) == [
        "runuser",
        "-u",
        "svc",
        "--",
        "sh",
        "-c",
        "cd / && echo 'it''s'",
    ]


# ------------------------------------------------------------------ SSH


@pytest.fixture
def ssh_keys(tmp_path):
    client = paramiko.ECDSAKey.generate()
    key_file = tmp_path / "id_ecdsa"
    client.write_private_key_file(str(key_file))
    return paramiko.ECDSAKey.generate(), key_file


def ssh_host(tmp_path, port: int, key_file: Path, **ssh):
    inventory = {
        "cluster": "c",
        "model": {"name": "m"},
        "engine": {"kind": "sim"},
        "router": {"host": "gpu1"},
        "ssh": {
            "user": "ops",
            "port": port,
            "key": str(key_file),
            "known_hosts": str(tmp_path / "known_hosts"),
            "connect_timeout_s": 5,
            **ssh,
        },
        "hosts": [{"name": "gpu1", "address": "127.0.0.1", "service_user": None}],
    }
    path = tmp_path / "ssh.yaml"
    path.write_text(yaml.safe_dump(inventory))
    return load_inventory(path).host("gpu1")


def test_an_unknown_host_key_is_refused_with_the_fix(tmp_path, ssh_keys):
    host_key, key_file = ssh_keys
    with FakeSSHD(host_key) as sshd:
        with pytest.raises(ConnectError) as caught:
            SSHConnector(ssh_host(tmp_path, sshd.port, key_file)).open()
    text = str(caught.value)
    assert text.startswith(
        f"gpu1 (127.0.0.1:{sshd.port}): its host key is not in {tmp_path / 'known_hosts'}"
    )
    assert "--accept-new-host-keys" in text and "ssh-keyscan" in text
    assert sshd.users == [] and sshd.commands == []  # refused before authenticating
    assert not (tmp_path / "known_hosts").exists()


def test_accept_new_records_the_key_and_later_connections_verify_it(tmp_path, ssh_keys):
    host_key, key_file = ssh_keys
    with FakeSSHD(host_key) as sshd:
        host = ssh_host(tmp_path, sshd.port, key_file)
        first = SSHConnector(host, accept_new_host_keys=True)
        assert first.run("echo hi; echo there >&2").stdout == "hi\n"
        first.close()
        line = (tmp_path / "known_hosts").read_text()
        assert line == f"[127.0.0.1]:{sshd.port} {host_key.get_name()} {host_key.get_base64()}\n"
        again = SSHConnector(host)  # no accept: the recorded key is the one verified
        assert again.endpoint() == {
            "user": "ops",
            "address": "127.0.0.1",
            "port": sshd.port,
            "host_key": (host_key.get_name(), host_key.get_base64()),
        }
        assert again.run("printf %s " + q("a b")).stdout == "a b"
        again.close()
    assert sshd.users == ["ops", "ops"]
    assert (tmp_path / "known_hosts").read_text() == line  # recorded once


def test_a_changed_host_key_is_always_refused(tmp_path, ssh_keys):
    host_key, key_file = ssh_keys
    with FakeSSHD(host_key) as sshd:
        old = paramiko.ECDSAKey.generate()
        (tmp_path / "known_hosts").write_text(
            f"[127.0.0.1]:{sshd.port} {old.get_name()} {old.get_base64()}\n"
        )
        with pytest.raises(ConnectError) as caught:
            SSHConnector(ssh_host(tmp_path, sshd.port, key_file), accept_new_host_keys=True).open()
    text = str(caught.value)
    assert text.startswith(f"gpu1 (127.0.0.1:{sshd.port}): the host key CHANGED")
    assert host_key.get_fingerprint().hex() in text and "remove the old line" in text
    assert sshd.commands == []
    assert (
        old.get_base64() in (tmp_path / "known_hosts").read_text()
    )  # the record is left for the operator


def test_ssh_failures_name_the_host_and_never_raise_a_traceback_type(tmp_path, ssh_keys):
    host_key, key_file = ssh_keys
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectError) as refused:
        SSHConnector(ssh_host(tmp_path, port, key_file)).open()
    assert str(refused.value).startswith(
        f"gpu1 (127.0.0.1:{port}): cannot connect"
    ) and "sshd running" in str(refused.value)
    with pytest.raises(ConnectError) as no_key:
        SSHConnector(ssh_host(tmp_path, port, tmp_path / "missing_key"))
    assert str(no_key.value).startswith("gpu1: ssh.key: ") and "missing_key" in str(no_key.value)


def test_ssh_command_results_and_a_connection_lost_mid_command(tmp_path, ssh_keys):
    host_key, key_file = ssh_keys
    with FakeSSHD(host_key, drop_on="DROP-HERE") as sshd:
        conn = SSHConnector(ssh_host(tmp_path, sshd.port, key_file), accept_new_host_keys=True)
        with pytest.raises(CommandError) as failed:
            conn.run("echo nope >&2; exit 5")
        assert failed.value.result.exited == 5 and "nope" in str(failed.value)
        assert conn.run("exit 6", check=False).exited == 6
        with pytest.raises(CommandError, match=r"command timed out after 0.3 s: sleep 5"):
            conn.run("sleep 5", timeout=0.3)
        with pytest.raises(ConnectError) as lost:
            conn.run("echo DROP-HERE; sleep 30")
        assert str(lost.value).startswith("gpu1: the connection failed while running a command")
        conn.close()
        with pytest.raises(
            ConnectError, match="closed"
        ):  # closed (as Ctrl-C does): no quiet reconnect
            conn.run("true")


def test_a_command_killed_at_its_timeout_reads_as_timed_out_when_invoke_missed_it():
    """invoke's timer can kill a command yet not have returned when invoke asks whether it
    fired: the result is then a plain exit -9 (local) or no status (SSH), reported as such."""
    long_ago = time.monotonic() - 1.0
    for exited in (-9, None):
        killed = stackctl.connect._result(invoke.Result(exited=exited), long_ago, timeout=0.3)
        assert killed.timed_out_s == 0.3
        assert "timed out after 0.3 s: sleep 5" in str(CommandError("sleep 5", killed))
    just_now = time.monotonic()  # a command that died by a signal before its timeout: as it is
    assert stackctl.connect._result(invoke.Result(exited=-9), just_now, 30).timed_out_s is None
    assert stackctl.connect._result(invoke.Result(exited=-9), long_ago, None).timed_out_s is None


def test_ssh_uploads_are_atomic_with_their_mode(tmp_path, ssh_keys):
    host_key, key_file = ssh_keys
    target = tmp_path / "deploy" / "secrets" / "hf_token"
    target.parent.mkdir(parents=True)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK wheel bytes")
    with FakeSSHD(host_key) as sshd:
        conn = SSHConnector(ssh_host(tmp_path, sshd.port, key_file), accept_new_host_keys=True)
        try:
            conn.put_bytes(b"hf_secret", str(target), 0o600)
            assert (
                target.read_bytes() == b"hf_secret" and stat.S_IMODE(target.stat().st_mode) == 0o600
            )
            inode = target.stat().st_ino
            conn.put_bytes(b"hf_rotated", str(target), 0o600)
            assert (
                target.read_bytes() == b"hf_rotated" and target.stat().st_ino != inode
            )  # renamed over, not rewritten
            conn.put_file(wheel, str(target.parent / wheel.name), 0o644)
        finally:
            conn.close()
    assert (target.parent / wheel.name).read_bytes() == b"PK wheel bytes"
    assert stat.S_IMODE((target.parent / wheel.name).stat().st_mode) == 0o644
    assert sorted(os.listdir(target.parent)) == sorted(
        ["hf_token", wheel.name]
    )  # no temp files left
