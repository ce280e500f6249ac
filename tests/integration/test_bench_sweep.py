"""Short sweeps end to end: a fake OpenAI server with a prefix cache, and the real simulator."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from stackctl.bench import (
    Scenario,
    load_results,
    run_availability_async,
    run_sweep_async,
    write_report,
)
from stackctl.tokenizer import render_chat, tokenize

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BLOCK = 16


class FakeOpenAI:
    """Streams ``max_tokens`` words; TTFT grows with uncached prompt tokens (a block prefix cache)."""

    def __init__(
        self, cache: bool, seconds_per_uncached_token: float = 2e-5, chunk_delay_s: float = 0.001
    ):
        self.cache = cache
        self.seconds_per_uncached_token = seconds_per_uncached_token
        self.chunk_delay_s = chunk_delay_s
        self.status = 200
        self.blocks: set[int] = set()
        self.in_flight: set[str] = set()
        self.overlaps = 0
        self.counters = {"queries": 0, "hits": 0, "generation": 0}

    def _cached_tokens(self, tokens: list[str]) -> int:
        digest, cached, still_hitting = 0, 0, True
        for start in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
            digest = hash((digest, tuple(tokens[start : start + BLOCK])))
            if still_hitting and self.cache and digest in self.blocks:
                cached = start + BLOCK
            else:
                still_hitting = False
            if self.cache:
                self.blocks.add(digest)
        return min(cached, len(tokens) - 1)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "engine unavailable"}}, status=self.status
            )
        body = await request.json()
        user = request.headers.get("x-user-id", "?")
        if user in self.in_flight and user != "-1":
            self.overlaps += 1
        self.in_flight.add(user)
        try:
            tokens = tokenize(render_chat(body["messages"]))
            cached = self._cached_tokens(tokens)
            self.counters["queries"] += len(tokens)
            self.counters["hits"] += cached
            await asyncio.sleep(self.seconds_per_uncached_token * (len(tokens) - cached))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(body["max_tokens"]):
                chunk = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.chunk_delay_s)
            self.counters["generation"] += body["max_tokens"]
            usage = {
                "prompt_tokens": len(tokens),
                "completion_tokens": body["max_tokens"],
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            await resp.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
            )
            return resp
        finally:
            self.in_flight.discard(user)

    async def metrics(self, request: web.Request) -> web.Response:
        c = self.counters
        text = (
            f'vllm:prefix_cache_queries_total{{engine="0"}} {c["queries"]}\n'
            f'vllm:prefix_cache_hits_total{{engine="0"}} {c["hits"]}\n'
            f'vllm:generation_tokens_total{{engine="0"}} {c["generation"]}\n'
        )
        return web.Response(text=text)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [web.post("/v1/chat/completions", self.completions), web.get("/metrics", self.metrics)]
        )
        return app


async def serve(fake: FakeOpenAI) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def small_scenario(**changes) -> Scenario:
    values = dict(
        name="it",
        users=6,
        rounds=4,
        system_prompt_tokens=200,
        history_tokens=3000,
        question_tokens=10,
        answer_tokens=6,
        qps=(10.0, 20.0),
        duration_s=0.6,
        warmup_s=0.3,
        seed=3,
        request_timeout_s=10,
        drain_timeout_s=5,
    )
    values.update(changes)
    return Scenario(**values)


@pytest.mark.slow  # 3-5 s
async def test_sweep_two_profiles_and_report(tmp_path):
    results = {}
    servers = {}
    for profile, cache in (("naive", False), ("optimized", True)):
        fake = FakeOpenAI(cache=cache)
        runner, url = await serve(fake)
        try:
            results[profile] = await run_sweep_async(
                url,
                MODEL,
                small_scenario(users=12),  # closed loop: room for a slow answer on a busy CI core
                profile_name=profile,
                out_dir=tmp_path,
                metrics_urls=[url],
                progress=False,
            )
        finally:
            await runner.cleanup()
        servers[profile] = fake

    for profile, result in results.items():
        assert servers[profile].overlaps == 0
        assert [p.qps_target for p in result.points] == [10.0, 20.0]
        for point in result.points:
            assert point.pacing["launched"] == point.pacing["due"] == int(point.qps_target * 0.6)
            assert point.pacing["achieved_qps"] == pytest.approx(point.qps_target, rel=0.1)
            assert point.cache["engines_scraped"] == 1
        assert all(r.ok and r.phase == "measure" for r in result.records)
        assert all(r.prompt_tokens == r.prompt_tokens_sent for r in result.records)
        assert all(r.output_tokens == 6 and r.ttft_s > 0 for r in result.records)
    assert all(p.cache["gpu_hit_rate"] == 0 for p in results["naive"].points)
    assert all(p.cache["gpu_hit_rate"] > 0.5 for p in results["optimized"].points)
    assert all(
        r.cached_tokens > 0 for r in results["optimized"].records
    )  # warm-up filled the cache

    records, points, _ = load_results(tmp_path)  # what the CLI does between profiles
    assert len(records) == sum(len(r.records) for r in results.values())
    paths = write_report(tmp_path / "report", records, points)
    summary = json.loads(paths["summary_json"].read_text())
    ratios = [row["ratio naive/optimized"] for row in summary["comparison"]]
    assert len(ratios) == 2 and all(r > 1 for r in ratios)
    assert paths["ttft_plot"].stat().st_size > 10_000


async def test_availability_sees_an_outage(tmp_path):
    fake = FakeOpenAI(cache=True)
    runner, url = await serve(fake)

    def fail():
        fake.status = 503

    def recover():
        fake.status = 200

    try:
        result = await run_availability_async(
            url,
            MODEL,
            2.0,
            small_scenario(users=4, history_tokens=500),
            10.0,
            profile_name="optimized",
            probe_interval_s=0.1,
            events=[(0.6, "engine down", fail), (1.2, "engine back", recover)],
            out_dir=tmp_path,
            progress=False,
        )
    finally:
        await runner.cleanup()
    assert [label for _, label in result.events] == ["engine down", "engine back"]
    assert len(result.probes) == 20
    before = [p for p in result.probes if p.t_s < 0.5]
    during = [p for p in result.probes if 0.8 <= p.t_s <= 1.0]
    after = [p for p in result.probes if p.t_s >= 1.5]
    assert before and all(p.ok for p in before)
    assert during and not any(p.ok for p in during)
    assert all(p.status == 503 for p in during)
    assert after and all(p.ok for p in after)
    failed = [r for r in result.records if not r.ok]
    assert failed and all(r.status == 503 and "engine unavailable" in r.error for r in failed)
    assert fake.overlaps == 0
    paths = write_report(tmp_path / "report", [], [], [result])
    assert paths["availability_optimized"].stat().st_size > 10_000
    assert load_results(tmp_path)[2][0].summary()["probes_ok"] == result.summary()["probes_ok"]


@pytest.mark.slow  # 3-5 s: simulator processes
def test_sweep_against_the_simulator(tmp_path):
    sim_fleet = pytest.importorskip("tests.helpers.sim_fleet")
    scenario = small_scenario(
        users=4, rounds=3, history_tokens=1500, qps=(4.0, 8.0), duration_s=0.8, warmup_s=0.4
    )
    args = ("--model", MODEL, *sim_fleet.LMCACHE_ARGS)
    with sim_fleet.start_sims(2, extra_args=args, env=sim_fleet.lmcache_env(cpu_gb=4)) as sims:
        result = asyncio.run(
            run_sweep_async(
                sims[0].url,
                MODEL,
                scenario,
                profile_name="sim",
                out_dir=tmp_path,
                metrics_urls=[s.url for s in sims],
                progress=False,
            )
        )
    assert [p.qps_target for p in result.points] == [4.0, 8.0]
    assert result.records and all(r.ok for r in result.records), [
        r.error for r in result.records if not r.ok
    ]
    assert all(r.prompt_tokens == r.prompt_tokens_sent for r in result.records)
    assert all(r.output_tokens == 6 for r in result.records)
    for point in result.points:
        assert point.pacing["launched"] == point.pacing["due"]
        assert point.cache["engines_scraped"] == 2
        # only sims[0] served: its counters must agree with what the client saw in usage
        records = [r for r in result.records if r.qps_target == point.qps_target]
        assert point.cache["gpu_queries"] == sum(r.prompt_tokens for r in records)
        assert point.cache["gpu_hit_rate"] > 0.5
        assert point.cache["server_generation_tokens"] == sum(r.output_tokens for r in records)
