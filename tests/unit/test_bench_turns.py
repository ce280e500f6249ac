"""First turns and returning turns: the warm-up waits for every first turn, the report splits them."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from stackctl.bench.client import Record
from stackctl.bench.report import markdown, point_rows, write_report
from stackctl.bench.runner import (
    PointResult,
    Warmup,
    load_warmups,
    run_sweep_async,
    warm_up,
    warmup_limit_s,
)
from stackctl.bench.scenario import Scenario
from stackctl.bench.workload import Workload


def scenario(users: int, **changes) -> Scenario:
    values = dict(
        users=users,
        rounds=20,  # no user finishes (and is replaced) in these short runs
        system_prompt_tokens=4,
        history_tokens=6,
        question_tokens=2,
        answer_tokens=2,
        qps=(20.0,),
        duration_s=0.2,
        warmup_s=0.01,
        stagger=False,
        request_timeout_s=5.0,
        drain_timeout_s=0.05,
    )
    values.update(changes)
    return Scenario(**values)


class SlowFirstTurns:
    """A send() whose first turns take ``first_s`` and returning turns ``returning_s``."""

    def __init__(self, first_s: float, returning_s: float = 0.005):
        self.first_s = first_s
        self.returning_s = returning_s
        self.sent: list[tuple[int, bool]] = []
        self.cancelled = 0
        self.records: list[Record] = []

    async def send(self, spec, scheduled_s, start_s, waited):
        self.sent.append((spec.user_id, spec.first_turn))
        try:
            await asyncio.sleep(self.first_s if spec.first_turn else self.returning_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.records.append(record(spec.first_turn, None, error="cancelled"))
            raise
        self.records.append(record(spec.first_turn, 0.1))
        return "an answer"


def record(first_turn, ttft, error=None, profile="optimized", qps=1.0, phase="measure"):
    return Record(
        profile=profile,
        qps_target=qps,
        phase=phase,
        user=0,
        round=1,
        scheduled_s=0.0,
        start_s=0.0,
        start_time=0.0,
        launch_lag_s=0.0,
        waited_for_idle_user=False,
        max_tokens=2,
        prompt_tokens_sent=10,
        ttft_s=ttft,
        e2e_s=None if ttft is None else ttft + 0.1,
        output_tokens=2,
        error=error,
        first_turn=first_turn,
    )


def test_first_turn_marks_each_conversations_first_request():
    workload = Workload(scenario(users=3, rounds=2, stagger=True))
    seen: dict[int, list[bool]] = {}
    for _ in range(12):
        conv = workload.take_idle_user()
        spec = workload.start_request(conv)
        seen.setdefault(spec.user_id, []).append(spec.first_turn)
        # the first turn of user 1 fails: it returned, but its user is still cold
        failed = spec.user_id == 1 and spec.first_turn
        workload.finish_request(conv, None if failed else "an answer")
    # staggered users start at round 1 or 2; replacements (ids >= 3) start at round 1
    assert all(flags[0] and not any(flags[1:]) for flags in seen.values())
    assert max(seen) >= 3  # some users were replaced, and their first turns are marked too
    assert workload.first_turns_answered == 2 and workload.first_turns_failed == 1
    assert workload.first_turns_pending == 0  # only the initial users count


def test_first_turns_pending_counts_the_ones_in_flight():
    workload = Workload(scenario(users=2))
    first = workload.take_idle_user()
    workload.start_request(first)
    assert workload.first_turns_pending == 2  # one sent and not answered, one not sent
    workload.finish_request(first, "an answer")
    assert workload.first_turns_pending == 1


async def test_warm_up_waits_for_first_turns_in_flight():
    # Cold first turns take far longer than the minimum warm-up and the drain timeout: a
    # warm-up that stopped at its minimum (or once every first turn was sent) would cancel them.
    server = SlowFirstTurns(first_s=0.4)
    workload = Workload(scenario(users=3))
    warmup = await warm_up(
        workload,
        50.0,
        0.02,
        server.send,
        server.records,
        profile="optimized",
        limit_s=30.0,
        drain_timeout_s=0.1,
    )
    assert server.cancelled == 0
    assert [user for user, first in server.sent if first] == [0, 1, 2]
    assert warmup.complete and not warmup.limit_reached
    assert (warmup.first_turns_answered, warmup.first_turns_failed) == (3, 0)
    assert warmup.first_turns_unsent == 0 and warmup.errors == 0
    assert 0.4 <= warmup.elapsed_s < 5.0
    assert warmup.requests == len(server.sent) > 3  # arrivals went on while it waited
    assert "3/3 first turns answered" in warmup.describe()


async def test_warm_up_stops_at_its_limit_and_says_so():
    server = SlowFirstTurns(first_s=10.0)
    workload = Workload(scenario(users=3))
    warmup = await warm_up(
        workload,
        50.0,
        0.02,
        server.send,
        server.records,
        profile="optimized",
        limit_s=0.2,
        drain_timeout_s=0.05,
    )
    assert warmup.limit_reached and not warmup.complete
    assert warmup.first_turns_failed == 3  # cancelled at the drain: those users are still cold
    assert warmup.errors == 3
    assert warmup.elapsed_s < 2.0
    line = warmup.describe()
    assert "stopped at its limit of 0.2 s" in line and "0/3 first turns answered" in line
    assert "3 failed (those users' next turns are cold too)" in line
    assert Warmup.from_dict(warmup.to_dict()) == warmup
    assert warmup.to_dict()["complete"] is False


def test_warmup_limit_leaves_every_first_turn_time_to_be_sent_and_to_return():
    assert warmup_limit_s(320, 2.0, 200.0, 600.0) == 800.0  # minimum 200 s > 160 s to send
    assert warmup_limit_s(320, 1.0, 200.0, 600.0) == 920.0  # 320 s to send them all


def test_turn_split_counts_and_ttft_per_group():
    records = [record(True, t) for t in (2.0, 3.0)] + [record(True, None, error="HTTP 500")]
    records += [record(False, t) for t in (0.1, 0.2, 0.3, 0.6)]
    records.append(record(None, 9.0))  # saved before first_turn existed: in neither group
    records.append(record(True, 50.0, phase="warmup"))  # warm-up never counts
    (row,) = point_rows(records, [])
    assert row["requests"] == 8 and row["errors"] == 1
    assert (row["first_turns"], row["returning_turns"]) == (3, 4)
    assert row["first_turn_ttft_mean_s"] == pytest.approx(2.5)
    assert row["first_turn_ttft_p50_s"] == pytest.approx(2.5)
    assert row["returning_ttft_mean_s"] == pytest.approx(0.3)
    assert row["returning_ttft_p50_s"] == pytest.approx(0.25)
    assert row["ttft_mean_s"] == pytest.approx((5.0 + 1.2 + 9.0) / 7)  # unchanged meaning
    md = markdown([row], None, [])
    assert "| optimized | 1 | 3 | 4 | 2.500 | 2.500 | 0.300 | 0.250 |" in md


def test_a_point_without_first_turns_has_no_first_turn_ttft():
    (row,) = point_rows([record(False, 0.2)], [])
    assert row["first_turns"] == 0 and row["first_turn_ttft_mean_s"] is None
    assert row["first_turn_ttft_p50_s"] is None and row["returning_ttft_p50_s"] == 0.2


def test_summary_reports_the_split_and_a_warm_up_that_hit_its_limit(tmp_path):
    warmup = Warmup("optimized", 2.0, 1.0, 5.0, 6.0, 12, 2, 4, 2, 1, 1, True)
    records = [record(True, 2.0), record(False, 0.1)]
    points = [PointResult("optimized", 1.0, {"elapsed_s": 1.0}, {})]
    paths = write_report(tmp_path, records, points, warmups=[warmup])
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["points"][0]["first_turns"] == 1
    assert summary["points"][0]["returning_ttft_mean_s"] == pytest.approx(0.1)
    (saved,) = summary["warmups"]
    assert saved["limit_reached"] is True and saved["complete"] is False
    assert saved["first_turns_unsent"] == 1
    md = paths["summary_md"].read_text()
    assert "## First and returning turns" in md
    assert "stopped at its limit of 5 s" in md


async def test_sweep_warms_every_user_and_marks_its_records(tmp_path, capsys):
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        first_turn = len(body["messages"]) == 2  # system prompt + history and question
        await asyncio.sleep(0.3 if first_turn else 0.005)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "ok then"}}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        result = await run_sweep_async(
            url,
            "m",
            scenario(users=3, drain_timeout_s=2.0),  # room for a slow reply on a busy machine
            profile_name="optimized",
            out_dir=tmp_path,
            progress=False,
        )
    finally:
        await runner.cleanup()
    assert result.warmup is not None and result.warmup.complete
    assert result.warmup.first_turns_failed == 0 and result.warmup.errors == 0
    assert result.records and all(r.ok for r in result.records)
    assert all(r.first_turn is False for r in result.records)  # every user was warm
    assert load_warmups(tmp_path) == [result.warmup]
    assert capsys.readouterr().err == ""  # a complete warm-up says nothing without progress bars
