"""The KV tiers: chained block keys, LRU eviction, pinning, CPU chunk store."""

from stackctl.sim.kvcache import (
    ROOT_HASH,
    CpuChunkCache,
    GpuPrefixCache,
    chain_hashes,
    extend_chain,
)


def words(n: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_chain_keys_cover_full_blocks_only_and_chain_the_prefix():
    tokens = words(40)
    keys = chain_hashes(tokens, 16)
    assert len(keys) == 2  # 40 tokens: two full blocks, the partial third is not keyed
    assert keys[0] == hash((ROOT_HASH, tuple(tokens[:16])))
    assert keys[1] == hash((keys[0], tuple(tokens[16:32])))


def test_same_block_after_different_prefix_gets_a_different_key():
    a = words(16, "a") + words(16, "x")
    b = words(16, "b") + words(16, "x")
    assert chain_hashes(a, 16)[1] != chain_hashes(b, 16)[1]
    assert chain_hashes(a, 16)[0] == chain_hashes(list(a), 16)[0]


def test_extend_chain_is_incremental_and_respects_upto():
    tokens = words(64)
    keys = extend_chain([], tokens, 16, upto=20)
    assert len(keys) == 1
    extend_chain(keys, tokens, 16)
    assert keys == chain_hashes(tokens, 16)


def test_match_is_an_unbroken_prefix_and_respects_the_limit():
    cache = GpuPrefixCache(8)
    keys = chain_hashes(words(64), 16)
    assert cache.allocate(4)
    for key in keys:
        cache.commit(key)
    cache.release(keys, 0)
    assert cache.match(keys, 4) == 4
    assert cache.match(keys, 2) == 2
    assert cache.match([keys[0], 12345, keys[2]], 3) == 1


def test_held_blocks_are_pinned_and_unreferenced_ones_evict_lru():
    cache = GpuPrefixCache(4)
    a = chain_hashes(words(32, "a"), 16)
    b = chain_hashes(words(32, "b"), 16)
    for keys in (a, b):
        assert cache.allocate(2)
        for key in keys:
            cache.commit(key)
    assert cache.num_free == 0 and cache.usage == 1.0
    assert not cache.allocate(1)  # everything is pinned by its holder
    cache.release(a, 0)  # a released first: least recently used
    cache.release(b, 0)
    assert cache.num_free == 4 and cache.usage == 0.0
    assert cache.allocate(2)  # evicts a's blocks, not b's
    assert cache.match(a, 2) == 0
    assert cache.match(b, 2) == 2
    assert cache.evictions == 2


def test_release_frees_the_tail_of_a_chain_first():
    cache = GpuPrefixCache(3)
    keys = chain_hashes(words(48), 16)
    cache.allocate(3)
    for key in keys:
        cache.commit(key)
    cache.release(keys, 0)
    cache.allocate(1)  # one eviction: the last block goes, the prefix stays reusable
    assert cache.match(keys, 3) == 2


def test_acquire_pins_a_hit_and_evictable_among_counts_it():
    cache = GpuPrefixCache(2)
    keys = chain_hashes(words(32), 16)
    cache.allocate(2)
    for key in keys:
        cache.commit(key)
    cache.release(keys, 0)
    assert cache.evictable_among(keys) == 2
    cache.acquire(keys[:1])
    assert cache.num_free == 1
    assert cache.allocate(1)  # may only evict the unpinned second block
    assert cache.match(keys, 2) == 1
    assert not cache.allocate(1)


def test_commit_of_an_already_cached_key_shares_the_block():
    cache = GpuPrefixCache(4)
    key = chain_hashes(words(16), 16)[0]
    cache.allocate(1)
    cache.commit(key)
    cache.allocate(1)  # a second request computed the same block concurrently
    cache.commit(key)
    assert cache.num_free == 3  # the duplicate went back to the pool
    cache.release([key], 0)
    assert cache.num_free == 3  # still held by the other request
    cache.release([key], 0)
    assert cache.num_free == 4


def test_caching_disabled_never_matches_or_keys():
    cache = GpuPrefixCache(4, enabled=False)
    key = chain_hashes(words(16), 16)[0]
    cache.allocate(1)
    assert cache.commit(key) is False
    cache.release([], 1)
    assert cache.match([key], 1) == 0
    assert cache.num_free == 4


def test_cpu_store_is_lru_and_lookup_is_a_prefix_that_refreshes():
    cpu = CpuChunkCache(capacity_chunks=3, chunk_size=256)
    a = chain_hashes(words(512, "a"), 256)
    b = chain_hashes(words(512, "b"), 256)
    for key in a:
        cpu.store(key)
    assert cpu.lookup(a) == 2
    cpu.store(b[0])
    cpu.store(b[1])  # over capacity: evicts a[0], the least recently used
    assert len(cpu) == 3 and cpu.evictions == 1
    assert cpu.lookup(a) == 0  # a's prefix is broken at its first chunk
    assert a[1] in cpu
    assert cpu.lookup(b) == 2


def test_cpu_lookup_refresh_protects_from_eviction():
    cpu = CpuChunkCache(capacity_chunks=2, chunk_size=16)
    x, y, z = (chain_hashes(words(16, p), 16)[0] for p in "xyz")
    cpu.store(x)
    cpu.store(y)
    assert cpu.lookup([x]) == 1  # x is now the most recent
    cpu.store(z)
    assert x in cpu and y not in cpu


def test_commit_many_matches_commit_one_by_one():
    keys = chain_hashes(words(64), 16)
    one, many = GpuPrefixCache(8), GpuPrefixCache(8)
    for cache in (one, many):
        cache.allocate(2)
        cache.commit(keys[0])
        cache.release(keys[:1], 1)  # keys[0] evictable, one anonymous block back
        cache.allocate(4)
    for key in keys:
        one.commit(key)
    many.commit_many(keys)
    assert one.num_free == many.num_free == 4  # k0 was shared: 4 blocks in use
    assert one.match(keys, 4) == many.match(keys, 4) == 4
