"""The simulator's HTTP API: the parts of vLLM's OpenAI-compatible server clients use.

Request bodies are validated the way vLLM does (400 with an OpenAI error object, 404 for an
unknown model). Streams are Server-Sent Events, one ``data: {json}`` event per engine step
per request (several tokens coalesce into one event when the client falls behind, as
vLLM's output collector does), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any, TypedDict

from aiohttp import web

from stackctl.sim.auth import api_key_middleware
from stackctl.sim.config import SimConfig
from stackctl.sim.engine import EngineLoop, SimEngine, SimRequest
from stackctl.sim.timing import TimingModel
from stackctl.sim.vllm_metrics import CONTENT_TYPE, SimMetrics
from stackctl.tokenizer import render_chat, tokenize

if TYPE_CHECKING:
    from stackctl.sim.kv_publisher import KvEventPublisher

try:  # orjson is faster when present; the standard library is enough
    import orjson

    def dumps(value: Any) -> str:
        text: str = orjson.dumps(value).decode()  # typed whether or not mypy sees orjson
        return text

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - depends on the environment
    import json

    def dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def loads(data: bytes) -> Any:
        return json.loads(data)


log = logging.getLogger(__name__)

JsonObject = dict[str, Any]  # a request body or a response, as json parses and dumps them


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    """The ``usage`` object of a completion, as vLLM reports it."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails


CONFIG_KEY = web.AppKey("sim_config", SimConfig)
ENGINE_KEY = web.AppKey("sim_engine", SimEngine)
LOOP_KEY = web.AppKey("sim_loop", EngineLoop)
DRAINING_KEY = web.AppKey("sim_draining", asyncio.Event)  # set on SIGTERM: refuse new work
METRICS_KEY = web.AppKey("sim_metrics", SimMetrics)
PUBLISHER_KEY: web.AppKey[KvEventPublisher] = web.AppKey("sim_kv_publisher")  # KV events on

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered as vLLM does: ``{"error": {message, type, param, code}}``."""

    TYPES = {
        400: "BadRequestError",
        404: "NotFoundError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "BadRequestError"),
                          "param": self.param, "code": self.status}}  # fmt: skip
        return web.Response(status=self.status, text=dumps(body), content_type="application/json")


def create_app(config: SimConfig) -> web.Application:
    middlewares = [api_key_middleware(config.api_keys)] if config.api_keys else []
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app[CONFIG_KEY] = config
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app[DRAINING_KEY] = asyncio.Event()
    app.on_startup.append(_start_engine)
    app.on_shutdown.append(_abort_requests)
    app.on_cleanup.append(_stop_engine)
    return app


def _cache_info(config: SimConfig) -> dict[str, str]:
    """Labels of vllm:cache_config_info, named like vLLM's CacheConfig fields."""
    lm = config.lmcache
    return {
        "block_size": str(config.block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": str(config.enable_prefix_caching),
        "gpu_memory_utilization": str(config.gpu_memory_utilization),
        "num_gpu_blocks": str(config.num_gpu_blocks),
        "num_cpu_blocks": "None",
        "prefix_caching_hash_algo": "builtin",
        "kv_connector": str((config.kv_transfer_config or {}).get("kv_connector")),
        "lmcache_chunk_size": str(lm.chunk_size) if lm else "None",
        "lmcache_max_local_cpu_size": str(lm.max_local_cpu_size) if lm else "None",
    }


async def _start_engine(app: web.Application) -> None:
    config = app[CONFIG_KEY]
    metrics_ = SimMetrics(
        config.served_model_name, _cache_info(config), external_cache=config.lmcache is not None
    )
    timing = TimingModel(config.hardware, config.model_profile, config.tensor_parallel_size)
    publisher = None
    if config.kv_events.active:
        from stackctl.sim.kv_publisher import KvEventPublisher  # zmq only when asked for

        publisher = KvEventPublisher(config.kv_events)
        publisher.start()
        app[PUBLISHER_KEY] = publisher
    engine = SimEngine(
        config.engine_config(),
        timing,
        observer=metrics_,
        kv_events=publisher.events if publisher else None,
    )
    metrics_.refresh(engine)
    loop = EngineLoop(engine, config.time_scale, after_step=publisher.flush if publisher else None)
    metrics_.clock(loop.now)
    loop.start()
    app[METRICS_KEY], app[ENGINE_KEY], app[LOOP_KEY] = metrics_, engine, loop


async def _abort_requests(app: web.Application) -> None:
    """On shutdown, end every request now so their handlers finish instead of timing out."""
    engine_loop = app[LOOP_KEY]
    for req in [*app[ENGINE_KEY].running, *app[ENGINE_KEY].waiting]:
        engine_loop.abort(req)


async def _stop_engine(app: web.Application) -> None:
    await app[LOOP_KEY].stop()
    publisher = app.get(PUBLISHER_KEY)
    if publisher is not None:
        await publisher.close()


# --- Plain endpoints ----------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[DRAINING_KEY].is_set() else 200)


def _refuse_if_draining(request: web.Request) -> None:
    """While shutting down, new requests get 503 before any byte, which routers retry elsewhere."""
    if request.app[DRAINING_KEY].is_set():
        raise ApiError(503, "The engine is shutting down; retry on another engine.")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": "stackctl-sim"})


async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    created = int(time.time())
    data: list[JsonObject] = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": config.model,
            "parent": None,
            "max_model_len": config.max_model_len,
            "permission": [],
        }  # fmt: skip
        for name in config.served_model_names
    ]
    return web.Response(
        text=dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def metrics(request: web.Request) -> web.Response:
    request.app[METRICS_KEY].refresh(request.app[ENGINE_KEY])
    return web.Response(
        body=request.app[METRICS_KEY].render(), headers={"Content-Type": CONTENT_TYPE}
    )


# --- Request parsing ----------------------------------------------------------------------


async def _json_body(request: web.Request) -> JsonObject:
    data = await request.read()
    try:
        body = loads(data)
    except RecursionError:  # the standard library's parser; orjson says ValueError
        raise ApiError(400, "JSON decode error: nested too deeply.") from None
    except ValueError as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from None
    if b"\\u" in data and _has_lone_surrogate(body):
        raise ApiError(400, "JSON decode error: a string holds a lone surrogate (\\ud800-\\udfff).")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string in ``value`` holds an unpaired surrogate escape, which is not text:
    vLLM's JSON parser refuses it (400), as orjson does; the standard library's takes it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _check_messages(body: JsonObject) -> list[JsonObject]:
    """``messages`` as vLLM's request model takes them: a non-empty list of objects with a
    string role and content that is a string, null, or a list of parts (objects with a
    string type, or strings); anything else is a 400, not a rendering error."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of messages.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(
                400, f"messages[{i}] must be an object with a string role.", param="messages"
            )
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
            isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("type"), str))
            for p in content
        ):
            raise ApiError(
                400,
                f"messages[{i}].content must be a string, null or a list of content parts "
                "(objects with a string type, or strings).",
                param="messages",
            )
    return messages


def _check_model(config: SimConfig, body: JsonObject) -> str:
    model = body.get("model")
    if model is None:
        return config.served_model_name
    if not isinstance(model, str) or model not in config.served_model_names:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    return model


def _max_tokens(
    config: SimConfig, body: JsonObject, prompt_len: int, names: tuple[str, ...]
) -> int:
    """The output length: the first of ``names`` given, else what the context has room for."""
    requested, name = None, names[0]
    for key in names:
        if body.get(key) is not None:
            requested, name = body[key], key
            break
    room = config.max_model_len - prompt_len
    if prompt_len > config.max_model_len or (requested is None and room < 1):
        raise ApiError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            param="messages" if "max_completion_tokens" in names else "prompt",
        )
    if requested is None:
        return room
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise ApiError(400, f"{name} must be an integer, got {requested!r}.", param=name)
    if requested < 1:
        raise ApiError(400, f"{name} must be at least 1, got {requested}.", param=name)
    if requested > room:
        raise ApiError(
            400,
            f"'{name}' is too large: {requested}. This model's maximum context length is {config.max_model_len} "
            f"tokens and your request has {prompt_len} input tokens ({requested} > {config.max_model_len} - {prompt_len}).",
            param=name,
        )
    return requested


def _check_common(body: JsonObject) -> tuple[bool, bool]:
    """(stream, include_usage); rejects what the simulator cannot honour."""
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 in the simulator, got {n!r}.", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", param="stream_options")
    if options and not stream:
        raise ApiError(
            400, "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    include_usage = bool(options and options.get("include_usage"))
    return stream, include_usage


def _request_seed(config: SimConfig, body: JsonObject, prompt: str) -> int:
    """A deterministic seed for the filler words: the same request gets the same answer."""
    seed = body.get("seed")
    base = seed if isinstance(seed, int) and not isinstance(seed, bool) else config.seed
    return zlib.crc32(prompt[-256:].encode()) ^ (base & 0xFFFFFFFF)


def _usage(req: SimRequest) -> Usage:
    return {
        "prompt_tokens": req.prompt_len,
        "total_tokens": req.prompt_len + req.output_count,
        "completion_tokens": req.output_count,
        "prompt_tokens_details": {"cached_tokens": req.num_cached_tokens},
    }


# --- Generation ---------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    try:
        _refuse_if_draining(request)
        body = await _json_body(request)
        model = _check_model(config, body)
        messages = _check_messages(body)
        stream, include_usage = _check_common(body)
        prompt = render_chat(messages)
        tokens = tokenize(prompt)
        max_tokens = _max_tokens(config, body, len(tokens), ("max_completion_tokens", "max_tokens"))
    except ApiError as err:
        return err.response()
    req = SimRequest(
        f"chatcmpl-{uuid.uuid4().hex}", tokens, max_tokens, _request_seed(config, body, prompt)
    )
    return await _generate(
        request, req, model, chat=True, stream=stream, include_usage=include_usage
    )


async def completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    try:
        _refuse_if_draining(request)
        body = await _json_body(request)
        model = _check_model(config, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(
                400,
                "prompt must be a string (or a list of exactly one string); batched and token-id prompts "
                "are not supported by the simulator.",
                param="prompt",
            )
        stream, include_usage = _check_common(body)
        tokens = tokenize(prompt)
        if not tokens:
            raise ApiError(400, "The prompt cannot be empty.", param="prompt")
        max_tokens = _max_tokens(config, body, len(tokens), ("max_tokens",))
    except ApiError as err:
        return err.response()
    req = SimRequest(
        f"cmpl-{uuid.uuid4().hex}", tokens, max_tokens, _request_seed(config, body, prompt)
    )
    return await _generate(
        request, req, model, chat=False, stream=stream, include_usage=include_usage
    )


async def _generate(
    request: web.Request,
    req: SimRequest,
    model: str,
    *,
    chat: bool,
    stream: bool,
    include_usage: bool,
) -> web.StreamResponse:
    engine_loop = request.app[LOOP_KEY]
    req.notify_each_token = stream
    engine_loop.submit(req)
    try:
        if stream:
            return await _stream(request, req, model, chat, include_usage)
        await _wait_finished(req)
        return _full_response(req, model, chat)
    finally:
        if not req.finished:
            engine_loop.abort(req)


async def _wait_finished(req: SimRequest) -> None:
    loop = asyncio.get_running_loop()
    while not req.finished:
        req.waiter = loop.create_future()
        await req.waiter


def _full_response(req: SimRequest, model: str, chat: bool) -> web.Response:
    text = " ".join(req.output_tokens)
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                  "logprobs": None, "finish_reason": req.finish_reason, "stop_reason": None}  # fmt: skip
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": req.finish_reason,
            "stop_reason": None,
        }
        obj = "text_completion"
    body = {"id": req.request_id, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": _usage(req)}  # fmt: skip
    return web.Response(text=dumps(body), content_type="application/json")


async def _stream(
    request: web.Request, req: SimRequest, model: str, chat: bool, include_usage: bool
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    created = int(time.time())
    head = f'data: {{"id":"{req.request_id}","object":"{"chat.completion.chunk" if chat else "text_completion"}","created":{created},"model":{dumps(model)},"choices":'
    if chat:
        role_event = (
            head
            + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )
        piece_open = head + '[{"index":0,"delta":{"content":'
        piece_close = '},"logprobs":null,"finish_reason":'
    else:
        role_event = ""
        piece_open = head + '[{"index":0,"text":'
        piece_close = ',"logprobs":null,"finish_reason":'
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        while True:
            count = req.output_count
            if count > sent:
                words = req.tokens[req.prompt_len + sent : req.prompt_len + count]
                text = " ".join(words) if sent == 0 else " " + " ".join(words)
                done = req.finished and req.output_count == count
                reason = f'"{req.finish_reason}"' if done else "null"
                event = (
                    f'{piece_open}{dumps(text)}{piece_close}{reason},"stop_reason":null}}]}}\n\n'
                )
                if sent == 0:
                    event = role_event + event
                sent = count
                await response.write(event.encode())
                if done:
                    break
            elif req.finished:
                break
            else:
                req.waiter = loop.create_future()
                await req.waiter
        if include_usage and req.finish_reason != "abort":
            await response.write(f'{head}[],"usage":{dumps(_usage(req))}}}\n\n'.encode())
        await response.write(DONE)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        log.debug("client of %s went away", req.request_id)
    return response
