"""Test support shipped with stackctl, as click.testing and aiohttp.test_utils ship with theirs:
stackctl's own tests, its benchmarks and downstream tests import it without path tricks.

- ``free_port``/``free_ports``: loopback ports to start servers on;
- ``wait_until``/``wait_until_async``: bounded polling that fails with what it waited for and
  what it last saw, never an unbounded ``while ...: sleep`` loop;
- ``read_metrics``: an engine's (or the simulator's) ``/metrics`` text read by prometheus_client's
  own parser, not a regex that breaks on labels, exponents or ``NaN``.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = [
    "Metrics",
    "WaitTimeout",
    "free_port",
    "free_ports",
    "read_metrics",
    "wait_until",
    "wait_until_async",
]

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now. Another process may take it before the caller
    binds it, so whoever starts a server on it should retry a lost race."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports: all are held open together while they are picked."""
    with ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


class WaitTimeout(AssertionError):
    """A bounded wait ran out. An AssertionError, so pytest reports it as a failed check."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "",
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
    max_interval: float | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    After ``timeout`` seconds raise WaitTimeout naming ``what``, the last value (or the last
    exception of an ``ignore`` type, e.g. OSError while a server is not listening yet) and
    ``detail()`` (a log tail, say). Any other exception propagates at once: a predicate raises to
    give up early (the process it waits for exited). The pause starts at ``interval`` and grows
    by half each round up to ``max_interval`` (default: it stays at ``interval``)."""
    deadline = time.monotonic() + timeout
    pause, ceiling = interval, max(interval, max_interval or interval)
    while True:
        try:
            last: object = predicate()
            if last:
                return last  # type: ignore[return-value]
        except ignore as exc:
            last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(_timeout_message(predicate, timeout, what, last, detail))
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, ceiling)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "",
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
    max_interval: float | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """``wait_until`` for a running event loop: sleeps with asyncio (the loop keeps serving) and
    awaits the predicate's result when it is awaitable (an ``async def`` or a coroutine lambda)."""
    deadline = time.monotonic() + timeout
    pause, ceiling = interval, max(interval, max_interval or interval)
    while True:
        try:
            last: object = predicate()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last  # type: ignore[return-value]
        except ignore as exc:
            last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(_timeout_message(predicate, timeout, what, last, detail))
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, ceiling)


def _timeout_message(
    predicate: Callable[..., object],
    timeout: float,
    what: str,
    last: object,
    detail: Callable[[], str] | None,
) -> str:
    subject = what or getattr(predicate, "__name__", repr(predicate))
    seen = (
        f"last error: {type(last).__name__}: {last}"
        if isinstance(last, BaseException)
        else f"last value: {last!r}"
    )
    message = f"timed out after {timeout:g} s waiting for {subject} ({seen[:500]})"
    extra = detail() if detail is not None else ""
    return f"{message}\n{extra}" if extra else message


@dataclass(frozen=True)
class Metrics:
    """The samples of one Prometheus text exposition (vLLM's and the simulator's /metrics)."""

    samples: tuple[Sample, ...]

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (one model's
        series, or all of them); ``default`` when none match, else KeyError naming what there is."""
        matching = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        if matching:
            return sum(matching)
        if default is not None:
            return default
        seen = sorted({tuple(sorted(s.labels.items())) for s in self.samples if s.name == name})
        where = (
            f" with labels {labels}; its label sets: {seen}"
            if seen
            else f"; {len(self.names())} other sample names"
        )
        raise KeyError(f"no sample {name}{where}")

    def names(self) -> set[str]:
        """Every sample name (a histogram ``h`` gives ``h_bucket``, ``h_sum`` and ``h_count``)."""
        return {s.name for s in self.samples}

    def totals(self) -> dict[str, float]:
        """Each sample name's sum over its label sets, histogram buckets left out (a sum over
        ``le`` means nothing): counters and gauges to take deltas of."""
        out: dict[str, float] = {}
        for s in self.samples:
            if "le" not in s.labels:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out


def read_metrics(text: str) -> Metrics:
    """Parse Prometheus text with prometheus_client's own parser (ValueError on bad input)."""
    return Metrics(
        tuple(s for family in text_string_to_metric_families(text) for s in family.samples)
    )
