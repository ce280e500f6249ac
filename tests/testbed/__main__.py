"""By hand: ``python -m tests.testbed up N [--bastion]`` / ``down`` / ``cleanup-stale`` / ``list``.

``up`` leaves the hosts running after it exits and writes their description (hosts, ssh block,
paths) as JSON to --json (default ./testbed.json); ``down`` removes every kept run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tests.testbed.netns import Testbed, cleanup_stale, environment_problem, kept_runs


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    testbed = Testbed(
        args.hosts, bastion=args.bastion, deploy_dir=args.deploy_dir, keep=True
    ).start()
    description = testbed.describe()
    Path(args.json).write_text(json.dumps(description, indent=2) + "\n")
    if args.inventory:
        testbed.write_inventory(args.inventory)
    print(
        f"testbed {testbed.run_id} up in {time.monotonic() - started:.2f}s; bridge {testbed.bridge} "
        f"({testbed.root_address}); dir {testbed.dir}"
    )
    for host in testbed.all_hosts:
        via = f"  via {host.proxy_jump}" if host.proxy_jump else ""
        print(f"  {host.name:8} {host.address:15} netns {host.netns}{via}")
    print(f"ssh -F {testbed.ssh_config} {testbed.all_hosts[0].name}")
    print(f"described in {args.json}; remove with: python -m tests.testbed down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    removed = cleanup_stale(include_kept=True)
    print("\n".join(removed) or "nothing to remove")
    return 0


def cmd_cleanup_stale(args: argparse.Namespace) -> int:
    removed = cleanup_stale(include_kept=args.all)
    print("\n".join(removed) or "no stale testbed leftovers")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for state in kept_runs():
        print(
            state["run_id"],
            state["dir"],
            " ".join(h["name"] + "=" + h["address"] for h in state["hosts"]),
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create N hosts and leave them running")
    up.add_argument("hosts", type=int)
    up.add_argument("--bastion", action="store_true", help="hosts reachable only through a bastion")
    up.add_argument("--deploy-dir", default="/opt/stackctl")
    up.add_argument("--json", default="testbed.json", help="where to write the description")
    up.add_argument("--inventory", help="also write an inventory skeleton here")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="remove every testbed left running by 'up'").set_defaults(
        func=cmd_down
    )
    stale = sub.add_parser(
        "cleanup-stale", help="remove leftovers of crashed runs (by name prefix)"
    )
    stale.add_argument("--all", action="store_true", help="also remove runs kept by 'up'")
    stale.set_defaults(func=cmd_cleanup_stale)
    sub.add_parser("list", help="show runs kept by 'up'").set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    problem = environment_problem()
    if problem:
        print(f"testbed unavailable: {problem}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
