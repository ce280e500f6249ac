"""The simulator's HTTP API in process: vLLM's shapes, errors, metrics, the openai client."""

import json

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from stackctl.sim.config import parse_args
from stackctl.sim.server import create_app
from stackctl.testing import Metrics, read_metrics, wait_until_async
from stackctl.tokenizer import count_tokens, render_chat

MODEL = "sim-llama"


@pytest.fixture
async def client():
    config = parse_args(
        ["--served-model-name", MODEL, "--max-model-len", "4096", "--time-scale", "200",
         "--num-gpu-blocks-override", "4096"],
        environ={},
    )  # fmt: skip
    async with TestClient(TestServer(create_app(config))) as test_client:
        yield test_client


@pytest.fixture
def oai(client):
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def metric_samples(client) -> Metrics:
    return read_metrics(await (await client.get("/metrics")).text())


async def test_health_and_models(client):
    assert (await client.get("/health")).status == 200
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list" and body["data"][0]["id"] == MODEL
    assert body["data"][0]["max_model_len"] == 4096


async def test_openai_chat_non_streaming(oai):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words(50)}]
    reply = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert count_tokens(reply.choices[0].message.content) == 12
    assert reply.usage.prompt_tokens == count_tokens(render_chat(messages))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


async def test_openai_chat_streaming_with_usage(oai):
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": words(30)}], max_completion_tokens=9,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    text, reasons, usage, roles = "", [], None, []
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            roles.append(choice.delta.role)
            reasons.append(choice.finish_reason)
    assert roles[0] == "assistant"
    assert count_tokens(text) == 9 and reasons[-1] == "length"
    assert (
        usage.completion_tokens == 9 and usage.prompt_tokens == 32
    )  # <|user|> + 30 words + <|assistant|>


async def test_openai_completions_both_ways(oai):
    reply = await oai.completions.create(model=MODEL, prompt=words(40), max_tokens=7)
    assert count_tokens(reply.choices[0].text) == 7
    assert reply.usage.prompt_tokens == 40 and reply.usage.completion_tokens == 7
    stream = await oai.completions.create(
        model=MODEL,
        prompt=[words(40)],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        pieces += [c.text for c in chunk.choices]
    assert "".join(pieces) == reply.choices[0].text  # same request, same deterministic words
    assert usage.total_tokens == 47


async def test_a_repeated_prompt_reports_cached_tokens(oai):
    prompt = words(1000, "cache")
    await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    again = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens == 999 // 16 * 16


async def test_default_max_tokens_fills_the_context(client):
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": words(4000)})
    assert resp.status == 200
    assert (await resp.json())["usage"]["completion_tokens"] == 96


async def test_raw_stream_format_and_done(client):
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})  # fmt: skip
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = (await resp.text()).split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


async def error_of(resp, status: int, err_type: str) -> dict:
    assert resp.status == status
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == err_type and body["error"]["code"] == status
    return body["error"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": MODEL}),  # no messages
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": ["hi"]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "9"},
        ),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5000}),  # over the context
        ("/v1/completions", {"prompt": words(5000)}),  # prompt longer than max_model_len
        ("/v1/completions", {}),  # no prompt
        ("/v1/completions", {"prompt": [1, 2, 3]}),  # token ids
        ("/v1/completions", {"prompt": ["a", "b"]}),  # batch
        ("/v1/completions", {"prompt": "  "}),
        ("/v1/completions", {"prompt": "x", "n": 2}),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
    ],
)
async def test_bad_bodies_are_400(client, path, body):
    await error_of(await client.post(path, json=body), 400, "BadRequestError")


async def test_invalid_json_and_unknown_model(client):
    await error_of(await client.post("/v1/completions", data=b"{nope"), 400, "BadRequestError")
    await error_of(await client.post("/v1/completions", data=b"[1]"), 400, "BadRequestError")
    err = await error_of(
        await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
        404,
        "NotFoundError",
    )
    assert "gpt-9" in err["message"]


async def test_openai_client_raises_the_matching_errors(oai):
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model=MODEL, prompt=words(5000), max_tokens=1)
    assert "maximum context length" in str(info.value)


async def test_metrics_names_labels_and_movement(client, oai):
    before = await metric_samples(client)
    prompt = words(800, "m")
    await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    after = await metric_samples(client)
    labels = {"model_name": MODEL}

    def delta(name):
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("vllm:prompt_tokens_total") == 1600
    assert delta("vllm:generation_tokens_total") == 10
    assert delta("vllm:prefix_cache_queries_total") == 1600
    assert delta("vllm:prefix_cache_hits_total") == 799 // 16 * 16  # counted in tokens
    assert after.value("vllm:request_success_total", finished_reason="length", **labels) >= 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds_count") == 8
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    # new KV computed: the first request's 800 tokens, then what the repeat missed
    assert delta("vllm:request_prefill_kv_computed_tokens_sum") == 1600 - 799 // 16 * 16
    assert delta("vllm:request_prefill_time_seconds_count") == 2
    assert delta("vllm:request_prefill_time_seconds_sum") > 0
    assert after.value("vllm:num_requests_running", **labels) == 0
    assert after.value("vllm:num_requests_waiting", **labels) == 0
    assert 0 <= after.value("vllm:kv_cache_usage_perc", **labels) <= 1
    assert after.value("vllm:external_prefix_cache_queries_total", **labels) == 0  # no CPU tier
    info = after.value("vllm:cache_config_info", block_size="16", num_gpu_blocks="4096")
    assert info == 1


async def test_client_disconnect_aborts_the_request(client):
    resp = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 3000, "stream": True}
    )
    await resp.content.readline()  # the first event arrived: the request is running
    resp.close()

    async def aborted() -> Metrics | None:
        samples = await metric_samples(client)
        return (
            samples
            if samples.value("vllm:request_success_total", 0.0, finished_reason="abort") == 1
            else None
        )

    samples = await wait_until_async(
        aborted, 10, interval=0.02, what="the disconnected request counted as aborted"
    )
    assert samples.value("vllm:num_requests_running") == 0
    assert samples.value("vllm:kv_cache_usage_perc") == 0
