"""The chaos and load scenarios of issue 13, each one bounded run against a deployed
:class:`~tests.helpers.chaos.LocalStack` that returns its figures (a dict) and the raw
outcomes the tests assert on. tests/e2e/test_chaos.py runs them at CI size,
``python -m benchmarks.chaos`` at the issue's sizes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from stackctl.testing import read_metrics
from tests.helpers.chaos import (
    EngineWatch,
    HealthProbe,
    HostileConnections,
    LoadRun,
    LocalStack,
    Outcome,
    ProcSampler,
    chat,
    closed_loop,
    errors_before_streaming,
    fd_soft_limit,
    open_loop,
    p50,
    p99,
    proc_stats,
    raise_fd_limit,
    small_scenario,
    ttfts,
)

HEALTH_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 1.0
# Ejection bound of the stack below: a frozen engine fails its next check (at most one
# interval away) after the check's timeout; one failure ejects (failures_to_eject: 1); plus
# the watcher's own polling and a loaded 2-core machine's slack.
EJECT_BOUND_S = HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S + 1.0
ENGINES = 3
MAX_NUM_SEQS = 8
# Admission cap for the overload scenario: twice what the engines run at once.
MAX_INFLIGHT = 2 * ENGINES * MAX_NUM_SEQS
TIME_SCALE = 1.0
# A request's head must arrive within this (slow-loris): below the hostile scenario's window.
HEADER_TIMEOUT_S = 5.0


def router_overrides() -> dict[str, Any]:
    """The inventory's router: section for the chaos stack: quick health checks, a header
    deadline the slow-loris scenario waits out, an in-flight cap the overload reaches."""
    return {
        "health_interval_s": HEALTH_INTERVAL_S,
        "health_timeout_s": HEALTH_TIMEOUT_S,
        "max_inflight": MAX_INFLIGHT,
        "header_timeout_s": HEADER_TIMEOUT_S,
    }


def engine_overrides() -> dict[str, Any]:
    return {"max_num_seqs": MAX_NUM_SEQS}


def workload(users: int = 12):
    """Each round prefills ~600 new tokens, so TTFT is the engines' work, not client noise."""
    return small_scenario(users=users, answer_tokens=16, question_tokens=600)


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))


def router_metric(stack: LocalStack, name: str) -> float | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{stack.router_url}/metrics", timeout=2) as resp:
            return read_metrics(resp.read().decode()).value(name, default=0.0)
    except (OSError, ValueError):
        return None


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    failed = [o for o in outcomes if not o.ok]
    return {
        "requests": len(outcomes),
        "ok": len(outcomes) - len(failed),
        "errors": len(failed),
        "errors_before_streaming": len(errors_before_streaming(outcomes)),
        "errors_mid_stream": sum(1 for o in failed if o.streamed),
        "ttft_p50_s": p50(ttfts(outcomes)),
        "ttft_p99_s": p99(ttfts(outcomes)),
        "error_samples": sorted({o.error or "" for o in failed})[:5],
    }


async def _wait_pid_change(stack: LocalStack, host: str, program: str, old: int, limit: float):
    """Seconds until supervisord reports a new pid for the program (None: not within limit)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        pid = await asyncio.to_thread(stack.pid, host, program)
        if pid and pid != old:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


# ----------------------------------------------------------------------------- 1. kill -9 engines


@dataclass
class Result:
    figures: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


async def engine_kills(
    stack: LocalStack,
    seconds: float = 30.0,
    every_s: float = 8.0,
    qps: float = 6.0,
    burst: int = 2 * ENGINES,
) -> Result:
    """kill -9 an engine every ``every_s`` (rotating) while the workload runs. Just before
    each kill, ``burst`` long-prompt requests are sent, so that the killed engine surely holds
    requests that have not streamed a token yet (accepted, in prefill): the ones the router
    must send elsewhere."""
    retries_before = router_metric(stack, "router_retries_total")
    watch = EngineWatch(stack.router_url)
    load = LoadRun(stack.router_url, qps, seconds, scenario=workload())
    kills: list[dict[str, Any]] = []
    bursts: list[Outcome] = []
    filler = " ".join(f"b{i % 89}" for i in range(OVERLOAD_PROMPT_TOKENS))

    async def one_burst(session: aiohttp.ClientSession, k: int, j: int) -> None:
        messages = [{"role": "user", "content": f"kill {k} burst {j}: {filler}"}]
        out, _ = await chat(session, stack.router_url, messages, 8, timeout_s=60, tag="burst")
        bursts.append(out)

    async def killer(session: aiohttp.ClientSession) -> None:
        start = time.monotonic()
        waits = []
        for k in range(int((seconds - 2) // every_s)):
            await asyncio.sleep(max(0.0, start + every_s * (k + 0.5) - time.monotonic()))
            waits += [asyncio.create_task(one_burst(session, k, j)) for j in range(burst)]
            await asyncio.sleep(0.3)  # sent and accepted (head sent), still in prefill
            host, program, name = stack.engines[k % len(stack.engines)]
            pid = await asyncio.to_thread(stack.signal, host, program, signal.SIGKILL)
            kill = {"engine": name, "at": time.monotonic(), "pid": pid}
            kills.append(kill)
            waits.append(asyncio.create_task(_restart(kill, host, program)))
        await asyncio.gather(*waits)

    async def _restart(kill: dict[str, Any], host: str, program: str) -> None:
        kill["restart_s"] = await _wait_pid_change(stack, host, program, kill["pid"], 30.0)

    async with new_session() as session:
        done: dict[str, bool] = {}

        async def load_then_mark() -> None:
            await load.run(session)
            done["load"] = True

        def all_back() -> bool:  # the load is over and every killed engine is back
            return "load" in done and all(
                watch.first(k["engine"], True, k["at"]) is not None for k in kills
            )

        await asyncio.gather(
            load_then_mark(), killer(session), watch.run(session, seconds + 20, all_back)
        )
    for kill in kills:
        ejected = watch.first(kill["engine"], False, kill["at"])
        back = watch.first(kill["engine"], True, ejected or kill["at"])
        kill["ejected_s"] = None if ejected is None else ejected - kill["at"]
        kill["readmitted_s"] = None if back is None else back - kill["at"]
    retries_after = router_metric(stack, "router_retries_total")
    figures = {
        "seconds": seconds,
        "qps": qps,
        "kills": len(kills),
        **summarize(load.outcomes + bursts),
        "burst_requests": len(bursts),
        "burst_errors_before_streaming": len(errors_before_streaming(bursts)),
        "router_retries": None
        if retries_before is None or retries_after is None
        else retries_after - retries_before,
        "restart_s": [k["restart_s"] for k in kills],
        "readmitted_s": [k["readmitted_s"] for k in kills],
    }
    return Result(figures, load.outcomes + bursts, {"kills": kills})


# ----------------------------------------------------------------------------- 2. SIGSTOP


async def engine_freeze(
    stack: LocalStack, freeze_s: float = 6.0, lead_s: float = 3.0, tail_s: float = 6.0,
    qps: float = 6.0,
) -> Result:  # fmt: skip
    """SIGSTOP one engine for ``freeze_s`` while the workload runs, then SIGCONT."""
    host, program, name = stack.engines[0]
    watch = EngineWatch(stack.router_url)
    seconds = lead_s + freeze_s + tail_s
    load = LoadRun(stack.router_url, qps, seconds, scenario=workload())
    marks: dict[str, float] = {}

    async def freezer() -> None:
        await asyncio.sleep(lead_s)
        pid = await asyncio.to_thread(stack.pid, host, program)
        marks["stop"] = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(freeze_s)
        finally:
            os.kill(pid, signal.SIGCONT)  # never leave a frozen engine behind
            marks["cont"] = time.monotonic()

    def readmitted() -> bool:
        return "cont" in marks and watch.first(name, True, marks["cont"]) is not None

    async with new_session() as session:
        await asyncio.gather(
            load.run(session), freezer(), watch.run(session, seconds + 35, until=readmitted)
        )
    stop, cont = marks["stop"], marks["cont"]
    ejected = watch.first(name, False, stop)
    back = watch.first(name, True, cont)
    # Requests running when the engine froze, or sent before the router ejected it: those
    # that may be stuck on it. Their time from the freeze (or their start) to their end.
    exposed = [o for o in load.outcomes if o.start < (ejected or cont) and o.end > stop]
    unstreamed = [o for o in exposed if not o.streamed or (o.start + (o.ttft or 0)) > stop]
    waits = [o.end - max(o.start, stop) for o in unstreamed]
    figures = {
        "freeze_s": freeze_s,
        "qps": qps,
        **summarize(load.outcomes),
        "ejected_after_s": None if ejected is None else ejected - stop,
        "eject_bound_s": EJECT_BOUND_S,
        "exposed_requests": len(exposed),
        "exposed_unstreamed": len(unstreamed),
        "exposed_unstreamed_max_wait_s": max(waits, default=0.0),
        "exposed_ended_after_sigcont": sum(1 for o in exposed if o.end > cont),
        "readmitted_after_sigcont_s": None if back is None else back - cont,
    }
    return Result(figures, load.outcomes, {"waits": waits})


# ----------------------------------------------------------------------------- 3. kill -9 router


async def router_kill(stack: LocalStack, seconds: float = 10.0, kill_at_s: float = 3.0) -> Result:
    """kill -9 the router while a 10-per-second /health probe and a light workload run."""
    probe = HealthProbe(stack.router_url, period=0.1)
    load = LoadRun(stack.router_url, 2.0, seconds, scenario=workload(users=4))
    marks: dict[str, Any] = {}

    async def killer() -> None:
        await asyncio.sleep(kill_at_s)
        marks["pid"] = await asyncio.to_thread(stack.signal, "head", "router", signal.SIGKILL)
        marks["at"] = time.monotonic()
        marks["restart_s"] = await _wait_pid_change(stack, "head", "router", marks["pid"], 20.0)

    async with new_session() as session:
        await asyncio.gather(probe.run(session, seconds), killer(), load.run(session))
    outage, failed = probe.longest_outage()
    figures = {
        "probes": len(probe.results),
        "probes_failed": sum(1 for _, ok in probe.results if not ok),
        "outage_s": outage,
        "outage_probes": failed,
        "router_restart_s": marks.get("restart_s"),
        "workload": summarize(load.outcomes),
    }
    return Result(figures, load.outcomes, {"old_pid": marks.get("pid")})


# ----------------------------------------------------------------------------- 4. idle + slow-loris


async def hostile_connections(
    stack: LocalStack, idle: int = 2000, loris: int = 200, window_s: float = 12.0,
    qps: float = 6.0,
) -> Result:  # fmt: skip
    """The workload in three windows: without, with (idle + slow-loris held open), without.
    TTFT is compared between the hostile window and the two clean ones around it."""
    limit, note = raise_fd_limit(idle + loris + 2048)
    pid = stack.router_pid()
    sampler = ProcSampler(pid)
    watch = EngineWatch(stack.router_url, period=0.25)
    phase = {"now": "before"}
    total = 3 * window_s + 10
    load = LoadRun(
        stack.router_url, qps, 3 * window_s, scenario=workload(), tag=lambda: phase["now"]
    )
    hostile = HostileConnections("127.0.0.1", int(stack.router_url.rsplit(":", 1)[1]))
    marks: dict[str, float] = {}
    base_fds, base_rss = proc_stats(pid)

    async def attacker() -> None:
        await asyncio.sleep(window_s)
        marks["open_start"] = time.monotonic()
        phase["now"] = "opening"
        await hostile.open(idle, loris)
        marks["opened"] = time.monotonic()
        phase["now"] = "hostile"
        await hostile.drip(window_s)
        marks["hostile_end"] = time.monotonic()
        marks["held"] = hostile.open_count
        phase["now"] = "closing"
        await hostile.close()
        phase["now"] = "after"

    async with new_session() as session:
        await asyncio.gather(
            load.run(session), attacker(), sampler.run(total), watch.run(session, total)
        )
    outcomes = load.outcomes
    clean = ttfts(outcomes, "before") + ttfts(outcomes, "after")
    under = ttfts(outcomes, "hostile")
    peak_fds, peak_rss = sampler.peak()
    ejections = [c for c in watch.changes if not c[2]]
    log = stack.log_text("head", "router")
    figures = {
        "idle": idle,
        "loris": loris,
        "opened": marks.get("held", hostile.open_count),
        "failed_to_open": hostile.failed_to_open,
        "closed_by_router": dict(hostile.closed_by_server),
        "closed_after_s_p50": p50(hostile.close_after_s),
        "closed_after_s_max": max(hostile.close_after_s, default=float("nan")),
        "test_fd_limit": limit,
        "fd_limit_note": note,
        "open_seconds": marks.get("opened", 0) - marks.get("open_start", 0),
        **summarize(outcomes),
        "ttft_p50_clean_s": p50(clean),
        "ttft_p50_hostile_s": p50(under),
        "ttft_ratio": p50(under) / p50(clean) if clean and under else None,
        "requests_hostile": sum(1 for o in outcomes if o.tag == "hostile"),
        "router_fd_limit": fd_soft_limit(pid),
        "router_fds_before": base_fds,
        "router_fds_peak": peak_fds,
        "router_rss_before_mib": base_rss / 1024,
        "router_rss_peak_mib": peak_rss / 1024,
        "engine_ejections": len(ejections),
        "emfile_in_router_log": "Too many open files" in log,
    }
    return Result(figures, outcomes)


# ----------------------------------------------------------------------------- 5. overload

OVERLOAD_PROMPT_TOKENS = 3000  # prefill-bound requests: the engines saturate at a few QPS
OVERLOAD_MAX_TOKENS = 8


async def overload(
    stack: LocalStack, seconds: float = 15.0, factor: float = 2.0, recovery_s: float = 40.0,
    probe_seconds: float = 6.0,
) -> Result:  # fmt: skip
    """Find the saturation QPS (closed loop), then ``factor`` x that open-loop for
    ``seconds``, with a light probe load running on past the drop to see latency recover."""
    system = "overload system prompt " * 50
    kw = {"system_prompt": system, "prompt_tokens": OVERLOAD_PROMPT_TOKENS,
          "max_tokens": OVERLOAD_MAX_TOKENS}  # fmt: skip
    pids = {
        (h, p): stack.pid(h, p) for h, p in [("head", "router"), *[e[:2] for e in stack.engines]]
    }
    router_pid = pids[("head", "router")]
    async with new_session() as session:
        saturated_qps = await closed_loop(
            session, stack.router_url, 2 * ENGINES * MAX_NUM_SEQS, probe_seconds, **kw
        )
        light = max(0.5, 0.25 * saturated_qps)
        baseline = await open_loop(session, stack.router_url, light, probe_seconds, **kw)
        base_ttft = p50(ttfts(baseline))
        sampler = ProcSampler(router_pid)
        _, rss_before = proc_stats(router_pid)
        start = time.monotonic()

        async def after_drop() -> list[Outcome]:
            await asyncio.sleep(seconds)
            return await open_loop(
                session, stack.router_url, light, recovery_s, tag="recovery", **kw
            )

        heavy, recovery, _ = await asyncio.gather(
            open_loop(
                session, stack.router_url, factor * saturated_qps, seconds, tag="overload", **kw
            ),
            after_drop(),
            sampler.run(seconds + recovery_s + 5),
        )
    drop = start + seconds
    threshold = max(1.5 * base_ttft, base_ttft + 0.05)
    slow = [o for o in recovery if not o.ok or (o.ttft or 0) > threshold]
    recovered_s = max((o.start - drop for o in slow), default=0.0)
    statuses: dict[str, int] = {}
    for o in heavy:
        key = str(o.status) if o.status else (o.error or "?").split(":")[0]
        statuses[key] = statuses.get(key, 0) + 1
    admitted = [o for o in heavy if o.status == 200]
    now = {key: stack.pid(*key) for key in pids}
    figures = {
        "saturated_qps": saturated_qps,
        "offered_qps": factor * saturated_qps,
        "seconds": seconds,
        "baseline_ttft_p50_s": base_ttft,
        "overload_statuses": statuses,
        "rejected_429": statuses.get("429", 0),
        "rejected_429_with_retry_after": sum(1 for o in heavy if o.status == 429 and o.retry_after),
        "admitted_ttft_p50_s": p50(ttfts(admitted)),
        "admitted_ttft_p99_s": p99(ttfts(admitted)),
        "admitted_ttft_max_s": max(ttfts(admitted), default=float("nan")),
        "recovery_threshold_s": threshold,
        "recovered_after_drop_s": recovered_s,
        "recovery_ttft_p50_s": p50(ttfts(recovery)),
        "router_rss_before_mib": rss_before / 1024,
        "router_rss_peak_mib": sampler.peak()[1] / 1024,
        "restarted": [f"{h}/{p}" for (h, p), pid in pids.items() if now[(h, p)] != pid],
        "max_inflight_configured": MAX_INFLIGHT,
    }
    return Result(figures, heavy + recovery)
