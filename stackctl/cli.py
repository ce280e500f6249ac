"""The `stackctl` command line: parse arguments, call the library, render the result."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import StackctlError
from .inventory import Cluster, load_inventory
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
