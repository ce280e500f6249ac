"""stackctl.testing: free ports, bounded waits and the metrics reader the tests and benchmarks share."""

from __future__ import annotations

import socket
import time

import pytest

from stackctl.testing import (
    WaitTimeout,
    free_port,
    free_ports,
    read_metrics,
    wait_until,
    wait_until_async,
)

EXPOSITION = """\
# HELP vllm:prefix_cache_hits Prefix cache hits, in tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="a"} 1.5e3
vllm:prefix_cache_hits_total{engine="0",model_name="b"} 24.0
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="a"} NaN
# HELP vllm:time_to_first_token_seconds TTFT.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 2.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="a"} 3.0
vllm:time_to_first_token_seconds_sum{model_name="a"} 0.75
vllm:time_to_first_token_seconds_count{model_name="a"} 3.0
"""


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(1024 <= p <= 65535 for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_wait_until_returns_the_first_truthy_value():
    calls = iter([0, None, "", "ready", "later"])
    assert wait_until(lambda: next(calls), 5, interval=0.001) == "ready"


def test_wait_until_times_out_naming_what_it_waited_for_and_what_it_saw():
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        wait_until(
            lambda: [],
            0.2,
            interval=0.02,
            what="the engines to answer",
            detail=lambda: "log tail: boom",
        )
    assert 0.2 <= time.monotonic() - started < 2
    message = str(caught.value)
    assert message.startswith(
        "timed out after 0.2 s waiting for the engines to answer (last value: [])"
    )
    assert message.endswith("\nlog tail: boom")
    assert isinstance(caught.value, AssertionError)  # pytest shows it as a failed check


def test_wait_until_retries_ignored_errors_and_reports_the_last_one():
    def refused():
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    with pytest.raises(
        WaitTimeout,
        match=r"waiting for refused \(last error: ConnectionRefusedError: \[Errno 111\]",
    ):
        wait_until(refused, 0.05, interval=0.01, ignore=OSError)


def test_wait_until_lets_other_errors_through_at_once():
    def exited():
        raise RuntimeError("the server exited with 1")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 1"):
        wait_until(exited, 10, ignore=OSError)
    assert time.monotonic() - started < 1


def test_wait_until_backs_off_up_to_max_interval():
    stamps: list[float] = []
    with pytest.raises(WaitTimeout):
        wait_until(lambda: stamps.append(time.monotonic()), 0.5, interval=0.01, max_interval=0.1)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert gaps[0] < 0.05 and max(gaps) < 0.2 and len(stamps) < 20


async def test_wait_until_async_awaits_coroutine_predicates_and_sync_ones():
    state = {"n": 0}

    async def count():
        state["n"] += 1
        return state["n"] if state["n"] >= 3 else None

    assert await wait_until_async(count, 5, interval=0.001) == 3
    assert await wait_until_async(lambda: state["n"], 5) == 3
    with pytest.raises(WaitTimeout, match="waiting for nothing"):
        await wait_until_async(lambda: False, 0.05, interval=0.01, what="nothing")


def test_read_metrics_sums_label_sets_and_filters_by_label():
    metrics = read_metrics(EXPOSITION)
    assert metrics.value("vllm:prefix_cache_hits_total") == 1524.0
    assert metrics.value("vllm:prefix_cache_hits_total", model_name="b") == 24.0
    assert metrics.value("vllm:time_to_first_token_seconds_bucket", le="+Inf") == 3.0
    assert metrics.value("vllm:prefix_cache_hits_total", 0.0, model_name="c") == 0.0
    assert metrics.value("vllm:kv_cache_usage_perc") != metrics.value(
        "vllm:kv_cache_usage_perc"
    )  # NaN parsed
    assert {
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
    } <= metrics.names()
    totals = metrics.totals()
    assert totals["vllm:time_to_first_token_seconds_count"] == 3.0
    assert "vllm:time_to_first_token_seconds_bucket" not in totals


def test_read_metrics_names_what_is_missing():
    metrics = read_metrics(EXPOSITION)
    with pytest.raises(
        KeyError, match=r"no sample vllm:prefix_cache_hits_total with labels \{'model_name': 'c'\}"
    ):
        metrics.value("vllm:prefix_cache_hits_total", model_name="c")
    with pytest.raises(KeyError, match="no sample vllm:nope_total"):
        metrics.value("vllm:nope_total")
    with pytest.raises(ValueError):
        read_metrics("vllm:broken{ 1\n")
