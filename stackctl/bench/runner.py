"""Benchmark runs against a deployed stack: a QPS sweep, and an availability probe.

``run_sweep`` warms the caches (the workload at the warm-up QPS, discarded, until every
user's first turn has come back: see :func:`warm_up`), then runs one fixed-duration point
per QPS on the same conversations, scraping the engines' Prometheus counters around each
point. Raw results are saved per profile under ``out_dir/raw/`` after every point, so an
interrupted sweep keeps what it measured and a report can be rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stackctl.bench.client import (
    Record,
    chat_completions_url,
    fill_record,
    new_session,
    percentile,
    stream_chat,
)
from stackctl.bench.metrics import cache_stats, scrape
from stackctl.bench.pacing import PacingStats, SendFn, run_paced
from stackctl.bench.scenario import Scenario, ScenarioError
from stackctl.bench.workload import RequestSpec, Workload


@dataclass
class PointResult:
    """Client pacing and engine cache statistics of one (profile, QPS) point."""

    profile: str
    qps_target: float
    pacing: dict[str, Any]
    cache: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointResult:
        return cls(
            data["profile"], data["qps_target"], data.get("pacing", {}), data.get("cache", {})
        )


@dataclass
class Warmup:
    """How the warm-up before a sweep ended (see :func:`warm_up`)."""

    profile: str
    qps: float
    min_s: float  # the scenario's warmup_s
    limit_s: float  # no arrival after this (see warmup_limit_s)
    elapsed_s: float  # arrivals and their drain
    requests: int
    errors: int
    users: int  # the initial users, whose first turns it waits for
    first_turns_answered: int
    first_turns_failed: int  # an error, or cancelled at the drain: that user is still cold
    first_turns_unsent: int  # not 0 only when the limit was reached
    limit_reached: bool

    @property
    def complete(self) -> bool:
        """Every initial user has an answered turn: no first turn is left to the measurement."""
        return self.first_turns_answered == self.users

    def describe(self) -> str:
        """One line for the console and summary.md."""
        head = (
            f"{self.profile} warm-up at {self.qps:g} QPS: {self.elapsed_s:.0f} s "
            f"(minimum {self.min_s:g} s)"
        )
        turns = f"{self.first_turns_answered}/{self.users} first turns answered"
        if self.limit_reached:
            head = f"{head}, stopped at its limit of {self.limit_s:g} s"
        if self.first_turns_failed:  # the conversation goes on, but nothing of it is cached
            turns += f", {self.first_turns_failed} failed (those users' next turns are cold too)"
        if self.first_turns_unsent:
            turns += f", {self.first_turns_unsent} never sent (left to the measured points)"
        return f"{head}; {turns}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Warmup:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class SweepResult:
    profile: str
    records: list[Record]
    points: list[PointResult]
    warmup: Warmup | None = None  # None: the sweep had no warm-up (warmup_s 0)


@dataclass
class Probe:
    """One availability probe: a tiny request sent to the router."""

    t_s: float
    ok: bool
    latency_s: float | None
    status: int | None
    error: str | None


@dataclass
class AvailabilityResult:
    profile: str
    qps: float
    seconds: float
    probes: list[Probe]
    records: list[Record]
    events: list[tuple[float, str]] = field(default_factory=list)
    # what the events' actions reported (an action that returns a mapping), with "t_s" and
    # "started_s" (when it returned and began), e.g. {"kind": "kill", "engine", "host", "pid"}
    faults: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [p for p in self.probes if p.ok]
        latencies = [p.latency_s for p in ok if p.latency_s is not None]
        longest = current = 0
        for probe in sorted(self.probes, key=lambda p: p.t_s):
            current = 0 if probe.ok else current + 1
            longest = max(longest, current)
        background_ok = sum(r.ok for r in self.records)
        failed = [r for r in self.records if not r.ok]
        return {
            "profile": self.profile,
            "qps": self.qps,
            "seconds": self.seconds,
            "probes": len(self.probes),
            "probes_ok": len(ok),
            "success_rate": len(ok) / len(self.probes) if self.probes else None,
            "longest_failure_streak": longest,
            "latency_p50_s": percentile(latencies, 50) if latencies else None,
            "latency_p99_s": percentile(latencies, 99) if latencies else None,
            "background_requests": len(self.records),
            "background_ok": background_ok,
            # a stream that had begun cannot be retried by the router; one that had not, can
            "background_errors_before_first_token": sum(r.ttft_s is None for r in failed),
            "background_errors_after_first_token": sum(r.ttft_s is not None for r in failed),
            "kills": sum(f.get("kind") == "kill" for f in self.faults),
            "faults": self.faults,
            "events": [{"t_s": t, "label": label} for t, label in self.events],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "qps": self.qps,
            "seconds": self.seconds,
            "probes": [asdict(p) for p in self.probes],
            "records": [r.to_dict() for r in self.records],
            "events": [list(e) for e in self.events],
            "faults": self.faults,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AvailabilityResult:
        return cls(
            data["profile"],
            data["qps"],
            data["seconds"],
            [Probe(**p) for p in data["probes"]],
            [Record.from_dict(r) for r in data["records"]],
            [tuple(e) for e in data.get("events", [])],
            data.get("faults", []),
        )


# ----------------------------------------------------------------------------- persistence


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "profile"


def save_sweep(out_dir: str | Path, result: SweepResult) -> Path:
    path = Path(out_dir) / "raw" / f"sweep-{_safe(result.profile)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "profile": result.profile,
        "records": [r.to_dict() for r in result.records],
        "points": [p.to_dict() for p in result.points],
        "warmup": result.warmup.to_dict() if result.warmup else None,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)
    return path


def save_availability(out_dir: str | Path, result: AvailabilityResult) -> Path:
    path = Path(out_dir) / "raw" / f"availability-{_safe(result.profile)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict()), encoding="utf-8")
    return path


def load_results(
    out_dir: str | Path,
) -> tuple[list[Record], list[PointResult], list[AvailabilityResult]]:
    """Everything saved under ``out_dir/raw``: records, points and availability runs."""
    records: list[Record] = []
    points: list[PointResult] = []
    availability: list[AvailabilityResult] = []
    raw = Path(out_dir) / "raw"
    for data in _saved_sweeps(raw):
        records += [Record.from_dict(r) for r in data["records"]]
        points += [PointResult.from_dict(p) for p in data["points"]]
    for path in sorted(raw.glob("availability-*.json")):
        availability.append(
            AvailabilityResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
        )
    return records, points, availability


def _saved_sweeps(raw: Path) -> list[dict[str, Any]]:
    """The sweep files under ``raw``, in the order the sweeps ran (each is rewritten after
    every point of its sweep)."""
    paths = sorted(raw.glob("sweep-*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]


def load_warmups(out_dir: str | Path) -> list[Warmup]:
    """The warm-ups of the sweeps saved under ``out_dir/raw`` (older saves have none)."""
    saved = _saved_sweeps(Path(out_dir) / "raw")
    return [Warmup.from_dict(data["warmup"]) for data in saved if data.get("warmup")]


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar per phase, fed from the live pacing stats (or nothing)."""

    def __init__(self, enabled: bool, console: Console | None):
        self.enabled = enabled
        self.console = console
        self.progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            if enabled
            else None
        )

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def say(self, text: str, *, always: bool = False) -> None:
        """A line above the bars; without bars only when ``always`` (a warning)."""
        if self.progress:
            self.progress.console.print(text, markup=False, highlight=False)
        elif always:
            (self.console or Console(stderr=True)).print(text, markup=False, highlight=False)

    @contextlib.asynccontextmanager
    async def phase(self, description: str, seconds: float, stats: PacingStats, sink: list[Record]):
        if not self.progress:
            yield
            return
        task = self.progress.add_task(description, total=seconds, counts="")
        started = time.monotonic()

        def refresh():
            errors = sum(1 for r in sink if not r.ok)
            self.progress.update(
                task,
                completed=min(seconds, time.monotonic() - started),
                counts=f"sent {stats.launched}  done {len(sink)}  errors {errors}",
            )

        async def tick():
            while True:
                refresh()
                await asyncio.sleep(0.5)

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            refresh()
            self.progress.update(task, completed=seconds)


# ----------------------------------------------------------------------------- runs


def _sender(
    session,
    url: str,
    model: str,
    scenario: Scenario,
    api_key: str | None,
    profile: str,
    qps: float,
    phase: str,
    sink: list[Record],
):
    """The ``send`` callback of run_paced: one streamed request -> one Record in ``sink``."""

    async def send(
        spec: RequestSpec, scheduled_s: float, start_s: float, waited: bool
    ) -> str | None:
        record = Record(
            profile=profile,
            qps_target=qps,
            phase=phase,
            user=spec.user_id,
            round=spec.round_index,
            scheduled_s=scheduled_s,
            start_s=start_s,
            start_time=time.time(),
            launch_lag_s=start_s - scheduled_s,
            waited_for_idle_user=waited,
            max_tokens=spec.max_tokens,
            prompt_tokens_sent=spec.prompt_tokens,
            first_turn=spec.first_turn,
        )
        try:
            out = await stream_chat(
                session,
                url,
                model,
                spec,
                api_key=api_key,
                timeout_s=scenario.request_timeout_s,
                ignore_eos=scenario.ignore_eos,
            )
        except asyncio.CancelledError:
            record.error = "cancelled: still running at the drain timeout"
            sink.append(record)
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected reply must cost one record, not the run
            record.error = f"client error: {type(exc).__name__}: {exc}"
            sink.append(record)
            return None
        sink.append(fill_record(record, out))
        return out.answer if out.error is None else None

    return send


def warmup_limit_s(users: int, qps: float, min_s: float, request_timeout_s: float) -> float:
    """When a warm-up sends its last arrival even if some first turn has not returned.

    The initial users go first, so their first turns are all due by ``users / qps``, and each
    returns (or times out) within ``request_timeout_s``: waiting longer would only wait on a
    client too far behind its schedule.
    """
    return max(min_s, users / qps) + request_timeout_s


async def warm_up(
    workload: Workload,
    qps: float,
    min_s: float,
    send: SendFn,
    records: Sequence[Record],
    *,
    profile: str,
    limit_s: float,
    time_origin: float | None = None,
    drain_timeout_s: float = 120.0,
    stats: PacingStats | None = None,
) -> Warmup:
    """Run ``workload`` at ``qps`` for at least ``min_s`` and until every initial user's first
    turn has returned, so that no cold first turn is still to come (or in flight) when the
    measurement starts; no arrival after ``limit_s``. Then drain, as every run does.

    Arrivals go on at ``qps`` while it waits, so the engines are in the steady state the points
    measure. ``records`` is the sink ``send`` appends to (for the request and error counts).
    """
    stats = await run_paced(
        workload,
        qps,
        min_s,
        send,
        time_origin=time_origin,
        drain_timeout_s=drain_timeout_s,
        stats=stats,
        until=lambda: workload.first_turns_pending == 0,
        limit_s=limit_s,
    )
    return Warmup(
        profile=profile,
        qps=qps,
        min_s=min_s,
        limit_s=limit_s,
        elapsed_s=stats.elapsed_s,
        requests=len(records),
        errors=sum(not r.ok for r in records),
        users=workload.scenario.users,
        first_turns_answered=workload.first_turns_answered,
        first_turns_failed=workload.first_turns_failed,
        first_turns_unsent=workload.first_turns_pending,  # every request sent has returned
        limit_reached=stats.limit_reached,
    )


async def run_sweep_async(
    base_url: str,
    model: str,
    scenario: Scenario,
    qps_list: Sequence[float] | None = None,
    duration_s: float | None = None,
    warmup_s: float | None = None,
    profile_name: str = "default",
    out_dir: str | Path | None = None,
    metrics_urls: Sequence[str] = (),
    progress: bool = True,
    api_key: str | None = None,
    console: Console | None = None,
    warmup_qps: float | None = None,
) -> SweepResult:
    """Async form of :func:`run_sweep`."""
    qps_list = [float(q) for q in (qps_list or scenario.qps)]
    duration_s = scenario.duration_s if duration_s is None else duration_s
    warmup_s = scenario.warmup_s if warmup_s is None else warmup_s
    warmup_qps = warmup_qps or scenario.warmup_qps or (qps_list[0] if qps_list else 1.0)
    if not qps_list or any(q <= 0 for q in qps_list):
        raise ScenarioError(f"QPS list must hold positive numbers, got {qps_list}")
    if duration_s <= 0 or warmup_s < 0 or warmup_qps <= 0:
        raise ScenarioError(
            f"need duration_s > 0, warmup_s >= 0, warmup_qps > 0; got {duration_s}, "
            f"{warmup_s}, {warmup_qps}"
        )
    url = chat_completions_url(base_url)
    workload = Workload(scenario)
    result = SweepResult(profile_name, [], [])
    origin = time.monotonic()
    async with new_session() as session:
        with _Progress(progress, console) as bar:
            if warmup_s > 0:
                discarded: list[Record] = []
                stats = PacingStats(warmup_qps, warmup_s)
                send = _sender(
                    session,
                    url,
                    model,
                    scenario,
                    api_key,
                    profile_name,
                    warmup_qps,
                    "warmup",
                    discarded,
                )
                expected_s = max(warmup_s, scenario.users / warmup_qps)  # all first turns sent
                async with bar.phase(
                    f"{profile_name} warm-up @ {warmup_qps:g} QPS", expected_s, stats, discarded
                ):
                    result.warmup = await warm_up(
                        workload,
                        warmup_qps,
                        warmup_s,
                        send,
                        discarded,
                        profile=profile_name,
                        limit_s=warmup_limit_s(
                            scenario.users, warmup_qps, warmup_s, scenario.request_timeout_s
                        ),
                        time_origin=origin,
                        drain_timeout_s=scenario.drain_timeout_s,
                        stats=stats,
                    )
                bar.say(result.warmup.describe(), always=not result.warmup.complete)
            for qps in qps_list:
                before = await scrape(session, metrics_urls) if metrics_urls else {}
                sink: list[Record] = []
                stats = PacingStats(qps, duration_s)
                send = _sender(
                    session, url, model, scenario, api_key, profile_name, qps, "measure", sink
                )
                async with bar.phase(f"{profile_name} @ {qps:g} QPS", duration_s, stats, sink):
                    await run_paced(
                        workload,
                        qps,
                        duration_s,
                        send,
                        time_origin=origin,
                        drain_timeout_s=scenario.drain_timeout_s,
                        stats=stats,
                    )
                after = await scrape(session, metrics_urls) if metrics_urls else {}
                result.records.extend(sink)
                result.points.append(
                    PointResult(
                        profile_name, qps, stats.summary(), cache_stats(before, after).summary()
                    )
                )
                if out_dir is not None:
                    save_sweep(out_dir, result)
    return result


def run_sweep(
    base_url: str,
    model: str,
    scenario: Scenario,
    qps_list: Sequence[float] | None = None,
    duration_s: float | None = None,
    warmup_s: float | None = None,
    profile_name: str = "default",
    out_dir: str | Path | None = None,
    metrics_urls: Sequence[str] = (),
    progress: bool = True,
    api_key: str | None = None,
    console: Console | None = None,
    warmup_qps: float | None = None,
) -> SweepResult:
    """Warm up, then measure one point per QPS against ``base_url`` (router or engine).

    ``qps_list``, ``duration_s``, ``warmup_s`` and ``warmup_qps`` default to the scenario's
    (warm-up QPS: the scenario's ``warmup_qps``, else the first point's). The warm-up lasts at
    least ``warmup_s`` and until every user's first turn has come back (:func:`warm_up`);
    ``warmup_s`` 0 measures without one. ``metrics_urls`` are the engines' base or /metrics
    URLs, scraped around each point for cache hit rates. Saves
    ``out_dir/raw/sweep-<profile>.json`` after each point when ``out_dir`` is given.
    """
    return asyncio.run(
        run_sweep_async(
            base_url,
            model,
            scenario,
            qps_list,
            duration_s,
            warmup_s,
            profile_name,
            out_dir,
            metrics_urls,
            progress,
            api_key,
            console,
            warmup_qps,
        )
    )


Event = tuple[float, str, Callable[[], Any]]


async def run_availability_async(
    base_url: str,
    model: str,
    seconds: float,
    background_scenario: Scenario,
    qps: float,
    *,
    profile_name: str = "default",
    probe_interval_s: float = 1.0,
    probe_timeout_s: float = 5.0,
    events: Sequence[Event] = (),
    out_dir: str | Path | None = None,
    progress: bool = True,
    api_key: str | None = None,
    console: Console | None = None,
) -> AvailabilityResult:
    """Async form of :func:`run_availability`."""
    url = chat_completions_url(base_url)
    workload = Workload(background_scenario)
    result = AvailabilityResult(profile_name, qps, seconds, [], [])
    origin = time.monotonic()
    probe_spec = RequestSpec(
        user_id=-1,
        round_index=1,
        max_tokens=4,
        prompt_tokens=5,
        messages=({"role": "user", "content": "availability probe, answer briefly"},),
    )

    async def probe(at: float) -> None:
        out = await stream_chat(
            session, url, model, probe_spec, api_key=api_key, timeout_s=probe_timeout_s
        )
        result.probes.append(
            Probe(
                at - origin,
                out.error is None,
                out.e2e_s if out.error is None else None,
                out.status,
                out.error,
            )
        )

    async def probes() -> None:
        tasks = []
        k = 0
        while k * probe_interval_s < seconds:
            at = origin + k * probe_interval_s
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            tasks.append(asyncio.create_task(probe(at)))
            k += 1
        await asyncio.gather(*tasks)

    async def run_events() -> None:
        for at_s, label, action in sorted(events, key=lambda e: e[0]):
            await asyncio.sleep(max(0.0, origin + at_s - time.monotonic()))
            fired = time.monotonic() - origin
            try:
                outcome = await asyncio.to_thread(action)
                at = fired
                if isinstance(outcome, Mapping):  # it did what it says just before it returned
                    at = time.monotonic() - origin
                    label = str(outcome.get("label", label))
                    result.faults.append({"t_s": at, "started_s": fired, **outcome})
                result.events.append((at, label))
            except Exception as exc:  # noqa: BLE001 - an operator's action; keep measuring
                result.events.append((fired, f"{label} (failed: {exc})"))

    async with new_session() as session:
        with _Progress(progress, console) as bar:
            stats = PacingStats(qps, seconds)
            send = _sender(
                session,
                url,
                model,
                background_scenario,
                api_key,
                profile_name,
                qps,
                "background",
                result.records,
            )
            async with bar.phase(
                f"{profile_name} availability @ {qps:g} QPS", seconds, stats, result.records
            ):
                await asyncio.gather(
                    run_paced(
                        workload,
                        qps,
                        seconds,
                        send,
                        time_origin=origin,
                        drain_timeout_s=background_scenario.drain_timeout_s,
                        stats=stats,
                    ),
                    probes(),
                    run_events(),
                )
    result.probes.sort(key=lambda p: p.t_s)
    if out_dir is not None:
        save_availability(out_dir, result)
    return result


def run_availability(
    base_url: str,
    model: str,
    seconds: float,
    background_scenario: Scenario,
    qps: float,
    **options: Any,
) -> AvailabilityResult:
    """Probe the router once per ``probe_interval_s`` with a tiny request while the workload runs.

    ``events`` are ``(at_s, label, callable)``: blocking actions (e.g. stop an engine) run in
    a thread at ``at_s`` seconds and marked on the availability plot. An action that returns a
    mapping is recorded in ``faults`` and marked when it returned, named by its ``label`` when
    it has one: what it did is known only once it has done it (e.g. the pid killed), and on a
    loaded host that can be seconds after it began.
    """
    return asyncio.run(
        run_availability_async(base_url, model, seconds, background_scenario, qps, **options)
    )
