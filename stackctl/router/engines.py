"""Engines as the router sees them: address, model, health, load and learned capacity."""

from __future__ import annotations

import time

from .config import EngineConfig, RouterConfig


class Engine:
    """Mutable routing state of one engine; shared by the policy, health checks and proxy."""

    __slots__ = ("name", "url", "model", "configured_capacity_tokens", "learned_capacity_tokens",
                 "healthy", "inflight", "failures", "ejections", "retry_at", "healthy_since",
                 "served", "prefix_index", "last_error")

    def __init__(self, config: EngineConfig):
        self.name = config.name
        self.url = config.url
        self.model = config.model
        self.configured_capacity_tokens = config.cache_capacity_tokens
        self.learned_capacity_tokens: int | None = None
        self.healthy = True  # optimistic until the first check; retries cover a dead start
        self.inflight = 0
        self.failures = 0  # consecutive failed checks or requests
        self.ejections = 0  # consecutive ejections, drives the exponential backoff
        self.retry_at = 0.0
        self.healthy_since = time.monotonic()
        self.served = 0
        self.prefix_index = None  # owned by the kv_aware policy
        self.last_error: str | None = None

    @property
    def capacity_tokens(self) -> int | None:
        return self.configured_capacity_tokens or self.learned_capacity_tokens

    def same_endpoint(self, config: EngineConfig) -> bool:
        return self.url == config.url and self.model == config.model

    def forget_cache(self) -> None:
        if self.prefix_index is not None:
            self.prefix_index.clear()


class EnginePool:
    """Engines by name and by model; rebuilt on reload while keeping surviving engines' state."""

    def __init__(self, config: RouterConfig):
        self.engines: dict[str, Engine] = {}
        self.by_model: dict[str, list[Engine]] = {}
        self.update(config)

    def update(self, config: RouterConfig) -> tuple[list[str], list[str]]:
        """Apply a (re)loaded config; returns (added, removed) engine names.

        An engine whose name, URL and model are unchanged keeps its object, so its in-flight
        count and prefix index survive. Requests in flight on a removed engine keep their own
        reference and finish normally.
        """
        old = self.engines
        new: dict[str, Engine] = {}
        for ec in config.engines:
            engine = old.get(ec.name)
            if engine is None or not engine.same_endpoint(ec):
                engine = Engine(ec)
            else:
                engine.configured_capacity_tokens = ec.cache_capacity_tokens
            new[ec.name] = engine
        by_model: dict[str, list[Engine]] = {}
        for engine in new.values():
            by_model.setdefault(engine.model, []).append(engine)
        added = [n for n in new if n not in old or old[n] is not new[n]]
        removed = [n for n in old if n not in new or old[n] is not new[n]]
        self.engines, self.by_model = new, by_model
        return added, removed

    def healthy_models(self) -> list[str]:
        return sorted(m for m, es in self.by_model.items() if any(e.healthy for e in es))
