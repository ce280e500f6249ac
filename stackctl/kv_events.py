"""vLLM's KV-cache events on the wire: the messages, their framing, and the router's block keys.

An engine started with ``--kv-events-config`` publishes, on a ZMQ PUB socket, one message per
batch of cache changes: three frames ``(topic, seq, payload)``, ``seq`` an 8-byte big-endian
counter starting at 0 when the engine starts, ``payload`` a msgpack ``KVEventBatch``. A batch
is an array ``[ts, events, data_parallel_rank]``; each event a map tagged by ``type``:

- ``BlockStored``: ``block_hashes`` (the engine's own hash of each new block, an int),
  ``parent_block_hash`` (the block before the first, None at a prompt's start), ``token_ids``
  (every token of those blocks, in order), ``block_size``, ``medium`` ("GPU", "CPU", ...).
- ``BlockRemoved``: ``block_hashes`` evicted from ``medium``.
- ``AllBlocksCleared``: the engine's prefix cache was reset.

With a ``replay_endpoint`` (a ROUTER socket) a subscriber that missed batches sends
``(b"", seq.to_bytes(8, "big"))`` from a DEALER socket and gets every buffered batch from
``seq`` on as ``(b"", topic, seq, payload)``, then ``(b"", b"", END_SEQ, b"")``.

This module is the one definition of that format in stackctl: the simulator publishes with it
(stackctl.sim), the router subscribes with it (stackctl.router.kv_index), and a test checks
it against real vLLM's messages. Unknown fields are ignored, so vLLM may add some.

The router does not use the engine's block hashes to match prompts (their algorithm and seed
are the engine's business and may change): it keys each block by its token content
(:func:`block_keys`), which it can compute for any prompt it tokenizes the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

#: The topic stackctl's engines publish on (``--kv-events-config``'s ``topic``).
TOPIC = "kv"
#: The replay socket's end-of-replay marker (a signed -1).
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"

#: The engine's name for a block: vLLM 0.32 sends a 64-bit unsigned int (bytes, a digest,
#: with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
BlockHash = bytes | int


class KVCacheEvent(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """One change to an engine's cache: a map with ``type`` = the class name. The fields are
    vLLM 0.32's, in its order: those without a default are always written (None included),
    the rest only when set, so re-encoding a real payload gives back its exact bytes."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """The batch in ``payload``; :class:`msgspec.DecodeError` (a ValueError) when it is not one."""
    return _decoder.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def parse_seq(frame: bytes) -> int:
    """The sequence number of a message's second frame (-1: the end of a replay)."""
    if len(frame) != 8:
        raise ValueError(f"a sequence frame has 8 bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


#: The key before a prompt's first block.
ROOT_KEY = hash("stackctl.kv-events.root")


def block_keys(
    token_ids: Sequence[int], block_size: int, parent: int = ROOT_KEY, start: int = 0
) -> list[int]:
    """Chained content keys of the full ``block_size``-token blocks of ``token_ids`` from
    ``start``: ``key_i = hash((key_{i-1}, tokens of block i))``, so one key names a whole
    prefix. ``parent`` is the key of the block before ``start`` (:data:`ROOT_KEY` at 0).

    Python's tuple hash is salted per process, which is fine: keys never leave the router.
    """
    keys = []
    key = parent
    for i in range(start, len(token_ids) - block_size + 1, block_size):
        key = hash((key, tuple(token_ids[i : i + block_size])))
        keys.append(key)
    return keys


def event_summary(batch: KVEventBatch) -> dict[str, Any]:
    """Counts by event type, for logs and tests."""
    counts: dict[str, Any] = {}
    for event in batch.events:
        name = type(event).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts
