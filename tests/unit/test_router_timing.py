"""Prefill rates learned from engines' /metrics (stackctl/router/timing.py) and the cost
policy that prices each engine in predicted seconds to first token."""

from __future__ import annotations

import random

import pytest

from stackctl.kv_events import MEDIUM_CPU, MEDIUM_GPU
from stackctl.router.backends import Backend
from stackctl.router.config import BackendConfig
from stackctl.router.kv_index import KvEventView
from stackctl.router.policies import CostPolicy, KvAwarePolicy, RouteRequest
from stackctl.router.timing import PrefillTiming, TimingSample, timing_sample
from stackctl.tokenizer import token_ids, tokenize
from tests.helpers.kv_batches import prefix_stored

# What vLLM 0.32 prints (two engine cores of a data-parallel server), trimmed to the series
# read here and a neighbour whose name starts the same.
VLLM_METRICS = """\
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 3.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 1.5
vllm:request_prefill_time_seconds_sum{engine="1",model_name="m"} 0.5
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 3.0
vllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="m"} 12000.0
vllm:request_prefill_kv_computed_tokens_sum{engine="1",model_name="m"} 4000.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 2048.0
vllm:external_prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
"""


def test_a_sample_sums_every_engine_core_and_needs_the_prefill_series():
    assert timing_sample(VLLM_METRICS) == (2.0, 16000.0, 2048.0, 300.0, 1000.0, None)
    sim = VLLM_METRICS + "stackctl_sim_clock_seconds 812.5\n"
    assert timing_sample(sim) == (2.0, 16000.0, 2048.0, 300.0, 1000.0, 812.5)
    no_external = "\n".join(line for line in VLLM_METRICS.splitlines() if "external" not in line)
    assert timing_sample(no_external) == (2.0, 16000.0, 0.0, 300.0, 1000.0, None)  # no LMCache
    assert timing_sample('vllm:num_requests_running{engine="0"} 1.0\n') is None  # older vLLM
    assert timing_sample("") is None


class Engine:
    """Counters of an engine whose prefill costs ``a`` s per computed and ``b`` s per loaded
    token, with ``together`` requests in prefill at once; ``time_scale`` > 0: a simulator
    that reports its clock, running that much faster than the router's."""

    def __init__(self, a: float, b: float, together: float = 1.0, time_scale: float = 0.0):
        self.a, self.b, self.together = a, b, together
        self.time_scale = time_scale
        self.counters = [0.0, 0.0, 0.0]
        self.now = 0.0  # the engine's clock

    def window(self, computed: float, loaded: float) -> tuple[float, TimingSample]:
        busy = self.a * computed + self.b * loaded  # engine time the window's prefills took
        self.counters[0] += busy * self.together  # each request counts the shared time
        self.counters[1] += computed
        self.counters[2] += loaded
        self.now += max(busy, 0.5)
        clock = self.now if self.time_scale else None
        router_now = self.now / self.time_scale if self.time_scale else self.now
        return router_now, TimingSample(*self.counters, 0.0, 0.0, clock)


def feed(timing: PrefillTiming, engine: Engine, windows: int, seed: int = 0, loads=True):
    rng = random.Random(seed)
    timing.observe(*engine.window(0, 0))
    for _ in range(windows):
        computed = rng.uniform(1000, 8000)
        loaded = rng.uniform(0, 20000) if loads else 0.0
        timing.observe(*engine.window(computed, loaded))


def test_rates_are_fitted_from_windows_of_computed_and_loaded_tokens():
    timing = PrefillTiming()
    feed(timing, Engine(a=1e-4, b=1.2e-5), 20)
    assert timing.seconds_per_token == pytest.approx(1e-4, rel=0.01)
    assert timing.seconds_per_loaded_token == pytest.approx(1.2e-5, rel=0.01)
    assert timing.describe()["prefill_s_per_token"] == timing.seconds_per_token


def test_concurrent_prefills_are_not_counted_twice():
    timing = PrefillTiming()
    feed(timing, Engine(a=1e-4, b=1.2e-5, together=3.0), 20)
    assert timing.seconds_per_token == pytest.approx(1e-4, rel=0.05)


def test_a_simulator_ten_times_faster_than_real_time_is_timed_on_its_own_clock():
    timing = PrefillTiming()
    feed(timing, Engine(a=1e-4, b=1.2e-5, together=3.0, time_scale=10.0), 20)
    assert timing.seconds_per_token == pytest.approx(1e-4, rel=0.05)  # simulated seconds


def test_nothing_is_known_before_enough_tokens_and_a_load_rate_needs_loads():
    timing = PrefillTiming()
    engine = Engine(a=1e-4, b=0.0)
    timing.observe(*engine.window(0, 0))
    timing.observe(*engine.window(1000, 0))  # below MIN_TOKENS
    assert timing.seconds_per_token is None
    feed(timing, engine, 10, loads=False)
    assert timing.seconds_per_token == pytest.approx(1e-4, rel=0.01)
    assert timing.seconds_per_loaded_token is None  # never loaded anything: unknown


def test_loads_always_in_proportion_cannot_be_told_from_computing():
    timing = PrefillTiming()
    engine = Engine(a=1e-4, b=1e-5)
    timing.observe(*engine.window(0, 0))
    for computed in (2000, 4000, 3000, 5000, 2500):
        timing.observe(*engine.window(computed, 2 * computed))
    assert timing.seconds_per_loaded_token is None
    assert timing.seconds_per_token == pytest.approx(1.2e-4, rel=0.01)  # the loads inside


def test_the_hit_rate_is_the_decayed_ratio_of_hits_to_queries():
    timing = PrefillTiming()
    timing.observe(0.0, TimingSample(0.0, 0.0, 0.0, 0.0, 0.0, None))
    timing.observe(2.0, TimingSample(0.5, 5000.0, 0.0, 300.0, 500.0, None))
    assert timing.hit_rate is None  # fewer than MIN_TOKENS queried
    timing.observe(4.0, TimingSample(1.0, 10000.0, 0.0, 1500.0, 2000.0, None))
    assert timing.hit_rate == pytest.approx(0.75, abs=0.01)


def test_counters_going_back_mean_a_restart():
    timing = PrefillTiming()
    feed(timing, Engine(a=1e-4, b=1e-5), 10)
    assert timing.seconds_per_token is not None
    timing.observe(1e6, TimingSample(0.1, 500.0, 0.0, 0.0, 0.0, None))  # a fresh engine's counters
    assert timing.seconds_per_token is None
    timing.observe(1e6 + 2, TimingSample(0.6, 5500.0, 0.0, 0.0, 0.0, None))
    assert timing.seconds_per_token == pytest.approx(1e-4)


# -- the cost policy --------------------------------------------------------------------------


def backends(n: int, rate: float | None = 1e-4, load_rate: float | None = None) -> list[Backend]:
    out = [Backend(BackendConfig(name=f"e{i}", url=f"http://h{i}", model="m")) for i in range(n)]
    for b in out:
        b.timing.seconds_per_token = rate
        b.timing.seconds_per_loaded_token = load_rate
    return out


def chat(history: str, system: str = "Answer briefly.") -> RouteRequest:
    return RouteRequest(
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": history}]},
        {},
    )


HISTORY = " ".join(f"w{i}" for i in range(2000))


def test_without_prefill_rates_the_beta_score_decides():
    es = backends(3, rate=None)
    cost, beta = CostPolicy(), KvAwarePolicy()
    for i in range(12):
        request = chat(f"{HISTORY} {i}")
        assert cost.choose(es, request).backend.name == beta.choose(es, request).backend.name


def test_a_long_queue_outweighs_a_cache_hit():
    es = backends(2)
    policy = CostPolicy()
    home = policy.choose(es, chat(HISTORY)).backend
    other = next(b for b in es if b is not home)
    follow_up = chat(HISTORY + " and then")
    assert policy.choose(es, follow_up).backend is home  # nothing queued: the hit wins
    # 40k tokens still to prefill there: 4 s at 1e-4 s/token, more than prefilling all of
    # the 2k-word prompt elsewhere. (kv_aware's beta score sees two equal in-flight counts.)
    home.queued_tokens = 40_000.0
    home.inflight = other.inflight = 1
    assert KvAwarePolicy.choose(policy, es, follow_up).backend is home  # the beta score
    choice = policy.choose(es, follow_up)
    assert choice.backend is other
    # the router's queue bookkeeping is what the choice predicts it computes
    assert choice.uncached_tokens == pytest.approx(choice.prompt_tokens_estimate)


def test_what_a_move_evicts_keeps_a_conversation_home_behind_a_short_queue():
    """A prefill queued at home costs about as long as prefilling the whole prompt elsewhere;
    elsewhere it also evicts as much of what that engine holds, which its hit rate says is
    worth keeping: the conversation stays home. A long queue still moves it."""

    def stays_home(hit_rate: float, queued_prompts: float) -> bool:
        es = backends(2)
        policy = CostPolicy()
        home = policy.choose(es, chat(HISTORY)).backend
        follow_up = chat(HISTORY + " and then")
        home.queued_tokens = queued_prompts * len(follow_up.prompt) / policy.chars_per_token
        for b in es:
            b.timing.hit_rate = hit_rate
        return policy.choose(es, follow_up).backend is home

    assert not stays_home(0.0, 1.05)  # nothing worth keeping elsewhere: the queue decides
    assert stays_home(0.6, 1.05)
    assert not stays_home(0.6, 3.0)


def held_in(backend: Backend, ids: list[int], blocks: int, medium: str, seq: int) -> None:
    backend.kv_view = backend.kv_view or KvEventView()
    backend.kv_view.apply(seq, prefix_stored(ids, blocks, 16, medium))


@pytest.mark.parametrize(
    ("load_rate", "winner"),
    [(1e-5, "e0"), (None, "e1")],  # a fast CPU tier; a load rate not known yet: as a miss
)
def test_a_cpu_tier_hit_is_worth_its_load_time(load_rate, winner):
    """e0 holds the whole prompt but only in its CPU tier, e1 60% of it on its GPU."""
    es = backends(2, load_rate=load_rate)
    request = chat(HISTORY)
    ids = token_ids(tokenize(request.prompt))
    held_in(es[0], ids, len(ids) // 16, MEDIUM_CPU, 0)
    held_in(es[1], ids, int(len(ids) * 0.6) // 16, MEDIUM_GPU, 0)
    choice = CostPolicy(kv_index="events").choose(es, request)
    assert choice.backend.name == winner
