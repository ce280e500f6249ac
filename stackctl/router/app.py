"""The router's aiohttp application: parse once, choose an engine, proxy bytes, observe.

The request body is parsed once (``json.loads``) only to read what routing needs and is
forwarded as the original bytes; the engine's response is streamed back chunk by chunk as it
arrives, never re-encoded.

Failure semantics (``_forward``; docs/architecture.md, "Router internals"). A request is tried
on another engine only while nothing has reached its client, and only when the engine cannot
be doing its work: the connection failed (refused, unreachable, connect timeout), the engine
closed or reset it before any byte of its answer (it died, the work with it), it answered 502
or 503 (it refused the work; on the last attempt that answer is passed on), or it was ejected
while the request waited (its connection is closed, so the engine drops the work when it runs
again). A timeout after the request was sent is never retried elsewhere (the engine has the
work): the client gets 504 and the engine is health-checked at once; only a failed check, or
``failures_to_eject`` consecutive failures, ejects it. EMFILE and other shortages of the
router's own answer 503 with Retry-After and are counted against no engine. After the first
byte reached the client, a failure cuts the client's connection (a broken, not a truncated,
answer); a stuck stream is cut after ``chunk_gap_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypedDict, Unpack

import aiohttp
from aiohttp import web

from .admission import Admission, Client, Refusal, completion_tokens
from .backends import Backend, BackendPool
from .config import (
    DEFAULT_CLIENT,
    RouterConfig,
    RouterConfigError,
    load_client_keys,
    load_config,
    load_engine_key,
    load_tokenizer,
)
from .health import HealthMonitor
from .kv_index import KvEvents
from .listener import Handler, Listener, deadlines
from .policies import Policy, RouteRequest, make_policy
from .requests import BadRequest, echo, parse_body, unreadable_body
from .telemetry import RouterMetrics
from .upstream import Failure, UpstreamClient, UpstreamPool, classify

log = logging.getLogger("stackctl.router")

# The engine refused the work (overloaded, starting, draining): another engine may take it.
RETRYABLE_STATUS = frozenset((502, 503))
ENGINE_HEADER = "x-stackctl-engine"
CHAT_PATH = "/v1/chat/completions"
# Bodies up to this size are tokenized with the model's tokenizer on the event loop (about
# 4k tokens: well under a millisecond); larger ones in a worker thread, not to stall the loop.
TOKENIZE_INLINE_BYTES = 16 * 1024
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


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx (no such path, a method the path does not take) as OpenAI errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not 400 <= exc.status < 500:
            raise
        allow = exc.headers.get("Allow")
        return error_response(
            exc.status,
            f"{exc.reason} ({request.method} {echo(request.path)})",
            headers={"Allow": allow} if allow is not None else None,
        )


def _wait(gap: float, deadline: float) -> float:
    """The next read's timeout: the chunk gap, or less when the total deadline is nearer."""
    return max(0.0, min(gap, deadline - time.perf_counter()))


def _failure_reason(
    engine: Backend, exc: BaseException, failure: Failure, waited: str, deadline: float
) -> str:
    """``<kind> at <engine>: <detail>`` (the first word labels router_retries)."""
    if failure is Failure.TIMEOUT:
        which = "total_s" if time.perf_counter() >= deadline - 0.001 else waited
        return f"timeout at {engine.name}: no answer within {which}"
    return f"{failure.value} at {engine.name}: {type(exc).__name__} {exc}".strip()


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
        api_keys: tuple[bytes | tuple[str, bytes], ...] | None = None,
        upstream_factory: Callable[[float, float], AnyUpstreamClient] = UpstreamPool,
    ):
        self.config_path = config_path
        self.config = config
        self.pool = BackendPool(
            config, make_policy(config.policy, config.policy_options, config.kv_index)
        )
        # (client name, key): the keys file's names; a bare key is the client "default"
        self.api_keys = _named(
            api_keys if api_keys is not None else load_client_keys(config.api_keys_file)
        )
        self.engine_key = load_engine_key(config.engine_key_file)  # sent to every engine
        self.tokenizer = load_tokenizer(config.tokenizer_dir)  # the model's, for token ids
        self.metrics = RouterMetrics(weakref.ref(self.pool), lambda: self.pool.policy.name)
        self.admission = Admission(
            config.admission,
            config.clients,
            self.api_keys,
            on_write_timeout=self.metrics.write_timed_out,
        )
        self.session: aiohttp.ClientSession | None = None  # health checks
        self.listener: Listener | None = None  # set by listener.start_listener (caps, deadlines)
        # The proxy's client, built at start from (connect_s, first_byte_s); benchmarks swap it.
        self.upstream_factory = upstream_factory
        self.upstream: AnyUpstreamClient | None = None
        self.health: HealthMonitor | None = None
        self.kv_events: KvEvents | None = None  # subscribers to the engines' KV events

    @property
    def policy(self) -> Policy:
        return self.pool.policy

    # -- lifecycle -------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        # Body size is enforced in the handler (413 as OpenAI JSON, reloadable limit).
        # deadlines: the listener's head/body read deadlines (listener.py), a no-op elsewhere
        app = web.Application(client_max_size=2**62, middlewares=[deadlines, openai_errors])
        app.add_routes(
            [
                web.post(CHAT_PATH, self.completions),
                web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health_endpoint),
                web.get("/metrics", self.metrics_endpoint),
                web.get("/engines", self.engines_endpoint),
                web.get("/clients", self.clients_endpoint),
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
        self._set_engine_key(self.engine_key)
        self.health.start()
        self.admission.start()
        self.kv_events = KvEvents()
        self.kv_events.sync(self.pool.backends.values())

    async def _stop(self, app: web.Application) -> None:
        if self.kv_events:
            await self.kv_events.stop()
        await self.admission.stop()
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
            keys = load_client_keys(config.api_keys_file)
            engine_key = load_engine_key(config.engine_key_file)
            tokenizer = (
                self.tokenizer
                if config.tokenizer_dir == self.config.tokenizer_dir
                else load_tokenizer(config.tokenizer_dir)
            )
        except RouterConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        self.tokenizer = tokenizer
        self.apply(config, keys)
        self._set_engine_key(engine_key)
        return True

    def _set_engine_key(self, key: str | None) -> None:
        """The key the engines require, for proxied requests and health checks alike."""
        self.engine_key = key
        if self.upstream:
            self.upstream.engine_key = key
        if self.health:
            self.health.engine_key = key

    def apply(self, config: RouterConfig, api_keys: tuple[bytes | tuple[str, bytes], ...]) -> None:
        if (config.host, config.port) != (self.config.host, self.config.port):
            log.warning(
                "listen address changes need a restart; keeping %s:%s",
                self.config.host,
                self.config.port,
            )
        added, removed = self.pool.update(config)
        if self.kv_events:
            self.kv_events.sync(self.pool.backends.values())
        if (config.policy, config.policy_options, config.kv_index) != (
            self.config.policy,
            self.config.policy_options,
            self.config.kv_index,
        ):
            # A new policy starts with no state (kv_aware's hashes depend on its options).
            self.pool.set_policy(make_policy(config.policy, config.policy_options, config.kv_index))
        self.api_keys = _named(api_keys)
        self.admission.update(config.admission, config.clients, self.api_keys)
        if self.upstream:
            self.upstream.connect_s = config.timeouts.connect_s
            self.upstream.read_s = config.timeouts.first_byte_s
        if self.listener:
            self.listener.update(config)
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
        return self._client(request) is not None

    def _client(self, request: web.Request) -> Client | None:
        """The named client whose key the request carries (constant time against every key),
        None without a valid one; the client ``default`` when the router has no keys."""
        return self.admission.authenticate(request.headers.get("Authorization", ""))

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or None when it exceeds max_body_bytes."""
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None:
            if length > limit:
                return None
            if "Content-Encoding" not in request.headers:  # else it is the compressed length
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
        client = self._client(request)
        if client is None:
            return self._reject(
                401,
                "Invalid or missing API key (expected 'Authorization: Bearer <key>').",
                code="invalid_api_key",
                type_="authentication_error",
            )
        # Admission (admission.py): the in-flight caps and requests/s before the body is read,
        # the prompt cap and tokens/min once it is parsed; the slots are freed in the finally.
        length = request.content_length
        reserve = (
            self.config.max_body_bytes
            if length is None
            else min(length, self.config.max_body_bytes)
        )
        if (refused := self.admission.enter(client, request, reserve)) is not None:
            return self._refuse(client, refused)
        try:
            response = await self._admitted(request, client, started)
            if not response.prepared:  # written here, under the write timeout, not after it
                with contextlib.suppress(ConnectionError):  # the client left: nothing to do
                    await response.prepare(request)
                    await response.write_eof()
            return response
        finally:
            self.admission.leave(request)

    async def _admitted(
        self, request: web.Request, client: Client, started: float
    ) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
        except web.RequestPayloadError as exc:  # a broken chunked or compressed body
            bad = unreadable_body(exc)
            return self._reject(bad.status, bad.message, code=bad.code)
        if body is None:
            return self._reject(
                413,
                f"Request body exceeds {self.config.max_body_bytes} bytes.",
                code="request_too_large",
            )
        try:
            parsed = parse_body(body, chat=request.path == CHAT_PATH)
        except BadRequest as exc:
            return self._reject(exc.status, exc.message, param=exc.param, code=exc.code)
        model = parsed.model
        engines = self.pool.by_model.get(model)
        if engines is None:
            return self._reject(
                404,
                f"The model `{echo(model)}` does not exist.",
                param="model",
                code="model_not_found",
            )
        route = RouteRequest(parsed.payload, request.headers, self.tokenizer)
        if (
            self.tokenizer is not None
            and len(body) > TOKENIZE_INLINE_BYTES
            and self.pool.policy.wants_token_ids
        ):  # tokenizers releases the GIL as it encodes
            await asyncio.get_running_loop().run_in_executor(None, route.prepare_token_ids)
        if self.admission.needs_prompt(client):
            refused = self.admission.charge(
                client,
                len(route.prompt),
                completion_tokens(parsed.payload),
                request,
                "messages" if request.path == CHAT_PATH else "prompt",
            )
            if refused is not None:
                return self._refuse(client, refused)
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
            response, last_reason = await self._forward(
                request, engine, body, started, final, parsed.stream, choice.uncached_tokens
            )
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

    def _refuse(self, client: Client, refusal: Refusal) -> web.Response:
        """An admission refusal: counted by client name and reason (never the key)."""
        self.metrics.refused(client.name, refusal.reason)
        return self._reject(
            refusal.status,
            refusal.message,
            type_=refusal.type,
            code=refusal.code,
            param=refusal.param,
            headers=refusal.headers(),
        )

    def _reject(self, status: int, message: str, **kw: Unpack[_ErrorFields]) -> web.Response:
        self.metrics.finished("none", status, None, 0.0)
        return error_response(status, message, **kw)

    async def _forward(
        self,
        request: web.Request,
        engine: Backend,
        body: bytes,
        started: float,
        final: bool,
        stream: bool = False,
        prefill_tokens: float = 0.0,
    ) -> tuple[web.StreamResponse | None, str | None]:
        """One attempt. Returns (response, None) when the client got an answer, or
        (None, reason) when nothing reached the client and another engine may be tried.

        What is tried again elsewhere (module docstring): the engine never saw the request,
        died before answering, answered 502/503 (not on the final attempt), or was ejected
        while this request had sent nothing to the client. Timeouts: ``first_byte_s`` to the
        head of a streamed answer; a non-streamed one sends its head with its end, so only
        ``total_s`` bounds that wait; then ``chunk_gap_s`` between body pieces and ``total_s``
        for the whole answer (from the request's arrival). ``prefill_tokens`` (what the
        policy predicts the engine computes for this request) count in the engine's
        ``queued_tokens`` until the first byte of its answer is back."""
        engine.inflight += 1
        engine.queued_tokens += prefill_tokens
        upstream = None
        status = 499  # the client went away, unless replaced below
        ttft = None
        pool, health = self.upstream, self.health
        assert pool is not None and health is not None  # made by _start, before any request
        timeouts = self.config.timeouts
        deadline = started + timeouts.total_s  # perf_counter time
        gap = timeouts.chunk_gap_s
        waited = "first_byte_s" if stream else "total_s"  # the timeout a TimeoutError means
        try:
            try:
                # An ejection of the engine expires this scope (Backend.cut_waiting).
                async with asyncio.timeout(None) as scope:
                    engine.waiting.add(scope)
                    try:
                        left = deadline - time.perf_counter()
                        head = min(timeouts.first_byte_s, left) if stream else left
                        upstream = await pool.request(engine.url, request.path, body, head)
                        waited = "chunk_gap_s"
                        if upstream.status in RETRYABLE_STATUS and not final:
                            status = upstream.status
                            return None, f"HTTP {upstream.status} from {engine.name}"
                        first = await upstream.read(_wait(gap, deadline))
                        engine.queued_tokens -= prefill_tokens  # prefilled: first token is here
                        prefill_tokens = 0.0
                    finally:
                        engine.waiting.discard(scope)
            except TimeoutError as exc:
                if scope.expired():  # cut by the ejection: nothing reached the client
                    status = 502
                    return None, f"ejected {engine.name} while the request waited"
                answer, reason = self._upstream_failed(engine, exc, waited, deadline)
                status = answer.status if answer is not None else 502
                return answer, reason
            except _UPSTREAM_ERRORS as exc:
                answer, reason = self._upstream_failed(engine, exc, waited, deadline)
                status = answer.status if answer is not None else 502
                return answer, reason

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
                health.request_succeeded(engine)
                return response, None
            response = web.StreamResponse(status=status, headers=headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if first:
                await response.write(first)
            ttft = time.perf_counter() - started
            read = upstream.read
            while True:
                try:
                    chunk = await read(_wait(gap, deadline))
                except _UPSTREAM_ERRORS as exc:
                    # Too late to retry: bytes already reached the client. Cut the connection
                    # so the client sees a broken stream rather than a clean, truncated answer.
                    failure = classify(exc)
                    reason = _failure_reason(engine, exc, failure, "chunk_gap_s", deadline)
                    reason += " mid-answer"
                    if failure is Failure.TIMEOUT:  # a stuck stream: no failure by itself
                        health.request_timed_out(engine, reason)
                    elif failure.counted:
                        health.request_failed(engine, reason)
                    status = 502
                    if request.transport is not None:
                        request.transport.close()
                    return response, None
                if not chunk:
                    break
                # outside the try: a client that went away is not the engine's failure
                await response.write(chunk)
            await response.write_eof()
            engine.served += 1
            health.request_succeeded(engine)
            return response, None
        finally:
            engine.inflight -= 1
            engine.queued_tokens -= prefill_tokens  # 0 unless it failed before its first byte
            if upstream is not None:
                pool.release(upstream, engine.url)  # closes it unless read to the end
            self.metrics.finished(engine.name, status, ttft, time.perf_counter() - started)

    def _upstream_failed(
        self, engine: Backend, exc: BaseException, waited: str, deadline: float
    ) -> tuple[web.Response | None, str | None]:
        """An attempt failed before any byte reached the client: (None, reason) to try
        another engine, or the client's error answer (504 on a timeout, 503 when the router
        itself is out of resources)."""
        health = self.health
        assert health is not None
        failure = classify(exc)
        reason = _failure_reason(engine, exc, failure, waited, deadline)
        if failure is Failure.LOCAL:
            health.local_shortage(f"connecting to {engine.name}", exc)
            return error_response(
                503,
                "The router is out of resources; retry shortly.",
                "service_unavailable",
                "router_overloaded",
                headers={"Retry-After": "1"},
            ), None
        if failure is Failure.TIMEOUT:  # the engine has the work: it is not run again elsewhere
            health.request_timed_out(engine, reason)
            return error_response(
                504,
                f"The engine did not answer in time ({reason}).",
                "upstream_error",
                "upstream_timeout",
            ), None
        if failure.counted:
            health.request_failed(engine, reason)
        if failure.retried:
            return None, reason
        return error_response(
            502, f"The engine's answer failed ({reason}).", "upstream_error", "upstream_error"
        ), None

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

    def _admin_refused(self, request: web.Request) -> web.Response | None:
        """/metrics and /engines (engine URLs, load, errors) need a client key when the router
        has keys, as /v1/* does; Prometheus sends one with ``authorization: {credentials}``."""
        if self._authorized(request):
            return None
        return error_response(
            401, "Invalid or missing API key.", "authentication_error", "invalid_api_key"
        )

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        if (refused := self._admin_refused(request)) is not None:
            return refused
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def clients_endpoint(self, request: web.Request) -> web.Response:
        """Admission state: caps, and per named client its limits and counters (no key)."""
        if (refused := self._admin_refused(request)) is not None:
            return refused
        return web.json_response(self.admission.describe())

    async def engines_endpoint(self, request: web.Request) -> web.Response:
        if (refused := self._admin_refused(request)) is not None:
            return refused
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
                    "queued_tokens": round(e.queued_tokens),
                    "timing": e.timing.describe(),
                    **policy.describe(e),
                    "kv_events": e.kv_view.describe() if e.kv_view else None,
                }
            )
        return web.json_response({"policy": policy.name, "engines": out})


def _named(keys: tuple[bytes | tuple[str, bytes], ...]) -> tuple[tuple[str, bytes], ...]:
    """Keys as (client name, key); a bare key (tests, older callers) is the client default."""
    return tuple((DEFAULT_CLIENT, k) if isinstance(k, bytes) else k for k in keys)
