"""Open-loop arrivals at a target QPS, handed to the next idle user.

Arrival k of a run is due at ``start + k / qps`` on a monotonic clock (an absolute schedule,
so sleep overshoot never accumulates). At each arrival the user idle the longest sends its
next request. When every user has a request in flight the arrival waits for the first user
to become idle; that wait, and any lateness of the event loop, is recorded as client-side
lag, so a report can show whether the client kept the promised rate.

A run given ``until`` (the warm-up) keeps arriving at the same rate after its window, until
``until()`` holds or ``limit_s`` has passed, so its load stays steady while it waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from stackctl.bench.client import percentile
from stackctl.bench.workload import Conversation, RequestSpec, Workload

# send(spec, scheduled_s, started_s, waited_for_idle_user) -> answer text, or None on failure
SendFn = Callable[[RequestSpec, float, float, bool], Awaitable[str | None]]


def arrival_times(qps: float, duration_s: float) -> list[float]:
    """Offsets (s) of the arrivals due in a window: 0, 1/qps, 2/qps, ... < duration_s."""
    count = int(duration_s * qps - 1e-9) + 1 if duration_s > 0 else 0
    return [k / qps for k in range(count)]


@dataclass
class PacingStats:
    """How well the client kept the target rate during one run."""

    qps_target: float
    duration_s: float
    due: int = 0  # arrivals scheduled inside the window
    launched: int = 0
    waited_for_idle_user: int = 0
    missed: int = 0  # arrivals never launched: no user became idle in time
    cancelled: int = 0  # in-flight requests cut at the drain timeout
    elapsed_s: float = 0.0  # window plus the drain of in-flight requests
    loop_lag_max_s: float = 0.0  # worst event-loop stall seen by a 20 ms ticker
    limit_reached: bool = False  # a run with ``until`` stopped at ``limit_s``, until() still false
    first_launch: float | None = None
    last_launch: float | None = None
    lags: list[float] = field(default_factory=list, repr=False)

    @property
    def achieved_qps(self) -> float:
        """Launches per second, measured between the first and the last launch."""
        first, last = self.first_launch, self.last_launch  # both set once anything launched
        if self.launched >= 2 and first is not None and last is not None and last > first:
            return (self.launched - 1) / (last - first)
        return self.launched / self.duration_s if self.duration_s else 0.0

    @property
    def lag_mean_s(self) -> float:
        return sum(self.lags) / len(self.lags) if self.lags else 0.0

    @property
    def lag_p99_s(self) -> float:
        return percentile(self.lags, 99) if self.lags else 0.0

    @property
    def lag_max_s(self) -> float:
        return max(self.lags) if self.lags else 0.0

    def summary(self) -> dict:
        return {
            "qps_target": self.qps_target,
            "duration_s": self.duration_s,
            "due": self.due,
            "launched": self.launched,
            "achieved_qps": self.achieved_qps,
            "waited_for_idle_user": self.waited_for_idle_user,
            "missed": self.missed,
            "cancelled": self.cancelled,
            "elapsed_s": self.elapsed_s,
            "lag_mean_s": self.lag_mean_s,
            "lag_p99_s": self.lag_p99_s,
            "lag_max_s": self.lag_max_s,
            "loop_lag_max_s": self.loop_lag_max_s,
        }


async def _watch_loop_lag(stats: PacingStats, period: float = 0.02) -> None:
    """Record how late a periodic sleep wakes up: a busy client shows up here."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(period)
        stats.loop_lag_max_s = max(stats.loop_lag_max_s, time.monotonic() - before - period)


async def run_paced(
    workload: Workload,
    qps: float,
    duration_s: float,
    send: SendFn,
    *,
    time_origin: float | None = None,
    drain_timeout_s: float = 120.0,
    stats: PacingStats | None = None,
    until: Callable[[], bool] | None = None,
    limit_s: float | None = None,
) -> PacingStats:
    """Drive ``workload`` at ``qps`` for ``duration_s``, then wait for in-flight requests.

    ``time_origin`` is the monotonic instant that record offsets count from (a sweep passes
    its own start so offsets are comparable across points). Requests still running after
    ``drain_timeout_s`` are cancelled; their users get a stand-in answer and stay usable.
    With ``until``, arrivals go on at ``qps`` after ``duration_s`` (a minimum) until ``until()``
    is true at an arrival, but none is due at or after ``limit_s`` from the start (then
    ``stats.limit_reached``); the drain follows as usual. ``until`` needs ``limit_s``.
    """
    if until is not None and limit_s is None:
        raise ValueError("run_paced: until needs limit_s, so that a run cannot last forever")
    stats = stats or PacingStats(qps_target=qps, duration_s=duration_s)
    idle_changed = asyncio.Event()
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    origin = start if time_origin is None else time_origin
    end = start + duration_s
    limit_end = start + max(duration_s, limit_s or 0.0)

    async def one_request(
        conv: Conversation, spec: RequestSpec, due: float, launched: float, waited: bool
    ):
        answer = None
        try:
            answer = await send(spec, due - origin, launched - origin, waited)
        finally:
            workload.finish_request(conv, answer)
            idle_changed.set()

    watcher = asyncio.create_task(_watch_loop_lag(stats))
    try:
        in_window = len(arrival_times(qps, duration_s))
        stats.due = in_window
        index = 0
        while True:
            due = start + index / qps
            extra = index >= in_window  # an arrival after the window: only while until() is false
            if extra and (until is None or until()):
                break
            if extra and due >= limit_end:
                stats.limit_reached = True
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if extra and until is not None and until():  # came true while this one was not due
                break
            stats.due += extra
            conv = workload.take_idle_user()
            waited = conv is None
            while conv is None:
                remaining = (limit_end if extra else end) - time.monotonic()
                if remaining <= 0:
                    break
                idle_changed.clear()
                try:
                    await asyncio.wait_for(idle_changed.wait(), timeout=remaining)
                except TimeoutError:
                    break
                conv = workload.take_idle_user()
            if conv is None:
                stats.missed = stats.due - index
                stats.limit_reached = extra
                break
            launched = time.monotonic()
            if stats.first_launch is None:
                stats.first_launch = launched
            stats.last_launch = launched
            stats.launched += 1
            stats.waited_for_idle_user += waited
            stats.lags.append(launched - due)
            spec = workload.start_request(conv)
            task = asyncio.create_task(one_request(conv, spec, due, launched, waited))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        # The point lasts its whole window even when the last arrival came early in it.
        if end > time.monotonic():
            await asyncio.sleep(end - time.monotonic())
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=drain_timeout_s)
            stats.cancelled = len(pending)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        watcher.cancel()
        for task in list(tasks):
            task.cancel()
        stats.elapsed_s = time.monotonic() - start
    return stats
