"""The router's aiohttp application: parse once, choose an engine, proxy bytes, observe.

The request body is parsed once (``json.loads``) only to read what routing needs and is
forwarded as the original bytes; the engine's response is streamed back chunk by chunk as it
arrives, never re-encoded. A request is retried on another engine only while nothing has
reached the client yet (connect error, timeout before the first byte, 502/503/504).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypedDict, Unpack

import aiohttp
from aiohttp import web

from .backends import Backend, BackendPool
from .config import RouterConfig, RouterConfigError, load_api_keys, load_config
from .health import HealthMonitor
from .policies import Policy, RouteRequest, make_policy
from .telemetry import RouterMetrics
from .upstream import UpstreamClient, UpstreamPool

log = logging.getLogger("stackctl.router")

RETRYABLE_STATUS = frozenset((502, 503, 504))
ENGINE_HEADER = "x-stackctl-engine"
_PASS_BACK = ("content-type", "content-encoding", "cache-control")
# What an UpstreamClient raises: connection refused/reset, TLS and DNS failures (OSError),
# UpstreamError (a ConnectionError: closed early, malformed answer) and timeouts.
_UPSTREAM_ERRORS = (OSError, asyncio.TimeoutError)


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


class _ErrorFields(TypedDict, total=False):
    """The optional keywords of :func:`error_response`, for helpers that pass them on."""

    type_: str
    code: str | None
    param: str | None
    headers: dict[str, str] | None


# Any: the router is indifferent to a client's response type; each client's request and
# release agree on it (UpstreamPool's is UpstreamConnection).
AnyUpstreamClient = UpstreamClient[Any]


class Router:
    """Routing state shared by the handlers; swapped in place on reload."""

    def __init__(
        self,
        config: RouterConfig,
        config_path: str | None = None,
        api_keys: tuple[bytes, ...] | None = None,
        upstream_factory: Callable[[float, float], AnyUpstreamClient] = UpstreamPool,
    ):
        self.config_path = config_path
        self.config = config
        self.pool = BackendPool(config, make_policy(config.policy, config.policy_options))
        self.api_keys = api_keys if api_keys is not None else load_api_keys(config.api_keys_file)
        self.metrics = RouterMetrics(weakref.ref(self.pool), lambda: self.pool.policy.name)
        self.session: aiohttp.ClientSession | None = None  # health checks
        # The proxy's client, built at start from (connect_s, first_byte_s); benchmarks swap it.
        self.upstream_factory = upstream_factory
        self.upstream: AnyUpstreamClient | None = None
        self.health: HealthMonitor | None = None

    @property
    def policy(self) -> Policy:
        return self.pool.policy

    # -- lifecycle -------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        # Body size is enforced in the handler (413 as OpenAI JSON, reloadable limit).
        app = web.Application(client_max_size=2**62)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.completions),
                web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health_endpoint),
                web.get("/metrics", self.metrics_endpoint),
                web.get("/engines", self.engines_endpoint),
            ]
        )
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.upstream = self.upstream_factory(
            self.config.timeouts.connect_s, self.config.timeouts.first_byte_s
        )
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.health = HealthMonitor(
            self.pool, self.config.health, self.session, on_change=self._health_changed
        )
        self.health.start()

    async def _stop(self, app: web.Application) -> None:
        if self.health:
            await self.health.stop()
        if self.session:
            await self.session.close()
        if self.upstream:
            self.upstream.close()

    def _health_changed(self, engine: Backend) -> None:
        self.metrics.health_changed(engine.name, engine.healthy)

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP). In-flight requests are untouched."""
        if not self.config_path:
            return False
        try:
            config = load_config(self.config_path)
            keys = load_api_keys(config.api_keys_file)
        except RouterConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        self.apply(config, keys)
        return True

    def apply(self, config: RouterConfig, api_keys: tuple[bytes, ...]) -> None:
        if (config.host, config.port) != (self.config.host, self.config.port):
            log.warning(
                "listen address changes need a restart; keeping %s:%s",
                self.config.host,
                self.config.port,
            )
        added, removed = self.pool.update(config)
        if (config.policy, config.policy_options) != (
            self.config.policy,
            self.config.policy_options,
        ):
            # A new policy starts with no state (kv_aware's hashes depend on its options).
            self.pool.set_policy(make_policy(config.policy, config.policy_options))
        self.api_keys = api_keys
        if self.upstream:
            self.upstream.connect_s = config.timeouts.connect_s
            self.upstream.read_s = config.timeouts.first_byte_s
        if self.health:
            self.health.config = config.health
        self.config = config
        log.info(
            "reloaded: policy %s, %d engines (added %s, removed %s)",
            config.policy,
            len(self.pool.backends),
            added or "none",
            removed or "none",
        )

    # -- helpers ---------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        keys = self.api_keys
        if not keys:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = token.strip().encode()
        ok = False
        for key in keys:  # compare with every key: time does not reveal which one matched
            ok |= hmac.compare_digest(presented, key)
        return ok

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or None when it exceeds max_body_bytes."""
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None:
            if length > limit:
                return None
            return await request.read()
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)

    # -- handlers --------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        if not self._authorized(request):
            return self._reject(
                401,
                "Invalid or missing API key (expected 'Authorization: Bearer <key>').",
                code="invalid_api_key",
                type_="authentication_error",
            )
        body = await self._read_body(request)
        if body is None:
            return self._reject(
                413,
                f"Request body exceeds {self.config.max_body_bytes} bytes.",
                code="request_too_large",
            )
        try:
            payload: Any = json.loads(body)
        except ValueError as exc:  # includes UnicodeDecodeError
            return self._reject(400, f"Request body is not valid JSON: {exc}", code="invalid_json")
        if not isinstance(payload, dict):
            return self._reject(400, "Request body must be a JSON object.", code="invalid_json")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return self._reject(
                400, "You must provide a model parameter.", param="model", code="missing_model"
            )
        engines = self.pool.by_model.get(model)
        if engines is None:
            return self._reject(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
        route = RouteRequest(payload, request.headers)
        tried: list[Backend] = []
        attempts = 1 + self.config.retries
        last_reason = None
        policy = self.pool.policy
        for attempt in range(attempts):
            candidates = [e for e in engines if e.healthy and e not in tried]
            if not candidates:
                break
            choice = policy.choose(candidates, route)
            engine = choice.backend
            tried.append(engine)
            self.metrics.routed(
                engine.name, choice.predicted_cached_tokens, choice.prompt_tokens_estimate
            )
            final = attempt == attempts - 1 or len(candidates) == 1
            response, last_reason = await self._forward(request, engine, body, started, final)
            if response is not None:
                return response
            self.metrics.retried(engine.name, last_reason or "error")
        if not tried:
            return self._reject(
                503,
                f"No healthy engine serves model `{model}`.",
                type_="service_unavailable",
                code="no_healthy_engine",
            )
        return self._reject(
            502,
            f"All {len(tried)} attempt(s) failed; last: {last_reason}.",
            type_="upstream_error",
            code="upstream_unavailable",
        )

    def _reject(self, status: int, message: str, **kw: Unpack[_ErrorFields]) -> web.Response:
        self.metrics.finished("none", status, None, 0.0)
        return error_response(status, message, **kw)

    async def _forward(
        self, request: web.Request, engine: Backend, body: bytes, started: float, final: bool
    ) -> tuple[web.StreamResponse | None, str | None]:
        """One attempt. Returns (response, None) when the client got an answer, or
        (None, reason) when nothing reached the client and another engine may be tried."""
        engine.inflight += 1
        upstream = None
        status = 499  # the client went away, unless replaced below
        ttft = None
        pool, health = self.upstream, self.health
        assert pool is not None and health is not None  # made by _start, before any request
        try:
            try:
                upstream = await pool.request(engine.url, request.path, body)
                if upstream.status in RETRYABLE_STATUS and not final:
                    status = upstream.status
                    return None, f"HTTP {upstream.status} from {engine.name}"
                first = await upstream.read(pool.read_s)
            except _UPSTREAM_ERRORS as exc:
                reason = f"{type(exc).__name__} from {engine.name}"
                health.request_failed(engine, reason)
                status = 502
                return None, reason

            up_headers = upstream.headers
            headers = {k: up_headers[k] for k in _PASS_BACK if k in up_headers}
            headers[ENGINE_HEADER] = engine.name
            status = upstream.status
            if upstream.complete:  # the whole answer is here: one write, no chunking
                response: web.StreamResponse = web.Response(
                    status=status, body=first, headers=headers
                )
                ttft = time.perf_counter() - started
                engine.served += 1
                return response, None
            response = web.StreamResponse(status=status, headers=headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if first:
                await response.write(first)
            ttft = time.perf_counter() - started
            read, timeout = upstream.read, pool.read_s
            try:
                while chunk := await read(timeout):
                    await response.write(chunk)
            except _UPSTREAM_ERRORS as exc:
                # Too late to retry: bytes already reached the client. Cut the connection so
                # the client sees a broken stream rather than a clean, truncated answer.
                health.request_failed(engine, f"{type(exc).__name__} mid-stream")
                status = 502
                if request.transport is not None:
                    request.transport.close()
                return response, None
            await response.write_eof()
            engine.served += 1
            return response, None
        finally:
            engine.inflight -= 1
            if upstream is not None:
                pool.release(upstream, engine.url)  # closes it unless read to the end
            self.metrics.finished(engine.name, status, ttft, time.perf_counter() - started)

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return error_response(
                401, "Invalid or missing API key.", "authentication_error", "invalid_api_key"
            )
        now = int(time.time())
        data = [
            {"id": m, "object": "model", "created": now, "owned_by": "stackctl"}
            for m in self.pool.healthy_models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def health_endpoint(self, request: web.Request) -> web.Response:
        models = self.pool.healthy_models()
        if not models:
            return error_response(
                503, "No healthy engine.", "service_unavailable", "no_healthy_engine"
            )
        return web.json_response({"status": "ok", "models": models})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def engines_endpoint(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        out = []
        policy = self.pool.policy
        for e in self.pool.backends.values():
            out.append(
                {
                    "name": e.name,
                    "url": e.url,
                    "model": e.model,
                    "models": list(e.models),
                    "healthy": e.healthy,
                    "inflight": e.inflight,
                    "served": e.served,
                    "failures": e.failures,
                    "last_error": e.last_error,
                    "retry_in_s": None if e.healthy else round(max(0.0, e.retry_at - now), 3),
                    "cache_capacity_tokens": e.capacity_tokens,
                    **policy.describe(e),
                }
            )
        return web.json_response({"policy": policy.name, "engines": out})
