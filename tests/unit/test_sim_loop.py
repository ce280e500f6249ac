"""The real-time driver: modelled durations become real ones, and nothing stalls."""

import asyncio
import random
import time

import pytest

from stackctl.sim.engine import EngineLoop, SimEngine, SimEngineConfig, SimRequest
from stackctl.sim.profiles import A100_80GB, LLAMA_31_8B
from stackctl.sim.timing import TimingModel

TIMING = TimingModel(A100_80GB, LLAMA_31_8B)


async def finished(req: SimRequest) -> None:
    loop = asyncio.get_running_loop()
    while not req.finished:
        req.waiter = loop.create_future()
        await req.waiter


async def test_a_lone_request_takes_its_modelled_time_divided_by_the_scale():
    scale = 20.0
    engine_loop = EngineLoop(
        SimEngine(SimEngineConfig(num_gpu_blocks=4000), TIMING), time_scale=scale
    )
    engine_loop.start()
    try:
        req = SimRequest("r", [f"w{i}" for i in range(8000)], 10)
        start = time.perf_counter()
        engine_loop.submit(req)
        await finished(req)
        elapsed = time.perf_counter() - start
    finally:
        await engine_loop.stop()
    modelled = req.finish_time - req.arrival
    assert modelled == pytest.approx(
        TIMING.prefill_seconds(8000, chunk=2048) + 9 * TIMING.decode_seconds(1, 8005), rel=0.01
    )
    assert elapsed == pytest.approx(modelled / scale, rel=0.25, abs=0.01)


async def test_staggered_arrivals_never_stall_and_match_the_virtual_replay():
    scale = 100.0
    rng = random.Random(1)
    engine_loop = EngineLoop(
        SimEngine(SimEngineConfig(num_gpu_blocks=4000), TIMING), time_scale=scale
    )
    engine_loop.start()
    reqs = [
        SimRequest(f"r{i}", [f"p{i}w{j}" for j in range(rng.randint(10, 600))], rng.randint(1, 4))
        for i in range(40)
    ]
    try:
        for req in reqs:
            engine_loop.submit(req)
            await asyncio.sleep(rng.uniform(0, 0.003))
        await asyncio.wait_for(asyncio.gather(*(finished(r) for r in reqs)), timeout=10)
    finally:
        await engine_loop.stop()
    assert all(r.output_count == r.max_tokens for r in reqs)
    # no request is served before it arrived, and each one took at least its own prefill
    for req in reqs:
        assert req.first_scheduled >= req.arrival
        assert req.first_token_time - req.arrival >= TIMING.prefill_seconds(req.prompt_len) * 0.999


def test_a_step_never_admits_a_request_that_arrives_after_it_began():
    engine = SimEngine(SimEngineConfig(num_gpu_blocks=100), TIMING)
    late = SimRequest("late", ["a", "b", "c"], 1)
    engine.add_request(late, 5.0)
    assert engine.schedule(4.0) is None  # the loop is catching up on its timeline
    assert engine.schedule(5.0) is not None


def test_replay_serves_arrivals_in_time_order():
    engine = SimEngine(SimEngineConfig(num_gpu_blocks=1000), TIMING)
    a = SimRequest("a", [f"a{i}" for i in range(2000)], 5)
    b = SimRequest("b", [f"b{i}" for i in range(2000)], 5)
    end = engine.replay([(10.0, b), (0.0, a)])
    assert a.finish_time < 10.0 <= b.first_scheduled
    assert end == pytest.approx(b.finish_time)
    assert b.first_token_time - b.arrival == pytest.approx(TIMING.prefill_seconds(2000))


async def test_a_request_arriving_while_the_loop_was_late_is_not_left_waiting():
    engine_loop = EngineLoop(SimEngine(SimEngineConfig(num_gpu_blocks=100), TIMING), time_scale=1.0)
    engine_loop.start()
    try:
        first = SimRequest("first", ["a"] * 16, 1)  # one ~12 ms step
        engine_loop.submit(first)
        await asyncio.sleep(0.002)  # the loop now sleeps until that step's deadline
        time.sleep(0.03)  # block the event loop past the deadline, as a busy host would
        second = SimRequest("second", ["b"] * 16, 1)
        engine_loop.submit(second)  # arrives after the deadline the loop resumes from
        await asyncio.wait_for(finished(second), timeout=2)
    finally:
        await engine_loop.stop()
    assert second.first_scheduled >= second.arrival
