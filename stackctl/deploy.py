"""`up`: connect -> facts -> diff -> show -> apply -> verify, in parallel over hosts.

A failure on one host (unreachable, a failed step, an engine that never becomes healthy) is
reported with its host, step and the command's output; the other hosts carry on, and the
run exits non-zero. Running `up` again resumes: it only does what is still missing.
"""

from __future__ import annotations

import contextlib
import enum
import json
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import engine_key
from .apply import (
    Applier,
    ChangeKind,
    HostDiff,
    attach_content_diffs,
    compute_diff,
    format_diff,
    sha256,
)
from .connect import BecomeError, Connector, connect
from .errors import StackctlError
from .facts import Facts, gather, probe_http, probe_wait
from .inventory import Cluster, check_secrets
from .metrics import engine_summary
from .models import ModelDistributor, check_operator, model_bytes
from .parallel import Cancellation, Interrupted, each
from .plan import HostPlan, plan_cluster, router_config_text, router_key_file
from .progress import Progress
from .wheels import requires_stackctl, stackctl_wheel, wheels_for_upload

INTERRUPTED = "interrupted (Ctrl-C) during this step; `stackctl up` again finishes it"


class HostState(enum.StrEnum):
    """Where a host stands in an `up` run (``HostOutcome.status``, `up -o json`'s ``status``); a
    str, so that output and comparisons with the plain names stay as they were."""

    PENDING = "pending"  # not applied (yet): left so only when the run stopped before this host
    PREPARED = "prepared"  # files, packages and model in place, programs not (re)started yet: the
    # router host waits here until the engine hosts are done; Ctrl-C turns it into INTERRUPTED
    UNCHANGED = "unchanged"  # nothing to do
    CHANGED = "changed"  # applied, its engines healthy
    WOULD_CHANGE = "would-change"  # `up --check`: it has changes, none applied
    REFUSED = "refused"  # a check failed (step "checks"): nothing applied
    UNREACHABLE = "unreachable"  # no connection or no facts
    FAILED = "failed"  # a step failed (``step``, ``error``)
    INTERRUPTED = "interrupted"  # Ctrl-C during its changes: half-done, `up` again finishes it


@dataclass
class HostOutcome:
    name: str
    status: HostState = HostState.PENDING
    step: str = ""
    error: str = ""
    changes: int = 0
    seconds: float = 0.0


@dataclass
class UpResult:
    outcomes: dict[str, HostOutcome] = field(default_factory=dict)
    router_urls: list[str] = field(default_factory=list)  # every router's, the first first
    verified: bool = False
    verify_error: str = ""
    interrupted: bool = False  # Ctrl-C: hosts with status INTERRUPTED were left half-done

    @property
    def router_url(self) -> str:
        """The first router's (Cluster.router_url)."""
        return self.router_urls[0] if self.router_urls else ""

    @property
    def ok(self) -> bool:
        return self.verified and all(
            o.status in (HostState.UNCHANGED, HostState.CHANGED) for o in self.outcomes.values()
        )


@dataclass
class UpOptions:
    hosts: list[str] | None = None
    rolling: bool = False
    yes: bool = False
    accept_new_host_keys: bool = False
    wheelhouse: Path | None = None
    verify: bool = True
    show_diff: bool = False  # also show line diffs of changed files
    check: bool = (
        False  # `up --check`: gather and show the diff only; nothing is confirmed or applied
    )


def _needs_stackctl(plans: list[HostPlan]) -> bool:
    return any(p.venv and requires_stackctl(p.packages) for p in plans)


class Deployment:
    """One `up` run over the cluster."""

    def __init__(
        self,
        cluster: Cluster,
        options: UpOptions,
        progress: Progress,
        confirm: Callable[[str], bool],
    ):
        self.cluster = cluster
        self.options = options
        self.progress = progress
        self.confirm = confirm
        self.result = UpResult(router_urls=cluster.router_urls)
        self.conns: dict[str, Connector] = {}
        self.diffs: dict[str, HostDiff] = {}
        self.facts: dict[str, Facts] = {}  # the hosts that answered, before they are diffed
        self.appliers: dict[str, Applier] = {}
        self.cancellation = Cancellation()
        self.models: ModelDistributor | None = (
            None  # the weights' fan-out, made before the apply phase
        )
        # set by run() before it connects (ops' rolling restart uses a Deployment without them)
        self.plans: list[HostPlan] = []
        self.secrets: dict[str, str] = {}
        self.wheels: list[Path] = []
        self.stackctl_sha: str | None = None

    # ------------------------------------------------------------------ phases
    def run(self) -> UpResult:
        """`up`, phase by phase: gather, show, confirm, apply (parallel or rolling), verify;
        `--check` stops after show. Ctrl-C marks the hosts left half-done."""
        self._before_connecting()
        try:
            with self.cancellation.on_sigint():
                self._gather_facts()
                todo = self._show_changes()
                if (
                    self.options.check
                ):  # the diff shown is the answer (the CLI's exit code says whether it is empty)
                    self._mark_would_change(todo)
                    return self.result
                self._confirm_changes(todo)
                with self.progress:
                    self._apply_changes(todo)
                    self._verify()
        except Interrupted:
            self._interrupted()
        finally:
            self._close()
        return self.result

    def _before_connecting(self) -> None:
        """What the operator's side must have: the secrets, the plans, rsync for model.source,
        the wheels to upload (and the stackctl wheel's hash the hosts' markers are compared with)."""
        self.secrets = check_secrets(self.cluster)
        self.plans = plan_cluster(self.cluster, self.options.hosts)
        check_operator(self.plans)
        self.wheels = wheels_for_upload(self.options.wheelhouse, _needs_stackctl(self.plans))
        ours = stackctl_wheel(self.wheels)
        self.stackctl_sha = _file_sha(ours) if ours else None
        for plan in self.plans:
            self.result.outcomes[plan.host.name] = HostOutcome(plan.host.name)

    def _gather_facts(self) -> None:
        """Gather: connect to every host and diff its facts against its plan, all in parallel."""
        with self.progress:
            self._parallel(self.plans, self._gather)
            # the engine key every host's diff compares with: read back from a host, or new
            key, problem = engine_key.resolve(self.cluster, self.plans, self.facts, self.conns)
            self.secrets.update(key)
            reachable = [p for p in self.plans if p.host.name in self.facts]
            if problem:  # every host holds the key: none can be diffed without it
                for plan in reachable:
                    outcome = self.result.outcomes[plan.host.name]
                    outcome.status, outcome.step, outcome.error = (
                        HostState.REFUSED,
                        "engine key",
                        problem,
                    )
                return
            self._parallel(reachable, self._diff)

    def _show_changes(self) -> list[HostPlan]:
        """Show: every reachable host's diff; refused and unchanged hosts are settled here.
        Returns the hosts to change."""
        reachable = [p for p in self.plans if p.host.name in self.diffs]
        self.progress.echo("\n".join(format_diff(self.diffs[p.host.name]) for p in reachable))
        for plan in reachable:
            diff = self.diffs[plan.host.name]
            outcome = self.result.outcomes[plan.host.name]
            if diff.problems:
                outcome.status, outcome.step, outcome.error = (
                    HostState.REFUSED,
                    "checks",
                    "; ".join(diff.problems),
                )
            elif not diff.changes:
                outcome.status = HostState.UNCHANGED
        return [
            p
            for p in reachable
            if self.diffs[p.host.name].changes and not self.diffs[p.host.name].problems
        ]

    def _mark_would_change(self, todo: list[HostPlan]) -> None:
        """`up --check`: the hosts with changes would change; nothing is asked or applied."""
        for plan in todo:
            self.result.outcomes[plan.host.name].status = HostState.WOULD_CHANGE

    def _confirm_changes(self, todo: list[HostPlan]) -> None:
        """Confirm: one question for all the changes (a "no" changes nothing, exit 1)."""
        if todo and not self.confirm(
            f"Apply {sum(len(self.diffs[p.host.name].changes) for p in todo)} change(s) on {len(todo)} host(s)?"
        ):
            raise StackctlError("nothing was changed (not confirmed).", exit_code=1)

    def _apply_changes(self, todo: list[HostPlan]) -> None:
        """Apply: engine hosts before the router host, in parallel or (`--rolling`) one at a time."""
        engine_hosts = [p for p in todo if not self.cluster.runs_router(p.host)]
        router_hosts = [p for p in todo if self.cluster.runs_router(p.host)]
        self.models = ModelDistributor(self.cluster, self.diffs, self.conns)
        if self.options.rolling:
            self._apply_rolling(engine_hosts, router_hosts)
        else:
            self._apply_parallel(engine_hosts, router_hosts)

    def _apply_parallel(self, engine_hosts: list[HostPlan], router_hosts: list[HostPlan]) -> None:
        """The router host installs alongside the engines; its programs start after theirs."""
        self._parallel(engine_hosts + router_hosts, lambda p: self._apply(p, p not in router_hosts))
        self._parallel(router_hosts, self._start)

    def _apply_rolling(self, engine_hosts: list[HostPlan], router_hosts: list[HostPlan]) -> None:
        """Engine hosts one by one, each drained through every running router; then the router
        hosts one by one (with several, the others keep serving; a router host's engines are
        drained out of the other routers)."""
        drain = RouterDrain.open(self)
        for conn, router in drain.routers:  # the routers' key before the engines'
            name = router.host.name
            engine_key.router_copy_first(self.cluster, self.diffs[name], conn, self.secrets)
        todo = engine_hosts + router_hosts
        for k, plan in enumerate(todo):
            self.cancellation.check()
            self._apply_drained(drain, plan)
            if self.result.outcomes[plan.host.name].status == HostState.FAILED:
                self._stopped_at(plan, todo[k + 1 :])
                return

    def _stopped_at(self, failed: HostPlan, rest: list[HostPlan]) -> None:
        """A rolling run stops at the first failed host: no second host goes down while one is
        out (as `restart --rolling`); the others stay pending, saying why."""
        for plan in rest:
            outcome = self.result.outcomes[plan.host.name]
            if outcome.status == HostState.PENDING:
                outcome.step = "not started"
                outcome.error = f"the rolling run stopped at {failed.host.name}, which failed; fix it and run `up --rolling` again"

    def _apply_drained(self, drain: RouterDrain, plan: HostPlan) -> None:
        """One host, its engines out of the (other) routers while they restart."""
        try:
            with drain.without(plan, self.diffs[plan.host.name]):
                self._apply(plan)
        except StackctlError as exc:  # the router could not be reconfigured
            outcome = self.result.outcomes[plan.host.name]
            outcome.status, outcome.step, outcome.error = HostState.FAILED, "drain", str(exc)

    def _close(self) -> None:
        """Remove this run's peer keys and close the connections (after Ctrl-C they are being
        closed already)."""
        if self.cancellation.cancelled:
            return
        for problem in self.models.close() if self.models else []:  # this run's peer keys
            self.progress.echo(f"warning: {problem}; remove it by hand, or run `up` again.")
        for conn in self.conns.values():
            conn.close()

    def _parallel(self, plans: list[HostPlan], fn) -> None:
        each(plans, fn, self.cancellation)

    def _interrupted(self) -> None:
        """Ctrl-C: hosts whose changes had begun are half-done; the others were not touched."""
        self.result.interrupted = True
        for name, outcome in self.result.outcomes.items():
            applier = self.appliers.get(name)
            if applier is not None and outcome.status in (
                HostState.PENDING,
                HostState.PREPARED,
                HostState.FAILED,
                HostState.INTERRUPTED,
            ):
                outcome.status, outcome.step, outcome.error = (
                    HostState.INTERRUPTED,
                    applier.step,
                    INTERRUPTED,
                )

    def _gather(self, plan: HostPlan) -> None:
        """One host: connect and gather its facts."""
        name = plan.host.name
        with self._gathering(name):
            self.progress.update(name, "connect")
            conn = connect(plan.host, accept_new_host_keys=self.options.accept_new_host_keys)
            self.conns[name] = conn
            self.cancellation.on_cancel(conn.close)
            self.progress.update(name, "facts")
            needs_gpus = plan.host.runs_engines and plan.host.engine.needs_gpus
            self.facts[name] = gather(conn, plan, needs_gpus)

    def _diff(self, plan: HostPlan) -> None:
        """One host that answered: its facts against its plan (with `--diff`, also the lines of
        each changed file, read back from the host)."""
        name = plan.host.name
        with self._gathering(name):
            self.diffs[name] = compute_diff(
                self.cluster,
                plan,
                self.facts[name],
                self.secrets,
                self.stackctl_sha,
                model_bytes(plan),
            )
            if self.options.show_diff:
                attach_content_diffs(self.conns[name], self.diffs[name])
            self.result.outcomes[name].changes = len(self.diffs[name].changes)
            self.progress.update(name, "planned")

    @contextlib.contextmanager
    def _gathering(self, name: str) -> Iterator[None]:
        """A host that cannot be reached or asked is settled (refused, unreachable); the others
        carry on."""
        outcome = self.result.outcomes[name]
        try:
            yield
        except (
            BecomeError
        ) as exc:  # reachable, but cannot run the privileged steps: nothing was changed
            outcome.status, outcome.step, outcome.error = HostState.REFUSED, "checks", str(exc)
            self.progress.update(name, "refused")
        except StackctlError as exc:
            outcome.status, outcome.step, outcome.error = (
                HostState.UNREACHABLE,
                "connect/facts",
                str(exc),
            )
            self.progress.update(name, "unreachable")

    def _apply(self, plan: HostPlan, start: bool = True) -> None:
        """Prepare the host (packages, files); with ``start``, also (re)start its programs (``_start``)."""
        name = plan.host.name
        outcome = self.result.outcomes[name]
        started = time.monotonic()
        applier = self.appliers[name] = Applier(
            self.conns[name],
            self.cluster,
            self.diffs[name],
            self.secrets,
            self.wheels,
            offline=self.options.wheelhouse is not None,
            report=lambda step: self.progress.update(name, step),
            cancellation=self.cancellation,
            models=self.models,
        )
        with self._host_step(name, applier, started):
            applier.prepare()
            outcome.status = HostState.PREPARED
        if start:
            self._start(plan)

    def _start(self, plan: HostPlan) -> None:
        """(Re)start a prepared host's programs and wait until its engines are healthy."""
        name = plan.host.name
        outcome = self.result.outcomes[name]
        if outcome.status != HostState.PREPARED:
            return
        started = time.monotonic()
        applier = self.appliers[name]
        with self._host_step(name, applier, started):
            applier.start()
            health = applier.wait_healthy(plan.host.engine.health_timeout_s)
            if health["unhealthy"]:
                programs = [p for p in plan.programs if p.health_url in health["unhealthy"]]
                tails = "\n".join(
                    f"--- last lines of {p.name}'s log:\n{applier.log_tail(p.name)}"
                    for p in programs
                )
                crashing = health.get("crashing") or {}
                why = (
                    "; ".join(crashing.values())
                    if crashing and set(crashing) == set(health["unhealthy"])
                    else f"did not become healthy within {plan.host.engine.health_timeout_s:.0f} s"
                )
                raise StackctlError(
                    f"engine(s) {', '.join(p.name for p in programs)}: {why}.\n{tails}"
                )
            outcome.status = HostState.CHANGED
            self.progress.update(name, "done")

    @contextlib.contextmanager
    def _host_step(self, name: str, applier: Applier, started: float):
        """Record a failure with its host and step, and keep the other hosts going."""
        outcome = self.result.outcomes[name]
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any failure is this host's, reported with its step; the others go on
            detail = str(exc) if isinstance(exc, StackctlError) else f"{type(exc).__name__}: {exc}"
            outcome.status, outcome.step, outcome.error = HostState.FAILED, applier.step, detail
            if self.cancellation.cancelled:  # its connection was closed under it
                outcome.status, outcome.error = HostState.INTERRUPTED, INTERRUPTED
            self.progress.update(name, f"FAILED at {applier.step}")
        finally:
            outcome.seconds += time.monotonic() - started

    def _verify(self) -> None:
        """Verify (unless UpOptions.verify is off): every router answers /health and serves one
        real completion; ``result.verify_error`` says which did not, and why."""
        if not self.options.verify:
            return
        errors = []
        for host in self.cluster.router_hosts:
            conn, error = self._router_connection(host.name)
            if conn is not None:
                error = self._verify_router(conn, host.name)
            if error:
                errors.append(
                    error if len(self.cluster.router_hosts) == 1 else f"{host.name}: {error}"
                )
        self.result.verify_error = "; ".join(errors)
        self.result.verified = not errors

    def _router_connection(self, router_host: str) -> tuple[Connector | None, str]:
        """The router host's connection (made here when `--hosts` left it out), or None and the
        reason when it is unreachable, refused or failed."""
        conn = self.conns.get(router_host)
        if conn is None and router_host not in self.result.outcomes:  # `--hosts` left it out
            try:
                conn = self.conns[router_host] = connect(
                    self.cluster.host(router_host),
                    accept_new_host_keys=self.options.accept_new_host_keys,
                )
            except StackctlError as exc:
                return None, str(exc)
        if conn is None:
            return None, f"router host {router_host} was not reachable"
        if self.result.outcomes.get(router_host, HostOutcome(router_host)).status in (
            HostState.REFUSED,
            HostState.FAILED,
        ):
            return None, f"router host {router_host} was {self.result.outcomes[router_host].status}"
        return conn, ""

    def _verify_router(self, conn: Connector, router_host: str) -> str:
        """ "" when the router on ``router_host`` is healthy and completes, else why not."""
        router_plan = next(p for p in plan_cluster(self.cluster, [router_host]))
        router = router_plan.program("router")
        assert router.health_url is not None  # plan._plan_router always gives the router one
        self.progress.update(router_host, "verify: router health")
        health = probe_wait(conn, router_plan.python, [router.health_url], 60, interval=0.5)
        if health["unhealthy"]:
            last = health["last"].get(router.health_url)
            status, said = (last["status"], last["body"][:300]) if last else (None, "")
            self.progress.update(router_host, "verify failed")
            return f"the router's /health did not answer 200 within 60 s (last: {status} {said})"
        self.progress.update(router_host, "verify: completion")
        body = json.dumps(
            {
                "model": self.cluster.model.name,
                "prompt": "stackctl deployment check",
                "max_tokens": 4,
            }
        )
        keys_file = router_key_file(self.cluster, router_plan)
        request = {
            "url": router.url("/v1/completions"),
            "body": body,
            "timeout": 300,
            "bearer_file": keys_file,
        }
        answer = probe_http(conn, router_plan.python, [request], timeout=360)[0]
        if answer["status"] != 200:
            self.progress.update(router_host, "verify failed")
            return (
                f"a completion through the router failed: {answer['status']} {answer['body'][:300]}"
            )
        self.progress.update(router_host, f"verified ({answer['seconds']:.2f} s completion)")
        return ""


class RouterDrain:
    """Rolling updates: take a host's engines out of every running router (router.yaml
    rendered without them, SIGHUP) and let their requests finish before they restart; put them
    back after (the full planned router.yaml).

    Without this, requests in flight on an engine when supervisord stops it are cut (an
    engine may abort them at SIGTERM, and supervisord signals its whole process group).
    """

    IDLE_TIMEOUT_S = 60.0
    RELOAD_TIMEOUT_S = 30.0

    def __init__(self, deployment: Deployment, routers: list[tuple[Connector, HostPlan]]):
        self.deployment, self.routers = deployment, routers

    @classmethod
    def open(cls, deployment: Deployment) -> RouterDrain:
        """Drains through each router host's connection whose router runs (none: a no-op)."""
        routers = []
        for host in deployment.cluster.router_hosts:
            conn, diff = deployment.conns.get(host.name), deployment.diffs.get(host.name)
            if conn and diff and diff.facts.program_state("router") == "RUNNING":
                routers.append((conn, diff.plan))
        return cls(deployment, routers)

    @contextlib.contextmanager
    def without(self, plan: HostPlan, diff: HostDiff):
        """``plan``'s engines out of the routers while ``diff`` restarts them (its own router,
        restarting too or not, keeps them: it carries nothing while it restarts)."""
        engines = {p.name for p in plan.programs if p.kind == "engine"}
        names = {e.name for e in plan.host.engines}
        restarts = any(c.kind == ChangeKind.RESTART and c.target in engines for c in diff.changes)
        routers = [(c, r) for c, r in self.routers if r.host.name != plan.host.name]
        if not routers or not restarts:
            yield
            return
        progress = self.deployment.progress
        cluster = self.deployment.cluster
        progress.update(plan.host.name, "drain: out of the router" + "s" * (len(routers) > 1))
        loaded = []
        try:
            for conn, router in routers:
                loaded.append((conn, router))
                text = router_config_text(cluster, router, without=names)
                self._load(conn, router, text, absent=names)
            progress.update(plan.host.name, "drain: finishing requests")
            self._wait_idle(plan)
            yield
        finally:
            progress.update(plan.host.name, "drain: back in the router" + "s" * (len(routers) > 1))
            for conn, router in loaded:
                self._load(conn, router, router_config_text(cluster, router), absent=set())

    def _load(self, conn: Connector, router: HostPlan, text: str, absent: set[str]) -> None:
        """Write the router's config, SIGHUP it, wait until its /engines shows the change."""
        conn.put_bytes(text.encode(), router.router_config)
        conn.run(shlex.join(router.supervisorctl("signal", "HUP", "router")))
        url = router.program("router").url("/engines")
        expected = len(yaml.safe_load(text).get("engines") or [])
        deadline = time.monotonic() + self.RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            keys = router_key_file(self.deployment.cluster, router)  # /engines may want a key
            request = {"url": url, "timeout": 5, "bearer_file": keys}
            answer = probe_http(conn, router.python, [request])[0]
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
        raise StackctlError(
            f"the router on {router.host.name} did not reload its config within {self.RELOAD_TIMEOUT_S:.0f} s"
        )

    def _wait_idle(self, plan: HostPlan) -> None:
        """Until the host's engines run and queue no request (their /metrics), or a timeout."""
        conn = self.deployment.conns[plan.host.name]
        urls = [p.url("/metrics") for p in plan.programs if p.kind == "engine"]
        deadline = time.monotonic() + self.IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            answers = probe_http(conn, plan.python, [{"url": u, "timeout": 5} for u in urls])
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


def up(
    cluster: Cluster, options: UpOptions, progress: Progress, confirm: Callable[[str], bool]
) -> UpResult:
    return Deployment(cluster, options, progress, confirm).run()
