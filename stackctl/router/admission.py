"""Admission control: who may send a request now, and how much.

One :class:`Admission` owns every counter: the router-wide in-flight count, and per named
client (the names the keys file gives its keys, ``clients:`` in router.yaml giving their
limits) an in-flight count and two token buckets, requests per second and tokens per minute.
A request passes three gates:

1. :meth:`Admission.authenticate` maps the Bearer key to its client (compared in constant
   time against every key, so the time taken does not tell which key came close);
2. :meth:`Admission.enter`, before the body is read: the bytes of request bodies in flight
   (each its Content-Length, else the body limit; the router's request memory), the global
   and the client's in-flight caps and the client's requests-per-second bucket. An admitted
   request holds its slots until :meth:`Admission.leave`, which the handler calls in a
   ``finally``;
3. :meth:`Admission.charge`, once the prompt is known: the prompt-size cap and the client's
   tokens-per-minute bucket. The tokens charged are what is known before the answer: the
   prompt's estimated tokens (``ceil(rendered prompt characters / 4)``, no tokenizer on the
   request path) plus ``n`` (default 1) x ``max_completion_tokens`` or ``max_tokens`` when the
   request gives one; the answer's real length is not counted afterwards.

A refusal is a :class:`Refusal` (429 with a ``Retry-After`` in whole seconds, rounded up, and
``retry-after-ms``, as OpenAI sends them; 400 ``context_length_exceeded`` for a prompt over
the cap, as OpenAI and vLLM answer a too-long context). The request path does a few integer
and float operations and allocates nothing but the refusal.

The write timeout: a client that stops reading makes the response write block for ever (the
socket's buffers fill, the transport pauses writing), holding its in-flight slot and its
engine's in-flight count, which load-aware routing reads. Rather than a timer per write, one
sweeper task looks at the admitted requests every ``write_timeout_s / 4`` (at most 1 s) and
aborts the connection of one whose transport has had writing paused for ``write_timeout_s``;
the blocked write then raises, and the handler's ``finally`` frees everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .config import DEFAULT_CLIENT, AdmissionConfig, ClientLimits

CHARS_PER_TOKEN = 4.0  # the estimate kv_aware uses too (its chars_per_token default)
INFLIGHT_RETRY_S = 1.0  # Retry-After for a full in-flight cap: when a slot frees is unknown


class TokenBucket:
    """``rate`` units a second, at most ``capacity`` saved up; the clock is the caller's."""

    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.level = capacity  # a new bucket starts full
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` and return 0.0, or take nothing and return the seconds until it
        would be there (``inf`` when it exceeds the capacity: it never will)."""
        level = self.level + (now - self.stamp) * self.rate
        if level > self.capacity:
            level = self.capacity
        self.stamp = now
        if level >= amount:
            self.level = level - amount
            return 0.0
        self.level = level
        if amount > self.capacity:
            return math.inf
        return (amount - level) / self.rate

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Client:
    """A named client's live state: its limits, in-flight count and buckets."""

    __slots__ = ("name", "limits", "inflight", "requests", "tokens", "admitted", "refused")

    def __init__(self, name: str, limits: ClientLimits, now: float):
        self.name = name
        self.inflight = 0
        self.admitted = 0
        self.refused = 0
        self.limits = limits
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.set_limits(limits, now)

    def set_limits(self, limits: ClientLimits, now: float) -> None:
        """New limits (a reload); a bucket whose rate is unchanged keeps its level."""
        self.limits = limits
        rps, tpm = limits.requests_per_s, limits.tokens_per_min
        old = self.requests
        if rps is None:
            self.requests = None
        elif old is None or old.rate != rps:
            self.requests = TokenBucket(rps, max(1.0, rps), now)
        old = self.tokens
        if tpm is None:
            self.tokens = None
        elif old is None or old.rate != tpm / 60.0:
            self.tokens = TokenBucket(tpm / 60.0, float(tpm), now)


class Refusal:
    """Why a request was not admitted: the HTTP answer and the metric's reason."""

    __slots__ = ("status", "reason", "message", "type", "code", "param", "retry_after_s")

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        type_: str = "requests",
        code: str = "rate_limit_exceeded",
        param: str | None = None,
        retry_after_s: float | None = None,
    ):
        self.status = status
        self.reason = reason  # the metric label: global_inflight, client_inflight, ...
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, at least 1) and ``retry-after-ms``, as OpenAI;
        for a request that can never fit, ``x-should-retry: false`` (the OpenAI clients'
        signal not to retry it)."""
        wait = self.retry_after_s
        if wait is None:
            return {}
        if not math.isfinite(wait):
            return {"x-should-retry": "false"}
        return {
            "Retry-After": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
        }

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.reason})"


def completion_tokens(body: Mapping[str, Any]) -> int:
    """What the request asks the engine to generate at most, when it says (else 0)."""
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        return 0
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        n = 1
    return limit * n


class Admission:
    """Every admission counter of one router; :meth:`update` applies a reload in place."""

    def __init__(
        self,
        config: AdmissionConfig,
        clients: Mapping[str, ClientLimits],
        keys: Iterable[tuple[str, bytes]],
        clock: Callable[[], float] = time.monotonic,
        on_write_timeout: Callable[[str], None] | None = None,
    ):
        self.clock = clock
        self.on_write_timeout = on_write_timeout  # gets the client's name
        self.inflight = 0
        self.clients: dict[str, Client] = {}
        self._keys: tuple[tuple[bytes, Client], ...] = ()
        self.body_bytes = 0  # reserved by the admitted requests' bodies
        # id(admitted request) -> (its client, the request, its body bytes), for leave() and
        # the sweeper (aiohttp's requests are mappings, so not hashable themselves)
        self._active: dict[int, tuple[Client, Any, int]] = {}
        self._paused_since: dict[int, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.write_timeouts = 0
        self.config = config
        self.update(config, clients, keys)

    # -- configuration ------------------------------------------------------------------
    def update(
        self,
        config: AdmissionConfig,
        clients: Mapping[str, ClientLimits],
        keys: Iterable[tuple[str, bytes]],
    ) -> None:
        """New caps, limits and keys; a client that stays keeps its counters and buckets."""
        now = self.clock()
        self.config = config
        keys = tuple(keys)
        names = {DEFAULT_CLIENT, *clients, *(name for name, _ in keys)}
        current = self.clients
        for name in names:
            limits = clients.get(name, ClientLimits())
            client = current.get(name)
            if client is None:
                current[name] = Client(name, limits, now)
            else:
                client.set_limits(limits, now)
        for name in [n for n, c in current.items() if n not in names and not c.inflight]:
            del current[name]  # still in flight: kept until it leaves, then dropped next time
        self._keys = tuple((key, current[name]) for name, key in keys)

    @property
    def authenticates(self) -> bool:
        return bool(self._keys)

    # -- the request path ---------------------------------------------------------------
    def authenticate(self, authorization: str) -> Client | None:
        """The client whose key the ``Authorization`` header carries, None for no valid key;
        the client ``default`` for everyone when no key is configured."""
        keys = self._keys
        if not keys:
            return self.clients[DEFAULT_CLIENT]
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token.strip().encode("utf-8", "surrogateescape")
        found = None
        for key, client in keys:  # compare with every key: time does not reveal which matched
            if hmac.compare_digest(presented, key):
                found = client
        return found

    def enter(self, client: Client, request: Any, body_bytes: int = 0) -> Refusal | None:
        """Admit ``request`` for ``client`` (None) or refuse it; an admitted request must
        :meth:`leave`, whatever happens to it. ``body_bytes``: what its body will take (its
        Content-Length, else the body limit), counted against ``max_body_bytes_inflight``."""
        budget = self.config.max_body_bytes_inflight
        if budget is not None and self.body_bytes + body_bytes > budget and self.body_bytes:
            return self._refused(
                client,
                Refusal(
                    429,
                    "body_bytes_inflight",
                    f"The router holds its limit of {budget} bytes of request bodies in "
                    "flight; retry shortly.",
                    retry_after_s=INFLIGHT_RETRY_S,
                ),
            )
        cap = self.config.max_inflight
        if cap is not None and self.inflight >= cap:
            return self._refused(
                client,
                Refusal(
                    429,
                    "global_inflight",
                    f"The router has its limit of {cap} requests in flight; retry shortly.",
                    retry_after_s=INFLIGHT_RETRY_S,
                ),
            )
        limits = client.limits
        if limits.max_inflight is not None and client.inflight >= limits.max_inflight:
            return self._refused(
                client,
                Refusal(
                    429,
                    "client_inflight",
                    f"Client {client.name} has its limit of {limits.max_inflight} requests in "
                    "flight; retry when one finishes.",
                    retry_after_s=INFLIGHT_RETRY_S,
                ),
            )
        bucket = client.requests
        if bucket is not None:
            wait = bucket.take(1.0, self.clock())
            if wait:
                return self._refused(
                    client,
                    Refusal(
                        429,
                        "requests_per_s",
                        f"Rate limit reached for client {client.name} on requests per second: "
                        f"limit {limits.requests_per_s:g}. Please try again in {wait:.3f}s.",
                        retry_after_s=wait,
                    ),
                )
        self.inflight += 1
        self.body_bytes += body_bytes
        client.inflight += 1
        client.admitted += 1
        self._active[id(request)] = (client, request, body_bytes)
        return None

    def needs_prompt(self, client: Client) -> bool:
        """Whether :meth:`charge` has anything to check (else the prompt need not be known)."""
        return self.config.max_prompt_chars is not None or client.tokens is not None

    def charge(
        self,
        client: Client,
        prompt_chars: int,
        completion: int,
        request: Any = None,
        param: str = "messages",
    ) -> Refusal | None:
        """The prompt-size cap and the client's tokens per minute, for an admitted request
        (``request``: its requests-per-second token is given back when refused here;
        ``param``: the prompt's field, ``messages`` or ``prompt``, named by a too-long one)."""
        cap = self.config.max_prompt_chars
        if cap is not None and prompt_chars > cap:
            return self._refused(
                client,
                Refusal(
                    400,
                    "prompt_too_long",
                    f"The prompt is {prompt_chars} characters (about "
                    f"{math.ceil(prompt_chars / CHARS_PER_TOKEN)} tokens); this router accepts "
                    f"at most {cap}. Please reduce the length of the messages or prompt.",
                    type_="invalid_request_error",
                    code="context_length_exceeded",
                    param=param,
                ),
                give_back=request is not None,
            )
        bucket = client.tokens
        if bucket is None:
            return None
        tokens = math.ceil(prompt_chars / CHARS_PER_TOKEN) + completion
        wait = bucket.take(tokens, self.clock())
        if not wait:
            return None
        limit = client.limits.tokens_per_min
        if math.isinf(wait):
            message = (
                f"Request too large for client {client.name} on tokens per min: limit "
                f"{limit}, requested {tokens} (estimated prompt tokens plus max_tokens). "
                "Please reduce the prompt or max_tokens."
            )
        else:
            message = (
                f"Rate limit reached for client {client.name} on tokens per min: limit "
                f"{limit}, requested {tokens}. Please try again in {wait:.3f}s."
            )
        return self._refused(
            client,
            Refusal(429, "tokens_per_min", message, type_="tokens", retry_after_s=wait),
            give_back=request is not None,
        )

    def leave(self, request: Any) -> None:
        """The admitted ``request`` finished (answered, failed, cancelled or timed out)."""
        entry = self._active.pop(id(request), None)
        if entry is None:
            return
        self.inflight -= 1
        self.body_bytes -= entry[2]
        entry[0].inflight -= 1
        if self._paused_since:
            self._paused_since.pop(id(request), None)

    def _refused(self, client: Client, refusal: Refusal, give_back: bool = False) -> Refusal:
        client.refused += 1
        if give_back and client.requests is not None:
            client.requests.give_back(1.0)  # refused after enter: not a request served
        return refusal

    # -- the write timeout ----------------------------------------------------------------
    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        task, self._sweeper = self._sweeper, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.write_timeout_s / 4))
            self.sweep()

    def sweep(self) -> int:
        """Abort the connections whose writes have been paused for ``write_timeout_s``;
        returns how many. ``request`` objects are aiohttp requests (``protocol`` with
        ``writing_paused``, ``transport``); anything else is skipped."""
        now = self.clock()
        limit = self.config.write_timeout_s
        paused_since = self._paused_since
        aborted = 0
        for key, (client, request, _) in list(self._active.items()):  # abort() may end handlers
            protocol = getattr(request, "protocol", None)
            if protocol is None or not getattr(protocol, "writing_paused", False):
                if paused_since:
                    paused_since.pop(key, None)
                continue
            since = paused_since.setdefault(key, now)
            if now - since >= limit:
                transport = request.transport
                if transport is not None:
                    transport.abort()  # the blocked write raises; the handler's finally leaves
                    aborted += 1
                    if self.on_write_timeout is not None:
                        self.on_write_timeout(client.name)
                paused_since.pop(key, None)
        self.write_timeouts += aborted
        return aborted

    # -- views ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """For ``/clients``: caps, and per client its limits and counters (never a key)."""
        keyed: dict[str, int] = {}
        for _, client in self._keys:
            keyed[client.name] = keyed.get(client.name, 0) + 1
        return {
            "inflight": self.inflight,
            "max_inflight": self.config.max_inflight,
            "body_bytes": self.body_bytes,
            "max_body_bytes_inflight": self.config.max_body_bytes_inflight,
            "max_prompt_chars": self.config.max_prompt_chars,
            "write_timeout_s": self.config.write_timeout_s,
            "write_timeouts": self.write_timeouts,
            "authentication": self.authenticates,
            "clients": [
                {
                    "name": c.name,
                    "keys": keyed.get(c.name, 0),
                    "inflight": c.inflight,
                    "admitted": c.admitted,
                    "refused": c.refused,
                    "max_inflight": c.limits.max_inflight,
                    "requests_per_s": c.limits.requests_per_s,
                    "tokens_per_min": c.limits.tokens_per_min,
                }
                for c in self.clients.values()
            ],
        }
