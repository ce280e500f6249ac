"""What one engine's prefill costs, in seconds per token, learned from its own ``/metrics``.

The cost policy predicts a request's time to first token from these rates. vLLM (and the
simulator) count, per finished request, its time in the prefill phase
(``vllm:request_prefill_time_seconds``) and the KV it computed there, cached tokens excluded
(``vllm:request_prefill_kv_computed_tokens``); a KV connector's hits (LMCache's CPU tier) are
``vllm:external_prefix_cache_hits``: tokens loaded rather than computed, whose loading time is
inside the same prefill time. Between two scrapes the deltas give one window:
``prefill seconds ~= a * computed + b * loaded``. ``a`` and ``b`` are fitted by least squares
over the windows of the last minute or so (exponentially decayed), so they follow the
engine's batch size and context lengths as they change, with no constant per GPU model.

Requests prefilled together each count the whole shared time, so the sum of prefill times
over-states the engine's busy time by the mean number of requests in prefill at once; that
factor (summed prefill time over wall time, when above 1) is divided out. Wall time is the
router's clock, or the engine's own where it reports one (``stackctl_sim_clock_seconds``: the
simulator, whose times are simulated seconds and may run faster than real time). The
engine's GPU prefix-cache hit rate (``vllm:prefix_cache_hits`` over ``queries``) is kept the
same way. Rates are ``None`` until enough tokens were seen; ``b`` stays ``None`` while the windows cannot tell loading
from computing apart (no CPU-tier hits, or hits always in the same proportion).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from ..metrics import EXTERNAL_HITS as LOADED_TOKENS
from ..metrics import (
    PREFILL_COMPUTED_TOKENS,
    PREFILL_SECONDS,
    PREFIX_HITS,
    PREFIX_QUERIES,
    SIM_CLOCK,
)

TIMING_METRICS = (
    PREFILL_SECONDS,
    PREFILL_COMPUTED_TOKENS,
    LOADED_TOKENS,
    PREFIX_HITS,
    PREFIX_QUERIES,
    SIM_CLOCK,
)

_SAMPLE = re.compile(
    r"^(" + "|".join(re.escape(n) for n in TIMING_METRICS) + r")(?:\{[^}]*\})?\s+(\S+)",
    re.MULTILINE,
)


class TimingSample(NamedTuple):
    """One scrape's counters, summed over every series (one per engine core)."""

    prefill_seconds: float
    computed_tokens: float
    loaded_tokens: float
    hit_tokens: float  # GPU prefix-cache hits and queries, in tokens
    queried_tokens: float
    clock: float | None  # the engine's own clock, where it reports one


def timing_sample(text: str) -> TimingSample | None:
    """The counters in an engine's /metrics text, or None when it does not report prefill
    times."""
    sums = dict.fromkeys(TIMING_METRICS, 0.0)
    seen = set()
    for name, value in _SAMPLE.findall(text):
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            sums[name] += number
            seen.add(name)
    if PREFILL_SECONDS not in seen or PREFILL_COMPUTED_TOKENS not in seen:
        return None
    return TimingSample(
        sums[PREFILL_SECONDS],
        sums[PREFILL_COMPUTED_TOKENS],
        sums[LOADED_TOKENS],
        sums[PREFIX_HITS],
        sums[PREFIX_QUERIES],
        sums[SIM_CLOCK] if SIM_CLOCK in seen else None,
    )


class PrefillTiming:
    """Seconds per computed and per loaded prompt token of one engine (see the module doc)."""

    HORIZON_S = 60.0  # windows older than this weigh 1/e of a new one
    MIN_TOKENS = 1024.0  # computed tokens (decayed) seen before a rate is trusted: a few prompts
    MIN_LOADED_TOKENS = 1024.0
    # the windows tell loading from computing apart when their correlation is below this
    MAX_COLLINEARITY = 0.98

    __slots__ = ("_last", "_sums", "seconds_per_token", "seconds_per_loaded_token", "hit_rate")

    def __init__(self) -> None:
        self._last: tuple[float, ...] | None = None  # (clock, y, c, loaded, hits, queries)
        # decayed sums: wall, y, c, l, cc, cl, ll, cy, ly, hits, queries
        self._sums = [0.0] * 11
        self.seconds_per_token: float | None = None
        self.seconds_per_loaded_token: float | None = None
        # the fraction of prompt tokens its GPU cache served lately: how much of what a new
        # prompt evicts there is likely to be asked for again
        self.hit_rate: float | None = None

    def reset(self) -> None:
        """Forget everything: the engine restarted (its counters begin again)."""
        self.__init__()  # type: ignore[misc]

    def observe(self, now: float, sample: TimingSample) -> None:
        """One scrape at the router's monotonic time ``now``."""
        if sample.clock is not None:
            now = sample.clock
        last = self._last
        current = (now, *sample[:5])
        self._last = current
        if last is None:
            return
        wall, y, c, loaded, hits, queries = (current[i] - last[i] for i in range(6))
        if wall <= 0 or min(y, c, loaded, hits, queries) < 0:  # counters went back: a restart
            self.reset()
            self._last = current
            return
        keep = math.exp(-wall / self.HORIZON_S)
        terms = (
            wall,
            y,
            c,
            loaded,
            c * c,
            c * loaded,
            loaded * loaded,
            c * y,
            loaded * y,
            hits,
            queries,
        )
        s = self._sums
        for i, term in enumerate(terms):  # a quiet window still counts as wall time
            s[i] = s[i] * keep + term
        self._fit()

    def _fit(self) -> None:
        wall, y, c, loaded, cc, cl, ll, cy, ly, hits, queries = self._sums
        self.hit_rate = hits / queries if queries >= self.MIN_TOKENS else None
        if c < self.MIN_TOKENS or y <= 0:
            self.seconds_per_token = self.seconds_per_loaded_token = None
            return
        together = max(1.0, y / wall)  # requests in prefill at once, on average
        a, b = y / c, None
        det = cc * ll - cl * cl
        if (
            loaded >= self.MIN_LOADED_TOKENS
            and det > 0
            and cl * cl < self.MAX_COLLINEARITY**2 * cc * ll
        ):
            fit_a = (cy * ll - ly * cl) / det
            fit_b = (ly * cc - cy * cl) / det
            if fit_a > 0 and fit_b >= 0:
                a, b = fit_a, min(fit_b, fit_a)  # loading never costs more than computing
        self.seconds_per_token = a / together
        self.seconds_per_loaded_token = None if b is None else b / together

    def describe(self) -> dict[str, float | None]:
        return {
            "prefill_s_per_token": self.seconds_per_token,
            "loaded_s_per_token": self.seconds_per_loaded_token,
            "hit_rate": self.hit_rate,
        }
