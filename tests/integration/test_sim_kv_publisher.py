"""A simulator process publishes vLLM's KV events on ZMQ (``--kv-events-config``).

A SUB socket on loopback receives the batches while chat completions go through the HTTP
API; the blocks they announce must be the rendered prompts' blocks, token by token, and the
replay socket must return the same batches from seq 0, then END_SEQ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from stackctl.kv_events import (
    END_SEQ,
    MEDIUM_GPU,
    ROOT_KEY,
    BlockRemoved,
    BlockStored,
    block_keys,
    decode_batch,
    parse_seq,
    seq_bytes,
)
from stackctl.sim.config import KVEventsConfig
from stackctl.sim.kv_publisher import KvEventPublisher
from stackctl.testing import free_ports
from stackctl.tokenizer import render_chat, token_ids, tokenize
from tests.helpers.sim_fleet import REPO_ROOT, start_sim, stop_sim

BS = 16
TOPIC = b"kv"
# 64 blocks (1024 tokens): the conversations below need about twice that, so blocks get evicted.
FLAGS = ["--num-gpu-blocks-override", "64", "--max-model-len", "1024", "--block-size", str(BS)]


def conversations(n: int) -> list[list[dict[str, str]]]:
    """``n`` chats: one of three system prompts, then a question of their own."""
    systems = [" ".join(f"sys{s}w{j}" for j in range(100 + 17 * s)) for s in range(3)]
    return [
        [{"role": "system", "content": systems[i % 3]},
         {"role": "user", "content": " ".join(f"q{i}w{j}" for j in range(40 + 9 * i))}]
        for i in range(n)
    ]  # fmt: skip


def chat(url: str, messages: list[dict[str, str]]) -> dict:
    body = json.dumps({"model": "sim", "messages": messages, "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def receive_all(sock: zmq.Socket, quiet_ms: int = 1000, limit: int = 10_000) -> list[list[bytes]]:
    """Messages until ``quiet_ms`` pass with none (at most ``limit``)."""
    out = []
    while len(out) < limit and sock.poll(quiet_ms):
        out.append(sock.recv_multipart())
    return out


@pytest.fixture
def kv_sim():
    pub_port, replay_port = free_ports(2)
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub_port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
        "topic": TOPIC.decode(),
    }
    sim = start_sim(
        extra_args=[*FLAGS, "--served-model-name", "sim", "--kv-events-config", json.dumps(config)],
        time_scale=50,
        attempts=1,
    )
    try:
        yield sim, pub_port, replay_port
    finally:
        stop_sim(sim)


def subscribe(ctx: zmq.Context, port: int) -> zmq.Socket:
    """A SUB socket connected to ``port`` whose subscription the publisher has (no slow joiner)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sub.connect(f"tcp://127.0.0.1:{port}")
    assert monitor.poll(10_000), "the SUB socket did not connect to the publisher"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    sub.disable_monitor()
    monitor.close(linger=0)
    time.sleep(0.3)  # the subscription travels right after the handshake
    return sub


def test_sim_publishes_the_blocks_of_its_prompts_and_replays_them(kv_sim):
    sim, pub_port, replay_port = kv_sim
    ctx = zmq.Context()
    try:
        sub = subscribe(ctx, pub_port)
        chats = conversations(15)
        with ThreadPoolExecutor(4) as pool:  # a few at once: steps that batch requests
            replies = list(pool.map(lambda m: chat(sim.url, m), chats))
        assert all(r["usage"]["completion_tokens"] == 1 for r in replies)
        live = receive_all(sub)

        assert live, "no KV event batches arrived"
        assert all(len(frames) == 3 and frames[0] == TOPIC for frames in live)
        assert [parse_seq(frames[1]) for frames in live] == list(range(len(live)))
        announced: dict[int, int] = {}  # engine block hash -> content key (stackctl.kv_events)
        content: set[int] = set()  # content keys of every block ever announced
        removed = 0
        for frames in live:
            batch = decode_batch(frames[2])
            assert batch.events, "a batch is sent only for a step with events"
            for event in batch.events:
                if isinstance(event, BlockStored):
                    assert event.block_size == BS and event.medium == "GPU"
                    assert len(event.token_ids) == BS * len(event.block_hashes)
                    parent = event.parent_block_hash
                    start = ROOT_KEY if parent is None else announced[parent]
                    keys = block_keys(event.token_ids, BS, parent=start)
                    for engine_key, key in zip(event.block_hashes, keys, strict=True):
                        assert isinstance(engine_key, int) and engine_key not in announced
                        announced[engine_key] = key
                    content.update(keys)
                elif isinstance(event, BlockRemoved):
                    for engine_key in event.block_hashes:
                        del announced[engine_key]  # KeyError: removed what was never stored
                    removed += len(event.block_hashes)
        assert removed > 0, "the small cache should have evicted blocks"
        prompt_keys = set()
        for messages in chats:
            ids = token_ids(tokenize(render_chat(messages)))
            prompt_keys.update(block_keys(ids, BS))
        # Every full block of every prompt was announced, and nothing else was.
        assert content == prompt_keys

        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart([b"", seq_bytes(0)])
        replayed = []
        for _ in range(len(live) + 1):
            assert dealer.poll(10_000), "the replay socket did not answer"
            replayed.append(dealer.recv_multipart())
            if replayed[-1][2] == END_SEQ:
                break
        assert replayed[-1] == [b"", b"", END_SEQ, b""]
        assert [frames[1:] for frames in replayed[:-1]] == live

        dealer.send_multipart([b"", seq_bytes(len(live) - 2)])  # from a later seq: the tail
        tail = [dealer.recv_multipart() for _ in range(3) if dealer.poll(10_000)]
        assert [frames[1:] for frames in tail[:2]] == live[-2:]
        assert tail[2][2] == END_SEQ
    finally:
        ctx.destroy(linger=0)


def run_sim(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stackctl.sim", "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('["enable_kv_cache_events"]', "must be a JSON object"),
        ('{"enable_kv_cache_events": true, "endpiont": "tcp://*:5557"}', "unknown key(s) endpiont"),
        ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events must be bool"),
        ('{"publisher": "kafka"}', 'publisher must be "zmq" or "null"'),
        ('{"hwm": -1}', "hwm must not be negative"),
    ],
)
def test_a_bad_kv_events_config_is_one_line_and_exit_2(value, reason):
    result = run_sim("--kv-events-config", value)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--kv-events-config" in errors[0] and reason in errors[0]


def test_an_endpoint_in_use_is_one_line_and_exit_1():
    http_port, zmq_port = free_ports(2)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", zmq_port))
        blocker.listen()
        config = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{zmq_port}"}
        result = run_sim("--port", str(http_port), "--kv-events-config", json.dumps(config))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "stackctl sim:" in line]
    assert len(lines) == 1 and f"cannot open tcp://*:{zmq_port}" in lines[0]


async def test_publisher_in_process_binds_ipc_connects_tcp_and_replays_from_a_seq(tmp_path):
    """The publisher alone: ipc:// is bound, a tcp host is connected to, and a step without
    events sends nothing."""
    (sub_port,) = free_ports(1)
    ctx = zmq.asyncio.Context()
    bound = ctx.socket(zmq.SUB)  # the publisher connects to this one
    bound.setsockopt(zmq.SUBSCRIBE, b"")
    bound.bind(f"tcp://127.0.0.1:{sub_port}")
    publishers = []
    try:
        for endpoint in (f"ipc://{tmp_path}/events", f"tcp://127.0.0.1:{sub_port}"):
            config = KVEventsConfig(
                enable_kv_cache_events=True,
                endpoint=endpoint,
                replay_endpoint=f"ipc://{tmp_path}/replay-{len(publishers)}",
                buffer_steps=2,
            )
            publisher = KvEventPublisher(config)
            publisher.start()
            publishers.append(publisher)
            if endpoint.startswith("ipc://"):
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(endpoint)
            else:
                sub = bound
            stored = BlockStored(
                block_hashes=[5, -6], parent_block_hash=None, token_ids=list(range(2 * BS)),
                block_size=BS, lora_id=None, medium=MEDIUM_GPU, lora_name=None,
            )  # fmt: skip
            frames: list[list[bytes]] = []
            for _ in range(100):  # until the connection is up: batches before it are lost
                publisher.events.append(stored)
                publisher.flush()
                if await sub.poll(100):
                    frames.append(await sub.recv_multipart())
                    break
            assert frames, f"nothing arrived over {endpoint}"
            while await sub.poll(300):  # a late one of the batches before: keep the newest
                frames[0] = await sub.recv_multipart()
            assert parse_seq(frames[0][1]) == publisher.next_seq - 1
            publisher.flush()  # no events since: no batch
            publisher.events.append(BlockRemoved(block_hashes=[-6], medium=MEDIUM_GPU))
            publisher.flush()
            assert await sub.poll(5000)
            frames.append(await sub.recv_multipart())
            first, last = parse_seq(frames[0][1]), parse_seq(frames[1][1])
            assert last == first + 1 == publisher.next_seq - 1
            assert decode_batch(frames[0][2]).events == [stored]
            assert decode_batch(frames[1][2]).data_parallel_rank == 0
            assert publisher.sent == publisher.next_seq and publisher.dropped == 0

            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(config.replay_endpoint)
            await dealer.send_multipart([b"", b"bad"])  # malformed: ignored
            await dealer.send_multipart([b"", seq_bytes(0)])  # only the last 2 are kept
            replies = []
            for _ in range(3):
                assert await dealer.poll(5000)
                replies.append(await dealer.recv_multipart())
            assert [r[1:] for r in replies[:2]] == frames
            assert replies[2] == [b"", b"", END_SEQ, b""]
            dealer.close(linger=0)
            if sub is not bound:
                sub.close(linger=0)
    finally:
        for publisher in publishers:
            await publisher.close()
        ctx.destroy(linger=0)


async def test_a_long_replay_comes_whole_and_in_order(tmp_path):
    config = KVEventsConfig(
        enable_kv_cache_events=True,
        endpoint=f"ipc://{tmp_path}/events",
        replay_endpoint=f"ipc://{tmp_path}/replay",
        buffer_steps=600,
    )
    publisher = KvEventPublisher(config)
    publisher.start()
    ctx = zmq.asyncio.Context()
    try:
        for i in range(700):  # the first 100 fall out of the buffer
            publisher.events.append(BlockRemoved(block_hashes=[i], medium=MEDIUM_GPU))
            publisher.flush()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(config.replay_endpoint)
        await dealer.send_multipart([b"", seq_bytes(0)])
        seqs = []
        for _ in range(700):
            assert await dealer.poll(5000), f"the replay stopped after {len(seqs)} batches"
            frames = await dealer.recv_multipart()
            if frames[2] == END_SEQ:
                break
            seqs.append(parse_seq(frames[2]))
            assert decode_batch(frames[3]).events[0].block_hashes == [seqs[-1]]
        assert seqs == list(range(100, 700))
    finally:
        await publisher.close()
        ctx.destroy(linger=0)
