"""`down`, `logs` and `restart`: small operations on running hosts, in parallel where it helps."""

from __future__ import annotations

import shlex
import signal
from collections.abc import Callable

import click

from .apply import Change, ChangeKind, HostDiff
from .connect import Connector, connect, q
from .errors import StackctlError
from .facts import Facts, gather, probe_wait, run_probe, supervisor_facts
from .inventory import Cluster, Engine
from .parallel import Cancellation, each
from .plan import HostPlan, owned_entries, plan_cluster
from .progress import Progress

MARKER = "rendered by stackctl"


def _each_host(plans: list[HostPlan], fn) -> dict[str, str | None]:
    """Run ``fn(plan)`` on every host; host -> None on success or the error message."""

    def guarded(plan):
        try:
            fn(plan)
            return plan.host.name, None
        except StackctlError as exc:
            return plan.host.name, str(exc)

    cancellation = Cancellation()
    with cancellation.on_sigint():
        return dict(each(plans, guarded, cancellation))


def down(
    cluster: Cluster, hosts: list[str] | None, purge: bool, accept_new_host_keys: bool = False
) -> dict[str, str | None]:
    """Stop every program and supervisord; with ``purge`` also remove the deploy dir."""

    def stop(plan: HostPlan) -> None:
        conn = connect(plan.host, accept_new_host_keys=accept_new_host_keys)
        try:
            facts = supervisor_facts(conn, plan)
            pid, running = facts.supervisor.pid, facts.supervisor.running
            installed = facts.systemd.present and facts.systemd.unit_sha256
            unit = plan.unit_name if installed else None  # the cluster's unit, when installed
            unit_path = plan.system_unit_path if installed else None  # (set with unit_name)
            if unit:  # stop it through systemd: Restart=always would bring supervisord back
                stop_s = sum(p.stopwaitsecs for p in plan.programs) + 60
                conn.run(f"systemctl disable --now {q(unit)}", as_root=True, timeout=stop_s)
                running = (
                    conn.run(f"kill -0 {int(pid)} 2>/dev/null", check=False).ok if pid else False
                )
            if running:
                conn.run(shlex.join(plan.supervisorctl("stop", "all")), check=False, timeout=300)
                conn.run(shlex.join(plan.supervisorctl("shutdown")), check=False, timeout=120)
                # supervisord exits once its children are gone; wait for it so nothing is left running
                assert pid is not None  # the probe, or kill -0 above, found it running by its pid
                conn.run(
                    f"for i in $(seq 1 120); do kill -0 {int(pid)} 2>/dev/null || exit 0; sleep 0.5; done; exit 1",
                    timeout=90,
                )
            if purge:
                conf = plan.supervisor_conf
                target = q(plan.deploy_dir)  # absent or empty (purged before) is fine too
                check = conn.run(
                    f'test ! -e {target} || test -z "$(ls -A {target})" || grep -qs {q(MARKER)} {q(conf)}',
                    check=False,
                )
                if not check.ok:
                    raise StackctlError(
                        f"{plan.host.name}: refusing to purge {plan.deploy_dir}: it does not look like a stackctl deploy dir ({conf} is missing or not ours)."
                    )
                conn.run(purge_command(plan), timeout=600, as_root=True)
                if unit_path:
                    conn.run(
                        f"rm -f -- {q(unit_path)} && systemctl daemon-reload",
                        as_root=True,
                        timeout=120,
                    )
        finally:
            conn.close()

    return _each_host(plan_cluster(cluster, hosts), stop)


def purge_command(plan: HostPlan) -> str:
    """Remove what `up` made in the deploy dir (plan.owned_entries), then the dir itself only
    if nothing else is left: files someone else put there stay. The service account's home is
    the deploy dir, so its dot-files (pip's and the engines' caches) go too. A deploy dir that
    is a mount point cannot be removed: emptied, it is purged. As root: the deploy dir's parent
    (e.g. /opt) is not the service user's to change."""
    target = q(plan.deploy_dir)
    entries = " ".join(q(path) for path in owned_entries(plan.deploy_dir))
    if plan.host.service_user:  # sh globs: every dot-entry but . and ..
        entries += f" {target}/.[!.]* {target}/..?*"
    return f'rm -rf -- {entries} && {{ test ! -e {target} || rmdir -- {target} 2>/dev/null || test -n "$(ls -A {target})" || mountpoint -q {target}; }}'


def restart(
    cluster: Cluster,
    hosts: list[str] | None,
    program: str | None,
    accept_new_host_keys: bool = False,
    *,
    rolling: bool = False,
    progress=None,
    confirm: Callable[[], bool] | None = None,
) -> dict[str, str | None]:
    """Restart the hosts' programs (or only ``program``), all at once or, with ``rolling``, engine
    hosts one at a time, drained through the router as `up --rolling` does, the router host last.
    ``confirm`` is asked once the program is known to exist, before anything connects."""
    plans = plan_cluster(cluster, hosts)
    if program:
        known = {p.name for plan in plans for p in plan.programs}
        if program not in known:
            raise StackctlError(
                f"no program named '{program}' on the chosen hosts; programs: {', '.join(sorted(known))}.",
                exit_code=2,
            )
    if confirm is not None and not confirm():
        raise StackctlError("nothing was restarted (not confirmed).", exit_code=1)
    if rolling:
        return _rolling_restart(
            cluster, plans, program, accept_new_host_keys, progress or Progress(quiet=True)
        )

    def restart_one(plan: HostPlan) -> None:
        names = [p.name for p in plan.programs if program in (None, p.name)]
        if not names:
            return
        conn = connect(plan.host, accept_new_host_keys=accept_new_host_keys)
        try:
            conn.run(shlex.join(plan.supervisorctl("restart", *names)), timeout=600)
        finally:
            conn.close()

    return _each_host(plans, restart_one)


def _rolling_restart(
    cluster: Cluster,
    plans: list[HostPlan],
    program: str | None,
    accept_new_host_keys: bool,
    progress: Progress,
) -> dict[str, str | None]:
    """One engine host at a time: out of the running routers (deploy.RouterDrain), its requests
    finished, restarted, healthy, back in; then the router hosts, one at a time. It stops at the
    first host that fails, so that no more engines go down than that one."""
    from .deploy import Deployment, RouterDrain, UpOptions  # deploy imports much of the package

    router_names = [h.name for h in cluster.router_hosts]
    deployment = Deployment(
        cluster,
        UpOptions(rolling=True, accept_new_host_keys=accept_new_host_keys),
        progress,
        lambda _question: True,
    )
    results: dict[str, str | None] = {}
    todo = [(plan, [p.name for p in plan.programs if program in (None, p.name)]) for plan in plans]
    todo = [(plan, names) for plan, names in todo if names]
    todo.sort(
        key=lambda item: item[0].host.name in router_names
    )  # engine hosts first, in inventory order
    try:
        drain = _open_drain(deployment, RouterDrain, router_names, accept_new_host_keys)
        for plan, names in todo:
            name = plan.host.name
            if any(results.values()):
                results[name] = (
                    f"not restarted: stopped after {next(h for h, e in results.items() if e)} failed"
                )
                continue
            try:
                conn = deployment.conns.get(name) or connect(
                    plan.host, accept_new_host_keys=accept_new_host_keys
                )
                deployment.conns[name] = conn
                restarts = [
                    Change(ChangeKind.RESTART, n) for n in names
                ]  # what `without` drains for, as in `up`'s diff
                # a router host's engines leave the other routers (its own router, restarting
                # or not, keeps them: a router that restarts cuts what it carries anyway)
                with drain.without(plan, HostDiff(plan, Facts(), restarts)):
                    progress.update(name, f"restart {', '.join(names)}")
                    conn.run(shlex.join(plan.supervisorctl("restart", *names)), timeout=600)
                    _wait_healthy(conn, plan, names, progress)
                progress.update(name, "done")
                results[name] = None
            except StackctlError as exc:
                progress.update(name, "FAILED")
                results[name] = str(exc)
    except StackctlError as exc:  # the router host could not be reached to drain through
        return {plan.host.name: f"not restarted: {exc}" for plan, _ in todo}
    finally:
        for conn in deployment.conns.values():
            conn.close()
    return results


def _open_drain(deployment, drain_class, router_names: list[str], accept_new_host_keys: bool):
    """The routers' facts (which run, on which plan), then ``RouterDrain.open`` on them."""
    for router_plan in plan_cluster(deployment.cluster, router_names):
        name = router_plan.host.name
        conn = deployment.conns[name] = connect(
            router_plan.host, accept_new_host_keys=accept_new_host_keys
        )
        deployment.diffs[name] = HostDiff(router_plan, gather(conn, router_plan, needs_gpus=False))
    return drain_class.open(deployment)


def _wait_healthy(conn, plan: HostPlan, names: list[str], progress: Progress) -> None:
    urls = [
        p.health_url
        for p in plan.programs
        if p.name in names and p.kind == "engine" and p.health_url
    ]
    if not urls:
        return
    timeout = plan.host.engine.health_timeout_s
    progress.update(plan.host.name, "wait for engines")
    health = probe_wait(conn, plan.python, urls, timeout, interval=1.0)
    if health["unhealthy"]:
        raise StackctlError(
            f"{plan.host.name}: engine(s) at {', '.join(health['unhealthy'])} did not become healthy within {timeout:.0f} s after the restart; "
            f"see `stackctl logs -l {plan.host.name}`. The host stays out of the router's rotation only until then: it was put back."
        )


def kill_engine(
    cluster: Cluster,
    engine: Engine,
    sig: int = signal.SIGKILL,
    *,
    conn: Connector | None = None,
    accept_new_host_keys: bool = False,
) -> int:
    """Send ``sig`` to one engine's process on its host, as an operator's ``kill -9`` (a crash)
    would: supervisord sees its child die and restarts it. The pid is the one that host's
    supervisord holds (XML-RPC), so nothing else is hit. Returns that pid. ``conn``: an open
    connection to the engine's host, to reuse across kills."""
    plan = plan_cluster(cluster, [engine.host])[0]
    own = conn is None
    conn = conn or connect(plan.host, accept_new_host_keys=accept_new_host_keys)
    try:
        request = {
            "action": "supervisor_signal",
            "python": plan.python,
            "supervisor_conf": plan.supervisor_conf,
            "program": engine.program,
            "signal": int(sig),
        }
        answer = run_probe(conn, plan.python, request, timeout=90)
    finally:
        if own:
            conn.close()
    assert isinstance(answer, dict)  # probe.supervisor_signal answers an object
    if answer["error"]:
        raise StackctlError(
            f"{engine.host}/{engine.program}: not signalled: {answer['error']}; "
            f"see `stackctl status -l {engine.host}`."
        )
    return int(answer["pid"])


def logs(
    cluster: Cluster,
    hosts: list[str],
    program: str | None,
    lines: int,
    follow: bool,
    accept_new_host_keys: bool = False,
) -> None:
    """Print (or follow) the programs' logs on each host in turn (``program``: only its log;
    hosts that do not run it are skipped)."""
    plans = plan_cluster(cluster, hosts)
    runs = {plan.host.name: [p.name for p in plan.programs] + ["supervisord"] for plan in plans}
    if program and not any(program in names for names in runs.values()):
        every = sorted({n for names in runs.values() for n in names})
        raise StackctlError(
            f"no program '{program}' on {', '.join(hosts)}; they run: {', '.join(every)}.",
            exit_code=2,
        )
    for plan in plans:
        names = runs[plan.host.name]
        if program and program not in names:
            continue
        files = [plan.log_file(name) for name in ([program] if program else names[:-1])]
        if len(plans) > 1:
            click.echo(f"=== {plan.host.name}", err=False)
        conn = connect(plan.host, accept_new_host_keys=accept_new_host_keys)
        try:
            flag = "-F" if follow else ""
            conn.run(
                f"tail -n {int(lines)} {flag} {' '.join(q(f) for f in files)}",
                check=False,
                stream=True,
            )
        finally:
            conn.close()
