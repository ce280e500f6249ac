"""The `stackctl` command line: parse arguments, call the library, render the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import StackctlError
from .inventory import Cluster, load_inventory, ssh_key_problem
from .plan import plan_cluster
from .show import format_host_plan, write_plan_tree

INVENTORY = click.argument("inventory", type=click.Path(dir_okay=False, path_type=Path))
PROFILE = click.option("--profile", "-p", default=None, help="Apply this profile (a named overlay under `profiles:`).")


def _split_hosts(value: str | None) -> list[str] | None:
    return [h.strip() for h in value.split(",") if h.strip()] if value else None


def _check_hosts(cluster: Cluster, names: list[str] | None) -> None:
    known = {h.name for h in cluster.hosts}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise StackctlError(f"{cluster.source}: unknown host(s): {', '.join(unknown)}. Hosts in this inventory: {', '.join(sorted(known))}.", exit_code=2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stackctl")
def cli() -> None:
    """Deploy and operate a vLLM + LMCache serving stack with a KV-aware router over SSH."""


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
        if ssh_key_problem(host):
            missing.setdefault(host.ssh.key, []).append(host.name)
    for key, names in missing.items():
        click.echo(f"warning: {inventory}: ssh.key: the SSH key file {key} does not exist on this machine (hosts {', '.join(names)}); "
                   "`up`, `status`, `down` and the other commands that connect refuse these hosts until it does.", err=True)
    engines = cluster.engines
    click.echo(
        f"{inventory}: OK. Cluster '{cluster.name}': {len(cluster.hosts)} hosts, {len(engines)} "
        f"{cluster.engine['kind']} engine(s) serving {cluster.model['name']}, router on "
        f"{cluster.router['host']} ({cluster.router['policy']}) at {cluster.router_url}"
        + (f"; profiles: {', '.join(cluster.profiles)}" if cluster.profiles else "")
        + "."
    )


@cli.command()
@INVENTORY
@PROFILE
@click.option("--host", "hosts", default=None, help="Only these hosts (comma-separated names).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also write every host's files under this directory.")
def plan(inventory: Path, profile: str | None, hosts: str | None, output: Path | None) -> None:
    """Show exactly what `up` would put on each host, without connecting to any."""
    cluster = load_inventory(inventory, profile)
    names = _split_hosts(hosts)
    _check_hosts(cluster, names)
    plans = plan_cluster(cluster, names)
    click.echo("\n\n".join(format_host_plan(p) for p in plans))
    if output:
        written = write_plan_tree(plans, output)
        click.echo(f"\nwrote {len(written)} files under {output}/")


HOSTS = click.option("--hosts", default=None, help="Only these hosts (comma-separated names).")
ACCEPT_KEYS = click.option("--accept-new-host-keys", is_flag=True, help="Record unknown SSH host keys on first use (changed keys are always refused).")


def _confirm(yes: bool):
    def ask(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise StackctlError("changes need confirmation: run again with --yes (stdin is not a terminal).", exit_code=1)
        return click.confirm(question, default=False)

    return ask


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option("--rolling", is_flag=True, help="Apply engine hosts one at a time, each healthy before the next, so the router keeps serving.")
@click.option("--yes", "-y", is_flag=True, help="Apply without asking.")
@ACCEPT_KEYS
@click.option("--wheelhouse", type=click.Path(file_okay=False, path_type=Path), default=None, help="Install packages offline from this directory of wheels (uploaded to each host).")
@click.option("--diff", "show_diff", is_flag=True, help="Also show the line-by-line diff of every file that would change (answer no to apply nothing).")
def up(inventory, profile, hosts, rolling, yes, accept_new_host_keys, wheelhouse, show_diff):
    """Deploy the stack: facts, show the changes, apply them, verify."""
    from .deploy import UpOptions, up as run_up
    from .progress import Progress
    from .render import render_up_summary

    cluster = load_inventory(inventory, profile)
    names = _split_hosts(hosts)
    _check_hosts(cluster, names)
    options = UpOptions(hosts=names, rolling=rolling, yes=yes, accept_new_host_keys=accept_new_host_keys, wheelhouse=wheelhouse, show_diff=show_diff)
    result = run_up(cluster, options, Progress(), _confirm(yes))
    render_up_summary(result)
    if result.interrupted:
        half = [f"{o.name} (at {o.step})" for o in result.outcomes.values() if o.status == "interrupted"]
        left = f"left half-done: {', '.join(half)}" if half else "no host was changed"
        click.echo(f"interrupted (Ctrl-C): {left}. Run `stackctl up` again: it resumes from what each host has.", err=True)
        sys.exit(130)
    if not result.ok:
        sys.exit(1)


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@ACCEPT_KEYS
def status(inventory, profile, hosts, as_json, accept_new_host_keys):
    """Every host, program, engine and the router, with live engine metrics.

    Exit code 0: healthy; 1: degraded; 2: a host is unreachable.
    """
    from .render import render_status
    from .status import cluster_status, exit_code

    cluster = load_inventory(inventory, profile)
    names = _split_hosts(hosts)
    _check_hosts(cluster, names)
    result = cluster_status(cluster, names, accept_new_host_keys)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render_status(result)
    sys.exit(exit_code(result))


@cli.command()
@INVENTORY
@PROFILE
@HOSTS
@click.option("--purge", is_flag=True, help="Also delete each host's deploy dir (venv, configs, logs, secrets).")
@ACCEPT_KEYS
def down(inventory, profile, hosts, purge, accept_new_host_keys):
    """Stop every program and supervisord on the hosts."""
    from .ops import down as run_down

    cluster = load_inventory(inventory, profile)
    names = _split_hosts(hosts)
    _check_hosts(cluster, names)
    _report_hosts(run_down(cluster, names, purge, accept_new_host_keys), "stopped" + (" and purged" if purge else ""))


@cli.command()
@INVENTORY
@click.argument("host")
@click.argument("program", required=False)
@click.option("-n", "lines", default=50, show_default=True, help="Lines to show.")
@click.option("-f", "follow", is_flag=True, help="Keep following the log.")
@ACCEPT_KEYS
def logs(inventory, host, program, lines, follow, accept_new_host_keys):
    """Show a program's log on a host (all its programs when PROGRAM is omitted)."""
    from .ops import logs as run_logs

    cluster = load_inventory(inventory)
    _check_hosts(cluster, [host])
    run_logs(cluster, host, program, lines, follow, accept_new_host_keys)


@cli.command()
@INVENTORY
@click.argument("hosts", required=False)
@PROFILE
@click.option("--program", default=None, help="Only this program (e.g. engine-0, router).")
@ACCEPT_KEYS
def restart(inventory, hosts, profile, program, accept_new_host_keys):
    """Restart programs on the hosts (all hosts when HOSTS is omitted)."""
    from .ops import restart as run_restart

    cluster = load_inventory(inventory, profile)
    names = _split_hosts(hosts)
    _check_hosts(cluster, names)
    _report_hosts(run_restart(cluster, names, program, accept_new_host_keys), "restarted")


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
        raise StackctlError(f"--qps {value}: give numbers separated by commas, e.g. --qps 0.5,1,2.", exit_code=2)


@cli.command()
@INVENTORY
@click.option("--compare", default="naive,optimized", show_default=True, help="Profiles to measure, in order (the first is the baseline of the ratios).")
@click.option("--scenario", "scenario_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Workload scenario YAML (default: the reference workload).")
@click.option("--qps", default=None, help="QPS points, comma-separated (default: the scenario's).")
@click.option("--users", type=int, default=None, help="Concurrent users (default: the scenario's).")
@click.option("--duration", "duration_s", type=float, default=None, help="Seconds measured per QPS point.")
@click.option("--warmup", "warmup_s", type=float, default=None, help="Warm-up seconds before the points.")
@click.option("--availability", "availability_s", type=float, default=None, help="Instead of the sweep: probe the router once a second for this many seconds under load.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"), show_default=True, help="Where the CSV, JSON, markdown table and plots go.")
@click.option("--yes", "-y", is_flag=True, help="Deploy each profile without asking.")
@ACCEPT_KEYS
@click.option("--wheelhouse", type=click.Path(file_okay=False, path_type=Path), default=None, help="As for `up`.")
def bench(inventory, compare, scenario_path, qps, users, duration_s, warmup_s, availability_s, out_dir, yes, accept_new_host_keys, wheelhouse):
    """Naive-versus-optimized multi-round QA benchmark: deploy each profile, sweep QPS, report."""
    from .benchcmd import BenchOptions, run_bench
    from .deploy import UpOptions

    profiles = [p.strip() for p in compare.split(",") if p.strip()]
    if not profiles:
        raise StackctlError("--compare needs at least one profile name.", exit_code=2)
    options = BenchOptions(
        inventory=inventory, profiles=profiles, out_dir=out_dir, scenario_path=scenario_path, qps=_floats(qps),
        users=users, duration_s=duration_s, warmup_s=warmup_s, availability_s=availability_s,
        up_options=UpOptions(yes=yes, accept_new_host_keys=accept_new_host_keys, wheelhouse=wheelhouse),
    )
    paths = run_bench(options, _confirm(yes), click.echo)
    summary = paths.get("summary_md") or next((p for p in paths.values() if str(p).endswith(".md")), None)
    if summary:
        click.echo(Path(summary).read_text())
    click.echo("results:")
    for path in paths.values():
        click.echo(f"  {path}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def sim(ctx: click.Context) -> None:
    """Run the vLLM simulator engine (takes vLLM's server flags; --help for the list)."""
    from .sim.__main__ import main as sim_main

    sys.exit(sim_main(list(ctx.args)))


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The router.yaml that `up` renders.")
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
