"""The simulator behaves like vLLM + LMCache on an A100 with Llama-3.1-8B, end to end.

Real simulator processes (tests/helpers/sim_fleet.py) at a small time scale; TTFTs are
measured by the client (real time x scale) and by the simulator's own histogram.
"""

import asyncio
import time

import aiohttp
import pytest

from stackctl.sim.profiles import A100_80GB, LLAMA_31_8B
from stackctl.sim.timing import TimingModel
from stackctl.testing import read_metrics
from tests.helpers.sim_fleet import LMCACHE_ARGS, lmcache_env, start_sims

pytestmark = (
    pytest.mark.slow
)  # modelled 20k-token prefills in near real time: 3 s a test, 8 s in all

SCALE = 4.0  # slow enough that HTTP overhead stays small next to a GPU-hit TTFT
# A GPU cache of 2048 blocks (32k tokens) holds one 20k prompt but not two, so a little
# other traffic evicts it; the CPU tier (20 GB = 160k tokens) keeps it.
FLAGS = ["--num-gpu-blocks-override", "2048", "--max-model-len", "32768"]
TIMING = TimingModel(A100_80GB, LLAMA_31_8B)
COLD_20K = TIMING.prefill_seconds(20_000, chunk=A100_80GB.default_max_num_batched_tokens)


@pytest.fixture(scope="module")
def sims():
    with start_sims(
        1, extra_args=[*FLAGS, *LMCACHE_ARGS], env=lmcache_env(cpu_gb=20), time_scale=SCALE
    ) as on:
        with start_sims(1, extra_args=FLAGS, time_scale=SCALE) as off:
            yield on[0].url, off[0].url


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as resp:
        return read_metrics(await resp.text()).totals()


async def measure(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int = 2
) -> tuple[float, float, dict]:
    """(client TTFT, simulator TTFT, metric deltas) of one streamed request, in simulated seconds."""
    before = await metrics(session, url)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    client_ttft = None
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if client_ttft is None and line.startswith(b"data: {"):
                client_ttft = (time.perf_counter() - start) * SCALE
    after = await metrics(session, url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return client_ttft, delta["vllm:time_to_first_token_seconds_sum"], delta


async def evict(session: aiohttp.ClientSession, url: str, rounds: int = 3) -> None:
    for k in range(rounds):
        await measure(session, url, words(20_000, f"other{k}_"))


async def test_cold_gpu_hit_cpu_hit_with_lmcache(sims):
    url = sims[0]
    prompt = words(20_000, "doc")
    async with aiohttp.ClientSession() as session:
        cold_client, cold, cold_delta = await measure(session, url, prompt)
        hot_client, hot, hot_delta = await measure(session, url, prompt)
        hot_client = min(hot_client, (await measure(session, url, prompt))[0])  # less host noise
        await evict(session, url)
        warm_client, warm, warm_delta = await measure(session, url, prompt)

    # A cold 20k-token prompt takes what the profile's prefill rate says (chunked by 2048).
    assert cold == pytest.approx(COLD_20K, rel=0.1)
    assert COLD_20K * 0.95 < cold_client < COLD_20K * 1.6  # plus HTTP and tokenizing, x SCALE
    assert cold_delta["vllm:prefix_cache_hits_total"] == 0
    # The same prompt again is a GPU hit.
    assert hot * 10 < cold and hot_client * 10 < cold_client
    assert hot_delta["vllm:prefix_cache_hits_total"] == 19_984
    # After other traffic evicted it from the GPU, LMCache's CPU tier serves it.
    assert warm_delta["vllm:prefix_cache_hits_total"] == 0
    assert warm_delta["vllm:external_prefix_cache_hits_total"] == 19_968  # 78 whole chunks
    assert warm_delta["vllm:external_prefix_cache_queries_total"] == 20_000
    assert hot < warm < cold / 5 and warm_client < cold_client / 3
    assert warm >= TIMING.load_seconds(19_968)  # copied over PCIe, not recomputed


async def test_without_lmcache_an_evicted_prompt_is_recomputed(sims):
    url = sims[1]
    prompt = words(20_000, "doc")
    async with aiohttp.ClientSession() as session:
        _, cold, _ = await measure(session, url, prompt)
        await evict(session, url)
        again_client, again, delta = await measure(session, url, prompt)
    assert again == pytest.approx(cold, rel=0.05)
    assert again_client > COLD_20K * 0.9
    assert delta["vllm:prefix_cache_hits_total"] == 0
    assert delta["vllm:external_prefix_cache_queries_total"] == 0  # no connector, no CPU tier


async def test_concurrent_load_raises_ttft_and_shows_in_the_gauges(sims):
    url = sims[1]
    async with aiohttp.ClientSession() as session:
        alone_client, alone, _ = await measure(session, url, words(4000, "solo"))
        before = await metrics(session, url)
        # 6 at once: their prefills queue behind each other, then ~1 s (real) of shared decode
        tasks = [
            asyncio.create_task(measure(session, url, words(4000, f"busy{i}_"), 100))
            for i in range(6)
        ]
        peak_running = peak_waiting = peak_usage = 0.0
        while not all(t.done() for t in tasks):
            sample = await metrics(session, url)
            peak_running = max(peak_running, sample["vllm:num_requests_running"])
            peak_waiting = max(peak_waiting, sample["vllm:num_requests_waiting"])
            peak_usage = max(peak_usage, sample["vllm:kv_cache_usage_perc"])
            await asyncio.sleep(0.01)
        results = [t.result() for t in tasks]
        after = await metrics(session, url)
    client_ttfts = sorted(r[0] for r in results)
    assert sum(client_ttfts) / len(client_ttfts) > 2 * alone_client
    assert client_ttfts[-1] > 4 * alone
    queued = (
        after["vllm:request_queue_time_seconds_sum"] - before["vllm:request_queue_time_seconds_sum"]
    )
    assert queued > 2 * alone  # the later arrivals waited for the earlier prefills
    assert peak_running >= 2  # they decode together (continuous batching)
    assert peak_running + peak_waiting >= 4 and 0 < peak_usage <= 1
