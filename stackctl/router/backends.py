"""Engines as the router sees them (backends): address, served names, health, load, capacity.

``Backend`` is the router's mutable view of one engine (``stackctl.inventory`` has the
deployment's ``Engine``, ``stackctl.sim`` the simulated ``SimEngine``). ``BackendPool`` is the
set of backends by name and by served model name; every change to that set or to a backend's
health or capacity goes through it, and it tells the routing policy (the hooks of
:class:`~stackctl.router.policies.Policy`), so a policy's per-backend state is never stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .config import BackendConfig, RouterConfig
from .timing import PrefillTiming

if TYPE_CHECKING:
    from .kv_index import KvEventView
    from .policies import Policy


class Backend:
    """Mutable routing state of one engine; shared by the policy, health checks and proxy."""

    __slots__ = (
        "name",
        "url",
        "model",
        "models",
        "configured_capacity_tokens",
        "learned_capacity_tokens",
        "healthy",
        "inflight",
        "failures",
        "ejections",
        "retry_at",
        "healthy_since",
        "served",
        "last_error",
        "waiting",
        "kv_events",
        "kv_view",
        "kv_events_gpu_only",
        "queued_tokens",
        "timing",
    )

    def __init__(self, config: BackendConfig):
        self.name = config.name
        self.url = config.url
        self.model = config.model  # the configured name; always served, listed first
        self.models: tuple[str, ...] = (config.model,)  # + aliases from the engine's /v1/models
        self.configured_capacity_tokens = config.cache_capacity_tokens
        self.learned_capacity_tokens: int | None = None
        self.healthy = True  # optimistic until the first check; retries cover a dead start
        self.inflight = 0
        self.failures = 0  # consecutive failed checks or requests
        self.ejections = 0  # consecutive ejections, drives the exponential backoff
        self.retry_at = 0.0
        self.healthy_since = time.monotonic()
        self.served = 0
        self.last_error: str | None = None
        # requests here that have sent nothing to their client yet (app.Router._forward):
        # each waits inside this scope, which an ejection expires (cut_waiting)
        self.waiting: set[asyncio.Timeout] = set()
        # (PUB endpoint, replay endpoint) of its KV-cache events, and what they say it holds
        self.kv_events = (config.kv_events, config.kv_events_replay) if config.kv_events else None
        self.kv_view: KvEventView | None = None  # made by kv_index.KvEvents when subscribed
        self.kv_events_gpu_only = config.kv_events_gpu_only  # see BackendConfig
        # prompt tokens the requests here still have to prefill, as the policy predicted them
        # (added when sent, taken off at the first byte back): the cost policy's queue
        self.queued_tokens = 0.0
        self.timing = PrefillTiming()  # its prefill rates, fed by the health checker

    @property
    def capacity_tokens(self) -> int | None:
        return self.configured_capacity_tokens or self.learned_capacity_tokens

    def cut_waiting(self) -> int:
        """End every wait of the requests that have sent nothing to their client yet (the
        backend was just ejected): each gets a TimeoutError from its scope and fails over."""
        if not self.waiting:
            return 0
        now = asyncio.get_running_loop().time()
        for scope in self.waiting:
            try:
                scope.reschedule(now)
            except RuntimeError:  # already expiring (cut before its task ran): nothing to do
                pass
        return len(self.waiting)

    def same_endpoint(self, config: BackendConfig) -> bool:
        return (
            self.url == config.url
            and self.model == config.model
            and self.kv_events
            == ((config.kv_events, config.kv_events_replay) if config.kv_events else None)
        )


class BackendPool:
    """Backends by name and by served model name; rebuilt on reload keeping survivors' state.

    ``policy`` is the routing policy over this set; the router swaps it on a reload that
    changes the policy or its options (a new policy starts with no state).
    """

    def __init__(self, config: RouterConfig, policy: Policy):
        self.policy = policy
        self.backends: dict[str, Backend] = {}
        self.by_model: dict[str, list[Backend]] = {}
        self.update(config)

    def update(self, config: RouterConfig) -> tuple[list[str], list[str]]:
        """Apply a (re)loaded config; returns (added, removed) backend names.

        A backend whose name, URL and model are unchanged keeps its object, so its in-flight
        count, learned names and policy state survive. Requests in flight on a removed
        backend keep their own reference and finish normally.
        """
        old = self.backends
        new: dict[str, Backend] = {}
        resized: list[Backend] = []
        for bc in config.engines:
            backend = old.get(bc.name)
            if backend is None or not backend.same_endpoint(bc):
                backend = Backend(bc)
            elif backend.configured_capacity_tokens != bc.cache_capacity_tokens:
                before = backend.capacity_tokens
                backend.configured_capacity_tokens = bc.cache_capacity_tokens
                if backend.capacity_tokens != before:
                    resized.append(backend)
            backend.kv_events_gpu_only = bc.kv_events_gpu_only
            new[bc.name] = backend
        added = [n for n in new if n not in old or old[n] is not new[n]]
        removed = [n for n in old if n not in new or old[n] is not new[n]]
        self.backends = new
        self._index_models()
        policy = self.policy
        for name in removed:
            policy.backend_removed(old[name])
        for name in added:
            policy.backend_added(new[name])
        for backend in resized:
            policy.capacity_changed(backend)
        return added, removed

    def _index_models(self) -> None:
        by_model: dict[str, list[Backend]] = {}
        for backend in self.backends.values():
            for model in backend.models:
                by_model.setdefault(model, []).append(backend)
        self.by_model = by_model

    def set_policy(self, policy: Policy) -> None:
        """A new policy (reload): it learns the current backends from scratch."""
        self.policy = policy
        for backend in self.backends.values():
            policy.backend_added(backend)

    # -- changes the health checker reports ---------------------------------------------------
    def ejected(self, backend: Backend) -> None:
        """``backend`` was just marked unhealthy (its cache is presumed gone)."""
        if backend.kv_view is not None:
            backend.kv_view.reset()  # a restarted engine's seq starts over: listen afresh
        backend.timing.reset()  # and so do its counters
        self.policy.backend_ejected(backend)

    def readmitted(self, backend: Backend) -> None:
        """``backend`` is healthy again. What was learned of its capacity is forgotten: it
        may have restarted with other settings (the next health round learns it again)."""
        self.set_learned_capacity(backend, None)
        self.policy.backend_readmitted(backend)

    def set_learned_capacity(self, backend: Backend, tokens: int | None) -> None:
        before = backend.capacity_tokens
        backend.learned_capacity_tokens = tokens
        if backend.capacity_tokens != before:
            self.policy.capacity_changed(backend)

    def set_served_models(self, backend: Backend, names: Iterable[str]) -> bool:
        """Names the engine serves (from its /v1/models), after the configured one; returns
        whether they changed."""
        models = (backend.model,) + tuple(dict.fromkeys(n for n in names if n != backend.model))
        if models == backend.models:
            return False
        backend.models = models
        if self.backends.get(backend.name) is backend:
            self._index_models()
        return True

    def healthy_models(self) -> list[str]:
        return sorted(m for m, bs in self.by_model.items() if any(b.healthy for b in bs))
