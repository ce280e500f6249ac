"""Read an engine's Prometheus text (real vLLM names; the simulator exposes the same)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# status field -> vLLM sample name (counters are read from their `_total` samples)
ENGINE_SAMPLES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "lmcache_queries": "vllm:external_prefix_cache_queries_total",
    "lmcache_hits": "vllm:external_prefix_cache_hits_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
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
