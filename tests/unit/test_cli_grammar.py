"""The CLI's grammar: --hosts/-l patterns, -o formats, STACKCTL_INVENTORY, confirmations,
`up --check` exit codes and `-v`, parsed by click's CliRunner through `main` (which turns
errors into exit codes). The local inventory runs the real probe on this machine and never
deploys: each case takes well under a second."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stackctl import cli
from stackctl.cli import main
from stackctl.testing import free_ports

REPO = Path(__file__).resolve().parents[2]
A100 = REPO / "inventory" / "a100-8.yaml"


def run(args, *, env=None, input=None) -> tuple[int, str, str]:
    with CliRunner().isolation(input=input, env=env) as streams:
        code = main([str(a) for a in args])
    return code, streams[0].getvalue().decode(), streams[1].getvalue().decode()


@pytest.fixture
def local(tmp_path) -> Path:
    """Two local hosts (router + one simulated engine) in tmp_path; nothing is deployed."""
    router_port, engine_port = free_ports(2)
    inventory = {
        "cluster": "grammar",
        "python": "current",
        "install": False,
        "deploy_dir": str(tmp_path / "head"),
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "engine": {"kind": "sim", "bind": "127.0.0.1", "sim": {"hardware": "a100-80gb"}},
        "router": {
            "host": "head",
            "port": router_port,
            "bind": "127.0.0.1",
            "api_keys_env": "GRAMMAR_KEYS",
        },
        "hosts": [
            {"name": "head", "connection": "local", "roles": ["router"]},
            {
                "name": "sim1",
                "connection": "local",
                "deploy_dir": str(tmp_path / "sim1"),
                "engine": {"port": engine_port},
            },
        ],
    }
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_grammarsecretvalue0123456789")
    monkeypatch.setenv("ROUTER_KEYS", "sk-routersecret")
    monkeypatch.setenv("GRAMMAR_KEYS", "sk-grammarsecret")
    monkeypatch.delenv("STACKCTL_INVENTORY", raising=False)


def hosts_in_plan(*args) -> list[str]:
    code, out, err = run(["plan", A100, "-o", "json", *args])
    assert code == 0, err
    return [h["host"] for h in json.loads(out)["hosts"]]


def test_hosts_take_names_and_glob_patterns_in_inventory_order():
    assert hosts_in_plan("--hosts", "gpu02,head") == ["head", "gpu02"]
    assert hosts_in_plan("-l", "gpu0[1-3]") == ["gpu01", "gpu02", "gpu03"]
    assert hosts_in_plan("-l", "gpu0*,gpu01") == [
        f"gpu0{i}" for i in range(1, 9)
    ]  # overlap: once each
    assert len(hosts_in_plan()) == 9


@pytest.mark.parametrize("value", ["gpu09", "gpu1*", "gpu01,GPU02"])
def test_a_name_or_pattern_matching_no_host_is_an_error(value):
    code, out, err = run(["plan", A100, "-l", value])
    assert code == 2 and out == "", (code, out, err)
    assert (
        "--hosts: no host named or matching" in err
        and value.split(",")[-1] in err
        and "Hosts in this inventory: head, gpu01" in err
    )


def test_every_host_selecting_command_has_the_same_option(local):
    for command in (
        ["plan"],
        ["up", "--check"],
        ["status"],
        ["down"],
        ["logs"],
        ["restart", "--yes"],
    ):
        code, _, err = run([command[0], local, *command[1:], "-l", "nosuch*"])
        assert code == 2 and "no host named or matching nosuch*" in err, (command, code, err)


def test_plan_host_is_a_deprecated_alias():
    code, out, err = run(["plan", A100, "--host", "gpu01", "-o", "json"])
    assert code == 0 and "deprecated" in err and "--hosts" in err
    assert [h["host"] for h in json.loads(out)["hosts"]] == ["gpu01"]


def test_plan_json_and_yaml_are_the_same_document_without_secret_values(tmp_path):
    code, as_json, _ = run(["plan", A100, "-o", "json", "-l", "head,gpu01"])
    assert code == 0
    code, as_yaml, _ = run(["plan", A100, "-o", "yaml", "-l", "head,gpu01"])
    assert code == 0 and yaml.safe_load(as_yaml) == json.loads(as_json)
    document = json.loads(as_json)
    gpu01 = document["hosts"][1]
    assert {p["name"] for p in gpu01["programs"]} == {"engine-0"} and gpu01["files"][0]["mode"] in (
        "0644",
        "0600",
    )
    assert {s["from_env"] for s in gpu01["secrets"]} == {"HF_TOKEN"}
    for secret in ("hf_grammarsecretvalue0123456789", "sk-routersecret"):
        assert secret not in as_json and secret not in as_yaml


def test_plan_out_dir_writes_the_tree_and_keeps_stdout_the_document(tmp_path):
    code, out, err = run(
        ["plan", A100, "-l", "gpu01", "-o", "json", "--out-dir", tmp_path / "tree"]
    )
    assert code == 0 and json.loads(out)["hosts"][0]["host"] == "gpu01"
    assert "wrote" in err and (tmp_path / "tree" / "gpu01" / "PLAN.txt").is_file()
    code, out, err = run(
        ["plan", A100, "--output", tmp_path / "tree"]
    )  # the old spelling of --out-dir
    assert code == 2 and "is not one of" in err


def test_stackctl_inventory_is_the_default_inventory(local):
    code, out, _ = run(["plan", "-o", "json"], env={"STACKCTL_INVENTORY": str(local)})
    assert code == 0 and json.loads(out)["cluster"] == "grammar"
    code, out, _ = run(
        ["plan", A100, "-o", "json"], env={"STACKCTL_INVENTORY": str(local)}
    )  # an argument wins
    assert code == 0 and json.loads(out)["cluster"] == "a100-8"
    code, out, err = run(["plan"])
    assert code == 2 and "STACKCTL_INVENTORY" in err and "Traceback" not in err


def test_up_check_exit_3_when_something_would_change_and_changes_nothing(local, tmp_path):
    code, out, err = run(["up", local, "--check", "-o", "json"])
    assert code == 3, (out, err)
    assert {h["name"]: h["status"] for h in json.loads(out)["hosts"]} == {
        "head": "would-change",
        "sim1": "would-change",
    }
    assert "change(s)" in err  # the diff, on stderr
    assert not (tmp_path / "head").exists() and not (tmp_path / "sim1").exists()


def test_up_check_exit_1_when_a_host_is_refused(local):
    port = yaml.safe_load(local.read_text())["hosts"][1]["engine"]["port"]
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, out, err = run(["up", local, "--check", "-o", "yaml"])
    assert code == 1, (out, err)
    statuses = {h["name"]: h["status"] for h in yaml.safe_load(out)["hosts"]}
    assert statuses == {"head": "would-change", "sim1": "refused"}


def test_verbose_shows_remote_commands_but_no_secret(local):
    code, out, err = run(["up", local, "--check", "-v"])
    assert code == 3
    commands = [line for line in err.splitlines() if line.startswith(("[head] $ ", "[sim1] $ "))]
    assert len(commands) >= 2 and any('"action": "facts"' in c for c in commands)
    assert all(len(c) < 2000 for c in commands)  # the packed probe is shown as its size
    assert "sk-grammarsecret" not in err + out
    code, _, err = run(["up", local, "--check"])
    assert code == 3 and "[head] $ " not in err  # off again without -v


def test_status_formats_and_the_json_alias(local):
    code, out, _ = run(["status", local, "-o", "json"])
    document = json.loads(out)
    assert (
        code == 1
        and document["overall"] == "degraded"
        and [h["host"] for h in document["hosts"]] == ["head", "sim1"]
    )
    code, out, _ = run(["status", local, "--json", "-l", "sim*"])
    assert code == 1 and [h["host"] for h in json.loads(out)["hosts"]] == ["sim1"]
    code, out, _ = run(["status", local, "-o", "yaml"])
    assert code == 1 and yaml.safe_load(out)["cluster"] == "grammar"


@pytest.mark.parametrize("args", [["restart"], ["restart", "--rolling"], ["down", "--purge"]])
def test_restart_and_purge_need_yes_without_a_terminal(local, args):
    code, _, err = run([args[0], local, *args[1:]])
    assert code == 1 and "changes need confirmation: run again with --yes" in err


@pytest.mark.parametrize(
    "args, refusal",
    [(["restart"], "nothing was restarted"), (["down", "--purge"], "nothing was purged")],
)
def test_restart_and_purge_ask_on_a_terminal(local, monkeypatch, args, refusal):
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    code, out, err = run([args[0], local, *args[1:]], input="n\n")
    assert code == 1 and "[y/N]" in out and refusal in err


def test_purge_confirmed_on_a_terminal_goes_ahead(local, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    code, out, err = run(["down", local, "--purge", "-l", "sim1"], input="y\n")
    assert code == 0 and "sim1: stopped and purged" in out, (out, err)


def test_restart_checks_the_program_before_asking(local):
    code, _, err = run(["restart", local, "--program", "engine-9"])
    assert code == 2 and "no program named 'engine-9'" in err


def test_logs_follow_needs_one_host(local):
    code, _, err = run(["logs", local, "-f"])
    assert code == 2 and "one host" in err and "head, sim1" in err
    code, _, err = run(["logs", local, "--program", "nosuch"])
    assert code == 2 and "no program 'nosuch'" in err


def test_verbose_uploads_show_path_and_size_never_content(local, tmp_path, capsys):
    from stackctl.connect import LocalConnector, set_verbosity
    from stackctl.inventory import load_inventory

    conn = LocalConnector(load_inventory(local).hosts[0])
    set_verbosity(1)
    try:
        conn.put_bytes(b"sk-uploadedsecret", str(tmp_path / "keys"), 0o600)
        conn.run(f"cat {tmp_path / 'keys'}")  # its output is the command's, not the trace's
    finally:
        set_verbosity(0)
    err = capsys.readouterr().err
    assert (
        f"[head] put {tmp_path / 'keys'} (mode 0600, 17 bytes)" in err
        and f"[head] $ cat {tmp_path / 'keys'}" in err
    )
    assert "sk-uploadedsecret" not in err


def test_rolling_restart_stops_at_the_first_failed_host(local):
    """Nothing deployed: no router runs (so no drain), sim1's restart fails and head, last, is
    left alone rather than restarted too."""
    code, out, err = run(["restart", local, "--rolling", "--yes"])
    assert code == 1
    assert (
        "sim1: FAILED: command exited with" in err
        and "head: FAILED: not restarted: stopped after sim1 failed" in err
    )
