"""`stackctl bench`: deploy each profile with `up`, run the workload against its router, report.

Profiles are measured one after another on the same hosts, so their numbers are side by side
from one run; the report compares them as ratios.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .deploy import UpOptions, up
from .errors import StackctlError
from .inventory import Cluster, Engine, load_inventory
from .progress import Progress

if TYPE_CHECKING:
    from .bench.runner import Event


@dataclass
class BenchOptions:
    inventory: Path
    profiles: list[str]
    out_dir: Path
    scenario_path: Path | None = None
    qps: list[float] | None = None
    users: int | None = None
    duration_s: float | None = None
    warmup_s: float | None = None
    availability_s: float | None = None
    kill_engine_every_s: float | None = None  # during --availability: kill -9 one engine this often
    api_key_env: str | None = None
    up_options: UpOptions | None = None


def _scenario(options: BenchOptions):
    from .bench import Scenario, load_scenario

    scenario = (
        load_scenario(options.scenario_path)
        if options.scenario_path
        else Scenario(name="reference")
    )
    changes: dict[str, object] = {}
    if options.users is not None:
        changes["users"] = options.users
    if options.duration_s is not None:
        changes["duration_s"] = options.duration_s
    if options.warmup_s is not None:
        changes["warmup_s"] = options.warmup_s
    if options.qps:
        changes["qps"] = tuple(options.qps)
    return scenario.replace(**changes) if changes else scenario


def _check_kills(options: BenchOptions) -> None:
    every = options.kill_engine_every_s
    if every is None:
        return
    if not options.availability_s:
        raise StackctlError(
            "--kill-engine-every needs --availability SECONDS: engines are killed during the "
            "availability run, not during a QPS sweep; add e.g. --availability 400.",
            exit_code=2,
        )
    if every <= 0 or every >= options.availability_s:
        raise StackctlError(
            f"--kill-engine-every {every:g}: give seconds between 0 and --availability "
            f"({options.availability_s:g}), exclusive, so that at least one engine is killed.",
            exit_code=2,
        )


def _kill_events(
    cluster: Cluster,
    every_s: float,
    seconds: float,
    options: BenchOptions,
    stack: contextlib.ExitStack,
) -> list[Event]:
    """A ``kill -9`` of one engine process every ``every_s`` seconds, round-robin over the
    cluster's engines, through each host's own connection (opened at the first kill, closed by
    ``stack``), so that supervisord restarts it as after a crash."""
    from .connect import Connector, connect
    from .ops import kill_engine

    engines = cluster.engines
    if not engines:
        raise StackctlError(f"--kill-engine-every: cluster {cluster.name} has no engines to kill.")
    accept = bool(options.up_options and options.up_options.accept_new_host_keys)
    conns: dict[str, Connector] = {}

    def kill(engine: Engine) -> dict[str, object]:
        conn = conns.get(engine.host)
        if conn is None:
            conn = conns[engine.host] = stack.enter_context(
                contextlib.closing(connect(cluster.host(engine.host), accept_new_host_keys=accept))
            )
        pid = kill_engine(cluster, engine, signal.SIGKILL, conn=conn)
        return {
            "kind": "kill",
            "label": f"kill -9 {engine.host}/{engine.program} (pid {pid})",
            "engine": engine.name,
            "host": engine.host,
            "program": engine.program,
            "pid": pid,
            "signal": "SIGKILL",
        }

    events: list[Event] = []
    k = 1
    while k * every_s < seconds:
        engine = engines[(k - 1) % len(engines)]
        events.append(
            (k * every_s, f"kill -9 {engine.host}/{engine.program}", partial(kill, engine))
        )
        k += 1
    return events


def run_bench(
    options: BenchOptions, confirm: Callable[[str], bool], echo: Callable[[str], None]
) -> dict[str, Path]:
    from .bench import rebuild_report, run_availability, run_sweep
    from .bench.report import PLOTS_MISSING, plots_available

    _check_kills(options)
    scenario = _scenario(options)
    clusters = {
        name: load_inventory(options.inventory, name) for name in options.profiles
    }  # all errors first
    if not plots_available():  # said before the long run, not after it
        echo(f"note: {PLOTS_MISSING}")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    for name, cluster in clusters.items():
        echo(
            f"== profile {name}: deploying ({cluster.router.policy} routing, LMCache {'on' if cluster.engine.lmcache.enabled else 'off'})"
        )
        result = up(
            cluster, options.up_options or UpOptions(yes=True), Progress(quiet=True), confirm
        )
        if not result.ok:
            failed = {o.name: o.error.splitlines()[0] for o in result.outcomes.values() if o.error}
            raise StackctlError(
                f"profile {name}: deployment failed, so it was not measured: {failed or result.verify_error}"
            )
        api_key = None
        if cluster.router.key_sources:  # api_keys_env's, else the first named client's
            import os

            api_key = os.environ[cluster.router.key_sources[0][1]].split(",")[0].strip()
        metrics_urls = [cluster.engine_url(e) for e in cluster.engines]
        model = cluster.model.name
        if options.availability_s:
            every = options.kill_engine_every_s
            echo(
                f"== profile {name}: availability for {options.availability_s:.0f} s under the workload"
                + (f", killing an engine every {every:g} s" if every else "")
            )
            with contextlib.ExitStack() as stack:
                events = (
                    _kill_events(cluster, every, options.availability_s, options, stack)
                    if every
                    else []
                )
                run_availability(
                    cluster.router_url,
                    model,
                    options.availability_s,
                    scenario,
                    scenario.qps[0],
                    profile_name=name,
                    out_dir=options.out_dir,
                    api_key=api_key,
                    events=events,
                )
        else:
            echo(
                f"== profile {name}: QPS sweep {', '.join(f'{q:g}' for q in scenario.qps)} ({scenario.duration_s:g} s each after a warm-up of at least {scenario.warmup_s:g} s, until every user's first turn is answered)"
            )
            run_sweep(
                cluster.router_url,
                model,
                scenario,
                profile_name=name,
                out_dir=options.out_dir,
                metrics_urls=metrics_urls,
                api_key=api_key,
            )
    baseline = options.profiles[0] if len(options.profiles) > 1 else None
    paths = rebuild_report(options.out_dir, baseline_profile=baseline)
    if not plots_available():
        echo(f"note: {PLOTS_MISSING}")
    return paths
