"""Model weights: which files are copied, the manifest, the resumable assembly, the SSH command
lines and the peer key's authorized_keys line (stackctl/probe.py's model part, stackctl/models.py)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest

from stackctl import probe
from stackctl.facts import Facts
from stackctl.inventory import SshSettings
from stackctl.models import (
    ModelDistributor,
    local_manifest,
    local_model_files,
    model_bytes,
    remote_rsync,
    sent_bytes,
    ssh_argv,
)
from stackctl.plan import ModelSpec
from stackctl.settings import ModelSettings

LLAMA_31_8B = [  # meta-llama/Llama-3.1-8B-Instruct's repository
    ".gitattributes",
    "LICENSE",
    "README.md",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00004.safetensors",
    "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors",
    "model.safetensors.index.json",
    "original/consolidated.00.pth",
    "original/params.json",
    "original/tokenizer.model",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def test_llama_skips_original_and_keeps_everything_vllm_reads():
    kept = probe.select_model_files(LLAMA_31_8B)
    assert not [p for p in kept if p.startswith("original/")]
    assert [p for p in kept if p.endswith(".safetensors")] == [
        f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)
    ]
    for needed in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert needed in kept


def test_safetensors_win_over_bin_and_pt_as_in_vllm():
    files = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "model.pt",
        "tf_model.h5",
        "flax_model.msgpack",
        "rust_model.ot",
    ]
    assert probe.select_model_files(files) == ["config.json", "model.safetensors"]
    # no safetensors: .bin is used (and .pt, vLLM's last fallback, is not), training state never
    files = [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "training_args.bin",
        "extra.pt",
    ]
    assert probe.select_model_files(files) == [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    assert probe.select_model_files(["config.json", "w.pt"]) == ["config.json", "w.pt"]
    # huggingface_hub's local_dir records and our own manifest are never part of a copy
    assert probe.select_model_files(
        [".cache/huggingface/download/x.metadata", probe.MODEL_MANIFEST, "a.json"]
    ) == ["a.json"]


def _model(tmp_path, name="m"):
    src = tmp_path / name
    (src / "original").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"w" * 1000)
    (src / "original" / "consolidated.00.pth").write_bytes(b"o" * 500)
    return src


def test_local_manifest_lists_sizes_of_selected_files(tmp_path):
    src = _model(tmp_path)
    cluster = SimpleNamespace(model=ModelSettings(name="org/m"))
    manifest = local_manifest(cluster, src)
    assert manifest["files"] == {"config.json": 2, "model.safetensors": 1000}
    assert manifest["model"] == "org/m"
    plan = SimpleNamespace(
        model=ModelSpec("upload", "/opt/stackctl/models/m", local_source=str(src), name="org/m")
    )
    assert model_bytes(plan) == 1002
    assert model_bytes(SimpleNamespace(model=ModelSpec("download", "/x", name="org/m"))) is None


def _finish(path, manifest=None, name="org/m"):
    return probe.model_finish({"path": str(path), "name": name, "manifest": manifest})


def test_assembly_in_partial_then_rename_and_complete(tmp_path):
    src = _model(tmp_path)
    target = tmp_path / "models" / "m"
    target.parent.mkdir()
    manifest = {"format": 1, "model": "org/m", "origin": "upload", "files": local_model_files(src)}
    partial = probe.model_prepare({"path": str(target)})["partial"]
    assert partial == str(tmp_path / "models" / ".m.partial")
    (tmp_path / "models" / ".m.partial" / "config.json").write_text("{}")
    # half of the weights arrived: the check refuses, nothing is renamed into place
    (tmp_path / "models" / ".m.partial" / "model.safetensors").write_bytes(b"w" * 400)
    answer = _finish(target, manifest)
    assert (
        not answer["ok"] and "model.safetensors has 400 of its 1000 bytes" in answer["problems"][0]
    )
    assert not target.exists()
    state = probe.model_state({"path": str(target), "name": "org/m", "managed": True})
    assert not state["complete"] and state["partial_bytes"] == 402
    # the rest arrives (a resumed copy), then it is complete and in place
    (tmp_path / "models" / ".m.partial" / "model.safetensors").write_bytes(b"w" * 1000)
    assert _finish(target, manifest) == {"ok": True, "files": 2, "bytes": 1002}
    assert not (tmp_path / "models" / ".m.partial").exists()
    assert probe.model_state({"path": str(target), "name": "org/m", "managed": True})["complete"]
    assert json.loads((target / probe.MODEL_MANIFEST).read_text())["files"] == manifest["files"]


@pytest.mark.parametrize("damage", ["truncate", "remove_manifest", "remove_file", "other_model"])
def test_a_damaged_copy_is_not_complete_and_is_resumed_from(tmp_path, damage):
    src = _model(tmp_path)
    target = tmp_path / "m-copy"
    manifest = {"format": 1, "model": "org/m", "origin": "upload", "files": local_model_files(src)}
    probe.model_prepare({"path": str(target)})
    for rel in manifest["files"]:
        (tmp_path / ".m-copy.partial" / rel).write_bytes((src / rel).read_bytes())
    assert _finish(target, manifest)["ok"]
    name = "org/m"
    if damage == "truncate":
        (target / "model.safetensors").write_bytes(b"w" * 10)
    elif damage == "remove_manifest":
        (target / probe.MODEL_MANIFEST).unlink()
    elif damage == "remove_file":
        (target / "config.json").unlink()
    else:
        name = "org/other"
    state = probe.model_state({"path": str(target), "name": name, "managed": True})
    assert not state["complete"], state
    # the next copy starts from what is there: the incomplete target moves to the partial dir
    prepared = probe.model_prepare({"path": str(target), "name": name})
    assert not target.exists() and prepared["bytes"] > 0
    # ...and what the finished copy does not list is removed (vLLM globs *.safetensors)
    (tmp_path / ".m-copy.partial" / "stray.safetensors").write_bytes(b"s")
    for rel in manifest["files"]:
        (tmp_path / ".m-copy.partial" / rel).write_bytes((src / rel).read_bytes())
    assert _finish(target, dict(manifest, model=name), name=name)["ok"]
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [probe.MODEL_MANIFEST, *manifest["files"]]
    )


def test_a_complete_copy_is_never_moved_aside(tmp_path):
    target = tmp_path / "m"
    probe.model_prepare({"path": str(target)})
    (tmp_path / ".m.partial" / "config.json").write_text("{}")
    assert _finish(target, {"format": 1, "model": "org/m", "files": {"config.json": 2}})["ok"]
    probe.model_prepare({"path": str(target)})  # e.g. a forced re-copy: a fresh partial dir
    assert (target / "config.json").exists() and (tmp_path / ".m.partial").is_dir()


def test_model_path_light_check_or_manifest(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    spec = {"path": str(d), "name": "org/m", "managed": False}
    assert "no config.json" in probe.model_state(spec)["problems"][0]
    (d / "config.json").write_text("{}")
    assert "no weights" in probe.model_state(spec)["problems"][0]
    (d / "model.safetensors").write_bytes(b"x" * 10)
    assert probe.model_state(spec)["complete"]
    # with a manifest, the manifest decides
    (d / probe.MODEL_MANIFEST).write_text(
        json.dumps({"model": "org/m", "files": {"model.safetensors": 99}})
    )
    assert not probe.model_state(spec)["complete"]


def _host(**ssh):
    settings = dict(
        user=None,
        port=22,
        key=None,
        known_hosts="~/.ssh/known_hosts",
        config=None,
        connect_timeout_s=10,
    )
    settings.update(ssh)
    return SimpleNamespace(ssh=SshSettings(**settings))


def test_ssh_argv_mirrors_the_connector_and_verifies_keys(tmp_path):
    argv = ssh_argv(
        _host(user="ubuntu", port=2222, key="/k/id", known_hosts="/k/known hosts", config="/k/cfg")
    )
    text = shlex.join(argv)
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert "UserKnownHostsFile=/k/known hosts" in argv and "GlobalKnownHostsFile=/dev/null" in argv
    assert argv[argv.index("-F") + 1] == "/k/cfg" and argv[argv.index("-i") + 1] == "/k/id"
    assert argv[argv.index("-l") + 1] == "ubuntu" and argv[argv.index("-p") + 1] == "2222"
    assert shlex.split(text) == argv  # survives rsync's -e word splitting
    plain = ssh_argv(_host())
    assert (
        "-p" not in plain and "-l" not in plain and "-i" not in plain
    )  # the SSH config decides, as for Fabric


def test_remote_rsync_runs_as_the_service_user():
    def ident(**kw):
        base = dict(
            service_is_login=False,
            service_uid=999,
            is_root=False,
            uses_sudo=True,
            become_user="root",
            service_user="stackctl",
        )
        base.update(kw)
        return SimpleNamespace(identity=SimpleNamespace(**base))

    assert remote_rsync(SimpleNamespace()) == "rsync"
    assert remote_rsync(ident(service_is_login=True)) == "rsync"
    assert remote_rsync(ident(is_root=True, uses_sudo=False)) == "runuser -u stackctl -- rsync"
    assert remote_rsync(ident()) == "sudo -n -u root -- runuser -u stackctl -- rsync"
    assert remote_rsync(ident(become_user="admin")) == "sudo -n -u stackctl -- rsync"


def test_sent_bytes_from_rsync_stats():
    assert (
        sent_bytes(
            "Number of files: 3\nTotal bytes sent: 2,147,483,999\nTotal bytes received: 100\n"
        )
        == 2147483999
    )
    assert sent_bytes("nothing") is None


def test_peer_authorized_line_is_read_only_and_restricted():
    def host(name, address):
        return SimpleNamespace(
            host=SimpleNamespace(is_local=False), endpoint=lambda: {"address": address}
        )

    plan = SimpleNamespace(
        model=ModelSpec("upload", "/opt/stack ctl/models/m", local_source="/src", name="m")
    )
    diff = SimpleNamespace(
        plan=plan,
        problems=[],
        facts=Facts.from_probe({"model": {"rrsync": "/usr/bin/rrsync", "rsync": "/usr/bin/rsync"}}),
    )
    cluster = SimpleNamespace(name="c1", model=ModelSettings(name="m", distribute="peer"))
    conns = {"a": host("a", "10.0.0.11"), "b": host("b", "10.0.0.12")}
    models = ModelDistributor(cluster, {"a": diff, "b": diff}, conns)
    line = models.authorized_line("a")
    options, key_type, key, marker = line.rsplit(" ", 3)
    assert options.startswith('restrict,from="10.0.0.11,10.0.0.12",command="')
    assert "/usr/bin/rrsync -ro '/opt/stack ctl/models/m'" in options
    assert key_type == "ssh-ed25519" and marker == models.marker and len(key) > 60
    conns["b"] = host("b", "gpu02.example")  # a name: sshd would match from= through DNS only
    assert 'from="' not in ModelDistributor(cluster, {"a": diff, "b": diff}, conns).authorized_line(
        "a"
    )
    diff.plan.model = ModelSpec("upload", '/opt/"x"/m', local_source="/src", name="m")
    with pytest.raises(Exception, match="authorized_keys"):
        models.authorized_line("a")
