"""The two KV tiers: vLLM's GPU prefix cache (blocks) and LMCache's local CPU store (chunks).

Both key their units by chained hashes: a unit's key is the hash of the previous unit's key
and this unit's tokens, so one key identifies a whole prefix, and equal keys mean equal
prefixes. Only full units are keyed. The hash is Python's built-in ``hash`` of a tuple of
token strings: C speed, and every ``str`` caches its own hash, so hashing a 20k-token
prompt costs about a millisecond. Keys live only inside one simulator process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from stackctl.kv_events import MEDIUM_GPU, BlockHash, BlockRemoved, BlockStored, Event

ROOT_HASH = hash("stackctl.sim.kv-root")
_U64 = (1 << 64) - 1


def event_hash(key: int) -> int:
    """A block's key as its KV events name it: a 64-bit unsigned int, as vLLM's (Python's
    hash is signed)."""
    return key & _U64


def extend_chain(
    hashes: list[int], tokens: Sequence[str], unit: int, upto: int | None = None
) -> list[int]:
    """Append to ``hashes`` the chained keys of the next full ``unit``-token units of ``tokens``.

    ``hashes`` already holds the keys of the first ``len(hashes)`` units; units are added up
    to ``upto`` tokens (default: all of ``tokens``). Returns ``hashes``.
    """
    end = len(tokens) if upto is None else min(upto, len(tokens))
    start = len(hashes) * unit
    previous = hashes[-1] if hashes else ROOT_HASH
    for i in range(start, end - unit + 1, unit):
        previous = hash((previous, tuple(tokens[i : i + unit])))
        hashes.append(previous)
    return hashes


def chain_hashes(tokens: Sequence[str], unit: int) -> list[int]:
    """Chained keys of every full ``unit``-token unit of ``tokens``."""
    return extend_chain([], tokens, unit)


class GpuPrefixCache:
    """vLLM's block pool with automatic prefix caching.

    A block is either blank, held (reference count > 0: pinned by running requests), or
    cached and unreferenced ("evictable"). Evictable blocks stay reusable until the pool
    needs room, then go least recently used first. Requests hold their full, keyed blocks
    by key and their partial (or, with caching off, all) blocks anonymously as a count.

    ``events``, when given, is a sink: the cache appends vLLM's KV events to it as blocks
    are cached (:meth:`commit_stored`) and evicted (:meth:`allocate`), and a publisher
    drains it (stackctl.sim.kv_publisher). None (the default) records nothing and costs
    nothing on the hot path.
    """

    def __init__(self, num_blocks: int, enabled: bool = True, events: list[Event] | None = None):
        self.num_blocks = num_blocks
        self.enabled = enabled
        self.events = events
        self._refs: dict[int, int] = {}  # key -> reference count, every cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refs == 0, oldest first
        self._blank = num_blocks
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take (blank plus evictable)."""
        return self._blank + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def __contains__(self, key: int) -> bool:
        return key in self._refs

    def cached_keys(self) -> set[int]:
        """Every cached block's key (held or evictable) as KV events name it."""
        return {event_hash(key) for key in self._refs}

    def match(self, keys: Sequence[int], limit: int) -> int:
        """How many of the first ``limit`` keys are cached, as an unbroken prefix."""
        if not self.enabled:
            return 0
        refs = self._refs
        n = 0
        for key in keys[:limit]:
            if key not in refs:
                break
            n += 1
        return n

    def evictable_among(self, keys: Sequence[int]) -> int:
        """How many of ``keys`` are unreferenced (acquiring them shrinks ``num_free``)."""
        evictable = self._evictable
        return sum(1 for key in keys if key in evictable)

    def acquire(self, keys: Sequence[int]) -> None:
        """Reference cached blocks (a prefix hit): they are pinned until released."""
        refs, evictable = self._refs, self._evictable
        for key in keys:
            count = refs[key]
            if count == 0:
                del evictable[key]
            refs[key] = count + 1

    def allocate(self, n: int) -> bool:
        """Take ``n`` blocks for new KV, evicting least recently used blocks if needed."""
        if n > self._blank + len(self._evictable):
            return False
        take_blank = min(n, self._blank)
        self._blank -= take_blank
        if n > take_blank and self.events is not None:
            self._evict_recorded(n - take_blank)
            return True
        for _ in range(n - take_blank):
            key, _ = self._evictable.popitem(last=False)
            del self._refs[key]
            self.evictions += 1
        return True

    def _evict_recorded(self, n: int) -> None:
        """Evict ``n`` blocks, least recently used first, and record one BlockRemoved."""
        assert self.events is not None
        evictable, refs = self._evictable, self._refs
        removed: list[BlockHash] = []
        for _ in range(n):
            key, _ = evictable.popitem(last=False)
            del refs[key]
            removed.append(event_hash(key))
        self.evictions += n
        self.events.append(BlockRemoved(block_hashes=removed, medium=MEDIUM_GPU))

    def commit(self, key: int) -> bool:
        """A held anonymous block just became full with ``key``; cache it under that key.

        Returns False (caching off) when the block stays anonymous. If another request
        already cached the same key, the holder shares that block and this one goes back
        to the blank pool.
        """
        if not self.enabled:
            return False
        count = self._refs.get(key)
        if count is None:
            self._refs[key] = 1
        else:
            if count == 0:
                del self._evictable[key]
            self._refs[key] = count + 1
            self._blank += 1
        return True

    def commit_many(self, keys: Sequence[int]) -> None:
        """:meth:`commit` for consecutive blocks of one request (the hot path of prefill)."""
        if not self.enabled:
            return
        refs, evictable = self._refs, self._evictable
        shared = 0
        for key in keys:
            count = refs.get(key)
            if count is None:
                refs[key] = 1
            else:
                if count == 0:
                    del evictable[key]
                refs[key] = count + 1
                shared += 1
        self._blank += shared

    def commit_stored(
        self, keys: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int
    ) -> None:
        """:meth:`commit_many`, recording a BlockStored for each unbroken run of blocks that
        were not cached yet (one another request cached meanwhile is shared: the simulator
        keeps one block per key, so it is not announced twice). ``parent`` is the key of the
        block before ``keys[0]`` (None at the prompt's start); ``token_ids`` are the ids of
        the blocks' ``len(keys) * block_size`` tokens."""
        if not self.enabled:
            return
        refs, evictable = self._refs, self._evictable
        events = self.events
        assert events is not None, "commit_stored needs an event sink"
        shared = 0
        run = -1  # index in ``keys`` where the current run of new blocks began
        for i, key in enumerate(keys):
            count = refs.get(key)
            if count is None:
                refs[key] = 1
                if run < 0:
                    run = i
                continue
            if count == 0:
                del evictable[key]
            refs[key] = count + 1
            shared += 1
            if run >= 0:
                events.append(_stored(keys, run, i, parent, token_ids, block_size))
                run = -1
        if run >= 0:
            events.append(_stored(keys, run, len(keys), parent, token_ids, block_size))
        self._blank += shared

    def release(self, keys: Sequence[int], anonymous: int) -> None:
        """Drop a request's blocks. Keyed blocks whose count reaches 0 become evictable,
        the chain's tail first (as vLLM frees in reverse), so a prefix outlives its suffix."""
        self._blank += anonymous
        refs, evictable = self._refs, self._evictable
        for key in reversed(keys):
            count = refs[key] - 1
            refs[key] = count
            if count == 0:
                evictable[key] = None


def _stored(
    keys: Sequence[int],
    start: int,
    end: int,
    parent: int | None,
    token_ids: Sequence[int],
    block_size: int,
) -> BlockStored:
    """The BlockStored event of ``keys[start:end]``, as vLLM's block pool writes it."""
    return BlockStored(
        block_hashes=[event_hash(key) for key in keys[start:end]],
        parent_block_hash=event_hash(keys[start - 1])
        if start
        else (None if parent is None else event_hash(parent)),
        token_ids=list(token_ids[start * block_size : end * block_size]),
        block_size=block_size,
        lora_id=None,
        medium=MEDIUM_GPU,
        lora_name=None,
    )


class CpuChunkCache:
    """LMCache's local CPU backend: whole chunks, keyed by chained chunk hashes, LRU."""

    def __init__(self, capacity_chunks: int, chunk_size: int):
        self.capacity_chunks = capacity_chunks
        self.chunk_size = chunk_size
        self._chunks: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: int) -> bool:
        return key in self._chunks

    @property
    def usage(self) -> float:
        return len(self._chunks) / self.capacity_chunks if self.capacity_chunks else 0.0

    def lookup(self, keys: Sequence[int]) -> int:
        """Length in chunks of the stored prefix of ``keys``; the hits become most recent."""
        chunks = self._chunks
        n = 0
        for key in keys:
            if key not in chunks:
                break
            chunks.move_to_end(key)
            n += 1
        return n

    def store(self, key: int) -> None:
        """Store (or refresh) one chunk, evicting the least recently used when full."""
        chunks = self._chunks
        if key in chunks:
            chunks.move_to_end(key)
            return
        if self.capacity_chunks <= 0:
            return
        chunks[key] = None
        while len(chunks) > self.capacity_chunks:
            chunks.popitem(last=False)
            self.evictions += 1
