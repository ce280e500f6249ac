"""Routing policies: one interface, one class each.

``choose`` gets the healthy, not-yet-tried engines serving the request's model (never empty)
and the parsed request, and returns one engine. Policies run on the event loop on every
request, so they do O(engines) cheap work and no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

from ..tokenizer import render_chat
from .engines import Engine
from .prefix_index import PrefixIndex, chunk_hashes


class RouteRequest:
    """What routing needs from one request, derived lazily and at most once (retries reuse it)."""

    __slots__ = ("body", "headers", "_prompt", "_hashes", "predicted_cached_tokens",
                 "prompt_tokens_estimate")

    def __init__(self, body: Mapping[str, Any], headers: Mapping[str, str]):
        self.body = body
        self.headers = headers
        self._prompt: str | None = None
        self._hashes: list[int] | None = None
        self.predicted_cached_tokens = 0.0
        self.prompt_tokens_estimate = 0.0

    @property
    def prompt(self) -> str:
        """The prompt text the engine will see (chat rendered with the shared template)."""
        if self._prompt is None:
            self._prompt = prompt_text(self.body)
        return self._prompt

    def hashes(self, chunk_chars: int) -> list[int]:
        if self._hashes is None:
            self._hashes = chunk_hashes(self.prompt, chunk_chars)
        return self._hashes


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


class Policy:
    """Chooses an engine for a request."""

    name = "policy"

    def __init__(self, **options: Any):
        self.options = options
        self._turn = 0

    def choose(self, engines: Sequence[Engine], request: RouteRequest) -> Engine:
        raise NotImplementedError

    def _rotate(self) -> int:
        self._turn += 1
        return self._turn

    def _least_loaded(self, engines: Sequence[Engine]) -> Engine:
        """Fewest in-flight requests; ties go round the ring so idle engines share work."""
        n = len(engines)
        start = self._rotate() % n
        best = engines[start]
        for i in range(1, n):
            e = engines[(start + i) % n]
            if e.inflight < best.inflight:
                best = e
        return best


class RoundRobinPolicy(Policy):
    """Naive baseline: the next engine in turn, blind to load and cache."""

    name = "round_robin"

    def choose(self, engines, request):
        return engines[self._rotate() % len(engines)]


class LeastLoadedPolicy(Policy):
    """Fewest requests in flight."""

    name = "least_loaded"

    def choose(self, engines, request):
        return self._least_loaded(engines)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class SessionPolicy(Policy):
    """Consistent hashing on a session key, with bounded load.

    Rendezvous (highest-random-weight) hashing: each engine scores ``hash(key, engine)`` and
    the session goes to the best-scoring engine whose in-flight count is below
    ``load_factor`` x the fair share. Removing an engine moves only its own sessions, and the
    hash is stable across router restarts (blake2b, not Python's salted ``hash``).
    Requests without a key (header ``header`` or the body's ``user``) go to the least loaded.
    """

    name = "session"

    def __init__(self, header: str = "x-session-id", load_factor: float = 1.25, **options):
        super().__init__(header=header, load_factor=load_factor, **options)
        self.header = header
        self.load_factor = load_factor

    def session_key(self, request: RouteRequest) -> str | None:
        key = request.headers.get(self.header)
        if not key:
            user = request.body.get("user")
            key = user if isinstance(user, str) and user else None
        return key

    def choose(self, engines, request):
        key = self.session_key(request)
        if key is None:
            return self._least_loaded(engines)
        total = sum(e.inflight for e in engines) + 1
        bound = self.load_factor * total / len(engines)
        ranked = sorted(engines, key=lambda e: _stable_hash(f"{key}\0{e.name}"), reverse=True)
        for engine in ranked:
            if engine.inflight < bound:
                return engine
        return self._least_loaded(engines)


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
    others (a new conversation, or a system prompt every engine holds) goes, among the
    engines not busier than average, to the one that was given the fewest such new prompts
    lately, so conversations are spread evenly by count rather than by a momentary in-flight
    snapshot (an uneven split of long-lived conversations is what later forces spills). The
    chosen engine's index then records the prompt: the engine caches it while serving it. No
    network round trip.
    """

    name = "kv_aware"
    PLACEMENT_DECAY = 1 - 1 / 512  # placements count over roughly the last 512 new prompts

    def __init__(self, chunk_chars: int = 256, chars_per_token: float = 4.0, beta: float = 0.75,
                 load_factor: float = 2.0, default_capacity_tokens: int = 1_000_000, **options):
        super().__init__(chunk_chars=chunk_chars, chars_per_token=chars_per_token, beta=beta,
                         load_factor=load_factor, default_capacity_tokens=default_capacity_tokens,
                         **options)
        self.chunk_chars = chunk_chars
        self.chars_per_token = chars_per_token
        self.beta = beta
        self.load_factor = load_factor
        self.default_capacity_tokens = default_capacity_tokens
        self._placed: dict[str, float] = {}  # engine name -> recent new-prompt placements

    def capacity_chunks(self, engine: Engine) -> int:
        tokens = engine.capacity_tokens or self.default_capacity_tokens
        return int(tokens * self.chars_per_token / self.chunk_chars)

    def index(self, engine: Engine) -> PrefixIndex:
        """The engine's index, created or resized when its known capacity changes."""
        index = engine.prefix_index
        tokens = engine.capacity_tokens
        if index is not None and index.capacity_tokens == tokens:
            return index  # the common case: one attribute compare
        capacity = self.capacity_chunks(engine)
        if index is None:
            index = engine.prefix_index = PrefixIndex(capacity)
        else:
            index.resize(capacity)
        index.capacity_tokens = tokens
        return index

    def _place_new(self, engines: Sequence[Engine], mean: float) -> Engine:
        """Fewest recent placements among the engines at or below the mean load."""
        placed = self._placed
        best = None
        for engine in engines:
            if engine.inflight > mean:
                continue
            count = placed.get(engine.name, 0.0)
            if best is None or count < best_count or (
                    count == best_count and engine.inflight < best.inflight):
                best, best_count = engine, count
        if best is None:  # unreachable: some engine is at or below the mean
            best = self._least_loaded(engines)
        for name in placed:  # forget old placements: those conversations end
            placed[name] *= self.PLACEMENT_DECAY
        placed[best.name] = placed.get(best.name, 0.0) + 1.0
        return best

    def choose(self, engines, request):
        hashes = request.hashes(self.chunk_chars)
        prompt_chars = len(request.prompt) or 1
        n = len(engines)
        mean = sum(e.inflight for e in engines) / n
        cap = self.load_factor * mean + 1
        norm = mean + 1
        beta = self.beta
        chunk = self.chunk_chars
        start = (hashes[0] if hashes else self._rotate()) % n
        best = None
        best_score = best_matched = 0
        least_matched = None
        for i in range(n):
            engine = engines[(start + i) % n]
            load = engine.inflight
            if load > cap:
                continue
            matched = self.index(engine).match(hashes) if hashes else 0
            if least_matched is None or matched < least_matched:
                least_matched = matched
            score = matched * chunk / prompt_chars
            if load > mean:
                score -= beta * (load - mean) / norm
            if best is None or score > best_score:
                best, best_score, best_matched = engine, score, matched
        if best is None or best_matched == least_matched:
            # The cache tells the engines apart for none of this prompt (a new conversation,
            # or only a system prompt every engine holds): place it for balance. (best is
            # never None: the least loaded engine is never above the cap.)
            best = self._place_new(engines, mean)
            best_matched = self.index(best).match(hashes) if hashes else 0
        if hashes:
            self.index(best).insert(hashes)
        request.predicted_cached_tokens = best_matched * chunk / self.chars_per_token
        request.prompt_tokens_estimate = prompt_chars / self.chars_per_token
        return best


POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobinPolicy, LeastLoadedPolicy, SessionPolicy, KvAwarePolicy)
}


def make_policy(name: str, options: Mapping[str, Any]) -> Policy:
    return POLICY_CLASSES[name](**options)
