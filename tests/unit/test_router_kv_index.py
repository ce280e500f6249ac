"""The router's event-based view of what engines hold (stackctl/router/kv_index.py): applying
vLLM-format batches, recovering missed ones through replay, noticing restarts, and kv_aware
routing on it (falling back to the estimate where the view cannot be trusted)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import pytest
import zmq
import zmq.asyncio

from stackctl.kv_events import (
    END_SEQ,
    MEDIUM_CPU,
    TOPIC,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    block_keys,
    encode_batch,
    parse_seq,
    seq_bytes,
)
from stackctl.router.backends import Backend
from stackctl.router.config import BackendConfig, RouterConfigError, parse_config
from stackctl.router.kv_index import KvEvents, KvEventView, ViewState
from stackctl.router.policies import KvAwarePolicy, RouteRequest
from stackctl.testing import free_ports, wait_until_async
from stackctl.tokenizer import token_ids, tokenize

BS = 4


def stored(hashes, parent, tokens, medium="GPU"):
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=parent,
        token_ids=list(tokens),
        block_size=BS,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


def batch(*events):
    return KVEventBatch(ts=0.0, events=list(events))


TOKENS = list(range(100, 124))  # 6 blocks of 4
KEYS = block_keys(TOKENS, BS)


def test_stored_chains_through_parents_and_matches_by_content():
    view = KvEventView()
    view.apply(0, batch(stored([b"a", b"b"], None, TOKENS[:8])))
    view.apply(1, batch(stored([b"c"], b"b", TOKENS[8:12])))
    assert view.state is ViewState.SYNCED and view.block_size == BS
    assert view.match(KEYS) == (3, 3)  # blocks 0-2, whatever the engine called them
    other = block_keys([7, *TOKENS[1:]], BS)  # first token differs: no shared block
    assert view.match(other) == (0, 0)


def test_removed_cleared_cpu_tier_orphans_and_malformed():
    view = KvEventView()
    view.apply(0, batch(stored([1, 2, 3], None, TOKENS[:12])))
    view.apply(1, batch(stored([2, 3, 4], 1, TOKENS[4:16], medium=MEDIUM_CPU)))
    assert view.match(KEYS) == (3, 4)  # GPU 0-2, then block 3 only in the CPU tier
    view.apply(2, batch(BlockRemoved(block_hashes=[2], medium="GPU")))
    assert view.match(KEYS) == (1, 4)  # block 1 still in the CPU tier
    view.apply(3, batch(stored([9], 12345, TOKENS[:4])))  # parent never seen
    view.apply(4, batch(stored([10], None, TOKENS[:5])))  # 5 token ids for one 4-token block
    assert (view.orphans, view.malformed) == (1, 1)
    view.apply(5, batch(AllBlocksCleared()))
    assert view.match(KEYS) == (0, 0) and view.gpu_blocks == view.cpu_blocks == 0


def test_a_gap_makes_the_view_warming_until_a_cache_full_has_been_stored():
    view = KvEventView()
    view.apply(0, batch(stored([1], None, TOKENS[:4])))
    view.lost()
    assert view.state is ViewState.WARMING and not view.usable(capacity_tokens=8)
    view.apply(1, batch(stored([2], 1, TOKENS[4:8])))
    assert not view.usable(capacity_tokens=8) and not view.usable(capacity_tokens=None)
    view.apply(2, batch(stored([3], 2, TOKENS[8:12])))
    assert view.usable(capacity_tokens=8) and view.state is ViewState.SYNCED


class Publisher:
    """A vLLM-like publisher: PUB + a replay ROUTER over a buffer of sent batches."""

    def __init__(self, ctx, pub_port, replay_port, buffer=100):
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{pub_port}")
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.bind(f"tcp://127.0.0.1:{replay_port}")
        self.buffer = deque(maxlen=buffer)
        self.task = asyncio.create_task(self._serve_replay())

    async def send(self, seq, payload, publish=True):
        self.buffer.append((seq, payload))
        if publish:
            await self.pub.send_multipart((TOPIC.encode(), seq_bytes(seq), payload))

    async def _serve_replay(self):
        while True:
            client, _, start = await self.replay.recv_multipart()
            for seq, payload in list(self.buffer):
                if seq >= parse_seq(start):
                    await self.replay.send_multipart(
                        (client, b"", TOPIC.encode(), seq_bytes(seq), payload)
                    )
            await self.replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def close(self):
        self.task.cancel()
        self.pub.close(linger=0)
        self.replay.close(linger=0)


def backend_with_events(pub_port, replay_port=None, name="e0"):
    return Backend(
        BackendConfig(
            name=name,
            url="http://127.0.0.1:1",
            model="m",
            kv_events=f"tcp://127.0.0.1:{pub_port}",
            kv_events_replay=f"tcp://127.0.0.1:{replay_port}" if replay_port else None,
        )
    )


@contextlib.asynccontextmanager
async def subscribed(backends, ports):
    ctx = zmq.asyncio.Context()
    publisher = Publisher(ctx, *ports)
    events = KvEvents()
    events.sync(backends)
    try:
        yield publisher, events
    finally:
        await events.stop()
        publisher.close()
        ctx.term()


async def until_subscribed(publisher, view):
    """ZMQ's slow joiner: publish a probe batch until the subscriber has seen one."""
    for _ in range(100):  # bounded: 5 s
        await publisher.send(0, encode_batch(batch()))
        await asyncio.sleep(0.05)
        if view.batches:
            return
    raise AssertionError("the subscriber never received a batch")


async def test_missed_batches_are_replayed_and_a_restart_starts_over():
    ports = free_ports(2)
    backend = backend_with_events(*ports)
    async with subscribed([backend], ports) as (publisher, _):
        view = backend.kv_view
        await until_subscribed(publisher, view)
        await publisher.send(1, encode_batch(batch(stored([1], None, TOKENS[:4]))))
        # 2 is never published (a dropped message): only the replay socket has it
        await publisher.send(2, encode_batch(batch(stored([2], 1, TOKENS[4:8]))), publish=False)
        await publisher.send(3, encode_batch(batch(stored([3], 2, TOKENS[8:12]))))
        await wait_until_async(lambda: view.last_seq == 3, 5, what="seq 3 applied")
        assert view.replayed == 1 and view.state is ViewState.SYNCED
        assert view.match(KEYS) == (3, 3)
        # the engine restarts: seq starts over, and so does the view
        publisher.buffer.clear()
        await publisher.send(0, encode_batch(batch(stored([7], None, TOKENS[:4]))))
        await wait_until_async(lambda: view.restarts == 1, 5, what="restart noticed")
        assert view.match(KEYS) == (1, 1) and view.last_seq == 0


async def test_a_replay_that_no_longer_reaches_back_applies_what_it_has_and_warms():
    ports = free_ports(2)
    backend = backend_with_events(*ports)
    async with subscribed([backend], ports) as (publisher, _):
        view = backend.kv_view
        await until_subscribed(publisher, view)
        publisher.buffer.clear()  # batches 1-4 are gone from the engine's buffer too
        for seq, (block, parent) in enumerate([(1, None), (2, 1), (3, 2)], start=5):
            tokens = TOKENS[(block - 1) * BS : block * BS]
            await publisher.send(seq, encode_batch(batch(stored([block], parent, tokens))), False)
        await publisher.send(8, encode_batch(batch(stored([4], 3, TOKENS[12:16]))))
        await wait_until_async(lambda: view.last_seq == 8, 5, what="seq 8 applied")
        assert view.replayed == 3 and view.state is ViewState.WARMING and view.gaps == 1
        assert view.match(KEYS) == (4, 4)  # the recent blocks the buffer still had, and 8's


async def test_a_gap_without_replay_leaves_the_view_warming():
    ports = free_ports(2)
    backend = backend_with_events(ports[0])  # no replay endpoint
    async with subscribed([backend], ports) as (publisher, _):
        view = backend.kv_view
        await until_subscribed(publisher, view)
        await publisher.send(5, encode_batch(batch(stored([1], None, TOKENS[:4]))))
        await wait_until_async(lambda: view.last_seq == 5, 5, what="seq 5 applied")
        assert view.state is ViewState.WARMING and view.gaps == 1
        assert view.match(KEYS) == (1, 1)  # what it did see is kept


async def test_garbage_on_the_stream_is_counted_and_the_stream_goes_on():
    ports = free_ports(2)
    backend = backend_with_events(*ports)
    async with subscribed([backend], ports) as (publisher, _):
        view = backend.kv_view
        await until_subscribed(publisher, view)
        await publisher.pub.send_multipart((TOPIC.encode(), seq_bytes(1), b"\xc1garbage"))
        await publisher.pub.send_multipart((TOPIC.encode(), b"short", b""))
        await publisher.send(1, encode_batch(batch(stored([1], None, TOKENS[:4]))))
        await wait_until_async(lambda: view.last_seq == 1, 5, what="seq 1 applied")
        assert view.malformed == 2 and view.match(KEYS) == (1, 1)


def route(policy, backends, text):
    return policy.choose(backends, RouteRequest({"prompt": text}, {}))


def test_kv_aware_on_events_follows_what_engines_report_not_what_it_sent():
    backends = [
        Backend(BackendConfig(name=f"e{i}", url=f"http://h{i}", model="m")) for i in range(3)
    ]
    policy = KvAwarePolicy(kv_index="events")
    text = " ".join(f"w{i}" for i in range(200))  # 200 tokens (50 blocks), 889 chars
    first = route(policy, backends, text).backend  # no view anywhere: the estimate places it
    # The engines' events say another engine holds the prompt (e.g. the chosen one evicted
    # it and a second router sent it elsewhere): the view wins over the estimate.
    ids = token_ids(tokenize(text))
    holder = next(b for b in backends if b is not first)
    for b in backends:
        b.kv_view = KvEventView()
        b.kv_view.apply(0, batch())
    holder.kv_view.apply(
        1,
        batch(
            BlockStored(
                block_hashes=list(range(50)),
                parent_block_hash=None,
                token_ids=ids,
                block_size=BS,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        ),
    )
    for b in backends:  # every view knows the block size once one block is stored
        b.kv_view.block_size = BS
    choice = route(policy, backends, text)
    assert choice.backend is holder and choice.predicted_cached_tokens == 200
    # A view not trusted alone (a gap, not warmed again) still proves what it shows...
    third = next(b for b in backends if b not in (first, holder))
    first.kv_view.lost()
    holder.kv_view.lost()
    choice = route(policy, backends, text)
    assert choice.backend is holder and choice.predicted_cached_tokens == 200
    # ... and once it shows nothing, the estimate decides: it has sent the prompt to `first`
    # and `holder`; the third engine's synced view says it holds nothing.
    holder.kv_view.apply(2, batch(BlockRemoved(block_hashes=list(range(50)), medium="GPU")))
    choice = route(policy, backends, text)
    assert choice.backend in (first, holder) and choice.backend is not third
    assert choice.predicted_cached_tokens == len(text) // 256 * 256 / 4  # whole chunks


def test_router_config_kv_index_and_endpoints_are_validated():
    base = {"engines": [{"name": "e", "url": "http://h:1", "model": "m"}]}
    assert parse_config(base).kv_index == "estimate"
    assert parse_config({**base, "kv_index": "events"}).kv_index == "events"
    with pytest.raises(RouterConfigError, match="kv_index: expected one of estimate, events"):
        parse_config({**base, "kv_index": "exact"})
    bad = {"engines": [{"name": "e", "url": "http://h:1", "model": "m", "kv_events": "h:5557"}]}
    with pytest.raises(RouterConfigError, match=r"engines\[0\].kv_events: expected a ZMQ endpoint"):
        parse_config(bad)
    lone = {"engines": [{**base["engines"][0], "kv_events_replay": "tcp://h:5558"}]}
    with pytest.raises(RouterConfigError, match="kv_events_replay: needs kv_events"):
        parse_config(lone)


@pytest.mark.parametrize("policy_name", ["kv_aware", "cost"])
def test_with_a_cpu_tier_the_events_do_not_report_the_estimate_stands_beside_the_view(policy_name):
    """LMCache publishes no events: a conversation the GPU evicted (BlockRemoved) may be in the
    CPU tier still, which the estimate (sized to both tiers) remembers. With the events alone
    returning turns lost their CPU-tier hits (the published multi-round run: CPU hits 3-9%
    against 37-49% on the estimate, TTFT 1.3-1.5 s against 0.3-0.6 s)."""
    from stackctl.router.policies import make_policy

    for gpu_only in (True, False):
        backends = [
            Backend(
                BackendConfig(
                    name=f"e{i}", url=f"http://h{i}", model="m", kv_events_gpu_only=gpu_only
                )
            )
            for i in range(3)
        ]
        policy = make_policy(policy_name, {}, kv_index="events")
        for b in backends:  # synced views that hold nothing
            b.kv_view = KvEventView()
            b.kv_view.apply(0, batch())
            b.kv_view.block_size = BS
        chat = [{"role": "user", "content": " ".join(f"w{i}" for i in range(200))}]
        home = policy.choose(backends, RouteRequest({"messages": chat}, {})).backend
        chat += [{"role": "assistant", "content": "an answer"}, {"role": "user", "content": "more"}]
        again = policy.choose(backends, RouteRequest({"messages": chat}, {}))
        if gpu_only:  # the estimate still places it at home, holding its first turn
            assert again.backend is home and again.predicted_cached_tokens > 150
        else:  # the views say nobody holds it: placed as new, for balance
            assert again.backend is not home and again.predicted_cached_tokens == 0


def test_up_marks_engines_with_lmcache_as_reporting_their_gpu_tier_only(tmp_path):
    from stackctl.inventory import load_inventory
    from stackctl.plan import router_engines

    text = """
cluster: t
model: {name: meta-llama/Llama-3.1-8B-Instruct}
engine: {kind: sim, lmcache: {enabled: LMCACHE}}
router: {policy: kv_aware, kv_index: events}
hosts:
  - {name: head, address: 10.0.0.1, roles: [router]}
  - {name: g1, address: 10.0.0.2}
"""
    for lmcache in (True, False):
        path = tmp_path / f"inv-{lmcache}.yaml"
        path.write_text(text.replace("LMCACHE", str(lmcache).lower()))
        (entry,) = router_engines(load_inventory(path))
        assert entry.get("kv_events_gpu_only", False) is lmcache
        config = parse_config({"engines": [entry]})
        assert config.engines[0].kv_events_gpu_only is lmcache
