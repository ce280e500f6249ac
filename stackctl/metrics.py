"""Read an engine's Prometheus text (real vLLM names; the simulator exposes the same)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# vLLM 0.32's sample names, the one place they are spelled on the deploy side (status, the
# rolling drain, bench); counters are read from their `_total` samples.
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"  # GPU prefix cache lookups, in tokens
PREFIX_HITS = "vllm:prefix_cache_hits_total"
EXTERNAL_QUERIES = (
    "vllm:external_prefix_cache_queries_total"  # the KV connector's (LMCache's CPU tier)
)
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
# per finished request: seconds in the prefill phase, and KV computed there (cached excluded)
PREFILL_SECONDS = "vllm:request_prefill_time_seconds_sum"
PREFILL_COMPUTED_TOKENS = "vllm:request_prefill_kv_computed_tokens_sum"
# the simulator's own clock (simulated seconds; faster than real time at --time-scale above
# 1): vLLM has no such series, its times are on the router's wall clock
SIM_CLOCK = "stackctl_sim_clock_seconds"

# status field -> vLLM sample name
ENGINE_SAMPLES = {
    "running": RUNNING,
    "waiting": WAITING,
    "kv_cache_usage": KV_CACHE_USAGE,
    "prefix_queries": PREFIX_QUERIES,
    "prefix_hits": PREFIX_HITS,
    "lmcache_queries": EXTERNAL_QUERIES,
    "lmcache_hits": EXTERNAL_HITS,
    "prompt_tokens": PROMPT_TOKENS,
    "generation_tokens": GENERATION_TOKENS,
}


def parse_samples(text: str) -> dict[str, float]:
    """Sum of every sample by name (across label sets, e.g. several models)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def engine_summary(text: str) -> dict[str, float | None]:
    """The numbers `status` shows for one engine, with hit rates computed."""
    samples = parse_samples(text)
    summary = {key: samples.get(name) for key, name in ENGINE_SAMPLES.items()}
    summary["prefix_hit_rate"] = _rate(summary["prefix_hits"], summary["prefix_queries"])
    summary["lmcache_hit_rate"] = _rate(summary["lmcache_hits"], summary["lmcache_queries"])
    return summary


def _rate(hits, queries):
    return hits / queries if hits is not None and queries else None
