"""`up`: connect -> facts -> diff -> show -> apply -> verify, in parallel over hosts.

A failure on one host (unreachable, a failed step, an engine that never becomes healthy) is
reported with its host, step and the command's output; the other hosts carry on, and the
run exits non-zero. Running `up` again resumes: it only does what is still missing.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .apply import Applier, HostDiff, compute_diff, format_diff, sha256
from .connect import CommandError, Connector, connect
from .errors import StackctlError
from .facts import gather, run_probe
from .inventory import Cluster, check_secrets
from .plan import HostPlan, plan_cluster
from .progress import Progress
from .wheels import wheels_for_upload


@dataclass
class HostOutcome:
    name: str
    status: str = "pending"  # unchanged | changed | failed | refused | unreachable
    step: str = ""
    error: str = ""
    changes: int = 0
    seconds: float = 0.0


@dataclass
class UpResult:
    outcomes: dict[str, HostOutcome] = field(default_factory=dict)
    router_url: str = ""
    verified: bool = False
    verify_error: str = ""

    @property
    def ok(self) -> bool:
        return self.verified and all(o.status in ("unchanged", "changed") for o in self.outcomes.values())


@dataclass
class UpOptions:
    hosts: list[str] | None = None
    rolling: bool = False
    yes: bool = False
    accept_new_host_keys: bool = False
    wheelhouse: Path | None = None
    verify: bool = True


def _needs_stackctl(plans: list[HostPlan]) -> bool:
    return any(p.venv and any(r.startswith("stackctl") for r in p.packages) for p in plans)


class Deployment:
    """One `up` run over the cluster."""

    def __init__(self, cluster: Cluster, options: UpOptions, progress: Progress, confirm: Callable[[str], bool]):
        self.cluster = cluster
        self.options = options
        self.progress = progress
        self.confirm = confirm
        self.result = UpResult(router_url=cluster.router_url)
        self.conns: dict[str, Connector] = {}
        self.diffs: dict[str, HostDiff] = {}

    # ------------------------------------------------------------------ phases
    def run(self) -> UpResult:
        secrets = check_secrets(self.cluster)
        plans = plan_cluster(self.cluster, self.options.hosts)
        wheels = wheels_for_upload(self.options.wheelhouse, _needs_stackctl(plans))
        stackctl_sha = next((_file_sha(w) for w in wheels if w.name.startswith("stackctl-")), None)
        for plan in plans:
            self.result.outcomes[plan.host.name] = HostOutcome(plan.host.name)
        try:
            with self.progress:
                self._parallel(plans, lambda p: self._gather(p, secrets, stackctl_sha))
            reachable = [p for p in plans if p.host.name in self.diffs]
            self.progress.echo("\n".join(format_diff(self.diffs[p.host.name]) for p in reachable))
            todo = [p for p in reachable if self.diffs[p.host.name].changes and not self.diffs[p.host.name].problems]
            for plan in reachable:
                diff = self.diffs[plan.host.name]
                outcome = self.result.outcomes[plan.host.name]
                if diff.problems:
                    outcome.status, outcome.step, outcome.error = "refused", "checks", "; ".join(diff.problems)
                elif not diff.changes:
                    outcome.status = "unchanged"
            if todo and not self.confirm(f"Apply {sum(len(self.diffs[p.host.name].changes) for p in todo)} change(s) on {len(todo)} host(s)?"):
                raise StackctlError("nothing was changed (not confirmed).", exit_code=1)
            engine_hosts = [p for p in todo if p.host.name != self.cluster.router["host"]]
            router_hosts = [p for p in todo if p.host.name == self.cluster.router["host"]]
            with self.progress:
                apply_one = lambda p: self._apply(p, secrets, wheels)  # noqa: E731
                if self.options.rolling:  # engines one by one, then the router (config reload)
                    for plan in engine_hosts:
                        apply_one(plan)
                    self._parallel(router_hosts, apply_one)
                else:  # the router health-checks its engines: no need to wait for them first
                    self._parallel(engine_hosts + router_hosts, apply_one)
                if self.options.verify:
                    self._verify(plans)
        finally:
            for conn in self.conns.values():
                conn.close()
        return self.result

    def _parallel(self, plans: list[HostPlan], fn) -> None:
        if not plans:
            return
        with ThreadPoolExecutor(max_workers=min(32, len(plans))) as pool:
            list(pool.map(fn, plans))

    def _gather(self, plan: HostPlan, secrets: dict, stackctl_sha: str | None) -> None:
        name = plan.host.name
        outcome = self.result.outcomes[name]
        try:
            self.progress.update(name, "connect")
            conn = connect(plan.host, accept_new_host_keys=self.options.accept_new_host_keys)
            self.conns[name] = conn
            self.progress.update(name, "facts")
            needs_gpus = plan.host.runs_engines and plan.host.engine["kind"] == "vllm" and plan.host.engine["package"] == "vllm"
            facts = gather(conn, plan, self.cluster.python, needs_gpus)
            self.diffs[name] = compute_diff(self.cluster, plan, facts, secrets, stackctl_sha)
            outcome.changes = len(self.diffs[name].changes)
            self.progress.update(name, "planned")
        except StackctlError as exc:
            outcome.status, outcome.step, outcome.error = "unreachable", "connect/facts", str(exc)
            self.progress.update(name, "unreachable")

    def _apply(self, plan: HostPlan, secrets: dict, wheels: list[Path]) -> None:
        name = plan.host.name
        outcome = self.result.outcomes[name]
        started = time.monotonic()
        applier = Applier(
            self.conns[name], self.cluster, self.diffs[name], secrets, wheels,
            offline=self.options.wheelhouse is not None, report=lambda step: self.progress.update(name, step),
        )
        try:
            applier.apply()
            health = applier.wait_healthy(plan.host.engine["health_timeout_s"])
            if health["unhealthy"]:
                programs = [p for p in plan.programs if p.health_url in health["unhealthy"]]
                tails = "\n".join(f"--- last lines of {p.name}'s log:\n{applier.log_tail(p.name)}" for p in programs)
                raise StackctlError(f"engine(s) {', '.join(p.name for p in programs)} did not become healthy within {plan.host.engine['health_timeout_s']:.0f} s.\n{tails}")
            outcome.status = "changed"
            self.progress.update(name, "done")
        except StackctlError as exc:
            outcome.status, outcome.step, outcome.error = "failed", applier.step, str(exc)
            self.progress.update(name, f"FAILED at {applier.step}")
        except Exception as exc:  # keep the other hosts going; say exactly where it broke
            outcome.status, outcome.step, outcome.error = "failed", applier.step, f"{type(exc).__name__}: {exc}"
            self.progress.update(name, f"FAILED at {applier.step}")
        outcome.seconds = time.monotonic() - started

    def _verify(self, plans: list[HostPlan]) -> None:
        """The router answers /health and serves one real completion."""
        router_host = self.cluster.router["host"]
        conn = self.conns.get(router_host)
        if conn is None and router_host not in self.result.outcomes:  # `--hosts` left it out
            try:
                conn = self.conns[router_host] = connect(self.cluster.host(router_host), accept_new_host_keys=self.options.accept_new_host_keys)
            except StackctlError as exc:
                self.result.verify_error = str(exc)
                return
        if conn is None:
            self.result.verify_error = f"router host {router_host} was not reachable"
            return
        router_plan = next(p for p in plan_cluster(self.cluster, [router_host]))
        port = self.cluster.router["port"]
        self.progress.update(router_host, "verify: router health")
        health = run_probe(conn, router_plan.python, {"action": "wait", "urls": [f"http://127.0.0.1:{port}/health"], "timeout": 60, "interval": 0.5}, timeout=120)
        if health["unhealthy"]:
            last = health["last"].get(f"http://127.0.0.1:{port}/health", {})
            self.result.verify_error = f"the router's /health did not answer 200 within 60 s (last: {last.get('status')} {last.get('body', '')[:300]})"
            self.progress.update(router_host, "verify failed")
            return
        self.progress.update(router_host, "verify: completion")
        body = json.dumps({"model": self.cluster.model["name"], "prompt": "stackctl deployment check", "max_tokens": 4})
        keys_file = next((s.path for s in router_plan.secrets if s.env_var == self.cluster.router.get("api_keys_env")), None)
        request = {"url": f"http://127.0.0.1:{port}/v1/completions", "body": body, "timeout": 300, "bearer_file": keys_file}
        answer = run_probe(conn, router_plan.python, {"action": "http", "requests": [request]}, timeout=360)[0]
        if answer["status"] != 200:
            self.result.verify_error = f"a completion through the router failed: {answer['status']} {answer['body'][:300]}"
            self.progress.update(router_host, "verify failed")
            return
        self.result.verified = True
        self.progress.update(router_host, f"verified ({answer['seconds']:.2f} s completion)")


def _file_sha(path: Path) -> str:
    return sha256(path.read_bytes())


def up(cluster: Cluster, options: UpOptions, progress: Progress, confirm: Callable[[str], bool]) -> UpResult:
    return Deployment(cluster, options, progress, confirm).run()
