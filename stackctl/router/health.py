"""Active health checks and passive ejection with exponential backoff.

An engine is ejected after ``failures_to_eject`` consecutive failed checks, or at once when a
proxied request hits a connection error or timeout (the request itself is retried elsewhere).
An ejected engine is not probed again before ``backoff_s * 2**(ejections-1)`` (capped at
``max_backoff_s``) has passed; the first successful probe after that re-admits it. Ejection
and re-admission go through the backend pool, which tells the policy (kv_aware forgets the
engine's prefix index: a restarted engine comes back with a cold cache).

A healthy engine is also asked what it serves (``/v1/models``): every name it lists (vLLM's
``--served-model-name a b``, or names added by extra flags) is routed to it, besides the
configured model. Its KV capacity is read from ``/metrics`` once after each admission.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable

import aiohttp

from .backends import Backend, BackendPool
from .config import HealthConfig

log = logging.getLogger("stackctl.router.health")

_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def capacity_from_metrics(text: str) -> int | None:
    """GPU KV capacity in tokens (num_gpu_blocks x block_size) from vLLM's /metrics text."""
    match = _CACHE_INFO.search(text)
    if not match:
        return None
    labels = dict(_LABEL.findall(match.group(1)))
    try:
        blocks, block_size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return blocks * block_size if blocks > 0 and block_size > 0 else None


def served_models(body: bytes) -> list[str] | None:
    """Model ids from an OpenAI ``/v1/models`` answer, or None when it is not one."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):  # not JSON (incl. bad UTF-8), or not an object
        return None
    if not isinstance(data, list):
        return None
    return [
        m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]
    ]


class HealthMonitor:
    """Keeps ``Backend.healthy`` (and its served names) true to what the engines answer."""

    def __init__(
        self,
        pool: BackendPool,
        config: HealthConfig,
        session: aiohttp.ClientSession,
        on_change: Callable[[Backend], None] | None = None,
    ):
        self.pool = pool
        self.config = config
        self.session = session
        self.on_change = on_change  # callback(engine) when health flips, for metrics/logs
        self._task: asyncio.Task[None] | None = None

    # -- passive -----------------------------------------------------------------------
    def request_failed(self, engine: Backend, reason: str) -> None:
        """A proxied request could not reach the engine: eject it now."""
        engine.last_error = reason
        if engine.healthy:
            self._eject(engine, reason)

    def request_succeeded(self, engine: Backend) -> None:
        engine.failures = 0

    # -- active ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.check_all()
            except Exception:  # never let one bad round stop health checking
                log.exception("health check round failed")
            await asyncio.sleep(max(0.0, self.config.interval_s - (time.monotonic() - started)))

    async def check_all(self) -> None:
        now = time.monotonic()
        due = [e for e in self.pool.backends.values() if e.healthy or now >= e.retry_at]
        if due:
            await asyncio.gather(*(self.check(e) for e in due))

    async def check(self, engine: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self.session.get(engine.url + "/health", timeout=timeout) as resp:
                await resp.read()
                ok = resp.status == 200
                reason = f"health returned HTTP {resp.status}"
            if ok:
                await self._learn_models(engine, timeout)
            if ok and engine.capacity_tokens is None:
                await self._learn_capacity(engine, timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok, reason = False, f"health check failed: {type(exc).__name__} {exc}".strip()
        if ok:
            self._succeeded(engine)
        else:
            self._failed(engine, reason)

    async def _learn_models(self, engine: Backend, timeout: aiohttp.ClientTimeout) -> None:
        """Route every name the engine lists; keep what was known when it does not answer."""
        try:
            async with self.session.get(engine.url + "/v1/models", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return
        names = served_models(body)
        if names is not None and self.pool.set_served_models(engine, names):
            log.info("engine %s serves %s", engine.name, ", ".join(engine.models))

    async def _learn_capacity(self, engine: Backend, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with self.session.get(engine.url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return
        capacity = capacity_from_metrics(text)
        if capacity:
            self.pool.set_learned_capacity(engine, capacity)
            log.info("engine %s: learned KV capacity %d tokens", engine.name, capacity)

    # -- state changes -------------------------------------------------------------------
    def _succeeded(self, engine: Backend) -> None:
        engine.failures = 0
        now = time.monotonic()
        if not engine.healthy:
            engine.healthy = True
            engine.healthy_since = now
            self.pool.readmitted(engine)  # forgets the learned capacity: may have restarted
            log.warning("engine %s re-admitted", engine.name)
            self._changed(engine)
        elif engine.ejections and now - engine.healthy_since >= self.config.max_backoff_s:
            engine.ejections = 0  # stable again: the next ejection starts a fresh backoff

    def _failed(self, engine: Backend, reason: str) -> None:
        engine.last_error = reason
        engine.failures += 1
        if engine.healthy and engine.failures >= self.config.failures_to_eject:
            self._eject(engine, reason)
        elif not engine.healthy:
            self._schedule_retry(engine)

    def _eject(self, engine: Backend, reason: str) -> None:
        engine.healthy = False
        engine.ejections += 1
        self.pool.ejected(engine)
        self._schedule_retry(engine)
        log.warning(
            "engine %s ejected (%s); next probe in %.1fs",
            engine.name,
            reason,
            engine.retry_at - time.monotonic(),
        )
        self._changed(engine)

    def _schedule_retry(self, engine: Backend) -> None:
        exponent = max(0, engine.ejections - 1) + max(0, engine.failures - 1)
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** min(exponent, 30))
        engine.retry_at = time.monotonic() + delay

    def _changed(self, engine: Backend) -> None:
        if self.on_change is not None:
            self.on_change(engine)
