"""The router's token ids with the model's own tokenizer (router.yaml ``tokenizer_dir``): what
kv_aware and cost match vLLM's KV events on. The tokenizer is the tiny test model's, trained
here; equality with real vLLM is tests/e2e/test_model_tokenizer_vllm.py."""

from __future__ import annotations

import pytest

from stackctl.kv_events import KVEventBatch
from stackctl.model_tokenizer import ModelTokenizer
from stackctl.router.backends import Backend
from stackctl.router.config import BackendConfig, RouterConfigError, load_tokenizer, parse_config
from stackctl.router.kv_index import KvEventView
from stackctl.router.policies import KvAwarePolicy, RouteRequest
from stackctl.tokenizer import token_ids, tokenize
from tests.helpers import tiny_model as tm
from tests.helpers.kv_batches import prefix_stored

SYSTEM = {"role": "system", "content": "You are a terse assistant for routers and caches."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ModelTokenizer:
    loaded = load_tokenizer(str(tm.write_tokenizer_dir(tmp_path_factory.mktemp("model"))))
    assert loaded is not None
    return loaded


def chat(*turns: str) -> dict:
    roles = ("user", "assistant")
    return {
        "model": "m",
        "messages": [SYSTEM, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))],
    }


def test_chat_and_completion_ids_are_the_models(tokenizer):
    body = chat("What does the router do with a prefix?")
    ids = RouteRequest(body, {}, tokenizer).token_ids
    assert ids == tokenizer.chat_token_ids(body["messages"])
    assert ids != token_ids(tokenize(RouteRequest(body, {}).prompt))  # not the simulator's
    prompt = "the router sends each request to the engine holding its prefix"
    assert RouteRequest({"prompt": prompt}, {}, tokenizer).token_ids == (
        tokenizer.prompt_token_ids(prompt)
    )
    assert RouteRequest({"prompt": [prompt, "x"]}, {}, tokenizer).token_ids == (
        tokenizer.prompt_token_ids(prompt)
    )  # a batch: the first
    assert RouteRequest({"prompt": [5, 6, 7]}, {}, tokenizer).token_ids == [5, 6, 7]
    assert RouteRequest({"prompt": [[5, 6], [7]]}, {}, tokenizer).token_ids == [5, 6]


def test_what_cannot_be_tokenized_matches_nothing_and_does_not_raise(tokenizer):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = {"messages": [{"role": "user", "content": [image]}]}
    assert RouteRequest(body, {}, tokenizer).token_ids == []
    assert RouteRequest({"messages": []}, {}, tokenizer).token_ids == []
    assert RouteRequest({"prompt": {"not": "a prompt"}}, {}, tokenizer).token_ids == []


def test_the_shared_system_prefix_is_counted_in_the_models_tokens(tokenizer):
    request = RouteRequest(chat("first question"), {}, tokenizer)
    system_only = tokenizer.encode(
        tokenizer.render_chat([SYSTEM], add_generation_prompt=False), add_special_tokens=False
    )
    assert request.shared_tokens == len(system_only)
    assert request.token_ids[: request.shared_tokens] == system_only
    other = RouteRequest(chat("another conversation"), {}, tokenizer)
    assert other.token_ids[: other.shared_tokens] == system_only
    assert RouteRequest({"prompt": "x y"}, {}, tokenizer).shared_tokens == 0


def test_kv_aware_on_events_matches_the_blocks_vllm_names_by_model_token_ids(tokenizer):
    """An engine reports it stored the blocks of a chat's token ids as the model tokenizes
    them; the router's next round of that chat is matched against them and goes there."""
    first = chat("Tell me about prefix caching in vLLM and how routers use it, at length.")
    ids = tokenizer.chat_token_ids(first["messages"])
    blocks = len(ids) // 4
    assert blocks >= 3
    backends = [
        Backend(BackendConfig(name=f"e{i}", url=f"http://h{i}", model="m")) for i in range(3)
    ]
    for b in backends:
        b.kv_view = KvEventView()
        b.kv_view.apply(0, KVEventBatch(ts=0.0, events=[]))
    holder = backends[2]
    holder.kv_view.apply(1, prefix_stored(ids, blocks, 4))
    for b in backends:
        b.kv_view.block_size = 4
    policy = KvAwarePolicy(kv_index="events")
    follow_up = chat(
        "Tell me about prefix caching in vLLM and how routers use it, at length.",
        "Routers send a request where its prefix is cached.",
        "And when the cache is full?",
    )
    choice = policy.choose(backends, RouteRequest(follow_up, {}, tokenizer))
    assert choice.backend is holder
    assert choice.predicted_cached_tokens == blocks * 4
    # the simulator's token ids of the same chat name other blocks: nothing would match
    assert policy.choose(backends, RouteRequest(follow_up, {})).predicted_cached_tokens == 0


def test_a_tokenizer_dir_the_router_cannot_load_is_a_config_error(tmp_path):
    config = parse_config(
        {"engines": [{"name": "e", "url": "http://h:1", "model": "m"}], "tokenizer_dir": "/x"},
        "router.yaml",
    )
    assert config.tokenizer_dir == "/x"
    with pytest.raises(RouterConfigError, match=r"tokenizer_dir: .*x: not a directory"):
        load_tokenizer(str(tmp_path / "x"))
    with pytest.raises(RouterConfigError, match=r"tokenizer_dir: .*no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(RouterConfigError, match="tokenizer_dir: expected"):
        parse_config(
            {"engines": [{"name": "e", "url": "http://h:1", "model": "m"}], "tokenizer_dir": 3},
            "router.yaml",
        )
    assert load_tokenizer(None) is None
