"""The simulated engine: vLLM v1's continuous-batching scheduler over the two KV tiers.

:class:`SimEngine` is clock-free: ``schedule(now)`` plans one step (which requests compute how
many tokens, which blocks they take, what the CPU tier loads) and returns its modelled
duration; ``complete(step, end)`` applies the step's results at its end time (KV becomes
cached, tokens are sampled). :class:`EngineLoop` drives it in real time with asyncio, and
tests drive it with a virtual clock (:meth:`SimEngine.run_until_idle`).

Scheduling follows vLLM v1: running requests first, in admission order, each getting its
pending tokens (1 for a decode, up to the token budget for a chunked prefill), then waiting
requests first-come first-served while the budget, ``max_num_seqs`` and free blocks allow.
Blocks are allocated step by step as KV is written. When a running request needs a block
and none is free, the most recently admitted request is preempted (recompute preemption:
its blocks are released, and it re-prefills its prompt and output later; prefix caching
usually makes that cheap). A waiting request that does not fit waits (head of line).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stackctl.kv_events import Event
from stackctl.sim.kvcache import CpuChunkCache, GpuPrefixCache, extend_chain
from stackctl.sim.timing import StepLoad, TimingModel
from stackctl.tokenizer import token_ids

log = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"

# Filler vocabulary for generated text: plain words, no whitespace, no role marks.
FILLER_WORDS = (
    "the of and to in is was that for on as with by at from this be are or an which it "
    "model cache token block chunk prefix engine router serving latency memory batch queue "
    "request stream value layer head key attention decode prefill bandwidth compute load "
    "store reuse hit miss evict host device tensor kernel step time rate user round answer"
).split()


class SimRequest:
    """One request's state inside the engine, and the hand-off to its HTTP handler."""

    __slots__ = (
        "request_id", "tokens", "prompt_len", "max_tokens", "seed", "arrival", "status",
        "num_computed", "block_keys", "held_keys", "anonymous_blocks", "chunk_keys",
        "stored_chunks", "output_count", "num_cached_tokens", "gpu_hit_tokens",
        "cpu_hit_tokens", "scheduled_once", "first_scheduled", "first_token_time",
        "last_token_time", "finish_time", "finish_reason", "waiter", "num_preemptions",
        "notify_each_token",
    )  # fmt: skip

    def __init__(self, request_id: str, prompt_tokens: list[str], max_tokens: int, seed: int = 0):
        self.request_id = request_id
        self.tokens = prompt_tokens  # prompt, then every sampled token appended
        self.prompt_len = len(prompt_tokens)
        self.max_tokens = max_tokens
        self.seed = seed
        self.arrival = 0.0
        self.status = WAITING
        self.num_computed = 0  # tokens whose KV is on the GPU
        self.block_keys: list[
            int
        ] = []  # chained keys of full blocks of ``tokens`` (lazily extended)
        self.held_keys: list[int] = []  # keyed GPU blocks held, in chain order
        self.anonymous_blocks = 0  # held GPU blocks not (yet) keyed: partial, or caching off
        self.chunk_keys: list[int] = []  # chained keys of the prompt's full CPU-tier chunks
        self.stored_chunks = 0  # prompt chunks already offered to the CPU tier
        self.output_count = 0
        self.num_cached_tokens = (
            0  # prompt tokens served from a cache (GPU or CPU) at first schedule
        )
        self.gpu_hit_tokens = 0
        self.cpu_hit_tokens = 0
        self.scheduled_once = False
        self.first_scheduled: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: str | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.num_preemptions = 0
        self.notify_each_token = True  # False: wake the handler only when finished

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def output_tokens(self) -> list[str]:
        return self.tokens[self.prompt_len :]

    def notify(self) -> None:
        """Wake the handler waiting for new tokens, if any."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


@dataclass(frozen=True)
class SimEngineConfig:
    num_gpu_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    cpu_capacity_chunks: int | None = None  # None: no CPU tier (LMCache off)
    cpu_chunk_size: int = 256


class EngineObserver:
    """Receives the engine's events (metrics implement it); the default ignores them."""

    def admitted(
        self, req: SimRequest, queried: int, gpu_hit: int, cpu_hit: int, first: bool
    ) -> None: ...
    def token(self, req: SimRequest, now: float, first: bool) -> None: ...
    def finished(self, req: SimRequest) -> None: ...
    def preempted(self, req: SimRequest) -> None: ...
    def step_done(self, engine: SimEngine, step: Step) -> None: ...


@dataclass(slots=True)
class Step:
    scheduled: list[tuple[SimRequest, int]] = field(default_factory=list)
    load: StepLoad = field(default_factory=StepLoad)
    duration: float = 0.0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SimEngine:
    """``kv_events``: a list the GPU cache appends vLLM's KV events to (GpuPrefixCache);
    None: no events."""

    def __init__(
        self,
        config: SimEngineConfig,
        timing: TimingModel,
        observer: EngineObserver | None = None,
        kv_events: list[Event] | None = None,
    ):
        self.config = config
        self.timing = timing
        self.observer = observer or EngineObserver()
        self.gpu = GpuPrefixCache(
            config.num_gpu_blocks, enabled=config.enable_prefix_caching, events=kv_events
        )
        self.cpu = (
            CpuChunkCache(config.cpu_capacity_chunks, config.cpu_chunk_size)
            if config.cpu_capacity_chunks is not None
            else None
        )
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.steps = 0
        self.busy_seconds = 0.0

    # --- Requests -----------------------------------------------------------------------

    def add_request(self, req: SimRequest, now: float) -> None:
        req.arrival = now
        req.status = WAITING
        self.waiting.append(req)

    def abort(self, req: SimRequest, now: float) -> None:
        """Drop a request (client went away); its blocks return to the pool."""
        if req.status == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif req.status == RUNNING:
            self.running.remove(req)
            self._release(req)
        else:
            return
        self._finish(req, now, "abort")

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- One step -----------------------------------------------------------------------

    def schedule(self, now: float) -> Step | None:
        """Plan the next step at time ``now``; None when nothing can run."""
        step = Step()
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            pending = len(req.tokens) - req.num_computed
            n = min(pending, budget)
            need = self._blocks_needed(req, req.num_computed + n)
            while need > self.gpu.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != RUNNING:
                break
            self.gpu.allocate(need)
            req.anonymous_blocks += need
            step.load.add(n, req.num_computed, samples=n == pending)
            step.scheduled.append((req, n))
            budget -= n
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                if self.waiting[0].arrival > now:
                    break  # arrived after this step began (the loop is catching up): next step
                admitted = self._admit(self.waiting[0], budget, step, now)
                if admitted is None:
                    break
                budget -= admitted
        if not step.scheduled:
            return None
        step.duration = self.timing.step_seconds(step.load)
        return step

    def complete(self, step: Step, now: float) -> None:
        """Apply ``step``'s results at its end time ``now``."""
        self.steps += 1
        self.busy_seconds += step.duration
        observer = self.observer
        max_len = len(FILLER_WORDS)
        for req, n in step.scheduled:
            if req.status != RUNNING:
                continue  # aborted during the step
            req.num_computed += n
            self._commit_blocks(req)
            if self.cpu is not None:
                self._store_chunks(self.cpu, req)
            if req.num_computed < len(req.tokens):
                continue  # a prefill chunk that samples nothing yet
            first = req.output_count == 0
            word = FILLER_WORDS[(req.seed + req.output_count * 7) % max_len]
            req.tokens.append(word)
            req.output_count += 1
            observer.token(req, now, first)
            if first:
                req.first_token_time = now
            req.last_token_time = now
            if req.output_count >= req.max_tokens:
                self.running.remove(req)
                self._release(req)
                self._finish(req, now, "length")
            elif req.notify_each_token:
                req.notify()
        observer.step_done(self, step)

    def run_until_idle(
        self, now: float = 0.0, on_step: Callable[[Step, float], None] | None = None
    ) -> float:
        """Run steps back to back on a virtual clock until no work is left; returns the end time."""
        while self.has_work():
            step = self.schedule(now)
            if step is None:
                raise RuntimeError("engine has work but cannot schedule any of it")
            now += step.duration
            self.complete(step, now)
            if on_step is not None:
                on_step(step, now)
        return now

    def replay(self, arrivals: Sequence[tuple[float, SimRequest]]) -> float:
        """Run requests arriving at given times on a virtual clock, as :class:`EngineLoop`
        would with no overhead: the ideal the real-time loop is measured against."""
        pending = sorted(arrivals, key=lambda item: item[0])
        now, i = 0.0, 0
        while i < len(pending) or self.has_work():
            while i < len(pending) and pending[i][0] <= now:
                self.add_request(pending[i][1], pending[i][0])
                i += 1
            step = self.schedule(now) if self.has_work() else None
            if step is None:
                now = pending[i][0]  # idle (or blocked) until the next arrival
                continue
            now += step.duration
            self.complete(step, now)
        return now

    # --- Internals ----------------------------------------------------------------------

    def _blocks_needed(self, req: SimRequest, upto_tokens: int) -> int:
        held = len(req.held_keys) + req.anonymous_blocks
        return max(0, _ceil_div(upto_tokens, self.config.block_size) - held)

    def _admit(self, req: SimRequest, budget: int, step: Step, now: float) -> int | None:
        """Schedule waiting ``req`` with its cache hits; the tokens it computes, or None if it must wait."""
        bs = self.config.block_size
        tokens = req.tokens
        hittable = len(tokens) - 1  # at least one token is computed, to sample from
        keys = extend_chain(req.block_keys, tokens, bs, upto=hittable) if self.gpu.enabled else ()
        gpu_blocks = self.gpu.match(keys, hittable // bs)
        gpu_hit = gpu_blocks * bs
        start = gpu_hit
        cpu_chunks = 0
        if self.cpu is not None:
            cs = self.cpu.chunk_size
            cpu_chunks = self.cpu.lookup(self._chunk_keys(self.cpu, req, req.prompt_len))
            start = max(gpu_hit, min(cpu_chunks * cs, hittable))
        pending = len(tokens) - start
        n = min(pending, budget)
        hit_keys = keys[:gpu_blocks]
        new_blocks = _ceil_div(start + n, bs) - gpu_blocks
        if new_blocks > self.gpu.num_free - self.gpu.evictable_among(hit_keys):
            return None
        self.waiting.popleft()
        self.gpu.acquire(hit_keys)
        self.gpu.allocate(new_blocks)
        req.held_keys = list(hit_keys)
        req.anonymous_blocks = new_blocks
        req.num_computed = start
        req.status = RUNNING
        self.running.append(req)
        loaded = start - gpu_hit
        first = not req.scheduled_once
        if first:
            req.scheduled_once = True
            req.first_scheduled = now
            req.gpu_hit_tokens, req.cpu_hit_tokens = gpu_hit, loaded
            req.num_cached_tokens = gpu_hit + loaded
        self.observer.admitted(req, len(tokens), gpu_hit, loaded, first)
        step.load.loaded_tokens += loaded
        step.load.add(n, start, samples=n == pending)
        step.scheduled.append((req, n))
        if loaded:
            self._commit_blocks(req)  # loaded KV is complete: key its full blocks now
        return n

    def _commit_blocks(self, req: SimRequest) -> None:
        """Key every block that ``req``'s computed KV has filled, so others can hit it."""
        if not self.gpu.enabled:
            return
        full = req.num_computed // self.config.block_size
        have = len(req.held_keys)
        if full <= have:
            return
        bs = self.config.block_size
        keys = extend_chain(req.block_keys, req.tokens, bs, upto=full * bs)
        new_keys = keys[have:full]
        if self.gpu.events is None:
            self.gpu.commit_many(new_keys)
        else:
            parent = keys[have - 1] if have else None
            ids = token_ids(req.tokens[have * bs : full * bs])
            self.gpu.commit_stored(new_keys, parent, ids, bs)
        req.held_keys.extend(new_keys)
        req.anonymous_blocks -= full - have

    def _chunk_keys(self, cpu: CpuChunkCache, req: SimRequest, upto: int) -> list[int]:
        """Chained keys of the prompt's full CPU-tier chunks within the first ``upto`` tokens.

        A chunk's key is the chained key of its last block when chunks are whole blocks
        (256 = 16 x 16 by default): it identifies the same prefix, and costs no hashing.
        """
        cs, bs = cpu.chunk_size, self.config.block_size
        upto = min(upto, req.prompt_len)
        if cs % bs:
            return extend_chain(req.chunk_keys, req.tokens, cs, upto=upto)
        n = upto // cs
        if len(req.chunk_keys) < n:
            ratio = cs // bs
            extend_chain(req.block_keys, req.tokens, bs, upto=n * cs)
            req.chunk_keys = req.block_keys[ratio - 1 : n * ratio : ratio]
        return req.chunk_keys

    def _store_chunks(self, cpu: CpuChunkCache, req: SimRequest) -> None:
        """Offer the prompt chunks whose KV is now computed to the CPU tier (LMCache store)."""
        done = min(req.num_computed, req.prompt_len) // cpu.chunk_size
        if done <= req.stored_chunks:
            return
        for key in self._chunk_keys(cpu, req, done * cpu.chunk_size)[req.stored_chunks : done]:
            cpu.store(key)
        req.stored_chunks = done

    def _release(self, req: SimRequest) -> None:
        self.gpu.release(req.held_keys, req.anonymous_blocks)
        req.held_keys = []
        req.anonymous_blocks = 0

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.status = WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self.observer.preempted(req)

    def _finish(self, req: SimRequest, now: float, reason: str) -> None:
        req.status = FINISHED
        req.finish_reason = reason
        req.finish_time = now
        self.observer.finished(req)
        req.notify()


class EngineLoop:
    """Runs a :class:`SimEngine` in real time: each step sleeps until its modelled deadline.

    Engine time is simulated seconds; real time is simulated time / ``time_scale``. A busy
    engine starts each step at the previous step's deadline (not when it woke up), so the
    simulator's own overhead and timer lateness do not accumulate.
    """

    # Real seconds of lag after which the timeline restarts from now. Below it the loop
    # catches up by running steps back to back; requests that arrive meanwhile only join
    # steps that begin after their arrival, so catching up never shortens a modelled time.
    RESYNC_AFTER_S = 1.0

    def __init__(
        self,
        engine: SimEngine,
        time_scale: float = 1.0,
        after_step: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.time_scale = time_scale
        self.after_step = after_step  # called after each step completes (the KV event publisher)
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._first_arrival: float | None = None  # first arrival since the last step was planned
        self.resyncs = 0  # times the host was too slow and the timeline restarted from now

    def now(self) -> float:
        """Current simulated time, seconds."""
        return (self._loop.time() - self._t0) * self.time_scale

    def submit(self, req: SimRequest) -> None:
        now = self.now()
        self.engine.add_request(req, now)
        if self._first_arrival is None:
            self._first_arrival = now
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        self.engine.abort(req, self.now())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        engine, loop = self.engine, self._loop
        deadline = None  # end of the previous step while busy; None after idling
        resync = self.RESYNC_AFTER_S * self.time_scale
        while True:
            if not engine.has_work():
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.now()
            # Back to back, the next step starts when the last one ended, however late the
            # timer woke us; only a lag past RESYNC_AFTER_S (an overloaded host) is given up.
            # From idle, it starts when the first request arrived, not when this task ran.
            if deadline is not None and now - deadline <= resync:
                start = deadline
            elif deadline is not None:
                self.resyncs += 1
                if self.resyncs == 1 or self.resyncs % 100 == 0:
                    log.warning("simulator fell %.0f ms behind its timeline (%d times): modelled times stretch",
                                (now - deadline) / self.time_scale * 1000, self.resyncs)  # fmt: skip
                start = now
            elif self._first_arrival is not None:
                start = min(self._first_arrival, now)
            else:
                start = now
            self._first_arrival = None
            step = engine.schedule(start)
            if step is None and engine.waiting and engine.waiting[0].arrival > start:
                start = engine.waiting[0].arrival  # idle on the timeline until it arrived
                step = engine.schedule(start)
            if step is None:
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = start + step.duration
            delay = self._t0 + deadline / self.time_scale - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            engine.complete(step, deadline)
            if self.after_step is not None:
                self.after_step()
