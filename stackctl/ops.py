"""`down`, `logs` and `restart`: small operations on running hosts, in parallel where it helps."""

from __future__ import annotations

import shlex

from .connect import connect, q
from .errors import StackctlError
from .facts import bootstrap_interpreter, run_probe
from .inventory import Cluster
from .parallel import Cancellation, each
from .plan import HostPlan, owned_entries, plan_cluster

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


def down(cluster: Cluster, hosts: list[str] | None, purge: bool, accept_new_host_keys: bool = False) -> dict[str, str | None]:
    """Stop every program and supervisord; with ``purge`` also remove the deploy dir."""

    def stop(plan: HostPlan) -> None:
        conn = connect(plan.host, accept_new_host_keys=accept_new_host_keys)
        try:
            facts = run_probe(conn, bootstrap_interpreter(plan), {
                "action": "facts", "deploy_dir": plan.deploy_dir, "python": plan.python,
                "supervisor_conf": plan.supervisor_conf, "supervisor_pidfile": f"{plan.dirs['run']}/supervisord.pid",
                "unit": plan.unit_name, "unit_path": plan.system_unit_path,
            })
            pid = facts["supervisor"]["pid"]
            systemd = facts.get("systemd") or {}
            unit_installed = plan.unit_name and systemd.get("present") and systemd.get("unit_sha256")
            if unit_installed:  # stop it through systemd: Restart=always would bring supervisord back
                stop_s = sum(p.stopwaitsecs for p in plan.programs) + 60
                conn.run(f"systemctl disable --now {q(plan.unit_name)}", as_root=True, timeout=stop_s)
                facts["supervisor"]["running"] = conn.run(f"kill -0 {int(pid)} 2>/dev/null", check=False).ok if pid else False
            if facts["supervisor"]["running"]:
                conn.run(shlex.join(plan.supervisorctl("stop", "all")), check=False, timeout=300)
                conn.run(shlex.join(plan.supervisorctl("shutdown")), check=False, timeout=120)
                # supervisord exits once its children are gone; wait for it so nothing is left running
                conn.run(f"for i in $(seq 1 120); do kill -0 {int(pid)} 2>/dev/null || exit 0; sleep 0.5; done; exit 1", timeout=90)
            if purge:
                conf = plan.supervisor_conf
                target = q(plan.deploy_dir)  # absent or empty (purged before) is fine too
                check = conn.run(f"test ! -e {target} || test -z \"$(ls -A {target})\" || grep -qs {q(MARKER)} {q(conf)}", check=False)
                if not check.ok:
                    raise StackctlError(f"{plan.host.name}: refusing to purge {plan.deploy_dir}: it does not look like a stackctl deploy dir ({conf} is missing or not ours).")
                conn.run(purge_command(plan), timeout=600, as_root=True)
                if unit_installed:
                    conn.run(f"rm -f -- {q(plan.system_unit_path)} && systemctl daemon-reload", as_root=True, timeout=120)
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
    return f"rm -rf -- {entries} && {{ test ! -e {target} || rmdir -- {target} 2>/dev/null || test -n \"$(ls -A {target})\" || mountpoint -q {target}; }}"


def restart(cluster: Cluster, hosts: list[str] | None, program: str | None, accept_new_host_keys: bool = False) -> dict[str, str | None]:
    plans = plan_cluster(cluster, hosts)
    if program:
        known = {p.name for plan in plans for p in plan.programs}
        if program not in known:
            raise StackctlError(f"no program named '{program}' on the chosen hosts; programs: {', '.join(sorted(known))}.", exit_code=2)

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


def logs(cluster: Cluster, host: str, program: str | None, lines: int, follow: bool, accept_new_host_keys: bool = False) -> None:
    """Print (or follow) a program's log on one host; all its programs when none is named."""
    plan = plan_cluster(cluster, [host])[0]
    names = [p.name for p in plan.programs]
    if program and program not in names + ["supervisord"]:
        raise StackctlError(f"host {host} has no program '{program}'; it runs: {', '.join(names + ['supervisord'])}.", exit_code=2)
    files = [f"{plan.dirs['logs']}/{name}.log" for name in ([program] if program else names)]
    conn = connect(plan.host, accept_new_host_keys=accept_new_host_keys)
    try:
        flag = "-F" if follow else ""
        conn.run(f"tail -n {int(lines)} {flag} {' '.join(q(f) for f in files)}", check=False, stream=True)
    finally:
        conn.close()
