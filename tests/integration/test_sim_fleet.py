"""The fleet helper other suites import: starts, reports failures, always stops."""

import urllib.request

import pytest

from tests.helpers.sim_fleet import start_sim, start_sims


def test_start_sims_serves_then_stops_everything():
    with start_sims(2, extra_args=["--served-model-name", "fleet-model"]) as sims:
        assert len({s.port for s in sims}) == 2
        for sim in sims:
            with urllib.request.urlopen(f"{sim.url}/v1/models", timeout=5) as resp:
                assert b"fleet-model" in resp.read()
    assert all(s.proc.poll() is not None for s in sims)
    assert not any(s.log_path.exists() for s in sims)


def test_a_simulator_that_cannot_start_raises_with_its_log():
    with pytest.raises(RuntimeError, match="max-num-seqs"):
        start_sim(extra_args=["--max-num-seqs", "zero"], startup_timeout=10)
