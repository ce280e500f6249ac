"""What a host has now, gathered in one round trip by running stackctl/probe.py on it."""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .connect import CommandError, Connector, q
from .plan import HostPlan
from .wheels import package_name

# The probe travels inside the command line (compressed), not on stdin: Fabric and invoke feed
# stdin one character per polling interval, which costs seconds for a few kilobytes.
_PROBE_PACKED = base64.b64encode(zlib.compress((Path(__file__).parent / "probe.py").read_bytes(), 9)).decode()
# An interpreter too old to even parse the probe (before 3.6) still says which version it is, so
# that `up` refuses the host with that instead of a SyntaxError (this part parses on Python 2 too).
_TOO_OLD = ('import sys,json;sys.version_info<(3,6) and (sys.stdout.write(json.dumps({"partial":True,"python_info":'
            '{"version":list(sys.version_info[:3]),"executable":sys.executable}})+"\\n"),sys.exit(0));')
_PROBE_LOADER = f"{_TOO_OLD}import base64,zlib;exec(zlib.decompress(base64.b64decode('{_PROBE_PACKED}')))"


def run_probe(conn: Connector, interpreter: str, request: dict, timeout: float | None = 120, env: dict | None = None, hangup: bool = False) -> object:
    """Run one probe action on the host (with ``env`` set for it); its JSON answer (the last
    line of its output, which ``hangup``'s terminal merges with stderr)."""
    prefix = "".join(f"{k}={q(v)} " for k, v in (env or {}).items())
    result = conn.run(f"{prefix}{q(interpreter)} -c {q(_PROBE_LOADER)} {q(json.dumps(request))}", timeout=timeout, hangup=hangup)
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class Facts:
    raw: dict
    files: dict = field(default_factory=dict)  # path -> {"sha256", "mode"}
    stale_program_files: list[str] = field(default_factory=list)

    @property
    def supervisor_running(self) -> bool:
        return self.raw.get("supervisor", {}).get("running", False)

    def program_state(self, name: str) -> str | None:
        return self.raw.get("supervisor", {}).get("programs", {}).get(name, {}).get("state")

    @property
    def partial(self) -> bool:
        """Only the interpreter's facts: it is missing or too old to run the probe."""
        return bool(self.raw.get("partial"))

    @property
    def packages(self) -> dict | None:
        return self.raw.get("packages")


def bootstrap_interpreter(plan: HostPlan) -> str:
    """The interpreter that can run the probe before any venv exists."""
    return plan.python if plan.venv is None else plan.host.python


def account_facts(conn: Connector) -> dict:
    """Who should own the deploy dir, from the connection's preflight (privilege.py).

    ``manage``: `up` creates the account and the deploy dir as root (a service user, or
    become with programs running as the SSH user); otherwise the SSH user makes its own dirs."""
    identity = getattr(conn, "identity", None)
    if identity is None or identity.is_plain:
        return {"manage": False}
    if identity.service_user is None:
        return {"manage": identity.become, "user": identity.login_user, "uid": identity.login_uid, "exists": True}
    return {"manage": True, "user": identity.service_user, "uid": identity.service_uid, "exists": identity.service_uid is not None}


def supervisor_request(plan: HostPlan) -> dict:
    """The probe's ``facts`` request for supervisord and the unit only (`status`, `down`);
    `gather` adds the rest."""
    return {
        "action": "facts", "deploy_dir": plan.deploy_dir, "python": plan.python,
        "supervisor_conf": plan.supervisor_conf, "supervisor_pidfile": plan.supervisor_pidfile,
        "unit": plan.unit_name, "unit_path": plan.system_unit_path,
    }


def gather(conn: Connector, plan: HostPlan, needs_gpus: bool) -> Facts:
    conf_dir = plan.program_dir
    request = {
        **supervisor_request(plan),
        "files": [f.path for f in plan.files],
        "secrets": [s.path for s in plan.secrets],
        "packages": [package_name(p) for p in plan.packages] + plan.remove_packages,
        "installed_marker": plan.installed_marker,
        "model": {"path": plan.model.remote_path, "name": plan.model.name, "managed": plan.model.action in ("upload", "download")}
        if plan.model and plan.model.action != "none" else None,
        "gpus": needs_gpus,
        "engine_pgid_files": [plan.engine_pgid_file(p.name) for p in plan.programs if p.kind == "engine"],
    }
    interpreter = bootstrap_interpreter(plan)
    try:
        raw = run_probe(conn, interpreter, request)
    except CommandError as exc:
        if exc.result.exited not in (126, 127):  # the shell's "not found" / "not executable"
            raise
        output = (exc.result.stderr or exc.result.stdout).strip().splitlines()[-1:]
        missing = {"python": interpreter, "output": "".join(output), "exists": exc.result.exited == 126}
        return Facts(raw={"partial": True, "python_info": None, "python_missing": missing})
    if raw.get("partial"):
        return Facts(raw=raw)
    raw["account"] = account_facts(conn)
    listing = conn.run(f"ls -1 {q(conf_dir)} 2>/dev/null || true").stdout.split()
    planned = {f.path for f in plan.files}
    stale = [f"{conf_dir}/{name}" for name in listing if name.endswith(".conf") and f"{conf_dir}/{name}" not in planned]
    return Facts(raw=raw, files=raw["files"], stale_program_files=stale)
