"""stackctl.kv_events against real vLLM (CPU build): the KV events the engine publishes.

One vLLM server with the tiny model, KV events on (ZMQ PUB + replay ROUTER, topic ``kv``),
prefix caching on and a cache of only NUM_BLOCKS blocks, so that later prompts evict earlier
ones. The ``traffic`` fixture sends, once: prompt A, A again, prompt B (sharing A's long
prefix), a chat prompt, then distinct prompts until the cache overflows, and records the
frames that arrived after each. The tests check those frames against the format stackctl
defines (stackctl.kv_events) and against vLLM's own /tokenize.

STACKCTL_UPDATE_GOLDEN=1 rewrites the golden batch (tests/golden/kv_events/) from A's events;
tests/unit/test_kv_events.py checks it without vLLM.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from stackctl.kv_events import (
    END_SEQ,
    MEDIUM_GPU,
    ROOT_KEY,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    block_keys,
    decode_batch,
    encode_batch,
    parse_seq,
    seq_bytes,
)
from stackctl.testing import free_ports, read_metrics
from tests.helpers.tiny_model import ensure_tiny_model
from tests.helpers.vllm_env import VllmServer, vllm_venv_or_skip

# timeout: may build the venv (3-11 min) and start vLLM (20 s idle, 5 min on a loaded 2-core box)
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(2400)]

MODEL = "tiny-llama"
TOPIC = b"kv"
NUM_BLOCKS = 12  # the engine's whole cache, so a few distinct prompts evict earlier ones
MAX_MODEL_LEN = 1024  # vLLM refuses a max_model_len its cache cannot hold
DISTINCT_PROMPTS = 5  # with A, B and chat: more full blocks than NUM_BLOCKS
WAIT_S = 60.0  # for a request's events, on a loaded 2-core box
GOLDEN = Path(__file__).parents[1] / "golden" / "kv_events" / "vllm-0.32.0-batch.msgpack"

SHARED = " ".join(
    f"Document {i}: the router sends each request to the engine holding its prefix."
    for i in range(16)
)
PROMPT_A = SHARED + " Question A: what is the capital of France?"
PROMPT_B = SHARED + " Question B: " + " ".join(f"item {i} of the list" for i in range(30))
CHAT = [{"role": "user", "content": SHARED}]


@dataclass
class Engine:
    server: VllmServer
    sub: zmq.Socket
    ctx: zmq.Context
    replay_port: int
    block_size: int
    num_blocks: int

    def post(self, path: str, body: dict) -> Any:
        req = urllib.request.Request(
            self.server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())


@dataclass
class Step:
    """One request, its prompt's token ids from vLLM's /tokenize, the frames that followed it."""

    name: str
    token_ids: list[int]
    frames: list[list[bytes]] = field(default_factory=list)

    def batches(self) -> list[KVEventBatch]:
        return [decode_batch(f[2]) for f in self.frames]

    def stored(self) -> list[BlockStored]:
        return [e for b in self.batches() for e in b.events if isinstance(e, BlockStored)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    vllm_venv_or_skip()
    model_dir = ensure_tiny_model()
    pub_port, replay_port = free_ports(2)
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub_port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
        "topic": TOPIC.decode(),
    }
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    # connected and subscribed before vLLM binds (ZMQ reconnects), so no batch goes by unseen
    sub.connect(f"tcp://127.0.0.1:{pub_port}")
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    extra = ["--kv-events-config", json.dumps(config)]
    extra += ["--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-model-len", str(MAX_MODEL_LEN)]
    try:
        with VllmServer.start(
            tmp_path_factory.mktemp("vllm"), model_dir, served_model_name=MODEL, extra=extra
        ) as srv:
            print(f"vLLM ready in {srv.startup_seconds}s")
            with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
                metrics = read_metrics(r.read().decode())
            infos = [s for s in metrics.samples if s.name == "vllm:cache_config_info"]
            assert len(infos) == 1, f"want one vllm:cache_config_info sample in /metrics: {infos}"
            (info,) = infos
            yield Engine(
                srv, sub, ctx, replay_port, int(info.labels["block_size"]),
                int(info.labels["num_gpu_blocks"]),
            )  # fmt: skip
    finally:
        sub.close(linger=0)
        ctx.term()


def _tokenize(engine: Engine, **prompt: Any) -> list[int]:
    return engine.post("/tokenize", {"model": MODEL, **prompt})["tokens"]


def _receive(engine: Engine, step: Step, last_block: list[int] | None) -> None:
    """Frames into ``step`` until a BlockStored ends with ``last_block`` (None: until
    nothing more comes for a second)."""
    deadline = time.monotonic() + (WAIT_S if last_block else 1.0)
    while time.monotonic() < deadline:
        if not engine.sub.poll(100):
            continue
        step.frames.append(engine.sub.recv_multipart())
        if last_block and any(e.token_ids[-len(last_block) :] == last_block for e in step.stored()):
            return
    assert last_block is None, (
        f"no BlockStored with the last full block of {step.name} within {WAIT_S}s; "
        f"{len(step.frames)} frames came; vLLM log tail:\n{engine.server.log_tail(3000)}"
    )


def _send(engine: Engine, name: str, *, prompt: str | None = None, chat: list | None = None):
    if chat is not None:
        ids = _tokenize(engine, messages=chat)
        body = {"model": MODEL, "messages": chat, "max_tokens": 1, "temperature": 0}
        r = engine.post("/v1/chat/completions", body)
    else:
        ids = _tokenize(engine, prompt=prompt)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        r = engine.post("/v1/completions", body)
    # max_tokens=1: the answer's token never enters the cache, only the prompt's full blocks
    assert r["usage"]["prompt_tokens"] == len(ids), (name, r["usage"], len(ids))
    return Step(name, ids)


def _full_blocks(ids: list[int], block_size: int) -> list[list[int]]:
    n = len(ids) // block_size
    return [ids[i * block_size : (i + 1) * block_size] for i in range(n)]


@pytest.fixture(scope="module")
def traffic(engine) -> dict[str, Step]:
    bs = engine.block_size
    steps: dict[str, Step] = {}
    t0 = time.monotonic()
    step = steps["A"] = _send(engine, "A", prompt=PROMPT_A)
    _receive(engine, step, _full_blocks(step.token_ids, bs)[-1])
    # A again: all its full blocks are cached, so it stores nothing; whatever it did publish
    # would arrive before B's batch and land in B's step
    _send(engine, "A again", prompt=PROMPT_A)
    step = steps["B"] = _send(engine, "B", prompt=PROMPT_B)
    _receive(engine, step, _full_blocks(step.token_ids, bs)[-1])
    step = steps["chat"] = _send(engine, "chat", chat=CHAT)
    _receive(engine, step, _full_blocks(step.token_ids, bs)[-1])
    for i in range(DISTINCT_PROMPTS):
        prompt = f"Distinct prompt {i}: " + " ".join(f"word{i}x{j}" for j in range(60))
        step = steps[f"D{i}"] = _send(engine, f"D{i}", prompt=prompt)
        _receive(engine, step, _full_blocks(step.token_ids, bs)[-1])
    step = steps["after"] = Step("after", [])
    _receive(engine, step, None)
    print(
        f"block size {bs}, {engine.num_blocks} blocks; requests and their events took "
        f"{time.monotonic() - t0:.1f}s; frames per request: "
        + ", ".join(f"{s.name} {len(s.frames)}" for s in steps.values())
    )
    return steps


def _all_frames(traffic: dict[str, Step]) -> list[list[bytes]]:
    return [f for s in traffic.values() for f in s.frames]


def test_prompts_span_several_blocks(engine, traffic):
    """The prompts are long enough for what the other tests compare (a guard on the setup)."""
    assert engine.num_blocks == NUM_BLOCKS  # --num-gpu-blocks-override took effect
    bs = engine.block_size
    a, b = traffic["A"].token_ids, traffic["B"].token_ids
    shared = _common_prefix(a, b) // bs
    assert len(a) // bs >= 2 and 1 <= shared <= len(a) // bs < len(b) // bs, (len(a), len(b))


def test_frames_have_topic_seq_payload(traffic):
    frames = _all_frames(traffic)
    assert frames
    assert all(len(f) == 3 for f in frames), [len(f) for f in frames]
    assert {f[0] for f in frames} == {TOPIC}
    seqs = [parse_seq(f[1]) for f in frames]
    # subscribed before the engine started: the first batch is seq 0
    assert seqs == list(range(len(seqs))), seqs


def test_every_payload_decodes(traffic):
    for frame in _all_frames(traffic):
        batch = decode_batch(frame[2])
        assert batch.events
        assert batch.data_parallel_rank == 0
        assert abs(batch.ts - time.time()) < 3600, batch.ts  # seconds since the epoch


def test_stored_blocks_are_the_prompts_full_blocks(engine, traffic):
    """Each new prompt stores its full blocks after what the cache already held, no more."""
    bs = engine.block_size
    a = traffic["A"].token_ids
    for name, step in traffic.items():
        if name in ("A again", "after"):
            continue
        shared = 0 if name == "A" else _common_prefix(a, step.token_ids) // bs
        if name.startswith("D"):
            assert shared == 0, "the distinct prompts must share no block with A"
        stored = step.stored()
        assert len(stored) == 1, (name, stored)
        (event,) = stored
        assert event.medium == MEDIUM_GPU
        assert event.block_size == bs
        assert _full_blocks(event.token_ids, bs) == _full_blocks(step.token_ids, bs)[shared:], name
        assert len(event.token_ids) == bs * len(event.block_hashes)  # no partial block
        assert all(isinstance(h, (int, bytes)) for h in event.block_hashes)
        assert len(set(event.block_hashes)) == len(event.block_hashes)
        # a prompt sharing none of A's blocks starts a chain
        assert (event.parent_block_hash is None) == (shared == 0), name


def test_shared_prefix_chains_to_the_first_prompts_block(engine, traffic):
    bs = engine.block_size
    (a,) = traffic["A"].stored()
    (b,) = traffic["B"].stored()
    shared = _common_prefix(traffic["A"].token_ids, traffic["B"].token_ids) // bs
    assert b.parent_block_hash == a.block_hashes[shared - 1]
    assert not set(b.block_hashes) & set(a.block_hashes)


def test_reencoding_is_byte_identical(traffic):
    """The simulator publishes with stackctl's structs: it must send what vLLM sends."""
    for frame in _all_frames(traffic):
        payload = frame[2]
        again = encode_batch(decode_batch(payload))
        original, reencoded = msgspec.msgpack.decode(payload), msgspec.msgpack.decode(again)
        for ours, theirs in zip(reencoded[1], original[1], strict=True):
            assert ours == theirs, (
                f"seq {parse_seq(frame[1])}: stackctl's re-encoding (left) lost or changed fields of vLLM's event (right)"
            )
        assert reencoded == original
        assert again == payload


def test_replay_sends_the_buffered_batches_then_end(engine, traffic):
    frames = _all_frames(traffic)
    dealer = engine.ctx.socket(zmq.DEALER)
    try:
        dealer.connect(f"tcp://127.0.0.1:{engine.replay_port}")
        dealer.send_multipart([b"", seq_bytes(0)])
        replies = []
        for _ in range(len(frames) + 1):
            assert dealer.poll(int(WAIT_S * 1000)), f"replay stopped after {len(replies)} replies"
            replies.append(dealer.recv_multipart())
        # from seq 1: everything but the first batch
        dealer.send_multipart([b"", seq_bytes(1)])
        from_one = []
        for _ in range(len(frames)):
            assert dealer.poll(int(WAIT_S * 1000)), f"replay stopped after {len(from_one)} replies"
            from_one.append(dealer.recv_multipart())
    finally:
        dealer.close(linger=0)
    assert replies[:-1] == [[b"", *f] for f in frames]
    assert replies[-1] == [b"", b"", END_SEQ, b""]
    assert parse_seq(replies[-1][2]) == -1
    assert from_one == replies[1:]


def test_router_keys_match_what_the_engine_stored(engine, traffic):
    """Keys from the events' token ids (chained through parents) equal keys from /tokenize:
    the router can tell what an engine holds from token content alone."""
    bs = engine.block_size
    key_of: dict[int | bytes, int] = {}
    for step in traffic.values():
        for event in step.stored():
            parent = (
                ROOT_KEY if event.parent_block_hash is None else key_of[event.parent_block_hash]
            )
            keys = block_keys(event.token_ids, bs, parent=parent)
            key_of.update(zip(event.block_hashes, keys, strict=True))
    (a,) = traffic["A"].stored()
    (b,) = traffic["B"].stored()
    shared = _common_prefix(traffic["A"].token_ids, traffic["B"].token_ids) // bs
    assert [key_of[h] for h in a.block_hashes] == block_keys(traffic["A"].token_ids, bs)
    b_chain = a.block_hashes[:shared] + b.block_hashes
    assert [key_of[h] for h in b_chain] == block_keys(traffic["B"].token_ids, bs)
    assert (
        block_keys(traffic["B"].token_ids, bs)[:shared]
        == block_keys(traffic["A"].token_ids, bs)[:shared]
    )


def test_evictions_remove_stored_blocks(engine, traffic):
    """More distinct full blocks than the cache holds: vLLM evicts and says so."""
    held: set[int | bytes] = set()
    stored_ever, removed = 0, []
    for frame in _all_frames(traffic):
        for event in decode_batch(frame[2]).events:
            if isinstance(event, BlockStored):
                assert not held & set(event.block_hashes)
                held.update(event.block_hashes)
                stored_ever += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert event.medium == MEDIUM_GPU
                assert set(event.block_hashes) <= held, "removed a block never stored"
                held.difference_update(event.block_hashes)
                removed += event.block_hashes
            else:
                pytest.fail(f"unexpected event {event!r}")
        assert len(held) <= engine.num_blocks  # never more cached blocks than the cache has
    assert stored_ever > engine.num_blocks  # the traffic overflowed the cache
    assert removed
    print(f"{stored_ever} blocks stored, {len(removed)} removed, {len(held)} held at the end")


def test_golden_batch(traffic):
    """The golden batch is A's: rewritten with STACKCTL_UPDATE_GOLDEN=1, else it must still
    look like what vLLM sends now (same event fields) and re-encode byte for byte."""
    (frame,) = traffic["A"].frames
    if os.environ.get("STACKCTL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_bytes(frame[2])
    golden = GOLDEN.read_bytes()
    live_events = msgspec.msgpack.decode(frame[2])[1]
    golden_events = msgspec.msgpack.decode(golden)[1]
    assert [sorted(e) for e in golden_events] == [sorted(e) for e in live_events]
    assert len(decode_batch(golden).events) == len(live_events)
    assert encode_batch(decode_batch(golden)) == golden, (
        f"{GOLDEN.name} does not re-encode byte for byte: test_reencoding_is_byte_identical "
        "names the fields"
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
