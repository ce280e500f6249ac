"""Chaos and load suite (issue 13): faults and hostile load against a local stack that `up`
deploys (simulator engines and the router under real supervisord), the multi-round workload
running, client -> router only. Each scenario runs once (a module fixture) and its checks are
separate tests.

CI sizes here (the whole module ~3-4 minutes on 2 cores); the issue's sizes are
``python -m benchmarks.chaos`` (benchmarks/results/chaos.md).
"""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.helpers import chaos
from tests.helpers import chaos_scenarios as sc

pytestmark = pytest.mark.slow

IDLE, LORIS = 2000, 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = chaos.deploy(
        tmp_path_factory.mktemp("chaos"),
        sc.ENGINES,
        time_scale=sc.TIME_SCALE,
        router=sc.router_overrides(),
        engine=sc.engine_overrides(),
    )
    try:
        stack.wait_all_healthy()
        yield stack
    finally:
        stack.down()


def _run(stack, scenario, **kw):
    stack.wait_all_healthy(60)  # each scenario starts from a whole stack
    result = asyncio.run(scenario(stack, **kw))
    print(f"{scenario.__name__}: {result.figures}")
    return result


# ----------------------------------------------------------------------------- 1. kill -9 engines


@pytest.fixture(scope="module")
def kills(stack):
    return _run(stack, sc.engine_kills, seconds=24.0, every_s=7.0, qps=6.0)


def test_engine_kill_hides_errors_before_streaming(kills):
    f = kills.figures
    assert f["kills"] >= 3 and f["requests"] >= 100, f
    assert f["errors_before_streaming"] == 0, f


def test_engine_kill_restarted_and_readmitted(kills, stack):
    for kill in kills.extra["kills"]:
        assert kill["restart_s"] is not None and kill["restart_s"] < 10, kill
        # back in the router once healthy: restart + startup + a (backed-off) health probe
        assert kill["readmitted_s"] is not None and kill["readmitted_s"] < 15, kill
    stack.wait_all_healthy(30)


# ----------------------------------------------------------------------------- 2. SIGSTOP


@pytest.fixture(scope="module")
def freeze(stack):
    return _run(stack, sc.engine_freeze, freeze_s=6.0, lead_s=3.0, tail_s=6.0, qps=6.0)


def test_frozen_engine_ejected_within_bound(freeze):
    f = freeze.figures
    assert f["ejected_after_s"] is not None and f["ejected_after_s"] <= sc.EJECT_BOUND_S, f


def test_frozen_engine_costs_no_error_before_streaming(freeze):
    f = freeze.figures
    assert f["errors_before_streaming"] == 0, f


def test_frozen_engine_inflight_fail_over_within_bound(freeze):
    """Requests stuck on the frozen engine that sent no byte fail over at its ejection (issue
    13 item 3; at commit fc56360 they waited for the engine to thaw)."""
    f = freeze.figures
    assert f["exposed_requests"] > 0, f  # the scenario did catch requests on the frozen engine
    assert f["exposed_unstreamed_max_wait_s"] <= sc.EJECT_BOUND_S + 2.0, f


def test_frozen_engine_readmitted_after_sigcont(freeze):
    f = freeze.figures
    assert f["readmitted_after_sigcont_s"] is not None, f
    assert f["readmitted_after_sigcont_s"] <= 30.0 + sc.HEALTH_INTERVAL_S, f  # max_backoff_s


# ----------------------------------------------------------------------------- 3. kill -9 router


@pytest.fixture(scope="module")
def router_killed(stack):
    return _run(stack, sc.router_kill, seconds=10.0, kill_at_s=3.0)


def test_router_kill_outage_under_two_seconds(router_killed, stack):
    f = router_killed.figures
    assert f["router_restart_s"] is not None, f
    assert f["probes_failed"] > 0, f  # the probe did see the router go (else it measured nothing)
    assert f["outage_s"] < 2.0, f
    assert stack.router_pid() != router_killed.extra["old_pid"]


# ----------------------------------------------------------------------------- 4. idle + slow-loris


@pytest.fixture(scope="module")
def hostile(stack):
    return _run(stack, sc.hostile_connections, idle=IDLE, loris=LORIS, window_s=10.0, qps=6.0)


def test_hostile_connections_were_held(hostile):
    f = hostile.figures
    # the test process's own RLIMIT_NOFILE is raised for them; a note says when it could not be
    assert f["opened"] == IDLE + LORIS and f["failed_to_open"] == 0, (f["fd_limit_note"], f)
    assert f["requests_hostile"] >= 30, f


def test_hostile_connections_every_workload_request_served(hostile):
    f = hostile.figures
    assert f["errors"] == 0, f
    assert f["engine_ejections"] == 0 and not f["emfile_in_router_log"], f


def test_hostile_connections_router_fds_and_rss_bounded(hostile):
    f = hostile.figures
    assert f["router_fd_limit"] and f["router_fds_peak"] < f["router_fd_limit"] - 16, f
    assert f["router_rss_peak_mib"] - f["router_rss_before_mib"] < 200, f


def test_hostile_slow_loris_closed_by_header_deadline(hostile):
    f = hostile.figures
    assert f["closed_by_router"]["loris"] == f["loris"], f
    assert f["closed_after_s_max"] <= sc.HEADER_TIMEOUT_S + 2.0, f


def test_hostile_connections_ttft_p50_within_ten_percent(hostile):
    f = hostile.figures
    assert f["ttft_ratio"] is not None and not math.isnan(f["ttft_ratio"]), f
    assert f["ttft_ratio"] <= 1.10, f


# ----------------------------------------------------------------------------- 5. overload


@pytest.fixture(scope="module")
def overloaded(stack):
    return _run(stack, sc.overload, seconds=15.0, factor=2.0, recovery_s=32.0)


def test_overload_no_crash(overloaded, stack):
    f = overloaded.figures
    assert f["restarted"] == [], f
    stack.wait_all_healthy(30)


def test_overload_latency_back_to_normal_within_30s(overloaded):
    f = overloaded.figures
    assert f["recovered_after_drop_s"] <= 30.0, f


def test_overload_answers_429_instead_of_queueing(overloaded):
    f = overloaded.figures
    assert f["rejected_429"] > 0, f
    assert f["rejected_429_with_retry_after"] == f["rejected_429"], f
    # What was admitted did not queue without bound: with at most max_inflight requests in
    # the stack served at the saturation rate, none waits much over max_inflight / rate
    # (Little's law); unbounded queueing grows with the overload's length instead.
    bound = 1.5 * sc.MAX_INFLIGHT / f["saturated_qps"] + 1.0
    assert f["admitted_ttft_max_s"] < bound, (bound, f)
