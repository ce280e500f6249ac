"""The scheduler over the KV tiers, on a virtual clock (no sleeping)."""

import pytest

from stackctl.sim.engine import EngineObserver, SimEngine, SimEngineConfig, SimRequest
from stackctl.sim.profiles import A100_80GB, LLAMA_31_8B
from stackctl.sim.timing import TimingModel

TIMING = TimingModel(A100_80GB, LLAMA_31_8B)


def prompt(n: int, tag: str) -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def make_engine(blocks: int = 2000, cpu_chunks: int | None = None, **kw) -> SimEngine:
    return SimEngine(
        SimEngineConfig(num_gpu_blocks=blocks, cpu_capacity_chunks=cpu_chunks, **kw), TIMING
    )


def serve(
    engine: SimEngine, tokens: list[str], now: float = 0.0, max_tokens: int = 1
) -> tuple[SimRequest, float]:
    req = SimRequest("r", list(tokens), max_tokens)
    engine.add_request(req, now)
    return req, engine.run_until_idle(now)


def ttft(req: SimRequest) -> float:
    return req.first_token_time - req.arrival


def test_cold_prompt_takes_its_chunked_prefill_time():
    engine = make_engine()
    req, _ = serve(engine, prompt(20_000, "a"))
    assert ttft(req) == pytest.approx(TIMING.prefill_seconds(20_000, chunk=2048))
    assert engine.steps == 10  # ceil(20000 / 2048) chunks, the last one samples
    assert req.num_cached_tokens == 0 and req.output_count == 1 and req.finish_reason == "length"


def test_repeat_is_a_gpu_hit_at_least_ten_times_faster():
    engine = make_engine()
    tokens = prompt(20_000, "a")
    cold, end = serve(engine, tokens)
    hot, _ = serve(engine, tokens, end)
    assert hot.gpu_hit_tokens == (20_000 - 1) // 16 * 16
    assert hot.num_cached_tokens == hot.gpu_hit_tokens
    assert ttft(hot) * 10 < ttft(cold)


def evict_with_other_traffic(engine: SimEngine, now: float, rounds: int = 3) -> float:
    for k in range(rounds):
        _, now = serve(engine, prompt(20_000, f"other{k}_"), now)
    return now


def test_after_gpu_eviction_the_cpu_tier_serves_it_between_hit_and_cold():
    engine = make_engine(blocks=2000, cpu_chunks=1000)  # GPU: 32k tokens; CPU: 256k tokens
    tokens = prompt(20_000, "a")
    cold, now = serve(engine, tokens)
    hot, now = serve(engine, tokens, now)
    now = evict_with_other_traffic(engine, now)
    assert engine.gpu.match(hot.block_keys, 1) == 0  # gone from the GPU
    warm, _ = serve(engine, tokens, now)
    assert warm.gpu_hit_tokens == 0
    assert warm.cpu_hit_tokens == 20_000 // 256 * 256
    assert ttft(hot) < ttft(warm) < ttft(cold)
    assert ttft(warm) >= TIMING.load_seconds(warm.cpu_hit_tokens)
    assert ttft(warm) * 5 < ttft(cold)


def test_without_the_cpu_tier_an_evicted_prompt_is_recomputed():
    engine = make_engine(blocks=2000)
    tokens = prompt(20_000, "a")
    cold, now = serve(engine, tokens)
    now = evict_with_other_traffic(engine, now)
    again, _ = serve(engine, tokens, now)
    assert again.num_cached_tokens == 0
    assert ttft(again) == pytest.approx(ttft(cold))


def test_gpu_hit_first_then_cpu_continues_the_prefix():
    engine = make_engine(blocks=2000, cpu_chunks=1000)
    base = prompt(4096, "a")
    longer = base + prompt(4096, "b")
    _, now = serve(engine, longer)  # both tiers hold all of it
    now = evict_with_other_traffic(engine, now, rounds=2)  # the GPU forgets it
    _, now = serve(engine, base, now)  # loads the first half back onto the GPU
    req, _ = serve(engine, longer, now)
    assert req.gpu_hit_tokens == 4096  # GPU prefix first (base was computed in full)...
    assert (
        req.gpu_hit_tokens + req.cpu_hit_tokens == 8191
    )  # ...then the CPU tier, all but the last token
    assert ttft(req) >= TIMING.load_seconds(req.cpu_hit_tokens)


def test_prefix_caching_off_never_hits():
    engine = make_engine(enable_prefix_caching=False)
    tokens = prompt(4000, "a")
    first, now = serve(engine, tokens)
    second, _ = serve(engine, tokens, now)
    assert second.num_cached_tokens == 0
    assert ttft(second) == pytest.approx(ttft(first))
    assert engine.gpu.usage == 0.0


def test_concurrent_load_raises_ttft_and_respects_max_num_seqs():
    alone, _ = serve(make_engine(), prompt(4000, "solo"))
    engine = make_engine(max_num_seqs=4)
    reqs = [SimRequest(f"r{i}", prompt(4000, f"c{i}_"), 20) for i in range(8)]
    for req in reqs:
        engine.add_request(req, 0.0)
    peak = []
    engine.run_until_idle(0.0, on_step=lambda step, now: peak.append(len(step.scheduled)))
    assert max(peak) <= 4
    ttfts = sorted(ttft(r) for r in reqs)
    assert ttfts[0] == pytest.approx(ttft(alone), rel=0.05)
    assert sum(ttfts) / len(ttfts) > 3 * ttft(alone)
    assert all(r.output_count == 20 for r in reqs)


def test_outputs_are_exact_length_deterministic_and_cached_for_the_next_round():
    engine = make_engine()
    tokens = prompt(1000, "a")
    first = SimRequest("a", list(tokens), 64, seed=7)
    engine.add_request(first, 0.0)
    now = engine.run_until_idle(0.0)
    assert first.output_count == 64 and len(first.output_tokens) == 64
    twin = SimRequest("b", list(tokens), 64, seed=7)
    engine.add_request(twin, now)
    now = engine.run_until_idle(now)
    assert twin.output_tokens == first.output_tokens
    # the next round's prompt continues the conversation: prompt + answer + new question
    follow = SimRequest("c", tokens + first.output_tokens + prompt(100, "q"), 1)
    engine.add_request(follow, now)
    engine.run_until_idle(now)
    assert follow.gpu_hit_tokens == (1000 + 64 - 1) // 16 * 16  # the answer's full blocks hit too


def test_a_full_cache_preempts_the_newest_request_and_everyone_finishes():
    events = []

    class Recorder(EngineObserver):
        def preempted(self, req):
            events.append(req.request_id)

    # 64 blocks = 1024 tokens for 4 requests that grow to 400 tokens each
    engine = SimEngine(SimEngineConfig(num_gpu_blocks=64), TIMING, observer=Recorder())
    reqs = [SimRequest(f"r{i}", prompt(200, f"p{i}_"), 200) for i in range(4)]
    for req in reqs:
        engine.add_request(req, 0.0)
    engine.run_until_idle(0.0)
    assert events and "r0" not in events  # the oldest request is never the victim
    assert all(r.output_count == 200 and r.finish_reason == "length" for r in reqs)
    assert engine.gpu.usage == 0.0  # every block was released


def test_abort_releases_blocks_and_finishes_the_request():
    engine = make_engine()
    req = SimRequest("r", prompt(5000, "a"), 10)
    engine.add_request(req, 0.0)
    step = engine.schedule(0.0)
    engine.complete(step, step.duration)
    assert engine.gpu.usage > 0
    engine.abort(req, step.duration)
    assert req.finished and req.finish_reason == "abort"
    assert engine.gpu.usage == 0.0 and not engine.has_work()


def test_waiting_requests_wait_when_blocks_are_short():
    engine = make_engine(blocks=200)  # 3200 tokens
    a = SimRequest("a", prompt(3000, "a"), 50)
    b = SimRequest("b", prompt(3000, "b"), 5)
    engine.add_request(a, 0.0)
    engine.add_request(b, 0.0)
    engine.run_until_idle(0.0)
    assert b.first_token_time > a.first_token_time
    assert a.output_count == 50 and b.output_count == 5


@pytest.mark.parametrize("chunk", [256, 100])  # whole blocks (keys shared) or not (own chain)
def test_cpu_tier_works_for_any_chunk_size(chunk):
    engine = make_engine(blocks=700, cpu_chunks=400, cpu_chunk_size=chunk)
    tokens = prompt(5000, "a")
    _, now = serve(engine, tokens)
    for k in range(2):  # 16k other tokens through an 11.2k-token GPU cache
        _, now = serve(engine, prompt(8000, f"other{k}_"), now)
    again, _ = serve(engine, tokens, now)
    assert again.gpu_hit_tokens == 0
    assert again.cpu_hit_tokens == min(5000 // chunk * chunk, 4999)  # all but the token to compute
