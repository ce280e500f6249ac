"""`up`: connect -> facts -> diff -> show -> apply -> verify, in parallel over hosts.

A failure on one host (unreachable, a failed step, an engine that never becomes healthy) is
reported with its host, step and the command's output; the other hosts carry on, and the
run exits non-zero. Running `up` again resumes: it only does what is still missing.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .apply import Applier, HostDiff, attach_content_diffs, compute_diff, format_diff, sha256
from .connect import BecomeError, CommandError, Connector, connect
from .errors import StackctlError
from .facts import gather, run_probe
from .inventory import Cluster, check_secrets
from .metrics import engine_summary
from .models import ModelDistributor, check_operator, model_bytes
from .parallel import Cancellation, Interrupted, each
from .plan import HostPlan, plan_cluster, router_config_text
from .progress import Progress
from .wheels import requires_stackctl, stackctl_wheel, wheels_for_upload


INTERRUPTED = "interrupted (Ctrl-C) during this step; `stackctl up` again finishes it"


@dataclass
class HostOutcome:
    name: str
    status: str = "pending"  # unchanged | changed | failed | refused | unreachable | interrupted | would-change (--check)
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
    interrupted: bool = False  # Ctrl-C: hosts with status "interrupted" were left half-done

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
    show_diff: bool = False  # also show line diffs of changed files
    check: bool = False  # `up --check`: gather and show the diff only; nothing is confirmed or applied


def _needs_stackctl(plans: list[HostPlan]) -> bool:
    return any(p.venv and requires_stackctl(p.packages) for p in plans)


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
        self.appliers: dict[str, Applier] = {}
        self.cancellation = Cancellation()
        self.models: ModelDistributor | None = None  # the weights' fan-out, made before the apply phase

    # ------------------------------------------------------------------ phases
    def run(self) -> UpResult:
        secrets = check_secrets(self.cluster)
        plans = plan_cluster(self.cluster, self.options.hosts)
        check_operator(plans)
        wheels = wheels_for_upload(self.options.wheelhouse, _needs_stackctl(plans))
        ours = stackctl_wheel(wheels)
        stackctl_sha = _file_sha(ours) if ours else None
        for plan in plans:
            self.result.outcomes[plan.host.name] = HostOutcome(plan.host.name)
        try:
            with self.cancellation.on_sigint():
                self._phases(plans, secrets, wheels, stackctl_sha)
        except Interrupted:
            self._interrupted()
        finally:
            if not self.cancellation.cancelled:  # else they are being closed already
                for problem in self.models.close() if self.models else []:  # this run's peer keys
                    self.progress.echo(f"warning: {problem}; remove it by hand, or run `up` again.")
                for conn in self.conns.values():
                    conn.close()
        return self.result

    def _phases(self, plans: list[HostPlan], secrets: dict, wheels: list[Path], stackctl_sha: str | None) -> None:
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
        if self.options.check:  # the diff shown is the answer (the CLI's exit code says whether it is empty)
            for plan in todo:
                self.result.outcomes[plan.host.name].status = "would-change"
            return
        if todo and not self.confirm(f"Apply {sum(len(self.diffs[p.host.name].changes) for p in todo)} change(s) on {len(todo)} host(s)?"):
            raise StackctlError("nothing was changed (not confirmed).", exit_code=1)
        engine_hosts = [p for p in todo if p.host.name != self.cluster.router["host"]]
        router_hosts = [p for p in todo if p.host.name == self.cluster.router["host"]]
        self.models = ModelDistributor(self.cluster, self.diffs, self.conns)
        with self.progress:
            apply_one = lambda p, start=True: self._apply(p, secrets, wheels, start)  # noqa: E731
            if self.options.rolling:  # engines one by one, then the router (config reload)
                drain = RouterDrain.open(self)
                for plan in engine_hosts:
                    self.cancellation.check()
                    try:
                        with drain.without(plan, self.diffs[plan.host.name]):
                            apply_one(plan)
                    except StackctlError as exc:  # the router could not be reconfigured
                        outcome = self.result.outcomes[plan.host.name]
                        outcome.status, outcome.step, outcome.error = "failed", "drain", str(exc)
                self._parallel(router_hosts, apply_one)
            else:  # the router host installs alongside the engines; its programs start after them
                self._parallel(engine_hosts + router_hosts, lambda p: apply_one(p, p not in router_hosts))
                self._parallel(router_hosts, self._start)
            if self.options.verify:
                self._verify(plans)

    def _parallel(self, plans: list[HostPlan], fn) -> None:
        each(plans, fn, self.cancellation)

    def _interrupted(self) -> None:
        """Ctrl-C: hosts whose changes had begun are half-done; the others were not touched."""
        self.result.interrupted = True
        for name, outcome in self.result.outcomes.items():
            applier = self.appliers.get(name)
            if applier is not None and outcome.status in ("pending", "prepared", "failed", "interrupted"):
                outcome.status, outcome.step, outcome.error = "interrupted", applier.step, INTERRUPTED

    def _gather(self, plan: HostPlan, secrets: dict, stackctl_sha: str | None) -> None:
        name = plan.host.name
        outcome = self.result.outcomes[name]
        try:
            self.progress.update(name, "connect")
            conn = connect(plan.host, accept_new_host_keys=self.options.accept_new_host_keys)
            self.conns[name] = conn
            self.cancellation.on_cancel(conn.close)
            self.progress.update(name, "facts")
            needs_gpus = plan.host.runs_engines and plan.host.engine["kind"] == "vllm" and plan.host.engine["package"] == "vllm"
            facts = gather(conn, plan, needs_gpus)
            self.diffs[name] = compute_diff(self.cluster, plan, facts, secrets, stackctl_sha, model_bytes(plan))
            if self.options.show_diff:
                attach_content_diffs(conn, self.diffs[name])
            outcome.changes = len(self.diffs[name].changes)
            self.progress.update(name, "planned")
        except BecomeError as exc:  # reachable, but cannot run the privileged steps: nothing was changed
            outcome.status, outcome.step, outcome.error = "refused", "checks", str(exc)
            self.progress.update(name, "refused")
        except StackctlError as exc:
            outcome.status, outcome.step, outcome.error = "unreachable", "connect/facts", str(exc)
            self.progress.update(name, "unreachable")

    def _apply(self, plan: HostPlan, secrets: dict, wheels: list[Path], start: bool = True) -> None:
        """Prepare the host (packages, files); with ``start``, also (re)start its programs (``_start``)."""
        name = plan.host.name
        outcome = self.result.outcomes[name]
        started = time.monotonic()
        applier = self.appliers[name] = Applier(
            self.conns[name], self.cluster, self.diffs[name], secrets, wheels,
            offline=self.options.wheelhouse is not None, report=lambda step: self.progress.update(name, step),
            cancellation=self.cancellation, models=self.models,
        )
        with self._host_step(name, applier, started):
            applier.prepare()
            outcome.status = "prepared"
        if start:
            self._start(plan)

    def _start(self, plan: HostPlan) -> None:
        """(Re)start a prepared host's programs and wait until its engines are healthy."""
        name = plan.host.name
        outcome = self.result.outcomes[name]
        if outcome.status != "prepared":
            return
        started = time.monotonic()
        applier = self.appliers[name]
        with self._host_step(name, applier, started):
            applier.start()
            health = applier.wait_healthy(plan.host.engine["health_timeout_s"])
            if health["unhealthy"]:
                programs = [p for p in plan.programs if p.health_url in health["unhealthy"]]
                tails = "\n".join(f"--- last lines of {p.name}'s log:\n{applier.log_tail(p.name)}" for p in programs)
                raise StackctlError(f"engine(s) {', '.join(p.name for p in programs)} did not become healthy within {plan.host.engine['health_timeout_s']:.0f} s.\n{tails}")
            outcome.status = "changed"
            self.progress.update(name, "done")

    @contextlib.contextmanager
    def _host_step(self, name: str, applier: Applier, started: float):
        """Record a failure with its host and step, and keep the other hosts going."""
        outcome = self.result.outcomes[name]
        try:
            yield
        except Exception as exc:
            detail = str(exc) if isinstance(exc, StackctlError) else f"{type(exc).__name__}: {exc}"
            outcome.status, outcome.step, outcome.error = "failed", applier.step, detail
            if self.cancellation.cancelled:  # its connection was closed under it
                outcome.status, outcome.error = "interrupted", INTERRUPTED
            self.progress.update(name, f"FAILED at {applier.step}")
        finally:
            outcome.seconds += time.monotonic() - started

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
        if self.result.outcomes.get(router_host, HostOutcome(router_host)).status in ("refused", "failed"):
            self.result.verify_error = f"router host {router_host} was {self.result.outcomes[router_host].status}"
            return
        router_plan = next(p for p in plan_cluster(self.cluster, [router_host]))
        router = router_plan.program("router")
        self.progress.update(router_host, "verify: router health")
        health = run_probe(conn, router_plan.python, {"action": "wait", "urls": [router.health_url], "timeout": 60, "interval": 0.5}, timeout=120)
        if health["unhealthy"]:
            last = health["last"].get(router.health_url, {})
            self.result.verify_error = f"the router's /health did not answer 200 within 60 s (last: {last.get('status')} {last.get('body', '')[:300]})"
            self.progress.update(router_host, "verify failed")
            return
        self.progress.update(router_host, "verify: completion")
        body = json.dumps({"model": self.cluster.model["name"], "prompt": "stackctl deployment check", "max_tokens": 4})
        keys_file = router_plan.router_keys_file if self.cluster.router.get("api_keys_env") else None
        request = {"url": router.url("/v1/completions"), "body": body, "timeout": 300, "bearer_file": keys_file}
        answer = run_probe(conn, router_plan.python, {"action": "http", "requests": [request]}, timeout=360)[0]
        if answer["status"] != 200:
            self.result.verify_error = f"a completion through the router failed: {answer['status']} {answer['body'][:300]}"
            self.progress.update(router_host, "verify failed")
            return
        self.result.verified = True
        self.progress.update(router_host, f"verified ({answer['seconds']:.2f} s completion)")


class RouterDrain:
    """Rolling updates: take a host's engines out of the running router (router.yaml rendered
    without them, SIGHUP) and let their requests finish before they restart; put them back
    after (the full planned router.yaml).

    Without this, requests in flight on an engine when supervisord stops it are cut (an
    engine may abort them at SIGTERM, and supervisord signals its whole process group).
    """

    IDLE_TIMEOUT_S = 60.0
    RELOAD_TIMEOUT_S = 30.0

    def __init__(self, deployment: "Deployment", conn: Connector | None, plan: HostPlan | None):
        self.deployment, self.conn, self.plan = deployment, conn, plan

    @classmethod
    def open(cls, deployment: "Deployment") -> "RouterDrain":
        """Drains through the router host's connection when its router runs (else a no-op)."""
        name = deployment.cluster.router["host"]
        conn, diff = deployment.conns.get(name), deployment.diffs.get(name)
        if conn is None or diff is None or diff.facts.program_state("router") != "RUNNING":
            return cls(deployment, None, None)
        return cls(deployment, conn, diff.plan)

    @contextlib.contextmanager
    def without(self, plan: HostPlan, diff: HostDiff):
        engines = {p.name for p in plan.programs if p.kind == "engine"}
        names = {e.name for e in plan.host.engines}
        restarts = any(c.kind == "restart" and c.target in engines for c in diff.changes)
        if self.conn is None or not restarts:
            yield
            return
        progress = self.deployment.progress
        cluster = self.deployment.cluster
        progress.update(plan.host.name, "drain: out of the router")
        self._load(router_config_text(cluster, self.plan, without=names), absent=names)
        try:
            progress.update(plan.host.name, "drain: finishing requests")
            self._wait_idle(plan)
            yield
        finally:
            progress.update(plan.host.name, "drain: back in the router")
            self._load(router_config_text(cluster, self.plan), absent=set())

    def _load(self, text: str, absent: set[str]) -> None:
        """Write the router's config, SIGHUP it, wait until its /engines shows the change."""
        self.conn.put_bytes(text.encode(), self.plan.router_config)
        self.conn.run(shlex.join(self.plan.supervisorctl("signal", "HUP", "router")))
        url = self.plan.program("router").url("/engines")
        expected = len(yaml.safe_load(text).get("engines") or [])
        deadline = time.monotonic() + self.RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            answer = run_probe(self.conn, self.plan.python, {"action": "http", "requests": [{"url": url, "timeout": 5}]})[0]
            try:
                listed = json.loads(answer["body"]) if answer["status"] == 200 else None
            except ValueError:
                listed = None
            listed = listed.get("engines", listed) if isinstance(listed, dict) else listed
            if isinstance(listed, list):
                names = {e.get("name") for e in listed}
                if not names & absent and (absent or len(names) >= expected):
                    return
            time.sleep(0.2)
        raise StackctlError(f"the router on {self.plan.host.name} did not reload its config within {self.RELOAD_TIMEOUT_S:.0f} s")

    def _wait_idle(self, plan: HostPlan) -> None:
        """Until the host's engines run and queue no request (their /metrics), or a timeout."""
        conn = self.deployment.conns[plan.host.name]
        urls = [p.url("/metrics") for p in plan.programs if p.kind == "engine"]
        deadline = time.monotonic() + self.IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            answers = run_probe(conn, plan.python, {"action": "http", "requests": [{"url": u, "timeout": 5} for u in urls]})
            busy = 0.0
            for answer in answers:
                if answer["status"] == 200:
                    summary = engine_summary(answer["body"])
                    busy += (summary["running"] or 0) + (summary["waiting"] or 0)
            if not busy:
                return
            time.sleep(0.2)


def _file_sha(path: Path) -> str:
    return sha256(path.read_bytes())


def up(cluster: Cluster, options: UpOptions, progress: Progress, confirm: Callable[[str], bool]) -> UpResult:
    return Deployment(cluster, options, progress, confirm).run()
