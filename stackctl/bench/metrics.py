"""Engine Prometheus counters before and after a benchmark point -> cache hit rates.

vLLM counts prefix-cache lookups in tokens: ``prefix_cache_queries/hits`` for its own GPU
cache and ``external_prefix_cache_queries/hits`` for the KV connector (LMCache's CPU tier).
The difference of the counters over a point, summed over engines, gives that point's rates.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from stackctl.metrics import (
    EXTERNAL_HITS,
    EXTERNAL_QUERIES,
    GENERATION_TOKENS,
    PREFIX_HITS,
    PREFIX_QUERIES,
    parse_samples,
)

COUNTERS = (PREFIX_QUERIES, PREFIX_HITS, EXTERNAL_QUERIES, EXTERNAL_HITS, GENERATION_TOKENS)


def metrics_url(url: str) -> str:
    """An engine base URL or its /metrics URL -> the /metrics URL."""
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


def parse_counters(text: str) -> dict[str, float]:
    """The wanted counters, each summed over its label sets (engines, models)."""
    samples = parse_samples(text)
    return {name: samples[name] for name in COUNTERS if name in samples}


async def scrape(
    session: aiohttp.ClientSession, urls, timeout_s: float = 5.0
) -> dict[str, dict | str]:
    """Counters of every engine, by URL; a string is the error for an engine not scraped."""

    async def one(url: str):
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with session.get(metrics_url(url), timeout=timeout) as resp:
                if resp.status != 200:
                    return url, f"HTTP {resp.status}"
                return url, parse_counters(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return url, f"{type(exc).__name__}: {exc}"

    return dict(await asyncio.gather(*(one(u) for u in urls)))


@dataclass
class CacheStats:
    """Counter deltas of one point, summed over the engines scraped both times."""

    engines: int = 0
    gpu_queries: float = 0.0
    gpu_hits: float = 0.0
    cpu_queries: float = 0.0
    cpu_hits: float = 0.0
    generation_tokens: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    # each engine's prompt tokens looked up (its prefill work, cached or not), by URL
    engine_queries: dict[str, float] = field(default_factory=dict)

    @property
    def busiest_share(self) -> float | None:
        """The busiest engine's prompt tokens over the fair share (the engines' mean): 1.0 is
        perfect balance, 8.0 on 8 engines is everything on one."""
        work = list(self.engine_queries.values())
        total = sum(work)
        return max(work) * len(work) / total if total else None

    @property
    def gpu_hit_rate(self) -> float | None:
        return self.gpu_hits / self.gpu_queries if self.gpu_queries else None

    @property
    def cpu_hit_rate(self) -> float | None:
        return self.cpu_hits / self.cpu_queries if self.cpu_queries else None

    def summary(self) -> dict:
        return {
            "engines_scraped": self.engines,
            "gpu_queries": self.gpu_queries,
            "gpu_hits": self.gpu_hits,
            "gpu_hit_rate": self.gpu_hit_rate,
            "cpu_queries": self.cpu_queries,
            "cpu_hits": self.cpu_hits,
            "cpu_hit_rate": self.cpu_hit_rate,
            "busiest_engine_share": self.busiest_share,
            "server_generation_tokens": self.generation_tokens,
            "scrape_errors": self.errors,
        }


def _delta(before: dict, after: dict, name: str) -> float:
    if name not in after:
        return 0.0
    b, a = before.get(name, 0.0), after[name]
    return a - b if a >= b else a  # a counter that went down was reset (engine restarted)


def cache_stats(before: dict[str, dict | str], after: dict[str, dict | str]) -> CacheStats:
    stats = CacheStats()
    for url, end in after.items():
        start = before.get(url)
        if isinstance(end, str) or isinstance(start, str) or start is None:
            stats.errors[url] = end if isinstance(end, str) else str(start or "not scraped before")
            continue
        stats.engines += 1
        stats.engine_queries[url] = _delta(start, end, PREFIX_QUERIES)
        stats.gpu_queries += stats.engine_queries[url]
        stats.gpu_hits += _delta(start, end, PREFIX_HITS)
        stats.cpu_queries += _delta(start, end, EXTERNAL_QUERIES)
        stats.cpu_hits += _delta(start, end, EXTERNAL_HITS)
        stats.generation_tokens += _delta(start, end, GENERATION_TOKENS)
    return stats
