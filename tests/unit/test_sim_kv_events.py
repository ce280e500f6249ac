"""The simulator's KV events (stackctl.kv_events) describe exactly what its GPU cache holds.

The engine runs on a virtual clock with a small pool, so prompts that share prefixes hit,
evict and get preempted; after every step the events so far, applied to a map keyed by the
engine's block hash, must equal the cache's keys, with each block's token ids and parent.
"""

from __future__ import annotations

import json
import random

import pytest

from stackctl.kv_events import (
    MEDIUM_GPU,
    BlockRemoved,
    BlockStored,
    Event,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from stackctl.sim.config import KVEventsConfig, parse_args
from stackctl.sim.engine import SimEngine, SimEngineConfig, SimRequest
from stackctl.sim.kvcache import GpuPrefixCache, chain_hashes, event_hash
from stackctl.sim.profiles import A100_80GB, LLAMA_31_8B
from stackctl.sim.timing import TimingModel
from stackctl.tokenizer import token_ids

TIMING = TimingModel(A100_80GB, LLAMA_31_8B)
BS = 16


class CacheMirror:
    """What a subscriber knows: block hash -> (parent hash, token ids), from events alone."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.stored = self.removed = 0

    def apply(self, event: Event) -> None:
        if isinstance(event, BlockStored):
            assert event.medium == MEDIUM_GPU and event.block_size == BS
            assert event.lora_id is None and event.lora_name is None
            assert event.block_hashes, "a BlockStored with no blocks"
            assert len(event.token_ids) == BS * len(event.block_hashes)
            parent = event.parent_block_hash
            for i, key in enumerate(event.block_hashes):
                assert isinstance(key, int)
                assert key not in self.blocks, "stored again while cached: only new blocks count"
                if parent is not None:
                    assert parent in self.blocks, "a block's parent must be cached before it"
                self.blocks[key] = (parent, tuple(event.token_ids[i * BS : (i + 1) * BS]))
                parent = key
                self.stored += 1
        elif isinstance(event, BlockRemoved):
            assert event.medium == MEDIUM_GPU
            for key in event.block_hashes:
                assert isinstance(key, int)
                assert key in self.blocks, "removed a block that was never stored"
                del self.blocks[key]
                self.removed += 1
        else:
            raise AssertionError(f"unexpected event {event!r}")


def expected_blocks(requests: list[SimRequest]) -> dict[int, tuple[int | None, tuple[int, ...]]]:
    """Every full block of every request's tokens: hash -> (parent hash, token ids of its words)."""
    out: dict[int, tuple[int | None, tuple[int, ...]]] = {}
    for req in requests:
        keys = [event_hash(k) for k in chain_hashes(req.tokens, BS)]
        for i, key in enumerate(keys):
            out[key] = (
                keys[i - 1] if i else None,
                tuple(token_ids(req.tokens[i * BS : (i + 1) * BS])),
            )
    return out


def make_engine(blocks: int, cpu_chunks: int | None = None) -> tuple[SimEngine, list[Event]]:
    sink: list[Event] = []
    config = SimEngineConfig(
        num_gpu_blocks=blocks,
        block_size=BS,
        max_num_batched_tokens=512,
        cpu_capacity_chunks=cpu_chunks,
        cpu_chunk_size=64,
    )
    return SimEngine(config, TIMING, kv_events=sink), sink


def run_checked(
    engine: SimEngine, sink: list[Event], arrivals: list[tuple[float, SimRequest]]
) -> CacheMirror:
    """Run ``arrivals`` step by step; after each step the mirror must equal the cache."""
    mirror = CacheMirror()
    pending = sorted(arrivals, key=lambda a: a[0])
    requests = [req for _, req in pending]
    now, i, steps = 0.0, 0, 0
    while i < len(pending) or engine.has_work():
        steps += 1
        assert steps < 100_000, "the engine did not finish"
        while i < len(pending) and pending[i][0] <= now:
            engine.add_request(pending[i][1], pending[i][0])
            i += 1
        step = engine.schedule(now) if engine.has_work() else None
        if step is None:
            now = pending[i][0]
            continue
        now += step.duration
        engine.complete(step, now)
        # One batch per step, through the wire format, as the publisher sends it.
        batch = decode_batch(encode_batch(KVEventBatch(ts=now, events=list(sink))))
        sink.clear()
        for event in batch.events:
            mirror.apply(event)
        assert set(mirror.blocks) == engine.gpu.cached_keys()
    expected = expected_blocks(requests)
    for key, value in mirror.blocks.items():
        assert value == expected[key], "a block's parent or token ids differ from its words'"
    return mirror


def shared_prefix_workload(n: int, seed: int = 7) -> list[tuple[float, SimRequest]]:
    """``n`` requests: one of 4 system prompts, then a question of their own, arriving in bursts."""
    rng = random.Random(seed)
    systems = [[f"sys{s}w{j}" for j in range(rng.randrange(40, 120))] for s in range(4)]
    out = []
    for r in range(n):
        tokens = systems[rng.randrange(4)] + [f"q{r}w{j}" for j in range(rng.randrange(1, 90))]
        out.append((r * 0.02, SimRequest(str(r), tokens, rng.randrange(1, 40), seed=r)))
    return out


@pytest.mark.parametrize("cpu_chunks", [None, 8], ids=["gpu-only", "with-cpu-tier"])
def test_events_mirror_the_cache_through_hits_evictions_and_preemptions(cpu_chunks):
    engine, sink = make_engine(blocks=40, cpu_chunks=cpu_chunks)
    arrivals = shared_prefix_workload(60)
    mirror = run_checked(engine, sink, arrivals)
    assert engine.gpu.evictions > 0 and mirror.removed == engine.gpu.evictions
    assert sum(req.num_preemptions for _, req in arrivals) > 0, "the pool should be too small"
    assert sum(req.gpu_hit_tokens for _, req in arrivals) > 0, "prefixes should be shared"
    assert mirror.stored == len(mirror.blocks) + mirror.removed
    if cpu_chunks:
        assert sum(req.cpu_hit_tokens for _, req in arrivals) > 0


def test_a_hit_on_cached_blocks_emits_nothing():
    engine, sink = make_engine(blocks=200)
    words = [f"w{i}" for i in range(5 * BS)]  # whole blocks: the last is recomputed, not hit
    first = SimRequest("a", list(words), 1)
    mirror = run_checked(engine, sink, [(0.0, first)])
    assert mirror.stored == 5 and mirror.removed == 0
    again = SimRequest("b", list(words), 1)
    engine.add_request(again, 1.0)
    engine.run_until_idle(1.0)
    assert again.gpu_hit_tokens == 4 * BS
    assert sink == []


def test_a_request_announces_its_new_blocks_as_one_chained_run():
    engine, sink = make_engine(blocks=200)
    system = [f"s{i}" for i in range(2 * BS)]
    run_checked(engine, sink, [(0.0, SimRequest("a", system + ["x"], 1))])
    sink.clear()
    tail = [f"t{i}" for i in range(3 * BS)]
    req = SimRequest("b", system + tail + ["y"], 1)
    engine.add_request(req, 1.0)
    engine.run_until_idle(1.0)
    assert len(sink) == 1 and isinstance(sink[0], BlockStored)
    keys = [event_hash(k) for k in chain_hashes(system + tail, BS)]
    assert all(0 <= k < 2**64 for k in keys)  # unsigned 64-bit, as vLLM's
    assert sink[0].block_hashes == keys[2:5]
    assert sink[0].parent_block_hash == keys[1]
    assert sink[0].token_ids == token_ids(tail)


def test_no_sink_no_events_and_caching_off_no_events():
    engine = SimEngine(SimEngineConfig(num_gpu_blocks=40, block_size=BS), TIMING)
    assert engine.gpu.events is None
    for _, req in shared_prefix_workload(10):
        engine.add_request(req, 0.0)
    engine.run_until_idle()
    sink: list[Event] = []
    off = SimEngine(
        SimEngineConfig(num_gpu_blocks=40, block_size=BS, enable_prefix_caching=False),
        TIMING,
        kv_events=sink,
    )
    for _, req in shared_prefix_workload(10):
        off.add_request(req, 0.0)
    off.run_until_idle()
    assert sink == [] and off.steps > 0


def test_commit_stored_splits_runs_at_blocks_already_cached():
    sink: list[Event] = []
    cache = GpuPrefixCache(10, events=sink)
    assert cache.allocate(1)
    cache.commit_stored([12], 11, list(range(BS)), BS)
    assert cache.allocate(4)
    ids = list(range(100, 100 + 4 * BS))
    cache.commit_stored([11, 12, 13, 14], None, ids, BS)  # 12 is cached already: shared
    assert [e.block_hashes for e in sink if isinstance(e, BlockStored)] == [[12], [11], [13, 14]]
    assert [e.parent_block_hash for e in sink if isinstance(e, BlockStored)] == [11, None, 12]
    assert sink[1].token_ids == ids[:BS] and sink[2].token_ids == ids[2 * BS :]
    assert cache.cached_keys() == {11, 12, 13, 14} and cache.num_free == 6


def test_evictions_are_recorded_oldest_first():
    sink: list[Event] = []
    cache = GpuPrefixCache(3, events=sink)
    assert cache.allocate(3)
    cache.commit_stored([1, 2, 3], None, [0] * 3 * BS, BS)
    cache.release([1, 2, 3], 0)  # the tail becomes evictable first
    sink.clear()
    assert cache.allocate(2)
    assert sink == [BlockRemoved(block_hashes=[3, 2], medium=MEDIUM_GPU)]
    assert cache.cached_keys() == {1} and cache.evictions == 2


@pytest.mark.parametrize(
    ("flag", "active"),
    [
        (None, False),
        ('{"enable_kv_cache_events": true}', True),  # as vLLM: the publisher defaults to zmq
        ('{"enable_kv_cache_events": true, "publisher": "zmq"}', True),
        ('{"enable_kv_cache_events": true, "publisher": "null"}', False),
        ('{"enable_kv_cache_events": false, "publisher": "zmq"}', False),
    ],
)
def test_events_are_published_only_when_enabled_with_zmq(flag, active):
    config = parse_args(["--kv-events-config", flag] if flag else [], environ={})
    assert config.kv_events.active is active


def test_kv_events_config_keeps_every_key():
    flag = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///run/ev",
            "replay_endpoint": "tcp://*:5558", "buffer_steps": 5, "hwm": 7,
            "max_queue_size": 9, "topic": "kv"}  # fmt: skip
    config = parse_args(["--kv-events-config", json.dumps(flag)], environ={})
    assert config.kv_events == KVEventsConfig(**flag)
    assert parse_args([], environ={}).kv_events == KVEventsConfig()
