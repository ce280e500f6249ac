"""Model weights on the SSH testbed, through `up`'s apply phase (tests/helpers/model_fanout.py):
an interrupted upload is never taken for complete and the next run resumes it; peer fan-out
sends the weights from the operator once and every host ends with an identical complete copy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import pytest

from stackctl import models as models_module
from stackctl import probe
from stackctl.inventory import SERVICE_USER_DEFAULT
from stackctl.testing import wait_until
from tests.helpers import model_fanout as mf

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

MODEL_BYTES = 384 * mf.MIB


@pytest.fixture(scope="module")
def bed(testbed_factory):
    return testbed_factory(3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return mf.make_model(tmp_path_factory.mktemp("model") / mf.MODEL_NAME_DIR, MODEL_BYTES)


@pytest.fixture
def clean(bed):
    mf.wipe_models(bed)
    yield bed
    mf.wipe_models(bed)


def _expected(source):
    """What a complete copy holds: the files vLLM reads (not original/), byte for byte."""
    digests = mf.digest(source)
    return {rel: d for rel, d in digests.items() if not rel.startswith("original/")}


def _copy(bed, host):
    digests = mf.digest(mf.model_dir(bed, host))
    manifest = digests.pop(probe.MODEL_MANIFEST, None)
    return digests, manifest


def _state(bed, host):
    return probe.model_state(
        {"path": str(mf.model_dir(bed, host)), "name": mf.MODEL_NAME, "managed": True}
    )


def _kill_rsync_once(ready, timeout: float = 60) -> None:
    """SIGKILL this test process's own rsync children once ``ready()`` (a transfer cut midway)."""
    wait_until(ready, timeout, interval=0.01, what="the upload to get a fifth of the way")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            comm, rest = stat.read_text().rsplit(")", 1)
            if comm.endswith("(rsync") and int(rest.split()[1]) == os.getpid():
                os.kill(int(stat.parent.name), signal.SIGKILL)


def test_interrupted_upload_is_not_complete_and_resumes(clean, source, tmp_path):
    bed, h1 = clean, clean.hosts[0]
    inventory = mf.write_inventory(bed, tmp_path / "inv.yaml", source, "direct", hosts=[h1])
    total = sum(models_module.local_model_files(source).values())

    partial = mf.partial_dir(bed, h1)
    killer = threading.Thread(
        target=_kill_rsync_once,
        args=(lambda: sum(probe.scan_files(str(partial)).values()) > total // 5,),
    )
    killer.start()
    cut = mf.apply_models(inventory, bed)  # the operator's rsync is killed a fifth of the way in
    killer.join()
    assert "uploading the model with rsync failed" in cut["errors"].get(h1.name, ""), cut
    assert not _state(bed, h1)["complete"]
    arrived = sum(probe.scan_files(str(partial)).values())
    assert 0 < arrived < total, (arrived, total)

    resumed = mf.apply_models(inventory, bed)
    assert not resumed["errors"], resumed
    [upload] = resumed["transfers"]
    assert upload["sent_by_operator"] < total, upload  # resumed, not started over
    assert _copy(bed, h1)[0] == _expected(source)
    assert _state(bed, h1)["complete"] and not mf.partial_dir(bed, h1).exists()
    assert mf.apply_models(inventory, bed)["hosts_copied"] == 0  # complete: nothing to do

    shard = mf.model_dir(bed, h1) / "model-00002-of-00004.safetensors"
    with open(shard, "r+b") as fh:  # a copy cut short later (disk full, a crash)
        fh.truncate(1000)
    assert not _state(bed, h1)["complete"]
    again = mf.apply_models(inventory, bed)
    assert again["hosts_copied"] == 1 and not again["errors"], again
    assert _copy(bed, h1)[0] == _expected(source)

    (mf.model_dir(bed, h1) / probe.MODEL_MANIFEST).unlink()
    assert not _state(bed, h1)["complete"]
    again = mf.apply_models(inventory, bed)
    assert again["hosts_copied"] == 1 and not again["errors"], again
    assert _state(bed, h1)["complete"]


@pytest.mark.parametrize("service_user", [None, SERVICE_USER_DEFAULT])
def test_peer_fanout_sends_the_weights_once(clean, source, tmp_path, service_user):
    """Also with the deploy dir owned by a service user (SSH user root): the operator's rsync and
    the peers' pulls write as that user, the serving side reads as the SSH user. (`up` makes the
    account when it is missing; the testbed's hosts share this machine's /etc, as in the become tests.)"""
    bed = clean
    inventory = mf.write_inventory(
        bed, tmp_path / "inv.yaml", source, "peer", service_user=service_user
    )
    total = sum(models_module.local_model_files(source).values())
    result = mf.apply_models(inventory, bed)
    assert not result["problems"] and not result["errors"] and not result["stuck"], result
    kinds = sorted(t["kind"] for t in result["transfers"])
    assert kinds == ["peer", "peer", "upload"], result["transfers"]
    # the operator's side: one copy of the weights plus SSH and the probes, for three hosts
    assert result["operator_tx_bytes"] < 1.3 * total, (result["operator_tx_bytes"], total)
    copies = [_copy(bed, h) for h in bed.hosts]
    for digests, _manifest in copies:
        assert digests == _expected(source)
    assert len({manifest for _, manifest in copies}) == 1  # the same manifest everywhere
    listed = json.loads((mf.model_dir(bed, bed.hosts[1]) / probe.MODEL_MANIFEST).read_text())[
        "files"
    ]
    assert sum(listed.values()) == total and not any(p.startswith("original/") for p in listed)
    # this run's peer key is gone from every host: authorized_keys line and private key file
    assert result["keys_left"] == []
    for host in bed.hosts:
        keys = host.root_ssh_dir / "authorized_keys"
        assert "stackctl-model-peer" not in (keys.read_text() if keys.exists() else "")
        assert not (host.deploy_source / "secrets" / models_module.PEER_KEY).exists()
    assert mf.apply_models(inventory, bed)["hosts_copied"] == 0
