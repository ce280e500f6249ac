"""`status`: supervisor state + engine /health and /metrics + the router's view, per host.

Engines are queried from their own host (through the probe over SSH), so engines behind a
bastion need no extra route from the operator's machine.
"""

from __future__ import annotations

import json
import re

from .connect import connect
from .errors import StackctlError
from .facts import (
    HttpAnswer,
    SupervisorFacts,
    SystemdFacts,
    bootstrap_interpreter,
    probe_http,
    supervisor_facts,
)
from .inventory import Cluster
from .metrics import engine_summary
from .parallel import Cancellation, each
from .plan import HostPlan, plan_cluster, router_key_file

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2
_DETAIL = re.compile(r"pid (\d+), uptime ([\d:]+(?: days?,? [\d:]+)?)")


def _program_row(
    plan: HostPlan,
    program,
    supervisor: SupervisorFacts,
    http: dict[str, HttpAnswer],
    model: str,
    router_url: str,
) -> dict:
    info = supervisor.programs.get(program.name)
    match = _DETAIL.search(info.detail if info else "")
    row = {
        "program": program.name,
        "kind": program.kind,
        "state": info.state if info else "NOT LOADED" if supervisor.running else "NO SUPERVISORD",
        "pid": int(match.group(1)) if match else None,
        "uptime": match.group(2) if match else None,
        "port": program.port,
        "healthy": None,
    }
    if program.health_url:
        health = http.get(program.health_url)
        row["healthy"] = health is not None and health["status"] == 200
    if program.kind == "engine":
        row["model"] = model
        metrics = http.get(program.url("/metrics"))
        if metrics is not None and metrics["status"] == 200:
            try:
                row["metrics"] = engine_summary(metrics["body"])
            except Exception as exc:  # noqa: BLE001 - a malformed exposition must not hide the rest
                row["metrics_error"] = f"unparseable /metrics: {exc}"
    if program.kind == "router":
        row["url"] = router_url
        engines = http.get(program.url("/engines"))
        if engines is not None and engines["status"] == 200:
            try:
                row["engines"] = json.loads(engines["body"])
            except ValueError:
                row["engines_error"] = "unparseable /engines"
    return row


def _systemd_row(systemd: SystemdFacts) -> dict:
    """Whether the cluster's unit starts supervisord at boot (``enabled``: null where there is
    no systemd or no unit: supervisord was started directly and a reboot leaves it down)."""
    if not systemd.present or not systemd.unit:
        return {"present": systemd.present, "unit": systemd.unit, "enabled": None, "active": None}
    return {
        "present": True,
        "unit": systemd.unit,
        "enabled": systemd.enabled == "enabled",
        "active": systemd.active,
    }


def host_status(cluster: Cluster, plan: HostPlan, accept_new_host_keys: bool = False) -> dict:
    host = plan.host
    entry = {"host": host.name, "address": host.address, "reachable": False, "programs": []}
    try:
        conn = connect(host, accept_new_host_keys=accept_new_host_keys)
    except StackctlError as exc:
        entry["error"] = str(exc)
        return entry
    try:
        interpreter = bootstrap_interpreter(plan)
        facts = supervisor_facts(conn, plan)
        entry["reachable"] = True
        entry["supervisord"] = {"running": facts.supervisor.running, "pid": facts.supervisor.pid}
        entry["systemd"] = _systemd_row(facts.systemd)
        requests = []
        for program in plan.programs:
            if program.health_url:
                requests.append({"url": program.health_url, "timeout": 5})
            if program.kind == "engine":
                requests.append({"url": program.url("/metrics"), "timeout": 5})
            if program.kind == "router":  # /engines wants a client key when the router has keys
                url, keys = program.url("/engines"), router_key_file(cluster, plan)
                requests.append({"url": url, "timeout": 5, "bearer_file": keys})
        answers = probe_http(conn, interpreter, requests) if requests else []
        http = {a["url"]: a for a in answers}
        entry["programs"] = [
            _program_row(
                plan, p, facts.supervisor, http, cluster.model.name, cluster.router_url_of(host)
            )
            for p in plan.programs
        ]
    except StackctlError as exc:
        entry["error"] = str(exc)
    finally:
        conn.close()
    return entry


def cluster_status(
    cluster: Cluster, hosts: list[str] | None = None, accept_new_host_keys: bool = False
) -> dict:
    plans = plan_cluster(cluster, hosts)
    cancellation = Cancellation()  # read-only: Ctrl-C just stops waiting
    with cancellation.on_sigint():
        entries = each(plans, lambda p: host_status(cluster, p, accept_new_host_keys), cancellation)
    return {
        "cluster": cluster.name,
        "profile": cluster.profile,
        "router_url": cluster.router_url,
        "router_urls": cluster.router_urls,
        "hosts": entries,
        "overall": overall(entries),
    }


def overall(entries: list[dict]) -> str:
    if any(not e["reachable"] for e in entries):
        return "unreachable"
    for entry in entries:
        if not entry["supervisord"]["running"] or entry.get("error"):
            return "degraded"
        for row in entry["programs"]:
            if row["state"] != "RUNNING" or row["healthy"] is False:
                return "degraded"
    return "healthy"


def exit_code(status: dict) -> int:
    return {"healthy": HEALTHY, "degraded": DEGRADED, "unreachable": UNREACHABLE}[status["overall"]]
