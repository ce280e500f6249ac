"""`up` gives up on an engine that keeps exiting at start, with its reason, instead of waiting
out the whole health timeout (engine.health_timeout_s, 900 s by default)."""

from __future__ import annotations

import time

import pytest
import yaml

from tests.helpers.chaos import inventory_for, stackctl

pytestmark = [pytest.mark.slow]


def test_an_engine_that_exits_at_start_fails_up_after_a_few_restarts(tmp_path):
    # 0.215 of an A100-80GB leaves Llama-8B's weights no room for a KV cache: the simulator
    # refuses to start, as vLLM does; supervisord keeps restarting it.
    data = inventory_for(tmp_path, 1, time_scale=4.0, engine={"gpu_memory_utilization": 0.215})
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.monotonic()
    try:
        result = stackctl("up", path, "--yes", timeout=240)
        took = time.monotonic() - started
        out = result.stdout + result.stderr
        assert result.returncode != 0, out
        assert "engine-0 exited 3 times before it answered" in out, out
        assert "no memory left for the KV cache" in out, out  # the log's own reason
        assert took < 120, f"up took {took:.0f} s"  # not the 900 s health timeout
    finally:
        stackctl("down", path, "--purge", "--yes", timeout=180)
