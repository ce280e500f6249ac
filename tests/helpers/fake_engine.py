"""A zero-cost fake OpenAI engine: answers immediately with a fixed streamed (SSE) reply.

Used by the router tests (in-process, with knobs to fail, hang or stream slowly) and by the
router-overhead benchmark (as a separate process, so the engine's CPU is not the router's):

    python -m tests.helpers.fake_engine --port 8101 --model m --name e1

Every answer names the engine in ``system_fingerprint`` so a test can see who served it,
and reports ``usage`` (prompt tokens with the project tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from aiohttp import web

from stackctl.tokenizer import count_tokens, render_chat

ANSWER_WORDS = ("Hello", " from", " the", " fake", " engine", ".", " Bye", ".")
NUM_GPU_BLOCKS = 4096
BLOCK_SIZE = 16


class FakeEngine:
    """One fake engine serving ``models``; attributes are knobs tests may flip at run time."""

    def __init__(
        self,
        name: str = "fake",
        models: tuple[str, ...] = ("fake-model",),
        words: tuple[str, ...] = ANSWER_WORDS,
    ):
        self.name = name
        self.models = tuple(models)
        self.words = words
        self.status = 200  # non-200: answer every completion with this error status
        self.delay_s = 0.0  # wait before sending any byte (a slow or hung engine)
        self.chunk_delay_s = 0.0  # wait between streamed chunks (a slow generation)
        self.healthy = True
        self.requests = 0
        self.prompts: list[str] = []  # rendered prompts, in arrival order
        self.record_prompts = False
        self.cancelled = 0  # streams whose client (the router) went away mid-answer

    # -- API -------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.completions),
                web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.list_models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
            ]
        )
        return app

    async def health(self, request):
        return web.Response(status=200 if self.healthy else 503)

    async def list_models(self, request):
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in self.models
                ],
            }
        )

    async def metrics(self, request):
        text = (
            f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",'
            f'num_gpu_blocks="{NUM_GPU_BLOCKS}",num_cpu_blocks="0"}} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request):
        body = json.loads(await request.read())
        self.requests += 1
        chat = request.path.endswith("/chat/completions")
        prompt = render_chat(body.get("messages", [])) if chat else str(body.get("prompt", ""))
        if self.record_prompts:
            self.prompts.append(prompt)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response(
                {
                    "error": {
                        "message": f"{self.name} failed",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=self.status,
            )
        model = body.get("model", self.models[0])
        prompt_tokens = count_tokens(prompt)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(self.words),
            "total_tokens": prompt_tokens + len(self.words),
        }
        if body.get("stream"):
            return await self._stream(
                request,
                chat,
                model,
                usage,
                bool((body.get("stream_options") or {}).get("include_usage")),
            )
        text = "".join(self.words)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        return web.json_response(
            {
                "id": f"fake-{self.name}",
                "object": obj,
                "created": 0,
                "model": model,
                "system_fingerprint": self.name,
                "choices": [choice],
                "usage": usage,
            }
        )

    def _chunk(
        self, chat: bool, model: str, word: str | None, finish: str | None, usage=None, n: int = 0
    ) -> bytes:
        if chat:
            delta = {} if word is None else {"content": word}
            if n == 0 and word is not None:
                delta["role"] = "assistant"
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            obj = "chat.completion.chunk"
        else:
            choices = [{"index": 0, "text": word or "", "finish_reason": finish, "logprobs": None}]
            obj = "text_completion"
        event = {
            "id": f"fake-{self.name}",
            "object": obj,
            "created": 0,
            "model": model,
            "system_fingerprint": self.name,
            "choices": [] if usage else choices,
        }
        if usage:
            event["usage"] = usage
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    async def _stream(self, request, chat, model, usage, include_usage):
        events = [self._chunk(chat, model, word, None, n=n) for n, word in enumerate(self.words)]
        events.append(self._chunk(chat, model, None, "stop"))
        if include_usage:
            events.append(self._chunk(chat, model, None, None, usage=usage))
        events.append(b"data: [DONE]\n\n")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            if self.chunk_delay_s:  # a slow generation: one event at a time
                for event in events:
                    await response.write(event)
                    await asyncio.sleep(self.chunk_delay_s)
            else:  # zero cost: the whole answer at once
                await response.write(b"".join(events))
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled += 1
            raise
        return response

    # -- running -----------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> RunningEngine:
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return RunningEngine(self, runner, f"http://{host}:{port}")


class RunningEngine:
    def __init__(self, engine: FakeEngine, runner: web.AppRunner, url: str):
        self.engine, self.runner, self.url = engine, runner, url

    async def stop(self) -> None:
        await self.runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", help="served model (repeatable)")
    parser.add_argument("--name", default="fake")
    args = parser.parse_args(argv)
    engine = FakeEngine(args.name, tuple(args.model or ["fake-model"]))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        engine.app(),
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
