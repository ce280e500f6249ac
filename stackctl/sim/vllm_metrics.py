"""vLLM's Prometheus metrics, fed by the engine's events.

Names, types and labels follow vLLM v1 (``vllm/v1/metrics/loggers.py``): every series has
``model_name`` (the first served model name) and ``engine`` ("0") labels; prefix-cache
counters count tokens; ``external_*`` counters are the KV connector's (here LMCache's CPU
tier). Times are simulated seconds, so histograms read the same at any ``--time-scale``.
Each app has its own CollectorRegistry, so several simulators can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stackctl.metrics import SIM_CLOCK
from stackctl.sim.engine import EngineObserver, SimEngine, SimRequest, Step

# vLLM v1's bucket boundaries for these histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, 200000)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SimMetrics(EngineObserver):
    def __init__(self, model_name: str, cache_info: dict[str, str], external_cache: bool = False):
        self.external_cache = external_cache
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=registry).labels(**labels)

        self.running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.external_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
        )
        self.external_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
        )
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            names + ["finished_reason"],
            registry=registry,
        )
        self.success = {
            reason: success.labels(**labels, finished_reason=reason)
            for reason in ("stop", "length", "abort")
        }
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            TOKEN_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            TOKEN_BUCKETS,
        )
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(cache_info) + ["engine"],
            registry=registry,
        )
        info.labels(**cache_info, engine="0").set(1)

    def clock(self, now: Callable[[], float]) -> None:
        """Report the engine's simulated clock (``now()``, read at each scrape): a router
        times the engine's prefill counters on it, not on its own wall clock."""
        Gauge(
            SIM_CLOCK, "Simulated seconds since the engine started.", registry=self.registry
        ).set_function(now)

    # --- EngineObserver ---------------------------------------------------------------------

    def admitted(
        self, req: SimRequest, queried: int, gpu_hit: int, cpu_hit: int, first: bool
    ) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(gpu_hit)
        if self.external_cache:
            self.external_queries.inc(queried)
            self.external_hits.inc(cpu_hit)
        if first:
            assert req.first_scheduled is not None  # the engine sets it before it reports
            self.queue_time.observe(max(0.0, req.first_scheduled - req.arrival))

    def token(self, req: SimRequest, now: float, first: bool) -> None:
        self.generation_tokens.inc()
        if first:
            self.prompt_tokens.inc(req.prompt_len)
            self.ttft.observe(now - req.arrival)
        elif req.last_token_time is not None:
            self.itl.observe(now - req.last_token_time)

    def finished(self, req: SimRequest) -> None:
        reason = req.finish_reason or "abort"
        self.success[reason].inc()
        if reason == "abort":
            return
        self.request_prompt_tokens.observe(req.prompt_len)
        self.request_generation_tokens.observe(req.output_count)
        assert req.finish_time is not None  # the engine sets it before it reports
        self.e2e.observe(req.finish_time - req.arrival)
        if req.first_token_time is not None and req.first_scheduled is not None:
            self.prefill_time.observe(req.first_token_time - req.first_scheduled)
            self.prefill_kv_computed.observe(req.prompt_len - req.num_cached_tokens)
        if req.output_count > 1 and req.first_token_time is not None:
            self.tpot.observe((req.finish_time - req.first_token_time) / (req.output_count - 1))

    def preempted(self, req: SimRequest) -> None:
        self.preemptions.inc()

    def step_done(self, engine: SimEngine, step: Step) -> None:
        self.refresh(engine)

    def refresh(self, engine: SimEngine) -> None:
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        self.kv_usage.set(engine.gpu.usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
