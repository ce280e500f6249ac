"""Chaos and load figures of issue 13 on the local fleet: engine kills, a frozen engine, a
killed router, idle and slow-loris connections, overload.

Deploys a local stack with `stackctl up` (simulator engines and the router under real
supervisord, ``connection: local``, loopback only), runs the chosen scenarios one after the
other with the multi-round workload, prints each one's figures and writes them as JSON and a
markdown table. The defaults are the issue's sizes; tests/e2e/test_chaos.py runs the same
scenarios (tests/helpers/chaos_scenarios.py) at CI sizes.

    python -m benchmarks.chaos                                  # every scenario, issue sizes
    python -m benchmarks.chaos --only kill,freeze --kill-seconds 60 --out bench-out/chaos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import chaos
from tests.helpers import chaos_scenarios as sc

SCENARIOS = ("kill", "freeze", "router", "hostile", "overload")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}"
    )
    ap.add_argument(
        "--engines", type=int, default=sc.ENGINES, help="simulator engines (default %(default)s)"
    )
    ap.add_argument(
        "--time-scale",
        type=float,
        default=sc.TIME_SCALE,
        help="simulator clock speed-up (default %(default)s)",
    )
    ap.add_argument(
        "--qps",
        type=float,
        default=6.0,
        help="workload QPS during the faults (default %(default)s)",
    )
    ap.add_argument(
        "--kill-seconds",
        type=float,
        default=300.0,
        help="engine-kill run length (default %(default)s)",
    )
    ap.add_argument(
        "--kill-every",
        type=float,
        default=30.0,
        help="seconds between engine kills (default %(default)s)",
    )
    ap.add_argument(
        "--freeze-seconds", type=float, default=20.0, help="SIGSTOP length (default %(default)s)"
    )
    ap.add_argument(
        "--router-seconds",
        type=float,
        default=20.0,
        help="router-kill probe run (default %(default)s)",
    )
    ap.add_argument(
        "--idle", type=int, default=10_000, help="idle connections (default %(default)s)"
    )
    ap.add_argument(
        "--loris", type=int, default=200, help="slow-loris connections (default %(default)s)"
    )
    ap.add_argument(
        "--hostile-window",
        type=float,
        default=30.0,
        help="seconds per window: clean, hostile, clean (default %(default)s)",
    )
    ap.add_argument(
        "--overload-seconds",
        type=float,
        default=300.0,
        help="overload length (default %(default)s)",
    )
    ap.add_argument(
        "--overload-factor",
        type=float,
        default=2.0,
        help="x the saturation QPS (default %(default)s)",
    )
    ap.add_argument(
        "--recovery-seconds",
        type=float,
        default=60.0,
        help="light load after the drop (default %(default)s)",
    )
    ap.add_argument(
        "--out", type=Path, default=Path("bench-out/chaos"), help="where chaos.json and chaos.md go"
    )
    ap.add_argument(
        "--keep", action="store_true", help="leave the stack running (its dir is printed)"
    )
    args = ap.parse_args(argv)  # fmt: skip
    unknown = sorted(set(args.only.split(",")) - set(SCENARIOS))
    if unknown:
        ap.error(
            f"--only {args.only}: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return args


def _table(figures: dict) -> list[str]:
    lines = ["| figure | value |", "|---|---|"]
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, list):
            value = ", ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
        lines.append(f"| {key} | {value} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for s in SCENARIOS if s in args.only.split(",")]
    root = Path(tempfile.mkdtemp(prefix="stackctl-chaos-"))
    started = time.monotonic()
    try:
        stack = chaos.deploy(
            root,
            args.engines,
            time_scale=args.time_scale,
            router=sc.router_overrides(),
            engine=sc.engine_overrides(),
        )
    except RuntimeError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 1
    print(f"stack up in {stack.up_seconds:.1f} s under {root}; router {stack.router_url}")
    runs = {
        "kill": lambda: sc.engine_kills(
            stack, seconds=args.kill_seconds, every_s=args.kill_every, qps=args.qps
        ),
        "freeze": lambda: sc.engine_freeze(
            stack, freeze_s=args.freeze_seconds, lead_s=5.0, tail_s=10.0, qps=args.qps
        ),
        "router": lambda: sc.router_kill(stack, seconds=args.router_seconds, kill_at_s=5.0),
        "hostile": lambda: sc.hostile_connections(
            stack, idle=args.idle, loris=args.loris, window_s=args.hostile_window, qps=args.qps
        ),
        "overload": lambda: sc.overload(
            stack,
            seconds=args.overload_seconds,
            factor=args.overload_factor,
            recovery_s=args.recovery_seconds,
        ),
    }
    results: dict[str, dict] = {}
    try:
        for name in chosen:
            stack.wait_all_healthy(90)
            t0 = time.monotonic()
            figures = asyncio.run(runs[name]()).figures
            figures["scenario_wall_s"] = time.monotonic() - t0
            results[name] = figures
            print(f"\n== {name}\n" + "\n".join(_table(figures)), flush=True)
    finally:
        if args.keep:
            print(f"stack left running: stackctl down {stack.inventory} --purge --yes")
        else:
            stack.down()
            shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()}, Python {platform.python_version()}",
        "engines": args.engines,
        "time_scale": args.time_scale,
        "wall_s": time.monotonic() - started,
    }  # fmt: skip
    (args.out / "chaos.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = [
        f"`{meta['command']}` ({meta['machine']}; {args.engines} engines, time_scale {args.time_scale})",
        "",
    ]
    for name, figures in results.items():
        md += [f"### {name}", "", *_table(figures), ""]
    (args.out / "chaos.md").write_text("\n".join(md))
    print(f"\nwrote {args.out / 'chaos.json'} and {args.out / 'chaos.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
