"""Rich tables for `up`'s summary and `status` (the CLI's rendering, kept out of the logic)."""

from __future__ import annotations

import dataclasses
import sys

from rich.console import Console
from rich.table import Table

from .deploy import UpResult


def _console() -> Console:
    """Wide when not on a terminal, so piped or logged tables do not wrap at 80 columns."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def render_up_summary(result: UpResult) -> None:
    console = _console()
    table = Table(title="stackctl up", show_lines=False)
    for column in ("host", "result", "changes", "time", "step / error"):
        table.add_column(column, overflow="fold")
    for outcome in result.outcomes.values():
        detail = outcome.error.splitlines()[0] if outcome.error else ""
        if outcome.error and outcome.step:
            detail = f"{outcome.step}: {detail}"
        table.add_row(
            outcome.name,
            outcome.status,
            str(outcome.changes),
            f"{outcome.seconds:.1f}s" if outcome.seconds else "",
            detail,
        )
    console.print(table)
    for outcome in result.outcomes.values():
        if outcome.error and "\n" in outcome.error:
            console.print(f"[bold]{outcome.name}[/bold] ({outcome.step}):")
            console.print(outcome.error, markup=False)
    urls = ", ".join(result.router_urls)
    label = "routers" if len(result.router_urls) > 1 else "router"
    if result.verified:
        console.print(f"{label}: {urls} (verified with a completion)")
    elif result.verify_error:
        console.print(f"{label}: {urls} NOT verified: {result.verify_error}", markup=False)


def up_document(result: UpResult) -> dict:
    """`up -o json|yaml`: the outcome per host, the router and whether it was verified."""
    return {
        "ok": result.ok,
        "router_url": result.router_url,
        "router_urls": result.router_urls,
        "verified": result.verified,
        "verify_error": result.verify_error,
        "interrupted": result.interrupted,
        "hosts": [
            {**dataclasses.asdict(o), "status": str(o.status)} for o in result.outcomes.values()
        ],  # plain str for yaml.safe_dump
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def render_status(status: dict) -> None:
    console = _console()
    models = sorted(
        {row["model"] for e in status["hosts"] for row in e.get("programs", []) if row.get("model")}
    )
    title = (
        f"{status['cluster']}"
        + (f" (profile {status['profile']})" if status.get("profile") else "")
        + (f": {', '.join(models)}" if models else "")
    )
    table = Table(title=title)
    for column in (
        "host",
        "program",
        "state",
        "pid",
        "uptime",
        "health",
        "run",
        "wait",
        "KV use",
        "prefix hit",
        "LMCache hit",
    ):
        table.add_column(column, overflow="fold")
    for entry in status["hosts"]:
        if not entry["reachable"]:
            table.add_row(
                entry["host"], "-", "UNREACHABLE", "", "", "", entry.get("error", "")[:80]
            )
            continue
        if not entry["programs"]:
            table.add_row(
                entry["host"],
                "-",
                "supervisord " + ("running" if entry["supervisord"]["running"] else "stopped"),
            )
        for row in entry["programs"]:
            metrics = row.get("metrics") or {}
            health = {True: "ok", False: "FAIL", None: "-"}[row["healthy"]]
            table.add_row(
                entry["host"],
                row["program"],
                row["state"],
                str(row["pid"] or "-"),
                row["uptime"] or "-",
                health,
                _num(metrics.get("running")),
                _num(metrics.get("waiting")),
                _pct(metrics.get("kv_cache_usage")),
                _pct(metrics.get("prefix_hit_rate")),
                "-"
                if metrics.get("lmcache_hits") is None
                else f"{_num(metrics.get('lmcache_hits'))} tok ({_pct(metrics.get('lmcache_hit_rate'))})",
            )
    console.print(table)
    routers = [
        row for e in status["hosts"] for row in e.get("programs", []) if row["kind"] == "router"
    ]
    for row in routers:
        engines = row.get("engines")
        if isinstance(engines, dict):
            engines = engines.get("engines", engines)
        count = len(engines) if isinstance(engines, list) else "?"
        healthy = sum(1 for e in engines if e.get("healthy")) if isinstance(engines, list) else "?"
        console.print(
            f"router {row.get('url') or status['router_url']}: {row['state']}, health {'ok' if row['healthy'] else 'FAIL'}, engines healthy {healthy}/{count}"
        )
    for entry in status["hosts"]:
        unit = entry.get("systemd") or {}
        if unit.get("present"):
            state = "enabled" if unit["enabled"] else "NOT enabled (a reboot leaves it down)"
            console.print(
                f"systemd {entry['host']}: {unit['unit']} {state}, {unit.get('active') or 'unknown'}"
            )
    console.print(f"overall: {status['overall']}")
