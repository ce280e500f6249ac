"""The streaming client: TTFT and gaps, usage, and every way a reply can fail."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from stackctl.bench.client import chat_completions_url, new_session, stream_chat
from stackctl.bench.workload import RequestSpec

SPEC = RequestSpec(
    user_id=7,
    round_index=1,
    messages=({"role": "user", "content": "hi there"},),
    max_tokens=3,
    prompt_tokens=4,
)


def sse(*chunks) -> bytes:
    return b"".join(
        f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks
    )


def delta(text):
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


async def serve(handler):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def call(handler, **options):
    runner, url = await serve(handler)
    try:
        async with new_session() as session:
            return await stream_chat(session, chat_completions_url(url), "m", SPEC, **options)
    finally:
        await runner.cleanup()


def test_chat_completions_url():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert (
        chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    )


async def test_streamed_reply_is_timed_and_sent_as_asked():
    seen = {}

    async def handler(request):
        seen["body"] = await request.json()
        seen["headers"] = dict(request.headers)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await asyncio.sleep(0.05)
        for word in ("a", " b", " c"):
            await resp.write(sse(delta(word)))
            await asyncio.sleep(0.02)
        await resp.write(
            sse(
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 4,
                        "completion_tokens": 3,
                        "prompt_tokens_details": {"cached_tokens": 2},
                    },
                },
                "[DONE]",
            )
        )
        return resp

    out = await call(handler, api_key="sekret")
    assert out.error is None and out.answer == "a b c" and out.status == 200
    assert 0.05 <= out.ttft_s < 0.5 and len(out.gaps) == 2 and all(g >= 0.015 for g in out.gaps)
    assert out.e2e_s >= out.ttft_s + sum(out.gaps)
    assert out.usage["prompt_tokens_details"]["cached_tokens"] == 2
    body = seen["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (
        body["max_tokens"] == 3
        and body["messages"] == list(SPEC.messages)
        and body["ignore_eos"] is True
    )
    assert (
        seen["headers"]["Authorization"] == "Bearer sekret" and seen["headers"]["x-user-id"] == "7"
    )


@pytest.mark.parametrize(
    "reply, status, message",
    [
        (
            lambda r: web.json_response({"error": {"message": "overloaded"}}, status=503),
            503,
            "HTTP 503",
        ),
        (
            lambda r: web.Response(
                body=sse({"error": {"message": "engine died"}}), content_type="text/event-stream"
            ),
            200,
            "stream error: engine died",
        ),
        (
            lambda r: web.Response(body=sse("[DONE]"), content_type="text/event-stream"),
            200,
            "no tokens received",
        ),
        (
            lambda r: web.Response(body=b"data: {not json\n\n", content_type="text/event-stream"),
            200,
            "JSONDecodeError",
        ),
    ],
)
async def test_failures_become_errors(reply, status, message):
    async def handler(request):
        return reply(request)

    out = await call(handler)
    assert out.status == status and message in out.error


async def test_timeout_is_an_error():
    async def handler(request):
        await asyncio.sleep(2)
        return web.Response(text="late")

    out = await call(handler, timeout_s=0.2)
    assert out.error and "Timeout" in out.error and out.e2e_s < 1.5
