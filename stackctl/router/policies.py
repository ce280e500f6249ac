"""Routing policies: one interface, one class each, each owning its own state.

``choose`` gets the healthy, not-yet-tried backends serving the request's model (never
empty) and the parsed request, and returns a :class:`Choice`. Policies run on the event loop
on every request, so they do O(backends) cheap work and no I/O. A policy that keeps state per
backend (kv_aware's prefix indexes) keeps it in the policy object, and the backend pool calls
its hooks when a backend is added, removed, ejected, re-admitted or changes capacity;
``describe`` reports that state for ``/engines`` and ``/metrics``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..kv_events import block_keys
from ..tokenizer import render_chat, token_ids, tokenize
from .backends import Backend
from .prefix_index import PrefixIndex, chunk_hashes

if TYPE_CHECKING:
    from ..model_tokenizer import ModelTokenizer

log = logging.getLogger("stackctl.router.policies")


class RouteRequest:
    """What routing needs from one request, derived lazily and at most once (retries reuse it)."""

    __slots__ = (
        "body",
        "headers",
        "_prompt",
        "_hashes",
        "_token_ids",
        "_block_keys",
        "_shared",
        "_shared_tokens",
        "tokenizer",
    )

    def __init__(
        self,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        tokenizer: ModelTokenizer | None = None,
    ):
        self.body = body
        self.headers = headers
        self.tokenizer = tokenizer  # the model's (router.yaml tokenizer_dir), else None
        self._prompt: str | None = None
        self._hashes: list[int] | None = None
        self._token_ids: list[int] | None = None
        self._block_keys: dict[int, list[int]] = {}  # block size -> content keys
        self._shared: str | None = None
        self._shared_tokens: int | None = None

    @property
    def prompt(self) -> str:
        """The prompt text the engine will see (chat rendered with the shared template)."""
        if self._prompt is None:
            self._prompt = prompt_text(self.body)
        return self._prompt

    @property
    def shared_chars(self) -> int:
        """Characters of the prompt's leading system (or developer) messages as rendered: the
        part that many conversations share, so that holding it says nothing of which engine
        holds this conversation."""
        if self._shared is None:
            self._shared = shared_prefix_text(self.body)
        return len(self._shared)

    @property
    def shared_tokens(self) -> int:
        """The leading system messages in tokens, as ``token_ids`` counts them (with the
        model's tokenizer: how many of its token ids they render to the same)."""
        if self._shared_tokens is None:
            self._shared_tokens = self._count_shared_tokens()
        return self._shared_tokens

    def _count_shared_tokens(self) -> int:
        if not self.shared_chars:
            return 0
        tokenizer = self.tokenizer
        if tokenizer is None:
            assert self._shared is not None  # rendered by shared_chars
            return len(tokenize(self._shared))
        try:
            text = tokenizer.render_chat(shared_messages(self.body), add_generation_prompt=False)
            shared = tokenizer.encode(text, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - the model's template is code: see model_token_ids
            return 0
        ids = self.token_ids
        n = 0
        for a, b in zip(shared, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def prepare_token_ids(self) -> None:
        """Compute what the events view matches on (for a worker thread: large prompts)."""
        self.token_ids  # noqa: B018
        self.shared_tokens  # noqa: B018

    def hashes(self, chunk_chars: int) -> list[int]:
        if self._hashes is None:
            self._hashes = chunk_hashes(self.prompt, chunk_chars)
        return self._hashes

    @property
    def token_ids(self) -> list[int]:
        """The prompt's token ids as the engines compute them: the model's tokenizer when the
        router has one (vLLM engines), else the simulator's."""
        if self._token_ids is None:
            tokenizer = self.tokenizer
            if tokenizer is None:
                self._token_ids = token_ids(tokenize(self.prompt))
            else:
                self._token_ids = model_token_ids(tokenizer, self.body)
        return self._token_ids

    def block_keys(self, block_size: int) -> list[int]:
        """Content keys of the prompt's full blocks (stackctl.kv_events.block_keys), as an
        engine's KV events name what it holds."""
        keys = self._block_keys.get(block_size)
        if keys is None:
            keys = self._block_keys[block_size] = block_keys(self.token_ids, block_size)
        return keys


class Choice:
    """A policy's answer: the backend, and what the policy predicts of it (for metrics)."""

    __slots__ = ("backend", "predicted_cached_tokens", "prompt_tokens_estimate")

    def __init__(
        self,
        backend: Backend,
        predicted_cached_tokens: float = 0.0,
        prompt_tokens_estimate: float = 0.0,
    ):
        self.backend = backend
        self.predicted_cached_tokens = predicted_cached_tokens  # of the chosen backend
        self.prompt_tokens_estimate = prompt_tokens_estimate  # 0: the policy does not predict

    @property
    def uncached_tokens(self) -> float:
        """What the chosen backend is predicted to prefill (its queue while it does)."""
        return max(0.0, self.prompt_tokens_estimate - self.predicted_cached_tokens)

    def __repr__(self) -> str:
        return (
            f"Choice({self.backend.name}, predicted_cached_tokens="
            f"{self.predicted_cached_tokens:g}, prompt_tokens_estimate="
            f"{self.prompt_tokens_estimate:g})"
        )


def prompt_text(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return render_chat(m for m in messages if isinstance(m, dict))  # JSON objects are dicts
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):  # a batch of prompts: route by the first
            return first
        return " ".join(map(str, prompt))  # token ids
    return ""


SHARED_ROLES = ("system", "developer")


def shared_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A chat's leading system/developer messages, the part many conversations share (none
    for a plain prompt, or for a chat of nothing else: then the prompt is its own)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    shared = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in SHARED_ROLES:
            break
        shared.append(m)
    return shared if len(shared) < len(messages) else []


def shared_prefix_text(body: Mapping[str, Any]) -> str:
    """The shared messages' text as ``prompt_text(body)`` renders them: a prefix of it."""
    shared = shared_messages(body)
    if not shared:
        return ""
    # rendering is line by line (tokenizer.render_chat): the shared lines and their newline
    return render_chat(shared).rsplit("\n", 1)[0] + "\n"


def _token_list(value: list[Any]) -> bool:
    return bool(value) and all(type(t) is int for t in value)


def model_token_ids(tokenizer: ModelTokenizer, body: Mapping[str, Any]) -> list[int]:
    """The prompt's token ids as vLLM computes them with the model's tokenizer and template;
    empty (it matches nothing: the request is routed as a new one) where they cannot be
    computed: multimodal parts, or a chat template that fails on these messages (a model's
    template is code, and any error it raises must not fail the request here: the engine
    answers it as it does)."""
    messages = body.get("messages")
    try:
        if isinstance(messages, list):
            return tokenizer.chat_token_ids(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not _token_list(prompt):
            prompt = prompt[0]  # a batch of prompts: route by the first
        if isinstance(prompt, str):
            return tokenizer.prompt_token_ids(prompt)
        if isinstance(prompt, list) and _token_list(prompt):
            return list(prompt)  # token ids already
    except Exception:  # see the docstring
        log.debug("no token ids for this request", exc_info=True)
    return []


class Policy:
    """Chooses a backend for a request. The hooks do nothing unless a policy keeps state."""

    name = "policy"
    uses_timing = False  # True: the health checker feeds each Backend.timing from /metrics
    wants_token_ids = False  # True: it matches on RouteRequest.token_ids (computed off the loop)

    def __init__(self, **options: Any):
        self.options = options
        self._turn = 0

    def choose(self, backends: Sequence[Backend], request: RouteRequest) -> Choice:
        raise NotImplementedError

    # -- hooks, called by BackendPool ---------------------------------------------------------
    def backend_added(self, backend: Backend) -> None:
        """A new backend joined (start, reload); also every backend when this policy is new."""

    def backend_removed(self, backend: Backend) -> None:
        """The backend left the configuration: drop what is kept for it."""

    def backend_ejected(self, backend: Backend) -> None:
        """The backend failed and was taken out of rotation; a restarted engine is cold."""

    def backend_readmitted(self, backend: Backend) -> None:
        """The backend passed a health check again after an ejection."""

    def capacity_changed(self, backend: Backend) -> None:
        """``backend.capacity_tokens`` changed (configured, learned, or forgotten)."""

    def describe(self, backend: Backend) -> dict[str, Any]:
        """This policy's view of ``backend`` for ``/engines`` (same keys for every policy)."""
        return {"prefix_index_chunks": 0, "cached_tokens_estimate": 0}

    # -- helpers -------------------------------------------------------------------------------
    def _rotate(self) -> int:
        self._turn += 1
        return self._turn

    def _least_loaded(self, backends: Sequence[Backend]) -> Backend:
        """Fewest in-flight requests; ties go round the ring so idle backends share work."""
        n = len(backends)
        start = self._rotate() % n
        best = backends[start]
        for i in range(1, n):
            b = backends[(start + i) % n]
            if b.inflight < best.inflight:
                best = b
        return best


class RoundRobinPolicy(Policy):
    """Naive baseline: the next backend in turn, blind to load and cache."""

    name = "round_robin"

    def choose(self, backends: Sequence[Backend], request: RouteRequest) -> Choice:
        return Choice(backends[self._rotate() % len(backends)])


class LeastLoadedPolicy(Policy):
    """Fewest requests in flight."""

    name = "least_loaded"

    def choose(self, backends: Sequence[Backend], request: RouteRequest) -> Choice:
        return Choice(self._least_loaded(backends))


def _stable_hash(text: str) -> int:
    # surrogatepass: a lone surrogate from JSON ("\ud800") or a header's undecodable byte
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class SessionPolicy(Policy):
    """Consistent hashing on a session key, with bounded load.

    Rendezvous (highest-random-weight) hashing: each engine scores ``hash(key, engine)`` and
    the session goes to the best-scoring engine whose in-flight count is below
    ``load_factor`` x the fair share. Removing an engine moves only its own sessions, and the
    hash is stable across router restarts (blake2b, not Python's salted ``hash``).
    Requests without a key (header ``header`` or the body's ``user``) go to the least loaded.
    """

    name = "session"

    def __init__(self, header: str = "x-session-id", load_factor: float = 1.25, **options: Any):
        super().__init__(header=header, load_factor=load_factor, **options)
        self.header = header
        self.load_factor = load_factor

    def session_key(self, request: RouteRequest) -> str | None:
        key = request.headers.get(self.header)
        if not key:
            user = request.body.get("user")
            key = user if isinstance(user, str) and user else None
        return key

    def choose(self, backends: Sequence[Backend], request: RouteRequest) -> Choice:
        key = self.session_key(request)
        if key is None:
            return Choice(self._least_loaded(backends))
        total = sum(b.inflight for b in backends) + 1
        bound = self.load_factor * total / len(backends)
        ranked = sorted(backends, key=lambda b: _stable_hash(f"{key}\0{b.name}"), reverse=True)
        for backend in ranked:
            if backend.inflight < bound:
                return Choice(backend)
        return Choice(self._least_loaded(backends))


class KvAwarePolicy(Policy):
    """Send a request where its prompt prefix is most likely cached, unless that engine is busy.

    Score per engine: ``matched_chars / prompt_chars - beta * excess / (mean_inflight + 1)``,
    where ``excess`` is how far the engine's in-flight count is above the mean (0 at or below
    it). An engine above ``load_factor * mean + 1`` in flight is skipped outright, so a hot
    prefix spreads out (and then gets cached on the other engines too) instead of piling up.

    Engines are visited from a starting point fixed by the prompt's first chunk and a later
    engine must score strictly higher to win, so between equally good engines the same one
    keeps winning: once a spilled prefix's home is no longer busier than average its traffic
    returns there instead of being split by load noise over every engine that ever served it
    (which would cost each of them cache room). A prompt that no engine holds more of than the
    others, or of which no engine holds more than its leading system messages (a new
    conversation), goes, among the
    engines not busier than average and given about the fewest such new prompts lately (a
    quarter of the fair share of slack), to the one holding most of it (its system prompt),
    so conversations are spread evenly by count rather than by a momentary in-flight snapshot
    (an uneven split of long-lived conversations is what later forces spills) while each
    system prompt stays where it is cached. The
    chosen engine's index then records the prompt: the engine caches it while serving it. No
    network round trip. The indexes and placement counts live here, keyed by backend, and
    follow the pool's hooks (cleared on ejection, resized on a capacity change, dropped with
    the backend).
    """

    name = "kv_aware"
    PLACEMENT_DECAY = 1 - 1 / 512  # placements count over roughly the last 512 new prompts
    PLACEMENT_SLACK = 0.25  # of the fair share: how uneven new conversations may be placed

    def __init__(
        self,
        chunk_chars: int = 256,
        chars_per_token: float = 4.0,
        beta: float = 0.75,
        load_factor: float = 2.0,
        default_capacity_tokens: int = 1_000_000,
        max_indexed_chars: int = 524_288,
        kv_index: str = "estimate",
        **options: Any,
    ):
        super().__init__(
            chunk_chars=chunk_chars,
            chars_per_token=chars_per_token,
            beta=beta,
            load_factor=load_factor,
            default_capacity_tokens=default_capacity_tokens,
            max_indexed_chars=max_indexed_chars,
            **options,
        )
        self.max_indexed_chars = max_indexed_chars
        self.events = kv_index == "events"  # match on the engines' KV events where trusted
        self.wants_token_ids = self.events
        self.chunk_chars = chunk_chars
        self.chars_per_token = chars_per_token
        self.beta = beta
        self.load_factor = load_factor
        self.default_capacity_tokens = default_capacity_tokens
        self._indexes: dict[Backend, PrefixIndex] = {}  # what each backend is predicted to hold
        self._placed: dict[Backend, float] = {}  # recent new-prompt placements per backend

    # -- state ---------------------------------------------------------------------------------
    def capacity_chunks(self, backend: Backend) -> int:
        tokens = backend.capacity_tokens or self.default_capacity_tokens
        return int(tokens * self.chars_per_token / self.chunk_chars)

    def index(self, backend: Backend) -> PrefixIndex:
        """The backend's index, created (sized to its capacity) on first use."""
        index = self._indexes.get(backend)
        if index is None:
            index = self._indexes[backend] = PrefixIndex(self.capacity_chunks(backend))
        return index

    def backend_removed(self, backend: Backend) -> None:
        self._indexes.pop(backend, None)
        self._placed.pop(backend, None)

    def backend_ejected(self, backend: Backend) -> None:
        index = self._indexes.get(backend)
        if index is not None:
            index.clear()  # a restarted engine comes back with a cold cache

    def capacity_changed(self, backend: Backend) -> None:
        index = self._indexes.get(backend)
        if index is not None:
            index.resize(self.capacity_chunks(backend))

    def describe(self, backend: Backend) -> dict[str, Any]:
        index = self._indexes.get(backend)
        chunks = len(index) if index is not None else 0
        return {
            "prefix_index_chunks": chunks,
            "cached_tokens_estimate": round(chunks * self.chunk_chars / self.chars_per_token),
        }

    # -- choice --------------------------------------------------------------------------------
    def _place_new(
        self, backends: Sequence[Backend], mean: float, held: Mapping[Backend, float]
    ) -> Backend:
        """A new conversation: among the backends (not above the cap: those in ``held``)
        whose recent placements are within ``PLACEMENT_SLACK`` of the fewest, the best by the
        kv_aware score on what it holds of the prompt (``held``, a fraction: its system prompt,
        so that each application's own system prompt stays where it is cached), then the
        fewest placed, then the least loaded. The slack keeps conversations spread by count;
        without the score inside it, many distinct system prompts would be spread as if no
        engine held any."""
        placed = self._placed
        fewest = min(placed.get(b, 0.0) for b in held)
        fair = sum(placed.values()) / len(backends)
        # strict balance while there are few (the first conversations spread evenly, and so
        # every engine soon has traffic to learn from), affinity once there are many
        limit = fewest + self.PLACEMENT_SLACK * fair
        norm = mean + 1
        best = None
        best_key = (0.0, 0.0, 0)
        for backend, fraction in held.items():
            count = placed.get(backend, 0.0)
            if count > limit:
                continue
            load = backend.inflight
            score = fraction - self.beta * (load - mean) / norm if load > mean else fraction
            key = (score, -count, -load)
            if best is None or key > best_key:
                best, best_key = backend, key
        assert best is not None  # the fewest placed is always within the limit
        for backend in placed:  # forget old placements: those conversations end
            placed[backend] *= self.PLACEMENT_DECAY
        placed[best] = placed.get(best, 0.0) + 1.0
        return best

    def held(
        self, backend: Backend, request: RouteRequest, hashes: list[int], prompt_chars: int
    ) -> tuple[float, float, bool]:
        """(fraction of the prompt ``backend`` holds, tokens it holds, whether that goes past
        the prompt's shared prefix): from its KV events when ``kv_index`` is events and its
        view can be trusted, else from the estimate (or the view, where an untrusted view
        shows more)."""
        reported = None
        if self.events:
            view = backend.kv_view
            if view is not None and view.block_size:
                size = view.block_size
                tokens = view.match(request.block_keys(size))[0] * size
                reported = (
                    tokens / (len(request.token_ids) or 1),
                    float(tokens),
                    tokens > request.shared_tokens,
                )
                if view.usable(backend.capacity_tokens) and not backend.kv_events_gpu_only:
                    return reported
        estimated = (0.0, 0.0, False)
        if hashes:
            index = self._indexes.get(backend)
            matched = (index if index is not None else self.index(backend)).match(hashes)
            chars = matched * self.chunk_chars
            estimated = (
                chars / prompt_chars,
                chars / self.chars_per_token,
                chars > request.shared_chars,
            )
        # A view not trusted alone (warming) still proves what it shows: take the larger.
        return estimated if reported is None or estimated[0] >= reported[0] else reported

    def _prompt(self, request: RouteRequest) -> tuple[int, bool, list[int]]:
        """(the prompt's chars, whether it is indexed, its chunk hashes). A prompt too long to
        be worth indexing is neither hashed nor recorded nor matched: it is placed as a new
        conversation (for balance), and the indexes keep real conversations' state."""
        prompt_chars = len(request.prompt) or 1
        indexed = prompt_chars <= self.max_indexed_chars
        return prompt_chars, indexed, request.hashes(self.chunk_chars) if indexed else []

    def _load_bounds(self, backends: Sequence[Backend]) -> tuple[float, float]:
        """(mean in flight, the cap above which an engine is skipped)."""
        mean = sum(b.inflight for b in backends) / len(backends)
        return mean, self.load_factor * mean + 1

    def choose(self, backends: Sequence[Backend], request: RouteRequest) -> Choice:
        prompt_chars, indexed, hashes = self._prompt(request)
        n = len(backends)
        mean, cap = self._load_bounds(backends)
        norm = mean + 1
        beta = self.beta
        held = self.held
        start = (hashes[0] if hashes else self._rotate()) % n
        best = None
        best_score = best_fraction = best_tokens = 0.0
        least_fraction = None
        conversation_held = False  # some engine holds part of the prompt past its shared prefix
        fractions: dict[Backend, float] = {}
        for i in range(n):
            backend = backends[(start + i) % n]
            load = backend.inflight
            if load > cap:
                continue
            fraction, tokens, own = (
                held(backend, request, hashes, prompt_chars) if indexed else (0.0, 0.0, False)
            )
            fractions[backend] = fraction
            conversation_held = conversation_held or own
            if least_fraction is None or fraction < least_fraction:
                least_fraction = fraction
            score = fraction
            if load > mean:
                score -= beta * (load - mean) / norm
            if best is None or score > best_score:
                best, best_score, best_fraction, best_tokens = backend, score, fraction, tokens
        if best is None or best_fraction == least_fraction or not conversation_held:
            # The cache tells the backends apart for none of this prompt, or only by its
            # system prompt (a new conversation: engines that happen to hold the system prompt
            # would otherwise take every new conversation, and an engine that never got one
            # would never get any): place it for balance, where its system prompt is cached
            # when that keeps the balance. (best is never None: the least loaded backend is
            # never above the cap.)
            best = self._place_new(backends, mean, fractions)
            best_tokens = held(best, request, hashes, prompt_chars)[1] if indexed else 0.0
        if hashes:
            self.index(best).insert(hashes)  # kept with events too: the fallback stays warm
        return Choice(best, best_tokens, prompt_chars / self.chars_per_token)


class CostPolicy(KvAwarePolicy):
    """The engine with the lowest predicted time to first token, in seconds.

    ``a * (queued + uncached + hit_rate * (uncached + loaded)) + b * loaded`` per engine:
    ``queued`` is what the requests the router already sent there still have to prefill
    (``Backend.queued_tokens``), ``uncached`` the part of this prompt the engine holds
    nowhere, ``loaded`` the part it holds only in its CPU tier; ``a`` and ``b`` are the
    engine's own seconds per computed and per loaded token, learned from its /metrics
    (``stackctl.router.timing``; a load rate not learned yet counts as computing). The third
    term is the time this choice costs later requests: what the prompt brings into a full GPU
    cache evicts as much of what the engine held, of which the share its cache has lately
    been hit for (``hit_rate``) would have been asked for again. Without it the score moves
    a returning conversation off its home whenever a prefill is queued there, and under cache
    pressure that split of conversations costs more hits than the queue it avoids (measured:
    GPU hits 31% against 58% for kv_aware at 4 QPS on the kv-pressure scenario). What an engine holds comes from its KV events where trusted (GPU
    and CPU tier apart), else from the estimate (all of it counted as on the GPU). Until every
    candidate has a prefill rate the kv_aware (beta) score decides. As with kv_aware, a prompt
    the caches do not tell apart is placed for balance, engines above ``load_factor * mean +
    1`` in flight are skipped, and the estimate index records every choice.
    """

    name = "cost"
    uses_timing = True

    def tiers(
        self, backend: Backend, request: RouteRequest, hashes: list[int], prompt_chars: int
    ) -> tuple[float, float, float, bool]:
        """(prompt tokens, tokens on the engine's GPU, tokens only in its CPU tier, whether it
        holds part of the prompt past the shared prefix)."""
        if self.events:
            view = backend.kv_view
            if view is not None and view.block_size and view.usable(backend.capacity_tokens):
                size = view.block_size
                gpu, anywhere = view.match(request.block_keys(size))
                prompt_tokens = float(len(request.token_ids))
                if backend.kv_events_gpu_only:  # the rest may be in a CPU tier it does not report
                    fraction, _, own = self.held(backend, request, hashes, prompt_chars)
                    held = max(fraction * prompt_tokens, float(gpu * size))
                    return prompt_tokens, float(gpu * size), held - gpu * size, own
                return (
                    prompt_tokens,
                    float(gpu * size),
                    float((anywhere - gpu) * size),
                    anywhere * size > request.shared_tokens,
                )
        prompt_tokens = prompt_chars / self.chars_per_token
        fraction, _, own = self.held(backend, request, hashes, prompt_chars)
        # as a fraction: held() counts in token ids where it took an untrusted view's word
        return prompt_tokens, fraction * prompt_tokens, 0.0, own

    def choose(self, backends: Sequence[Backend], request: RouteRequest) -> Choice:
        if any(b.timing.seconds_per_token is None for b in backends):
            return super().choose(backends, request)
        prompt_chars, indexed, hashes = self._prompt(request)
        n = len(backends)
        mean, cap = self._load_bounds(backends)
        start = (hashes[0] if hashes else self._rotate()) % n
        unindexed = (prompt_chars / self.chars_per_token, 0.0, 0.0, False)
        best = None
        best_cost = math.inf
        best_tiers = unindexed
        most_held = least_held = None
        conversation_held = False
        held_fractions: dict[Backend, float] = {}
        for i in range(n):
            backend = backends[(start + i) % n]
            if backend.inflight > cap:
                continue
            tiers = self.tiers(backend, request, hashes, prompt_chars) if indexed else unindexed
            prompt_tokens, gpu, cpu, own = tiers
            conversation_held = conversation_held or own
            held = gpu + cpu
            held_fractions[backend] = held / (prompt_tokens or 1.0)
            most_held = held if most_held is None else max(most_held, held)
            least_held = held if least_held is None else min(least_held, held)
            timing = backend.timing
            a = timing.seconds_per_token or 0.0  # known: checked above
            b = timing.seconds_per_loaded_token
            evicts = (prompt_tokens - gpu) * (timing.hit_rate or 0.0)
            cost = (
                a * (backend.queued_tokens + prompt_tokens - held + evicts)
                + (a if b is None else b) * cpu
            )
            if cost < best_cost:
                best, best_cost, best_tiers = backend, cost, tiers
        if best is None or most_held == least_held or not conversation_held:
            best = self._place_new(backends, mean, held_fractions)
            best_tiers = self.tiers(best, request, hashes, prompt_chars) if indexed else unindexed
        if hashes:
            self.index(best).insert(hashes)
        prompt_tokens, gpu, cpu, _ = best_tiers
        return Choice(best, gpu + cpu, prompt_tokens)


POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (RoundRobinPolicy, LeastLoadedPolicy, SessionPolicy, KvAwarePolicy, CostPolicy)
}


def make_policy(name: str, options: Mapping[str, Any], kv_index: str = "estimate") -> Policy:
    """The policy ``name`` with its options; ``kv_index`` (router.yaml's) tells kv_aware
    where it learns what the engines hold."""
    cls = POLICY_CLASSES[name]
    if issubclass(cls, KvAwarePolicy):
        return cls(**options, kv_index=kv_index)
    return cls(**options)
