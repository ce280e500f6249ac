"""Per-engine index of the prompt prefixes the router has sent there.

Prompts are cut into fixed-size chunks of *characters* (not tokens) and each chunk gets a
chained hash ``h_i = hash((h_{i-1}, chunk_i))``, so ``h_i`` names the whole prefix up to chunk
``i`` - like vLLM's block hashes. Hashing characters avoids tokenizing on the request path
(``str.split`` allocates one object per word; slicing eight 256-char chunks and hashing them
with CPython's C string hash costs a few microseconds). The router only needs to *predict*
which engine holds a prefix, so chunk boundaries need not line up with the engine's blocks:
two prompts that share a prefix share every full chunk inside it.

The index is an LRU bounded to the engine's KV capacity, so entries age out roughly when the
engine itself would have evicted them. Python's ``hash`` is salted per process, which is fine:
the index lives and dies with the router process.
"""

from __future__ import annotations

from collections import OrderedDict


def chunk_hashes(text: str, chunk_chars: int) -> list[int]:
    """Chained hashes of the full ``chunk_chars``-sized chunks of ``text``."""
    hashes = []
    h = 0
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        h = hash((h, text[start : start + chunk_chars]))
        hashes.append(h)
    return hashes


class PrefixIndex:
    """LRU set of chained chunk hashes that one engine is predicted to hold."""

    __slots__ = ("_entries", "capacity_chunks")

    def __init__(self, capacity_chunks: int):
        self._entries: OrderedDict[int, None] = OrderedDict()
        self.capacity_chunks = max(1, int(capacity_chunks))

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: list[int]) -> int:
        """Number of leading chunks of ``hashes`` present (the predicted cached prefix)."""
        entries = self._entries
        matched = 0
        for h in hashes:
            if h not in entries:
                break
            matched += 1
        return matched

    def insert(self, hashes: list[int]) -> None:
        """Record that the engine now holds this prefix; refresh it as most recently used.

        Chunks are touched last-to-first so the prefix's root is the most recent entry and
        eviction eats a prefix from its tail, as vLLM evicts blocks, never orphaning a tail.
        """
        entries = self._entries
        move = entries.move_to_end
        for h in reversed(hashes):
            if h in entries:
                move(h)
            else:
                entries[h] = None
        excess = len(entries) - self.capacity_chunks
        if excess > 0:
            pop = entries.popitem
            for _ in range(excess):
                pop(last=False)

    def resize(self, capacity_chunks: int) -> None:
        self.capacity_chunks = max(1, int(capacity_chunks))
        self.insert([])

    def clear(self) -> None:
        """Forget everything (the engine restarted or was ejected: its cache is gone)."""
        self._entries.clear()
