"""Pacing: arrivals on an absolute schedule, next idle user, lag when none is idle."""

from __future__ import annotations

import asyncio

import pytest

from stackctl.bench.pacing import arrival_times, run_paced
from stackctl.bench.scenario import Scenario
from stackctl.bench.workload import Workload


def scenario(users: int) -> Scenario:
    return Scenario(
        users=users,
        rounds=3,
        system_prompt_tokens=4,
        history_tokens=6,
        question_tokens=2,
        answer_tokens=2,
        qps=(1.0,),
        duration_s=1.0,
        warmup_s=0.0,
        stagger=False,
        turn_order="cyclic",
    )


def test_arrival_times():
    assert arrival_times(2.0, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert arrival_times(0.1, 100.0) == [k * 10.0 for k in range(10)]
    assert arrival_times(0.1, 5.0) == [0.0]
    assert len(arrival_times(3.3, 100.0)) == 330


class FakeServer:
    """A send() that takes ``service_s`` and checks that no user overlaps itself."""

    def __init__(self, service_s: float):
        self.service_s = service_s
        self.in_flight: set[int] = set()
        self.overlaps = 0
        self.sent: list[tuple[int, float, float, bool]] = []

    async def send(self, spec, scheduled_s, start_s, waited):
        if spec.user_id in self.in_flight:
            self.overlaps += 1
        self.in_flight.add(spec.user_id)
        self.sent.append((spec.user_id, scheduled_s, start_s, waited))
        try:
            await asyncio.sleep(self.service_s)
        finally:
            self.in_flight.discard(spec.user_id)
        return "fine answer"


async def test_keeps_the_target_rate_when_users_are_available():
    server = FakeServer(service_s=0.01)
    workload = Workload(scenario(users=8))
    stats = await run_paced(workload, qps=100.0, duration_s=0.5, send=server.send)
    assert stats.due == 50 and stats.launched == 50 and stats.missed == 0
    assert stats.achieved_qps == pytest.approx(100.0, rel=0.05)
    assert stats.waited_for_idle_user == 0
    assert stats.lag_p99_s < 0.1  # sequential sends would be ~0.5 s late
    assert stats.elapsed_s >= 0.5  # the point lasts its whole window
    assert server.overlaps == 0
    # arrivals are spaced by 1/qps on the schedule, and sent no earlier than due
    scheduled = [s[1] for s in server.sent]
    assert scheduled == pytest.approx([k / 100.0 for k in range(50)], abs=1e-6)
    assert all(start >= due - 1e-6 for _, due, start, _ in server.sent)
    assert workload.in_flight == 0


async def test_users_take_turns_longest_idle_first():
    server = FakeServer(service_s=0.001)
    workload = Workload(scenario(users=4))
    await run_paced(workload, qps=50.0, duration_s=0.16, send=server.send)
    users = [s[0] for s in server.sent]
    assert users[:8] == [0, 1, 2, 3, 0, 1, 2, 3]


async def test_lag_is_recorded_when_no_user_is_idle():
    server = FakeServer(service_s=0.2)
    workload = Workload(scenario(users=2))
    stats = await run_paced(workload, qps=50.0, duration_s=0.5, send=server.send)
    assert server.overlaps == 0
    assert stats.waited_for_idle_user > 0
    assert stats.launched < stats.due and stats.missed > 0
    assert stats.achieved_qps < 25
    assert stats.lag_max_s > 0.1
    assert any(waited for *_, waited in server.sent)


async def test_drain_timeout_cancels_and_frees_users():
    server = FakeServer(service_s=10.0)
    workload = Workload(scenario(users=3))
    stats = await run_paced(
        workload, qps=20.0, duration_s=0.1, send=server.send, drain_timeout_s=0.1
    )
    assert stats.cancelled == stats.launched == 2
    assert workload.in_flight == 0 and workload.idle_users == 3
    assert stats.elapsed_s < 1.0


async def test_until_extends_arrivals_at_the_same_rate_up_to_a_limit():
    server = FakeServer(service_s=0.001)
    workload = Workload(scenario(users=4))
    stats = await run_paced(
        workload,
        qps=50.0,
        duration_s=0.1,
        send=server.send,
        until=lambda: len(server.sent) >= 12,
        limit_s=10.0,
    )
    assert stats.due == stats.launched == 12 and not stats.limit_reached
    scheduled = [s[1] for s in server.sent]
    assert scheduled == pytest.approx([k / 50.0 for k in range(12)], abs=1e-6)
    stats = await run_paced(
        workload, qps=50.0, duration_s=0.1, send=server.send, until=lambda: False, limit_s=0.3
    )
    assert stats.limit_reached and stats.due == stats.launched == 15  # none due at 0.3 s or later
    with pytest.raises(ValueError, match="until needs limit_s"):
        await run_paced(workload, qps=50.0, duration_s=0.1, send=server.send, until=lambda: True)
