"""The router in front of in-process fake engines, driven by the official openai client."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from stackctl.router.app import ENGINE_HEADER, Router
from stackctl.router.config import parse_config
from stackctl.testing import wait_until_async
from tests.helpers.fake_engine import ANSWER_WORDS, FakeEngine

ANSWER = "".join(ANSWER_WORDS)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def router_config(engines, **overrides):
    raw = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "policy": "round_robin",
        "engines": [{"name": name, "url": url, "model": model} for name, url, model in engines],
        "health": {"interval_s": 0.2, "timeout_s": 5.0, "backoff_s": 0.2, "max_backoff_s": 1.0},
        "timeouts": {"connect_s": 0.5, "first_byte_s": 1.0},
        "retries": 2,
    }
    raw.update(overrides)
    return raw


@contextlib.asynccontextmanager
async def serve_router(raw_config, config_path=None, api_keys=()):
    router = Router(parse_config(raw_config), config_path=config_path, api_keys=api_keys)
    runner = web.AppRunner(router.build_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    router.url = f"http://127.0.0.1:{port}"
    try:
        yield router
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fleet(n=2, models=("m",)):
    running = []
    try:
        for i in range(n):
            model = models[i % len(models)]
            running.append(await FakeEngine(f"e{i}", (model,)).start())
        yield running
    finally:
        for r in running:
            await r.stop()


def spec(running, models=("m",)):
    return [(r.engine.name, r.url, models[i % len(models)]) for i, r in enumerate(running)]


def client(router, key="none"):
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=10)


async def test_chat_and_completions_stream_and_not_through_the_router():
    async with fleet(2) as engines, serve_router(router_config(spec(engines))) as router:
        c = client(router)
        reply = await c.chat.completions.create(model="m", messages=MESSAGES)
        assert reply.choices[0].message.content == ANSWER
        assert reply.usage.prompt_tokens == 7 and reply.usage.completion_tokens == 8
        stream = await c.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert "".join(parts) == ANSWER and usage.total_tokens == 15
        done = await c.completions.create(model="m", prompt="one two three")
        assert done.choices[0].text == ANSWER and done.usage.prompt_tokens == 3
        stream = await c.completions.create(model="m", prompt="one two", stream=True)
        assert "".join([ch.choices[0].text async for ch in stream if ch.choices]) == ANSWER
        assert sum(r.engine.requests for r in engines) == 4
        assert all(r.engine.requests == 2 for r in engines)  # round robin


async def test_bytes_are_passed_through_unchanged_and_in_chunks():
    async with fleet(1) as engines, serve_router(router_config(spec(engines))) as router:
        body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
        async with aiohttp.ClientSession() as s:
            async with s.post(engines[0].url + "/v1/chat/completions", data=body) as r:
                direct = await r.read()
            async with s.post(router.url + "/v1/chat/completions", data=body) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                assert r.headers[ENGINE_HEADER] == "e0"
                routed = await r.read()
        assert routed == direct and routed.endswith(b"data: [DONE]\n\n")


async def test_streamed_chunks_arrive_as_the_engine_sends_them():
    async with fleet(1) as engines, serve_router(router_config(spec(engines))) as router:
        engines[0].engine.chunk_delay_s = 0.15
        body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as s:
            start = loop.time()
            async with s.post(router.url + "/v1/chat/completions", data=body) as r:
                first = await r.content.readline()
                first_at = loop.time() - start
                await r.read()
                total = loop.time() - start
        assert first.startswith(b"data: ")
        assert total > 1.0 and first_at < total - 0.9  # the first event long before the last


async def test_errors_are_openai_json():
    async with (
        fleet(1) as engines,
        serve_router(router_config(spec(engines), max_body_bytes=2000)) as router,
    ):
        c = client(router)
        with pytest.raises(openai.NotFoundError) as info:
            await c.chat.completions.create(model="nope", messages=MESSAGES)
        assert info.value.body["code"] == "model_not_found"
        async with aiohttp.ClientSession() as s:
            for data, status, code in [
                (b'{"messages": []}', 400, "missing_model"),
                (b"{not json", 400, "invalid_json"),
                (b"[1, 2]", 400, "invalid_json"),
                (
                    json.dumps({"model": "m", "prompt": "x" * 3000}).encode(),
                    413,
                    "request_too_large",
                ),
            ]:
                async with s.post(router.url + "/v1/completions", data=data) as r:
                    assert r.status == status
                    err = (await r.json())["error"]
                    assert set(err) == {"message", "type", "param", "code"}
                    assert err["code"] == code

            # a chunked body (no Content-Length) is limited too
            async def gen():
                for _ in range(30):
                    yield b"x" * 100

            async with s.post(router.url + "/v1/completions", data=gen()) as r:
                assert r.status == 413
        # an engine's own error passes through with its status
        engines[0].engine.status = 400
        with pytest.raises(openai.BadRequestError):
            await c.completions.create(model="m", prompt="x")


async def test_api_keys_are_checked():
    async with (
        fleet(1) as engines,
        serve_router(router_config(spec(engines)), api_keys=(b"sk-good", b"sk-other")) as router,
    ):
        for key in ("sk-bad", "sk-goo"):
            with pytest.raises(openai.AuthenticationError) as info:
                await client(router, key).completions.create(model="m", prompt="x")
            assert info.value.body["code"] == "invalid_api_key"
            assert key not in json.dumps(info.value.body)
        async with aiohttp.ClientSession() as s:  # no Authorization header at all
            async with s.post(
                router.url + "/v1/completions", json={"model": "m", "prompt": "x"}
            ) as r:
                assert r.status == 401
                assert (await r.json())["error"]["type"] == "authentication_error"
        reply = await client(router, "sk-other").completions.create(model="m", prompt="x")
        assert reply.choices[0].text == ANSWER


async def test_several_models_route_to_their_own_engines():
    models = ("alpha", "beta")
    async with (
        fleet(4, models) as engines,
        serve_router(router_config(spec(engines, models), policy="least_loaded")) as router,
    ):
        c = client(router)
        for _ in range(6):
            r = await c.completions.create(model="beta", prompt="x")
            assert r.system_fingerprint in ("e1", "e3") and r.model == "beta"
        listed = await c.models.list()
        assert sorted(m.id for m in listed.data) == ["alpha", "beta"]
        for r in engines:
            if r.engine.models == ("beta",):
                r.engine.healthy = False
        await wait_until_async(
            lambda: not any(e.healthy for e in router.pool.by_model["beta"]),
            10,
            what="beta's engines ejected",
        )
        with pytest.raises(openai.InternalServerError) as info:
            await c.completions.create(model="beta", prompt="x")
        assert info.value.status_code == 503
        assert [m.id for m in (await c.models.list()).data] == ["alpha"]
        async with aiohttp.ClientSession() as s:
            async with s.get(router.url + "/health") as r:
                assert r.status == 200
            for r in engines:
                r.engine.healthy = False
            await wait_until_async(
                lambda: not any(e.healthy for e in router.pool.backends.values()),
                10,
                what="every engine ejected",
            )
            async with s.get(router.url + "/health") as r:
                assert r.status == 503 and "error" in await r.json()


async def test_failed_engines_are_retried_elsewhere_before_any_byte():
    async with fleet(3) as engines, serve_router(router_config(spec(engines))) as router:
        c = client(router)
        engines[0].engine.status = 503  # overloaded: retry, no ejection
        await engines[1].stop()  # dead: connection refused, retry and eject
        for _ in range(9):
            r = await c.completions.create(model="m", prompt="x")
            assert r.system_fingerprint == "e2"
        async with aiohttp.ClientSession() as s:
            async with s.get(router.url + "/engines") as r:
                state = {e["name"]: e for e in (await r.json())["engines"]}
        assert state["e1"]["healthy"] is False and state["e0"]["healthy"] is True


async def test_a_hung_engine_that_passes_health_times_out_is_not_retried_nor_ejected():
    """The engine has the work (issue 13): a timeout answers 504, runs nothing again
    elsewhere, and a slow engine whose /health passes stays in."""
    async with (
        fleet(2) as engines,
        serve_router(
            router_config(
                spec(engines),
                policy="round_robin",
                health={"interval_s": 5, "timeout_s": 1, "backoff_s": 5, "max_backoff_s": 5},
                timeouts={"connect_s": 0.5, "first_byte_s": 0.4, "total_s": 1.0},
            )
        ) as router,
    ):
        engines[0].engine.delay_s = 30
        c = client(router)
        loop = asyncio.get_running_loop()
        start = loop.time()
        replies = await asyncio.gather(
            *(c.completions.create(model="m", prompt="x") for _ in range(4)),
            return_exceptions=True,
        )
        assert loop.time() - start < 5.0  # far below the engine's 30 s hang
        timed_out = [r for r in replies if isinstance(r, openai.APIStatusError)]
        assert [r.status_code for r in timed_out] == [504, 504]
        assert {r.system_fingerprint for r in replies if r not in timed_out} == {"e1"}
        assert (engines[0].engine.requests, engines[1].engine.requests) == (2, 2)  # no retry
        await asyncio.sleep(0.2)  # the health check the timeouts asked for
        assert router.pool.backends["e0"].healthy is True


async def test_a_client_that_leaves_cancels_its_upstream_request():
    async with fleet(1) as engines, serve_router(router_config(spec(engines))) as router:
        engine = engines[0].engine
        engine.chunk_delay_s = 0.2
        body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
        async with aiohttp.ClientSession() as s:
            r = await s.post(router.url + "/v1/completions", data=body)
            await r.content.readline()
            r.close()
        await wait_until_async(
            lambda: engine.cancelled == 1, 10, what="the engine to see the cancel"
        )
        assert router.pool.backends["e0"].inflight == 0


async def test_sighup_reload_swaps_engines_without_dropping_inflight(tmp_path):
    async with fleet(2) as engines:
        path = tmp_path / "router.yaml"
        first = router_config(spec(engines[:1]))
        path.write_text(yaml.safe_dump(first))
        async with serve_router(first, config_path=str(path)) as router:
            engines[0].engine.chunk_delay_s = 0.1
            c = client(router)

            async def slow_stream():  # ~1 s: one event every 0.1 s
                stream = await c.completions.create(model="m", prompt="x", stream=True)
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            slow = asyncio.create_task(slow_stream())
            await wait_until_async(
                lambda: router.pool.backends["e0"].inflight == 1,
                10,
                what="one request in flight on e0",
            )
            path.write_text(yaml.safe_dump(router_config(spec(engines[1:]), policy="kv_aware")))
            assert router.reload()
            assert list(router.pool.backends) == ["e1"] and router.policy.name == "kv_aware"
            assert await slow == ANSWER  # finished on the engine the reload removed
            r = await c.completions.create(model="m", prompt="x")
            assert r.system_fingerprint == "e1"
            path.write_text("policy: [broken\n")
            assert not router.reload()  # a bad file keeps the running config
            assert list(router.pool.backends) == ["e1"]


async def test_metrics_and_engines_views():
    async with (
        fleet(2) as engines,
        serve_router(router_config(spec(engines), policy="kv_aware")) as router,
    ):
        c = client(router)
        for _ in range(3):
            await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "word " * 300}]
            )
        # a health round learns the capacity from /metrics
        await wait_until_async(
            lambda: router.pool.backends["e0"].capacity_tokens is not None,
            10,
            what="e0's capacity from its metrics",
        )
        async with aiohttp.ClientSession() as s:
            async with s.get(router.url + "/metrics") as r:
                text = await r.text()
            async with s.get(router.url + "/engines") as r:
                view = await r.json()
        assert 'router_requests_total{engine="' in text and 'policy="kv_aware"' in text
        for name in (
            "router_ttft_seconds_bucket",
            "router_request_latency_seconds_count",
            "router_routing_decisions_total",
            "router_predicted_cached_tokens_total",
            "router_inflight_requests",
            "router_engine_healthy",
        ):
            assert name in text
        assert view["policy"] == "kv_aware"
        e = {x["name"]: x for x in view["engines"]}
        assert e["e0"]["cache_capacity_tokens"] == 4096 * 16
        assert sum(x["served"] for x in e.values()) == 3
        assert max(x["prefix_index_chunks"] for x in e.values()) > 0
        # the growing-prompt requests all went to the engine that had the prefix
        assert sorted(x["served"] for x in e.values()) == [0, 3]


async def test_every_name_an_engine_serves_is_routed_and_listed():
    """--served-model-name m alias-a alias-b: the health checker learns the aliases from the
    engine's /v1/models and routes them to that engine only."""
    e0 = await FakeEngine("e0", ("m", "alias-a", "alias-b")).start()
    e1 = await FakeEngine("e1", ("m",)).start()
    try:
        async with serve_router(
            router_config([("e0", e0.url, "m"), ("e1", e1.url, "m")], policy="least_loaded")
        ) as router:
            await wait_until_async(
                lambda: "alias-b" in router.pool.by_model, 10, what="alias-b routed"
            )
            c = client(router)
            for _ in range(4):
                r = await c.completions.create(model="alias-a", prompt="x")
                assert r.system_fingerprint == "e0" and r.model == "alias-a"
            served = {
                (await c.completions.create(model="m", prompt="x")).system_fingerprint
                for _ in range(4)
            }
            assert served == {"e0", "e1"}  # the configured name still goes to both
            listed = [m.id for m in (await c.models.list()).data]
            assert sorted(listed) == ["alias-a", "alias-b", "m"]
            async with aiohttp.ClientSession() as s:
                async with s.get(router.url + "/engines") as r:
                    view = {e["name"]: e for e in (await r.json())["engines"]}
            assert view["e0"]["models"] == ["m", "alias-a", "alias-b"]  # configured first
            assert view["e1"]["models"] == ["m"]
            with pytest.raises(openai.NotFoundError):
                await c.completions.create(model="alias-c", prompt="x")
            e0.engine.models = ("m", "alias-c")  # restarted with other names
            await wait_until_async(
                lambda: "alias-c" in router.pool.by_model, 10, what="alias-c routed"
            )
            assert "alias-a" not in router.pool.by_model
            r = await c.completions.create(model="alias-c", prompt="x")
            assert r.system_fingerprint == "e0"
    finally:
        await e0.stop()
        await e1.stop()
