"""What a host has now, gathered in one round trip by running stackctl/probe.py on it."""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .connect import Connector, q
from .plan import HostPlan

# The probe travels inside the command line (compressed), not on stdin: Fabric and invoke feed
# stdin one character per polling interval, which costs seconds for a few kilobytes.
_PROBE_PACKED = base64.b64encode(zlib.compress((Path(__file__).parent / "probe.py").read_bytes(), 9)).decode()
_PROBE_LOADER = f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{_PROBE_PACKED}')))"


def run_probe(conn: Connector, interpreter: str, request: dict, timeout: float | None = 120) -> object:
    """Run one probe action on the host; its JSON answer."""
    result = conn.run(f"{q(interpreter)} -c {q(_PROBE_LOADER)} {q(json.dumps(request))}", timeout=timeout)
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class Facts:
    raw: dict
    files: dict = field(default_factory=dict)  # path -> {"sha256", "mode"}
    stale_program_files: list[str] = field(default_factory=list)

    @property
    def supervisor_running(self) -> bool:
        return self.raw["supervisor"]["running"]

    def program_state(self, name: str) -> str | None:
        return self.raw["supervisor"]["programs"].get(name, {}).get("state")

    @property
    def packages(self) -> dict | None:
        return self.raw.get("packages")


def bootstrap_interpreter(plan: HostPlan) -> str:
    """The interpreter that can run the probe before any venv exists."""
    return plan.python if plan.venv is None else plan.host.python


def package_name(requirement: str) -> str:
    for sep in ("==", ">=", "<=", "~=", ">", "<"):
        if sep in requirement:
            return requirement.split(sep, 1)[0].strip()
    return requirement.strip()


def gather(conn: Connector, plan: HostPlan, needs_gpus: bool) -> Facts:
    conf_dir = f"{plan.dirs['supervisor']}/conf.d"
    request = {
        "action": "facts",
        "deploy_dir": plan.deploy_dir,
        "python": plan.python,
        "files": [f.path for f in plan.files],
        "secrets": [s.path for s in plan.secrets],
        "packages": [package_name(p) for p in plan.packages] + plan.remove_packages,
        "installed_marker": f"{plan.dirs['wheels']}/installed.txt",
        "model_path": plan.model.remote_path if plan.model and plan.model.action != "none" else None,
        "supervisor_conf": plan.supervisor_conf,
        "supervisor_pidfile": f"{plan.dirs['run']}/supervisord.pid",
        "gpus": needs_gpus,
    }
    raw = run_probe(conn, bootstrap_interpreter(plan), request)
    listing = conn.run(f"ls -1 {q(conf_dir)} 2>/dev/null || true").stdout.split()
    planned = {f.path for f in plan.files}
    stale = [f"{conf_dir}/{name}" for name in listing if name.endswith(".conf") and f"{conf_dir}/{name}" not in planned]
    return Facts(raw=raw, files=raw["files"], stale_program_files=stale)
