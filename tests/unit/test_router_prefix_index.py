"""Prefix index: chained chunk hashes name whole prefixes; the LRU bound evicts tails first."""

from __future__ import annotations

from stackctl.router.prefix_index import PrefixIndex, chunk_hashes


def test_chunks_are_chained_so_equal_chunks_at_different_prefixes_differ():
    a = chunk_hashes("x" * 8 + "y" * 8, 4)
    b = chunk_hashes("z" * 8 + "y" * 8, 4)
    assert len(a) == 4
    assert a[2] != b[2] and a[3] != b[3]  # same chunk text "yyyy", different prefix


def test_only_full_chunks_are_hashed_and_a_longer_prompt_extends_the_chain():
    short = chunk_hashes("abcdefghij", 4)  # two full chunks, "ij" left over
    long = chunk_hashes("abcdefghijklmnop", 4)
    assert len(short) == 2 and long[:2] == short
    assert chunk_hashes("abc", 4) == []


def test_match_counts_the_leading_run_only():
    index = PrefixIndex(100)
    prompt = chunk_hashes("a" * 40, 4)
    index.insert(prompt[:5])
    assert index.match(prompt) == 5
    other = chunk_hashes("b" + "a" * 39, 4)
    assert index.match(other) == 0  # first chunk differs: nothing after it can be reused


def test_capacity_evicts_least_recently_used_prefix_from_its_tail():
    index = PrefixIndex(6)
    old = chunk_hashes("o" * 16, 4)  # 4 chunks
    new = chunk_hashes("n" * 16, 4)
    index.insert(old)
    index.insert(new)  # 8 > 6: two chunks must go, from the old prompt's tail
    assert len(index) == 6
    assert index.match(new) == 4
    assert index.match(old) == 2


def test_reuse_refreshes_a_prefix():
    index = PrefixIndex(8)
    a, b, c = (chunk_hashes(ch * 16, 4) for ch in "abc")
    index.insert(a)
    index.insert(b)
    index.match(a)
    index.insert(a[:1])  # a is touched again (its first chunk), so b is now the oldest
    index.insert(c)
    assert index.match(a) >= 1 and index.match(c) == 4
    assert index.match(b) < 4


def test_resize_and_clear():
    index = PrefixIndex(10)
    index.insert(chunk_hashes("q" * 40, 4))
    index.resize(3)
    assert len(index) == 3 and index.match(chunk_hashes("q" * 40, 4)) == 3
    index.clear()
    assert len(index) == 0
