"""What each engine holds, from its own KV-cache events (``kv_index: events``).

Each engine with an event endpoint gets a :class:`KvEventView` (on ``Backend.kv_view``) and a
subscriber task that feeds it (:class:`KvEvents` runs them). The view keys every block by its
token content (``stackctl.kv_events.block_keys``), never by the engine's own hash, so it
matches prompts the router tokenizes the same way whatever hash function the engine uses.

Sequence numbers tell the subscriber what it missed:

- the first batch it sees is not seq 0 (the router started after the engine), or a batch is
  skipped (a slow subscriber, a dropped link): it asks the engine's replay socket for the
  missing batches; when the replay covers them the view stays exact (``SYNCED``);
- seq goes back (the engine restarted: its cache is empty) or the engine is ejected: the view
  starts over;
- a gap that replay cannot fill (its buffer no longer reaches back, e.g. a router started
  long after the engine) leaves blocks stored before it unknown: the view is ``WARMING``, and
  routing takes the larger of its match and the estimate's for that engine until the engine
  has stored as many blocks as its cache holds since (by then what it held before the gap
  has turned over). What a warming view shows is still there: it knows every removal since.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from ..kv_events import (
    END_SEQ,
    MEDIUM_CPU,
    MEDIUM_GPU,
    ROOT_KEY,
    TOPIC,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    block_keys,
    decode_batch,
    parse_seq,
    seq_bytes,
)

if TYPE_CHECKING:
    from .backends import Backend

log = logging.getLogger("stackctl.router.kv_index")

_GPU, _CPU, _OTHER = 1, 2, 4  # medium bits of a held block
_MEDIUM_BIT = {MEDIUM_GPU: _GPU, MEDIUM_CPU: _CPU}
REPLAY_TIMEOUT_S = 2.0


class ViewState(enum.StrEnum):
    COLD = "cold"  # no batch yet since the start (or since the engine restarted)
    SYNCED = "synced"  # every batch since the engine started has been applied
    WARMING = "warming"  # a gap replay could not fill: blocks stored before it are unknown


class KvEventView:
    """The blocks one engine holds, by medium, keyed by content; fed batch by batch."""

    __slots__ = (
        "state",
        "last_seq",
        "block_size",
        "_blocks",
        "_gpu",
        "_cpu",
        "stored_since_gap",
        "batches",
        "gaps",
        "replayed",
        "restarts",
        "orphans",
        "malformed",
        "last_batch_at",
    )

    def __init__(self) -> None:
        self.state = ViewState.COLD
        self.last_seq: int | None = None
        self.block_size: int | None = None
        self._blocks: dict[BlockHash, list[int]] = {}  # engine hash -> [content key, medium bits]
        self._gpu: dict[int, int] = {}  # content key -> engine blocks holding it on the GPU
        self._cpu: dict[int, int] = {}  # ... in the CPU tier
        self.stored_since_gap = 0
        self.batches = 0
        self.gaps = 0  # gaps that replay could not fill
        self.replayed = 0  # batches recovered through replay
        self.restarts = 0
        self.orphans = 0  # stored blocks whose parent is unknown (skipped)
        self.malformed = 0  # messages or events that do not parse
        self.last_batch_at: float | None = None

    # -- reading -------------------------------------------------------------------------
    @property
    def gpu_blocks(self) -> int:
        return len(self._gpu)

    @property
    def cpu_blocks(self) -> int:
        return len(self._cpu)

    def usable(self, capacity_tokens: int | None) -> bool:
        """Routing may trust this view alone: synced, or warmed again after a gap. (A view it
        cannot trust alone still proves what it shows: blocks it was told of, not removed.)"""
        if self.state is ViewState.SYNCED:
            return True
        if (
            self.state is ViewState.WARMING
            and capacity_tokens
            and self.block_size
            and self.stored_since_gap * self.block_size >= capacity_tokens
        ):
            self.state = ViewState.SYNCED  # what it held before the gap has turned over
            return True
        return False

    def match(self, keys: Sequence[int]) -> tuple[int, int]:
        """(leading blocks on the GPU, leading blocks on the GPU or in the CPU tier)."""
        gpu, cpu = self._gpu, self._cpu
        n = len(keys)
        on_gpu = 0
        while on_gpu < n and keys[on_gpu] in gpu:
            on_gpu += 1
        anywhere = on_gpu
        while anywhere < n and (keys[anywhere] in cpu or keys[anywhere] in gpu):
            anywhere += 1
        return on_gpu, anywhere

    def describe(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "seq": self.last_seq,
            "block_size": self.block_size,
            "gpu_blocks": self.gpu_blocks,
            "cpu_blocks": self.cpu_blocks,
            "batches": self.batches,
            "replayed": self.replayed,
            "gaps": self.gaps,
            "restarts": self.restarts,
            "orphans": self.orphans,
            "malformed": self.malformed,
            "last_batch_age_s": None
            if self.last_batch_at is None
            else round(time.monotonic() - self.last_batch_at, 3),
        }

    # -- changes -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (the engine restarted or was ejected); the next batch is a start."""
        self._blocks.clear()
        self._gpu.clear()
        self._cpu.clear()
        self.state = ViewState.COLD
        self.last_seq = None

    def lost(self) -> None:
        """Batches are missing for good: keep what is known, but do not trust it alone."""
        self.gaps += 1
        self.state = ViewState.WARMING
        self.stored_since_gap = 0

    def apply(self, seq: int, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(event)
            elif isinstance(event, BlockRemoved):
                self._removed(event.block_hashes, event.medium)
            elif isinstance(event, AllBlocksCleared):
                self._blocks.clear()
                self._gpu.clear()
                self._cpu.clear()
        self.last_seq = seq
        self.batches += 1
        self.last_batch_at = time.monotonic()
        if self.state is ViewState.COLD:
            self.state = ViewState.SYNCED

    def _stored(self, event: BlockStored) -> None:
        size = event.block_size
        hashes = event.block_hashes
        if size <= 0 or len(event.token_ids) != len(hashes) * size:
            self.malformed += 1
            return
        if event.parent_block_hash is None:
            parent = ROOT_KEY
        else:
            known = self._blocks.get(event.parent_block_hash)
            if known is None:  # stored before we listened, or evicted meanwhile
                self.orphans += 1
                return
            parent = known[0]
        self.block_size = size
        bit = _MEDIUM_BIT.get(event.medium or MEDIUM_GPU, _OTHER)
        held = self._gpu if bit == _GPU else self._cpu if bit == _CPU else None
        blocks = self._blocks
        for block_hash, key in zip(hashes, block_keys(event.token_ids, size, parent), strict=True):
            entry = blocks.get(block_hash)
            if entry is None:
                blocks[block_hash] = [key, bit]
            elif entry[1] & bit:
                continue  # already held there (a duplicate event)
            else:
                entry[1] |= bit
            if held is not None:
                held[key] = held.get(key, 0) + 1
        self.stored_since_gap += len(hashes)

    def _removed(self, hashes: Iterable[BlockHash], medium: str | None) -> None:
        bit = _MEDIUM_BIT.get(medium or MEDIUM_GPU, _OTHER)
        held = self._gpu if bit == _GPU else self._cpu if bit == _CPU else None
        blocks = self._blocks
        for block_hash in hashes:
            entry = blocks.get(block_hash)
            if entry is None or not entry[1] & bit:
                continue
            entry[1] &= ~bit
            if held is not None:
                key = entry[0]
                count = held[key] - 1
                if count:
                    held[key] = count
                else:
                    del held[key]
            if not entry[1]:
                del blocks[block_hash]


class Subscriber:
    """One engine's event stream into its view: a SUB socket, and replay when batches are missed."""

    def __init__(
        self,
        backend: Backend,
        view: KvEventView,
        endpoint: str,
        replay_endpoint: str | None,
        topic: bytes,
        context: zmq.asyncio.Context,
    ):
        self.backend = backend
        self.view = view
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.context = context
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"kv-events {self.backend.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sub.connect(self.endpoint)
        try:
            while True:
                frames = await sub.recv_multipart(copy=True)
                try:
                    await self.receive(frames)
                except Exception:  # one bad message must not end the stream
                    self.view.malformed += 1
                    log.exception("kv events from %s: message dropped", self.backend.name)
        finally:
            sub.close(linger=0)

    async def receive(self, frames: Sequence[bytes]) -> None:
        view = self.view
        if len(frames) != 3:
            view.malformed += 1
            return
        try:
            seq = parse_seq(frames[1])
            batch = decode_batch(frames[2])
        except (ValueError, msgspec.DecodeError):
            view.malformed += 1
            return
        last = view.last_seq
        if last is not None and seq <= last:  # the engine restarted: its cache is empty
            view.restarts += 1
            view.reset()
            last = None
        if last is None:
            if seq > 0 and not await self._catch_up(0, seq):
                view.lost()
        elif seq > last + 1 and not await self._catch_up(last + 1, seq):
            view.lost()
        if view.last_seq is None or seq > view.last_seq:
            view.apply(seq, batch)

    async def _catch_up(self, start: int, until: int) -> bool:
        """Apply batches ``start``..``until - 1`` from the engine's replay socket; True when
        all of them came (contiguous), False when there is no replay or it falls short."""
        if self.replay_endpoint is None:
            return False
        dealer = self.context.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        expected, whole = start, True
        try:
            await dealer.send_multipart((b"", seq_bytes(start)))
            async with asyncio.timeout(REPLAY_TIMEOUT_S):
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4 or frames[2] == END_SEQ:
                        break
                    seq = parse_seq(frames[2])
                    if seq < expected:
                        continue
                    if seq >= until:
                        break
                    if seq != expected:  # the buffer no longer reaches back that far:
                        whole = False  # the recent batches it has are still worth applying
                    self.view.apply(seq, decode_batch(frames[3]))
                    self.view.replayed += 1
                    expected = seq + 1
        except (TimeoutError, ValueError, msgspec.DecodeError, zmq.ZMQError) as exc:
            log.warning(
                "kv events from %s: replay of %d..%d failed: %s",
                self.backend.name,
                start,
                until - 1,
                exc,
            )
        finally:
            dealer.close(linger=0)
        return whole and expected == until


class KvEvents:
    """The subscribers of every backend that publishes events; follows the pool's changes."""

    def __init__(self, topic: str = TOPIC) -> None:
        self.topic = topic.encode()
        self.context: zmq.asyncio.Context | None = None  # made when a backend publishes
        self.subscribers: dict[Backend, Subscriber] = {}

    def sync(self, backends: Iterable[Backend]) -> None:
        """Subscribe to each backend with an endpoint, unsubscribe from the rest (a reload)."""
        wanted = {b for b in backends if b.kv_events is not None}
        for backend in list(self.subscribers):
            if backend not in wanted:
                asyncio.get_running_loop().create_task(self.subscribers.pop(backend).stop())
        for backend in wanted:
            if backend not in self.subscribers:
                assert backend.kv_events is not None
                endpoint, replay = backend.kv_events
                backend.kv_view = backend.kv_view or KvEventView()
                if self.context is None:
                    self.context = zmq.asyncio.Context()
                subscriber = Subscriber(
                    backend, backend.kv_view, endpoint, replay, self.topic, self.context
                )
                self.subscribers[backend] = subscriber
                subscriber.start()

    async def stop(self) -> None:
        for subscriber in self.subscribers.values():
            await subscriber.stop()
        self.subscribers.clear()
        if self.context is not None:
            self.context.term()
