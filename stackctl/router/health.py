"""Active health checks and passive ejection with exponential backoff.

An engine is ejected after ``failures_to_eject`` consecutive failures: failed health checks
and proxied requests that could not reach it, died with it or got a broken answer
(``upstream.Failure.counted``); a success resets the count. A request that timed out after it
was sent (a slow answer) is no failure: it asks for a health check now, and only a failed
check ejects. The router's own shortages (EMFILE and kin, here or on the proxy path) never
count. When an engine is ejected, the requests on it that have sent nothing to their client
yet are cut short and fail over (``Backend.cut_waiting``). An ejected engine is not probed
again before ``backoff_s * 2**(ejections-1)`` (capped at ``max_backoff_s``) has passed; the
first successful probe after that re-admits it. Ejection and re-admission go through the
backend pool, which tells the policy (kv_aware forgets the engine's prefix index: a restarted
engine comes back with a cold cache).

A healthy engine is also asked what it serves (``/v1/models``): every name it lists (vLLM's
``--served-model-name a b``, or names added by extra flags) is routed to it, besides the
configured model. Its KV capacity is read from ``/metrics`` once after each admission; with a
policy that prices requests in seconds (cost), its prefill counters every round.
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
from .timing import timing_sample
from .upstream import local_resource_error

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
        self._soon: dict[Backend, asyncio.Task[None]] = {}  # checks asked for by check_soon
        self._local_logged = 0.0  # when a local shortage was last logged (rate limit)
        self.engine_key: str | None = None  # the engines' API key (for /v1/models), set by Router

    # -- passive -----------------------------------------------------------------------
    def request_failed(self, engine: Backend, reason: str) -> None:
        """A proxied request could not reach the engine, died there or got a broken answer:
        one more consecutive failure (``failures_to_eject`` of them eject). Once the engine is
        out, the other requests it had in flight fail with it: one outage, so they neither
        count again nor push its next probe further back (supervisord restarts a killed engine
        in a fraction of a second; its readmission must not wait for a backoff per request)."""
        if not engine.healthy:
            engine.last_error = reason
            return
        self._failed(engine, reason)

    def request_succeeded(self, engine: Backend) -> None:
        engine.failures = 0

    def request_timed_out(self, engine: Backend, reason: str) -> None:
        """A request sent to the engine timed out: no failure by itself (a slow answer is not
        a dead engine), but the engine is checked now rather than at the next round."""
        engine.last_error = reason
        self.check_soon(engine)

    def local_shortage(self, what: str, exc: BaseException) -> None:
        """The router is out of file descriptors or memory: logged (at most every 10 s),
        counted against no engine."""
        now = time.monotonic()
        if now - self._local_logged >= 10.0:
            self._local_logged = now
            log.warning("router out of resources (%s): %s; no engine is blamed", what, exc)

    def check_soon(self, engine: Backend) -> None:
        """Check ``engine`` now (one check at a time per engine)."""
        if engine in self._soon or not engine.healthy:
            return  # a check is under way, or the engine is ejected (probed on its backoff)
        task = asyncio.get_running_loop().create_task(self.check(engine))
        self._soon[engine] = task
        task.add_done_callback(lambda _: self._soon.pop(engine, None))

    # -- active ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in list(self._soon.values()):
            task.cancel()
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
            if ok and (refused := await self._learn_models(engine, timeout)):
                ok, reason = False, refused
            if ok and (engine.capacity_tokens is None or self.pool.policy.uses_timing):
                await self._read_metrics(engine, timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if local_resource_error(exc):  # our EMFILE says nothing about the engine
                self.local_shortage(f"health check of {engine.name}", exc)
                return
            ok, reason = False, f"health check failed: {type(exc).__name__} {exc}".strip()
        if ok:
            self._succeeded(engine)
        else:
            self._failed(engine, reason)

    async def _learn_models(self, engine: Backend, timeout: aiohttp.ClientTimeout) -> str | None:
        """Route every name the engine lists; keep what was known when it does not answer.
        Returns why the engine is unusable when it refuses the engine key (401/403): every
        request would fail there, so the check fails (and /engines says why)."""
        headers = {"Authorization": f"Bearer {self.engine_key}"} if self.engine_key else None
        try:
            async with self.session.get(
                engine.url + "/v1/models", timeout=timeout, headers=headers
            ) as resp:
                if resp.status in (401, 403):
                    return (
                        f"engine refused the router's engine key (HTTP {resp.status} on /v1/models)"
                    )
                if resp.status != 200:
                    return None
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        names = served_models(body)
        if names is not None and self.pool.set_served_models(engine, names):
            log.info("engine %s serves %s", engine.name, ", ".join(engine.models))
        return None

    async def _read_metrics(self, engine: Backend, timeout: aiohttp.ClientTimeout) -> None:
        """Its KV capacity when not known yet; its prefill counters each round when the
        policy prices requests in seconds (``stackctl.router.timing``)."""
        try:
            async with self.session.get(engine.url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return
        if engine.capacity_tokens is None:
            capacity = capacity_from_metrics(text)
            if capacity:
                self.pool.set_learned_capacity(engine, capacity)
                log.info("engine %s: learned KV capacity %d tokens", engine.name, capacity)
        if self.pool.policy.uses_timing and (sample := timing_sample(text)) is not None:
            engine.timing.observe(time.monotonic(), sample)

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
        cut = engine.cut_waiting()  # its requests that sent nothing yet fail over
        log.warning(
            "engine %s ejected (%s); %d waiting request(s) failing over; next probe in %.1fs",
            engine.name,
            reason,
            cut,
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
