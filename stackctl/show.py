"""Human-readable views of plans (shared by `plan` and `up`'s change preview)."""

from __future__ import annotations

import shlex
from pathlib import Path

from .inventory import Cluster
from .plan import HostPlan

MASK = "********"


def format_host_plan(plan: HostPlan, with_files: bool = True) -> str:
    host = plan.host
    where = "local: this machine" if host.is_local else f"ssh: {host.address}"
    lines = [
        f"=== host {host.name} ({where}); roles: {', '.join(host.roles)}; deploy dir {plan.deploy_dir}"
    ]
    who = (
        f"programs run as {host.service_user} (a system account `up` creates)"
        if host.service_user
        else "programs run as the connecting user"
    )
    lines.append(
        who + (f"; privileged steps through sudo -n -u {host.become_user}" if host.become else "")
    )
    if plan.venv:
        lines.append(f"venv {plan.venv}: {' '.join(plan.packages)}")
    else:
        lines.append(f"no install: programs run with {plan.python}")
    if plan.model and plan.model.action != "none":
        source = {
            "upload": f"uploaded from {plan.model.local_source}",
            "present": "already on the host",
            "download": "downloaded from the Hugging Face Hub",
        }[plan.model.action]
        lines.append(f"model {plan.model.name}: {plan.model.remote_path} ({source})")
    for secret in plan.secrets:
        lines.append(
            f"secret {secret.purpose}: {secret.path} (mode 0600) <- {secret.source} = {MASK}"
        )
    for program in plan.programs:
        lines.append(f"program {program.name}: {program.description}")
        lines.append(f"  command: {shlex.join(program.command)}")
        for key, value in program.environment.items():
            lines.append(f"  env {key}={value}")
    if with_files:
        for spec in plan.files:
            lines.append(f"--- {spec.path} (mode {spec.mode:04o})")
            lines.append(spec.content.rstrip("\n"))
    return "\n".join(lines)


def write_plan_tree(plans: list[HostPlan], out_dir: Path) -> list[Path]:
    """Write each host's files under OUT/<host>/<absolute path>, plus OUT/<host>/PLAN.txt."""
    written = []
    for plan in plans:
        root = out_dir / plan.host.name
        for spec in plan.files:
            target = root / spec.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(spec.content)
            written.append(target)
        summary = root / "PLAN.txt"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(format_host_plan(plan, with_files=False) + "\n")
        written.append(summary)
    return written


def plan_document(cluster: Cluster, plans: list[HostPlan]) -> dict:
    """`plan -o json|yaml`: what the text view shows, as data. Secrets appear as the path and
    the variable they come from, never a value (planned files and environments hold none)."""

    def host(plan: HostPlan) -> dict:
        model = plan.model if plan.model and plan.model.action != "none" else None
        return {
            "host": plan.host.name,
            "address": None if plan.host.is_local else plan.host.address,
            "roles": list(plan.host.roles),
            "deploy_dir": plan.deploy_dir,
            "python": plan.python,
            "venv": plan.venv,
            "packages": list(plan.packages),
            "service_user": plan.host.service_user,
            "model": {"name": model.name, "path": model.remote_path, "action": model.action}
            if model
            else None,
            "secrets": [
                {
                    "purpose": s.purpose,
                    "path": s.path,
                    "from_env": None if s.generated else s.env_var,
                    "generated": s.generated,
                    **({"also_from_env": list(s.also_from)} if s.also_from else {}),
                }
                for s in plan.secrets
            ],
            "programs": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "description": p.description,
                    "command": list(p.command),
                    "environment": dict(p.environment),
                    "port": p.port,
                    "health_url": p.health_url,
                }
                for p in plan.programs
            ],
            "files": [
                {"path": f.path, "mode": f"{f.mode:04o}", "content": f.content} for f in plan.files
            ],
        }

    return {
        "cluster": cluster.name,
        "profile": cluster.profile,
        "router_url": cluster.router_url,
        "router_urls": cluster.router_urls,
        "hosts": [host(p) for p in plans],
    }
