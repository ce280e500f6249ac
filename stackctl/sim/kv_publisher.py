"""Publishes the simulated engine's KV-cache events the way vLLM's ZmqEventPublisher does.

The wire format is stackctl.kv_events. The engine's GPU cache appends events to
:attr:`KvEventPublisher.events` (its sink); after each engine step :meth:`flush` sends what
the step produced as one batch on a PUB socket, numbered from 0, and keeps the last
``buffer_steps`` batches for the replay socket (ROUTER), which is served on the event loop.

Everything runs on the simulator's event loop and nothing waits: a batch the PUB socket
cannot take is counted in :attr:`dropped` (ZMQ's PUB itself drops silently for a subscriber
past its high-water mark, as in vLLM) and stays in the replay buffer, so a subscriber that
sees a gap in ``seq`` can fetch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import zmq
import zmq.asyncio

from stackctl.kv_events import END_SEQ, Event, KVEventBatch, encode_batch, parse_seq, seq_bytes
from stackctl.sim.config import KVEventsConfig, KvEventsError

log = logging.getLogger(__name__)


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: wildcard (``*``, ``::``), ipc:// and inproc:// endpoints are bound, others connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """One engine's KV event stream: ``PUB`` at ``config.endpoint``, ``ROUTER`` replay at
    ``config.replay_endpoint`` (if any). :meth:`start` and :meth:`close` need a running loop."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0):
        self.config = config
        self.events: list[Event] = []  # the sink: GpuPrefixCache appends, flush() drains
        self.data_parallel_rank = data_parallel_rank
        self.next_seq = 0
        self.sent = 0  # batches handed to the PUB socket
        self.dropped = 0  # batches the PUB socket refused (still in the replay buffer)
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Open the sockets; :class:`KvEventsError` when an endpoint cannot be used."""
        cfg = self.config
        self._ctx = zmq.asyncio.Context()
        endpoint = cfg.endpoint
        try:
            # A plain socket: sends are synchronous and NOBLOCK, no future per batch.
            self._pub = pub = zmq.Socket(self._ctx, zmq.PUB)
            pub.set_hwm(cfg.hwm)
            pub.setsockopt(zmq.LINGER, 0)
            if is_bind_endpoint(endpoint):
                pub.bind(endpoint)
            else:
                pub.connect(endpoint)
            if cfg.replay_endpoint is not None:
                endpoint = cfg.replay_endpoint
                self._replay = self._ctx.socket(zmq.ROUTER)
                # Room for two whole replays per peer; past that a replay is refused, not queued.
                self._replay.setsockopt(zmq.SNDHWM, 2 * (cfg.buffer_steps + 1))
                self._replay.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer: an error
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise KvEventsError(
                f"--kv-events-config: cannot open {endpoint}: {exc.strerror}; choose a free port "
                "(endpoint, replay_endpoint)"
            ) from None
        if self._replay is not None:
            self._replay_task = asyncio.create_task(self._serve_replay(), name="kv-event-replay")
        log.info("publishing KV events on %s (topic %r, replay %s)",
                 cfg.endpoint, cfg.topic, cfg.replay_endpoint or "off")  # fmt: skip

    def flush(self) -> None:
        """Send the events gathered since the last flush as one batch (nothing if none)."""
        events = self.events
        if not events or self._pub is None:
            return
        batch = KVEventBatch(
            ts=time.time(), events=events.copy(), data_parallel_rank=self.data_parallel_rank
        )
        events.clear()
        payload = encode_batch(batch)
        seq = self.next_seq
        self.next_seq = seq + 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq_bytes(seq), payload), flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.ZMQError as exc:  # Again: the socket is full (PUB itself drops silently)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("KV event batch not sent (%s): %d dropped so far, still replayable",
                            exc, self.dropped)  # fmt: skip

    async def _serve_replay(self) -> None:
        """Answer replay requests ``(identity, b"", seq)`` with every buffered batch from
        ``seq`` on, then the END_SEQ marker."""
        sock = self._replay
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                log.warning("ignoring a malformed KV event replay request (%d frames)", len(frames))
                continue
            identity, start = frames[0], parse_seq(frames[2])
            try:
                for i, (seq, payload) in enumerate(list(self._buffer)):
                    if seq >= start:
                        await sock.send_multipart(
                            (identity, b"", self._topic, seq_bytes(seq), payload),
                            flags=zmq.NOBLOCK,
                        )
                    if i % 256 == 255:
                        await asyncio.sleep(0)  # a long replay lets the engine's steps run
                await sock.send_multipart((identity, b"", b"", END_SEQ, b""), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # Again: the peer does not read; EHOSTUNREACH: gone
                log.warning("KV event replay from seq %d abandoned: %s", start, exc)

    async def close(self) -> None:
        log.info("KV events: %d batch(es) published, %d not sent", self.sent, self.dropped)
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
