"""KV-event batches as an engine publishes them, for tests and benchmarks that set up what a
router's view of an engine holds without running the engine."""

from __future__ import annotations

from stackctl.kv_events import MEDIUM_GPU, BlockStored, KVEventBatch


def prefix_stored(
    ids: list[int], blocks: int, block_size: int, medium: str = MEDIUM_GPU
) -> KVEventBatch:
    """One batch storing the first ``blocks`` full blocks of ``ids`` (engine hashes 0..n-1)."""
    return KVEventBatch(
        ts=0.0,
        events=[
            BlockStored(
                block_hashes=list(range(blocks)),
                parent_block_hash=None,
                token_ids=ids[: blocks * block_size],
                block_size=block_size,
                lora_id=None,
                medium=medium,
                lora_name=None,
            )
        ],
    )
