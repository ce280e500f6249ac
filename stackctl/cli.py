"""The `stackctl` command line: parse arguments, call the library, render the result."""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import click
import yaml

from . import __version__
from .errors import StackctlError
from .inventory import Cluster, load_inventory, ssh_key_problem
from .plan import plan_cluster
from .show import format_host_plan, write_plan_tree


def _need_inventory(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path:
    if value is None:
        raise StackctlError(
            "no inventory: give the inventory file as the first argument, or set STACKCTL_INVENTORY to its path.",
            exit_code=2,
        )
    return value


INVENTORY = click.argument(
    "inventory",
    envvar="STACKCTL_INVENTORY",
    required=False,
    callback=_need_inventory,
    type=click.Path(dir_okay=False, path_type=Path),
)
PROFILE = click.option(
    "--profile", "-p", default=None, help="Apply this profile (a named overlay under `profiles:`)."
)
HOSTS = click.option(
    "--hosts",
    "-l",
    "hosts",
    default=None,
    metavar="NAMES",
    help="Only these hosts: comma-separated names or glob patterns (gpu0*, 'gpu[12]').",
)
FORMATS = ("table", "json", "yaml")


def _output(what: str):
    return click.option(
        "--output",
        "-o",
        "output",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help=f"How to print {what}.",
    )


def _verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    from .connect import set_verbosity

    set_verbosity(value)
    return value


VERBOSE = click.option(
    "--verbose",
    "-v",
    count=True,
    expose_value=False,
    callback=_verbosity,
    help="Show each command run on a host, on stderr (commands only: never their output).",
)


def select_hosts(cluster: Cluster, value: str | None) -> list[str] | None:
    """``--hosts``: names or fnmatch patterns, comma-separated -> host names in inventory order
    (None: every host). A name or pattern that matches no host is an error (exit 2)."""
    patterns = [h.strip() for h in value.split(",") if h.strip()] if value else []
    if not patterns:
        return None
    known = [h.name for h in cluster.hosts]
    chosen: set[str] = set()
    unmatched = []
    for pattern in patterns:
        matched = [name for name in known if fnmatch.fnmatchcase(name, pattern)]
        chosen.update(matched)
        if not matched:
            unmatched.append(pattern)
    if unmatched:
        raise StackctlError(
            f"{cluster.source}: --hosts: no host named or matching {', '.join(unmatched)}. Hosts in this inventory: {', '.join(known)}.",
            exit_code=2,
        )
    return [name for name in known if name in chosen]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stackctl")
def cli() -> None:
    """Deploy and operate a vLLM + LMCache serving stack with a KV-aware router over SSH.

    INVENTORY defaults to $STACKCTL_INVENTORY. Shell completion:
    eval "$(_STACKCTL_COMPLETE=bash_source stackctl)".
    """


@cli.command()
@INVENTORY
@PROFILE
def validate(inventory: Path, profile: str | None) -> None:
    """Check an inventory and say what it describes."""
    cluster = load_inventory(inventory, profile)
    profiles = [cluster.profile] if cluster.profile else list(cluster.profiles)
    for name in profiles:  # a profile that breaks the inventory is caught now, not at `up`
        load_inventory(inventory, name)
    missing: dict[str, list[str]] = {}  # may be right on the machine that runs `up`: warn only
    for host in cluster.hosts:
        if host.ssh.key and ssh_key_problem(host):
            missing.setdefault(host.ssh.key, []).append(host.name)
    for key, names in missing.items():
        click.echo(
            f"warning: {inventory}: ssh.key: the SSH key file {key} does not exist on this machine (hosts {', '.join(names)}); "
            "`up`, `status`, `down` and the other commands that connect refuse these hosts until it does.",
            err=True,
        )
    engines = cluster.engines
    routers = ", ".join(f"{h.name} at {cluster.router_url_of(h)}" for h in cluster.router_hosts)
    click.echo(
        f"{inventory}: OK. Cluster '{cluster.name}': {len(cluster.hosts)} hosts, {len(engines)} "
        f"{cluster.engine.kind} engine(s) serving {cluster.model.name}, "
        f"{'router' if len(cluster.router_hosts) == 1 else 'routers'} ({cluster.router.policy}) on {routers}"
        + (f"; profiles: {', '.join(cluster.profiles)}" if cluster.profiles else "")
        + "."
    )


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option(
    "--host", "old_host", default=None, hidden=True
)  # deprecated spelling of --hosts, for one release
@_output("the plan")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write every host's files under this directory.",
)
def plan(
    inventory: Path,
    profile: str | None,
    hosts: str | None,
    old_host: str | None,
    output: str,
    out_dir: Path | None,
) -> None:
    """Show exactly what `up` would put on each host, without connecting to any."""
    from .show import plan_document

    if old_host:
        click.echo(
            "warning: `plan --host` is deprecated and goes in the next release: use --hosts (-l).",
            err=True,
        )
        hosts = ",".join(filter(None, [hosts, old_host]))
    cluster = load_inventory(inventory, profile)
    plans = plan_cluster(cluster, select_hosts(cluster, hosts))
    if output == "table":
        click.echo("\n\n".join(format_host_plan(p) for p in plans))
    else:
        _dump(plan_document(cluster, plans), output)
    if out_dir:
        written = write_plan_tree(plans, out_dir)
        if output == "table":
            click.echo(f"\nwrote {len(written)} files under {out_dir}/")
        else:  # stdout holds the document alone
            click.echo(f"wrote {len(written)} files under {out_dir}/", err=True)


def _dump(document: dict, output: str) -> None:
    """``-o json|yaml``: the document alone on stdout (progress and warnings go to stderr)."""
    if output == "json":
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), nl=False)


ACCEPT_KEYS = click.option(
    "--accept-new-host-keys",
    is_flag=True,
    help="Record unknown SSH host keys on first use (changed keys are always refused).",
)
YES = click.option("--yes", "-y", is_flag=True, help="Do it without asking.")


def _interactive() -> bool:
    return sys.stdin.isatty()


def _confirm(yes: bool):
    def ask(question: str) -> bool:
        if yes:
            return True
        if not _interactive():
            raise StackctlError(
                "changes need confirmation: run again with --yes (stdin is not a terminal).",
                exit_code=1,
            )
        return click.confirm(question, default=False)

    return ask


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option(
    "--rolling",
    is_flag=True,
    help="Apply engine hosts one at a time, each healthy before the next, so the router keeps serving.",
)
@YES
@click.option(
    "--check",
    is_flag=True,
    help="Only show what would change, change nothing: exit 0 when nothing would, 3 when something would (1: a host refused or unreachable).",
)
@ACCEPT_KEYS
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Install packages offline from this directory of wheels (uploaded to each host).",
)
@click.option(
    "--diff",
    "show_diff",
    is_flag=True,
    help="Also show the line-by-line diff of every file that would change (answer no to apply nothing).",
)
@_output("the result per host")
@VERBOSE
def up(
    inventory,
    profile,
    hosts,
    rolling,
    yes,
    check,
    accept_new_host_keys,
    wheelhouse,
    show_diff,
    output,
):
    """Deploy the stack: facts, show the changes, apply them, verify."""
    from .deploy import HostState, UpOptions
    from .deploy import up as run_up
    from .progress import Progress
    from .render import render_up_summary, up_document

    cluster = load_inventory(inventory, profile)
    options = UpOptions(
        hosts=select_hosts(cluster, hosts),
        rolling=rolling,
        yes=yes,
        accept_new_host_keys=accept_new_host_keys,
        wheelhouse=wheelhouse,
        show_diff=show_diff,
        check=check,
    )
    result = run_up(cluster, options, Progress(), _confirm(yes))
    if output == "table":
        render_up_summary(result)
    else:
        _dump(up_document(result), output)
    if result.interrupted:
        half = [
            f"{o.name} (at {o.step})"
            for o in result.outcomes.values()
            if o.status == HostState.INTERRUPTED
        ]
        left = f"left half-done: {', '.join(half)}" if half else "no host was changed"
        click.echo(
            f"interrupted (Ctrl-C): {left}. Run `stackctl up` again: it resumes from what each host has.",
            err=True,
        )
        sys.exit(130)
    if check:
        statuses = {o.status for o in result.outcomes.values()}
        sys.exit(
            1
            if statuses - {HostState.UNCHANGED, HostState.WOULD_CHANGE}
            else 3
            if HostState.WOULD_CHANGE in statuses
            else 0
        )
    if not result.ok:
        sys.exit(1)


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@_output("the status")
@click.option(
    "--json", "as_json", is_flag=True, hidden=True
)  # the same as -o json (kept for scripts)
@ACCEPT_KEYS
@VERBOSE
def status(inventory, profile, hosts, output, as_json, accept_new_host_keys):
    """Every host, program, engine and the router, with live engine metrics.

    Exit code 0: healthy; 1: degraded; 2: a host is unreachable.
    """
    from .render import render_status
    from .status import cluster_status, exit_code

    cluster = load_inventory(inventory, profile)
    result = cluster_status(cluster, select_hosts(cluster, hosts), accept_new_host_keys)
    if as_json or output != "table":
        _dump(result, "json" if as_json else output)
    else:
        render_status(result)
    sys.exit(exit_code(result))


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option(
    "--purge",
    is_flag=True,
    help="Also delete what `up` made in each host's deploy dir (venv, configs, logs, secrets); asks first.",
)
@YES
@ACCEPT_KEYS
@VERBOSE
def down(inventory, profile, hosts, purge, yes, accept_new_host_keys):
    """Stop every program and supervisord on the hosts."""
    from .ops import down as run_down

    cluster = load_inventory(inventory, profile)
    names = select_hosts(cluster, hosts)
    if purge and not _confirm(yes)(
        f"Stop and purge the deploy dirs of {len(names or cluster.hosts)} host(s) ({', '.join(names or [h.name for h in cluster.hosts])})?"
    ):
        raise StackctlError("nothing was purged (not confirmed).", exit_code=1)
    _report_hosts(
        run_down(cluster, names, purge, accept_new_host_keys),
        "stopped" + (" and purged" if purge else ""),
    )


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option(
    "--program", default=None, help="Only this program's log (e.g. engine-0, router, supervisord)."
)
@click.option("-n", "lines", default=50, show_default=True, help="Lines to show.")
@click.option("-f", "follow", is_flag=True, help="Keep following the log (one host only).")
@ACCEPT_KEYS
@VERBOSE
def logs(inventory, profile, hosts, program, lines, follow, accept_new_host_keys):
    """Show the programs' logs on the hosts (each host in turn; all hosts when --hosts is omitted)."""
    from .ops import logs as run_logs

    cluster = load_inventory(inventory, profile)
    names = select_hosts(cluster, hosts) or [h.name for h in cluster.hosts]
    if follow and len(names) != 1:
        raise StackctlError(
            f"logs -f follows one host's logs: choose one with --hosts (these match: {', '.join(names)}).",
            exit_code=2,
        )
    run_logs(cluster, names, program, lines, follow, accept_new_host_keys)


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option("--program", default=None, help="Only this program (e.g. engine-0, router).")
@click.option(
    "--rolling",
    is_flag=True,
    help="Engine hosts one at a time, each out of the routers until its requests finish and healthy again before the next; the router hosts last, one at a time.",
)
@YES
@ACCEPT_KEYS
@VERBOSE
def restart(inventory, profile, hosts, program, rolling, yes, accept_new_host_keys):
    """Restart programs on the hosts (all hosts when --hosts is omitted)."""
    from .ops import restart as run_restart
    from .progress import Progress

    cluster = load_inventory(inventory, profile)
    names = select_hosts(cluster, hosts)
    chosen = names or [h.name for h in cluster.hosts]
    what = program or "every program"
    _report_hosts(
        run_restart(
            cluster,
            names,
            program,
            accept_new_host_keys,
            rolling=rolling,
            progress=Progress(),
            confirm=lambda: _confirm(yes)(
                f"Restart {what} on {len(chosen)} host(s) ({', '.join(chosen)})?"
            ),
        ),
        "restarted",
    )


def _report_hosts(errors: dict, done: str) -> None:
    failed = {h: e for h, e in errors.items() if e}
    for host, error in errors.items():
        click.echo(f"{host}: {done}" if not error else f"{host}: FAILED: {error}", err=bool(error))
    if failed:
        sys.exit(1)


def _floats(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise StackctlError(
            f"--qps {value}: give numbers separated by commas, e.g. --qps 0.5,1,2.", exit_code=2
        ) from None


@cli.command()
@INVENTORY
@click.option(
    "--compare",
    default="naive,optimized",
    show_default=True,
    help="Profiles to measure, in order (the first is the baseline of the ratios).",
)
@click.option(
    "--scenario",
    "scenario_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Workload scenario YAML (default: the reference workload).",
)
@click.option("--qps", default=None, help="QPS points, comma-separated (default: the scenario's).")
@click.option("--users", type=int, default=None, help="Concurrent users (default: the scenario's).")
@click.option(
    "--duration", "duration_s", type=float, default=None, help="Seconds measured per QPS point."
)
@click.option(
    "--warmup",
    "warmup_s",
    type=float,
    default=None,
    help="Warm-up seconds at least, before the points (it goes on until every user's first turn is answered).",
)
@click.option(
    "--availability",
    "availability_s",
    type=float,
    default=None,
    help="Instead of the sweep: probe the router once a second for this many seconds under load.",
)
@click.option(
    "--kill-engine-every",
    "kill_engine_every_s",
    type=float,
    default=None,
    help="With --availability: kill -9 one engine process every this many seconds, round-robin "
    "(supervisord restarts it), and report what the probes and the workload saw.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Where the CSV, JSON, markdown table and plots go.",
)
@click.option("--yes", "-y", is_flag=True, help="Deploy each profile without asking.")
@ACCEPT_KEYS
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="As for `up`.",
)
@VERBOSE
def bench(
    inventory,
    compare,
    scenario_path,
    qps,
    users,
    duration_s,
    warmup_s,
    availability_s,
    kill_engine_every_s,
    out_dir,
    yes,
    accept_new_host_keys,
    wheelhouse,
):
    """Naive-versus-optimized multi-round QA benchmark: deploy each profile, sweep QPS, report."""
    from .benchcmd import BenchOptions, run_bench
    from .deploy import UpOptions

    profiles = [p.strip() for p in compare.split(",") if p.strip()]
    if not profiles:
        raise StackctlError("--compare needs at least one profile name.", exit_code=2)
    options = BenchOptions(
        inventory=inventory,
        profiles=profiles,
        out_dir=out_dir,
        scenario_path=scenario_path,
        qps=_floats(qps),
        users=users,
        duration_s=duration_s,
        warmup_s=warmup_s,
        availability_s=availability_s,
        kill_engine_every_s=kill_engine_every_s,
        up_options=UpOptions(
            yes=yes, accept_new_host_keys=accept_new_host_keys, wheelhouse=wheelhouse
        ),
    )
    paths = run_bench(options, _confirm(yes), click.echo)
    summary = paths.get("summary_md") or next(
        (p for p in paths.values() if str(p).endswith(".md")), None
    )
    if summary:
        click.echo(Path(summary).read_text())
    click.echo("results:")
    for path in paths.values():
        click.echo(f"  {path}")


@cli.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.pass_context
def sim(ctx: click.Context) -> None:
    """Run the vLLM simulator engine (takes vLLM's server flags; --help for the list)."""
    from .sim.__main__ import main as sim_main

    sys.exit(sim_main(list(ctx.args)))


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The router.yaml that `up` renders.",
)
def router(config_path: Path) -> None:
    """Run the KV-aware router (normally started by supervisord on the router host)."""
    from .router.__main__ import main as router_main

    sys.exit(router_main(["--config", str(config_path)]))


def main(argv: list[str] | None = None) -> int:
    """Entry point: user-facing errors become one paragraph on stderr and an exit code."""
    try:
        cli.main(args=argv, prog_name="stackctl", standalone_mode=False)
    except StackctlError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted.", err=True)
        return 130
    except SystemExit as exc:  # commands that end with a specific exit code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
