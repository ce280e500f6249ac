"""Diff a host's facts against its plan, and apply the difference idempotently.

Each change is one small operation; nothing is touched that already matches the plan, so a
second `up` with nothing changed does nothing and restarts nothing. Programs are restarted
only when something they depend on changed: their supervisor section (``supervisorctl
update``), their LMCache file or the packages (restart), or, for the router, its config file
(SIGHUP, which reloads engines without dropping requests).
"""

from __future__ import annotations

import difflib
import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from . import hostchecks
from .connect import Connector, q
from .errors import DeployError
from .facts import Facts, run_probe
from .inventory import Cluster
from .models import ModelDistributor
from .parallel import Cancellation
from .plan import HostPlan, ProgramSpec, SecretSpec
from .privilege import own_dir_command
from .wheels import package_name, requires_stackctl, stackctl_wheel, wheels_needed

GIB = hostchecks.GIB
MEMORY_MARGIN_GIB = 8  # beyond LMCache's CPU offload: vLLM's own host memory and the OS


@dataclass
class Change:
    kind: str  # user | owner | venv | packages | model | secret | file | remove | unit | enable | supervisord | restart | reload | start
    target: str
    detail: str = ""
    content_diff: str = ""  # a changed file's unified diff, host -> planned (``up --diff``)


@dataclass
class HostDiff:
    plan: HostPlan
    facts: Facts
    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refusals: nothing is applied on this host
    warnings: list[str] = field(default_factory=list)  # shown with the diff, not blocking

    def has(self, kind: str) -> bool:
        return any(c.kind == kind for c in self.changes)


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _requirement_satisfied(requirement: str, installed: str | None, stackctl_marker: str | None, stackctl_wheel_sha: str | None) -> bool:
    if installed is None:
        return False
    requirement = Requirement(requirement)
    if requirement.name == "stackctl":
        return stackctl_wheel_sha is not None and stackctl_marker == stackctl_wheel_sha
    return requirement.specifier.contains(installed, prereleases=True)


def secret_content(cluster: Cluster, secret: SecretSpec, value: str) -> str:
    """What a secret file holds: the variable's value, except the router's API keys, which the
    inventory gives comma-separated and the router reads one key a line."""
    if secret.env_var == cluster.router.get("api_keys_env") and Path(secret.path).name == "router_api_keys":
        return "".join(f"{key.strip()}\n" for key in value.split(",") if key.strip())
    return value


def compute_diff(cluster: Cluster, plan: HostPlan, facts: Facts, secrets: dict[str, str], stackctl_wheel_sha: str | None,
                 weights_bytes: int | None = None) -> HostDiff:
    """What must change on this host to match the plan (pure: no I/O). ``weights_bytes``: the
    size of the model the host still needs (`models.model_bytes`), None when unknown."""
    diff = HostDiff(plan, facts)
    problems, diff.warnings = hostchecks.check_host(plan, facts, weights_bytes)
    diff.problems += problems
    if facts.partial:  # the host's Python cannot run the probe: nothing else is known
        return diff
    _check_host(cluster, plan, facts, diff)
    _account_changes(plan, facts, diff)
    if plan.venv and not facts.raw["venv_python"]:
        diff.changes.append(Change("venv", plan.venv, f"create with {plan.host.python}"))
    installed = facts.packages or {}
    missing = [
        r for r in plan.packages
        if not _requirement_satisfied(r, installed.get(package_name(r)), facts.raw.get("installed_marker"), stackctl_wheel_sha)
    ]
    unwanted = [name for name in plan.remove_packages if installed.get(name)]
    what = ([f"install {' '.join(missing)}"] if missing else []) + ([f"remove {' '.join(unwanted)}"] if unwanted else [])
    if what:
        diff.changes.append(Change("packages", plan.venv or plan.python, "; ".join(what)))
    if plan.model and plan.model.action in ("upload", "download") and not facts.raw.get("model_present"):
        how = f"upload from {plan.model.local_source}" if plan.model.action == "upload" else "download from the Hugging Face Hub"
        if cluster.model.get("distribute") == "peer":
            how += ", or copy from an engine host that has it"
        partial = (facts.raw.get("model") or {}).get("partial_bytes")
        if partial:
            how += f"; resumes the {partial / GIB:.1f} GiB an earlier try left"
        diff.changes.append(Change("model", plan.model.remote_path, how))
    for secret in plan.secrets:
        if facts.raw["secrets"].get(secret.path) != sha256(secret_content(cluster, secret, secrets.get(secret.env_var, ""))):
            diff.changes.append(Change("secret", secret.path, f"{secret.purpose} from ${secret.env_var} (mode 0600, value not shown)"))
    changed_files = {c.target for c in diff.changes if c.kind == "secret"}
    for spec in plan.files:
        have = facts.files.get(spec.path) or {}
        if have.get("sha256") != sha256(spec.content) or have.get("mode") != spec.mode:
            changed_files.add(spec.path)
            detail = "new" if not have.get("sha256") else ("mode" if have.get("sha256") == sha256(spec.content) else "changed")
            diff.changes.append(Change("file", spec.path, detail))
    for path in facts.stale_program_files:
        diff.changes.append(Change("remove", path, "program no longer planned"))
    use_unit = uses_systemd(plan, facts)
    if use_unit:
        systemd = facts.raw["systemd"]
        if systemd.get("unit_sha256") != sha256(unit_content(plan)):
            diff.changes.append(Change("unit", plan.system_unit_path, "changed (applies at its next start)" if systemd.get("unit_sha256") else "new"))
        if systemd.get("enabled") != "enabled":
            diff.changes.append(Change("enable", plan.unit_name, "start supervisord at boot"))
    if not facts.supervisor_running:
        diff.changes.append(Change("supervisord", plan.supervisor_conf, f"start with systemctl ({plan.unit_name})" if use_unit else "start"))
    elif use_unit and facts.raw["systemd"].get("active") != "active":
        diff.changes.append(Change("supervisord", plan.supervisor_conf, f"restart under systemd ({plan.unit_name}): it was started outside it"))
    else:
        _program_changes(plan, facts, diff, changed_files, packages_changed=bool(missing or unwanted))
    return diff


def uses_systemd(plan: HostPlan, facts: Facts) -> bool:
    """supervisord runs as the cluster's systemd unit: an SSH host where systemd runs."""
    return bool(plan.unit_name and (facts.raw.get("systemd") or {}).get("present"))


def unit_content(plan: HostPlan) -> str:
    return next(f.content for f in plan.files if f.path == plan.unit_file)


def _account_changes(plan: HostPlan, facts: Facts, diff: HostDiff) -> None:
    """The service account and a deploy dir it owns (made as root: its parent, e.g. /opt, is root's)."""
    account = facts.raw.get("account") or {}
    if not account.get("manage"):
        return
    if not account["exists"]:
        diff.changes.append(Change("user", account["user"], f"create system account (home {plan.deploy_dir}, no login shell)"))
    owner = facts.raw.get("deploy_dir_uid")
    if owner is None:
        diff.changes.append(Change("owner", plan.deploy_dir, f"create, owned by {account['user']}"))
    elif owner != account["uid"]:
        diff.changes.append(Change("owner", plan.deploy_dir, f"give it and everything in it to {account['user']} (chown -R)"))


def _program_changes(plan: HostPlan, facts: Facts, diff: HostDiff, changed_files: set[str], packages_changed: bool) -> None:
    for program in plan.programs:
        conf_changed = plan.program_file(program.name) in changed_files
        state = facts.program_state(program.name)
        if conf_changed:
            diff.changes.append(Change("restart", program.name, "its supervisor program changed"))
        elif packages_changed:
            diff.changes.append(Change("restart", program.name, "packages changed"))
        elif any(path in changed_files for path in _program_inputs(plan, program)):
            if program.kind == "router":
                diff.changes.append(Change("reload", program.name, "router config changed (SIGHUP, no restart)"))
            else:
                diff.changes.append(Change("restart", program.name, "its configuration changed"))
        elif state not in ("RUNNING", "STARTING"):
            diff.changes.append(Change("start", program.name, f"it is {state or 'not loaded'}"))


def _program_inputs(plan: HostPlan, program: ProgramSpec) -> list[str]:
    """Files a program reads at start (besides its supervisor section); the router also
    re-reads its API keys file on SIGHUP."""
    keys = [s.path for s in plan.secrets if program.kind == "router" and s.path == plan.router_keys_file]
    secret_files = {s.path for s in plan.secrets}  # engine.env secrets: read by the command at start
    return [arg for arg in program.command if arg.startswith(plan.dirs["config"]) or arg in secret_files] + [
        v for v in program.environment.values() if str(v).startswith(plan.dirs["config"])
    ] + keys


def _check_host(cluster: Cluster, plan: HostPlan, facts: Facts, diff: HostDiff) -> None:
    host = plan.host
    settings = host.engine
    engines_running = any(facts.program_state(p.name) == "RUNNING" for p in plan.programs if p.kind == "engine")
    if host.runs_engines and settings["kind"] == "vllm":
        lmcache = settings["lmcache"]
        if lmcache["enabled"] and lmcache["mode"] == "local" and not engines_running:
            need = len(host.engines) * lmcache["cpu_offload_gb"] * GIB + MEMORY_MARGIN_GIB * GIB
            have = facts.raw.get("mem_available_bytes") or 0
            if have < need:
                diff.problems.append(
                    f"not enough free memory: LMCache offload needs {len(host.engines)} x {lmcache['cpu_offload_gb']} GB "
                    f"plus a {MEMORY_MARGIN_GIB} GB margin = {need / GIB:.0f} GiB, the host has {have / GIB:.1f} GiB available. "
                    "Lower engine.lmcache.cpu_offload_gb for this host or free memory."
                )
    for program in plan.programs:
        if program.port in facts.raw["listening_ports"] and facts.program_state(program.name) not in ("RUNNING", "STARTING"):
            diff.problems.append(f"port {program.port} (for {program.name}) is already taken by another process on this host; stop it or change the port in the inventory.")
    model_facts = facts.raw.get("model") or {}
    if plan.model and plan.model.action == "present" and not facts.raw.get("model_present"):
        why = "; ".join(model_facts.get("problems") or ["it has no config.json"])
        diff.problems.append(f"model.path {plan.model.remote_path} is not a complete model on this host ({why}); copy the weights there, or set model.source to upload them.")
    if plan.model and plan.model.action == "upload" and not facts.raw.get("model_present") and "model" in facts.raw and not model_facts.get("rsync"):
        diff.problems.append("rsync is not installed, and `up` copies model.source here with it (resumable copies); "
                             "install it on this host (Debian/Ubuntu: apt install rsync), then run `up` again.")


def attach_content_diffs(conn: Connector, diff: HostDiff) -> None:
    """Read each changed file back from the host and keep its unified diff against the plan.

    Planned files never hold secrets (those are separate 0600 files, never read back), so the
    diff can be shown as is."""
    planned = {f.path: f.content for f in diff.plan.files}
    for change in diff.changes:
        if change.kind == "file" and change.detail == "changed":
            current = conn.run(f"cat {q(change.target)}", check=False).stdout
            lines = difflib.unified_diff(current.splitlines(keepends=True), planned[change.target].splitlines(keepends=True),
                                         fromfile=f"{change.target} (on the host)", tofile=f"{change.target} (planned)")
            change.content_diff = "".join(lines)


def format_diff(diff: HostDiff) -> str:
    name = diff.plan.host.name
    warnings = [f"  warning: {w}" for w in diff.warnings]
    if diff.problems:
        return "\n".join([f"{name}: cannot deploy:"] + [f"  ! {p}" for p in diff.problems] + warnings)
    if not diff.changes:
        return "\n".join([f"{name}: no changes"] + warnings)
    lines = [f"{name}: {len(diff.changes)} change(s)"]
    for change in diff.changes:
        lines.append(f"  {_SYMBOL.get(change.kind, '~')} {change.kind:<11} {change.target}  ({change.detail})")
        lines.extend(f"      {line}" for line in change.content_diff.splitlines())
    return "\n".join(lines + warnings)


_SYMBOL = {"user": "+", "owner": "~", "unit": "~", "enable": "+", "file": "~", "remove": "-", "venv": "+", "packages": "+", "model": "+", "secret": "~", "supervisord": "+", "restart": "↻", "reload": "↻", "start": "▶"}


# --------------------------------------------------------------------------- applying


class Applier:
    """Applies one host's diff, step by step, reporting progress through ``report(step)``."""

    def __init__(self, conn: Connector, cluster: Cluster, diff: HostDiff, secrets: dict[str, str], wheels: list[Path], offline: bool = False, report=lambda step: None, cancellation: Cancellation | None = None, models: ModelDistributor | None = None):
        self.conn = conn
        self.cluster = cluster
        self.diff = diff
        self.plan = diff.plan
        self.secrets = secrets
        self.wheels = wheels
        self.offline = offline  # install only from the uploaded wheelhouse (air-gapped hosts)
        self.report = report
        self.cancellation = cancellation or Cancellation()  # Ctrl-C: no new step starts
        self.models = models  # the run's ModelDistributor, shared by its hosts (None: this host alone)
        self.step = "start"

    def _do(self, step: str) -> None:
        self.cancellation.check()
        self.step = step
        self.report(step)

    def run(self, command: str, timeout: float | None = None, hangup: bool = False):
        """``hangup`` for long steps (venv, pip, downloads): Ctrl-C ends them on the host too."""
        return self.conn.run(command, timeout=timeout, hangup=hangup)

    def apply(self) -> None:
        self.prepare()
        self.start()

    def prepare(self) -> None:
        """Everything but (re)starting programs: directories, venv, packages, model, secrets, files."""
        plan, diff = self.plan, self.diff
        if diff.has("user"):
            self._do("service user")
            self.conn.create_service_user(plan.deploy_dir)
        for change in diff.changes:
            if change.kind == "owner":
                self._do("deploy dir")
                existed = self.diff.facts.raw.get("deploy_dir_uid") is not None
                self.conn.run(own_dir_command(plan.deploy_dir, self.diff.facts.raw["account"]["user"], recursive=existed), as_root=True, timeout=600)
        self._do("directories")
        dirs = " ".join(q(d) for d in [plan.deploy_dir, *plan.dirs.values(), plan.program_dir, *self._model_parents()])
        self.run(f"mkdir -p {dirs} && chmod 700 {q(plan.dirs['secrets'])}")
        if diff.has("venv"):
            self._do("venv")
            self.run(f"{q(plan.host.python)} -m venv {q(plan.venv)}", timeout=300, hangup=True)
        if diff.has("packages"):
            self._install_packages()
        for change in diff.changes:
            if change.kind == "secret":
                self._do("secrets")
                secret = next(s for s in plan.secrets if s.path == change.target)
                self.conn.put_bytes(secret_content(self.cluster, secret, self.secrets[secret.env_var]).encode(), secret.path, 0o600)
        if diff.has("model"):  # after the secrets: a download reads the Hugging Face token
            self._install_model()
        self._do("configs")
        files = {f.path: f for f in plan.files}
        for change in diff.changes:
            if change.kind == "file":
                spec = files[change.target]
                self.conn.put_bytes(spec.content.encode(), spec.path, spec.mode)
            elif change.kind == "remove":
                self.run(f"rm -f {q(change.target)}")
        self._install_unit()

    def start(self) -> None:
        """Make supervisord and its programs match: start, update, restart or reload them."""
        self._supervise()

    def _install_unit(self) -> None:
        """Install the unit as root from the planned text (never from the service user's copy
        in the deploy dir, which that user could have changed), and enable it."""
        plan = self.plan
        if self.diff.has("unit"):
            self._do("systemd unit")
            path, tmp = plan.system_unit_path, f"{plan.system_unit_path}.stackctl-tmp"
            self.conn.run(f"umask 022 && printf %s {q(unit_content(plan))} > {q(tmp)} && mv -f -- {q(tmp)} {q(path)} && systemctl daemon-reload",
                          as_root=True, timeout=120)
        if self.diff.has("enable"):
            self._do("systemd enable")
            self.conn.run(f"systemctl enable {q(plan.unit_name)}", as_root=True, timeout=120)

    def _model_parents(self) -> list[str]:
        model = self.plan.model
        if model and model.remote_path and model.action in ("upload", "download"):
            return [str(Path(model.remote_path).parent)]
        return []

    def _install_packages(self) -> None:
        plan = self.plan
        self._do("packages")
        pip = f"{q(plan.python)} -m pip"
        requirements = []
        for requirement in plan.packages:
            if package_name(requirement) == "stackctl":
                continue
            requirements.append(requirement)
        index_args = ""
        if self.wheels:
            self._do("upload wheels")
            have = set(self.run(f"ls -1 {q(plan.dirs['wheels'])}").stdout.split())
            for wheel in wheels_needed(self.wheels, plan.packages):
                if wheel.name not in have:
                    self.conn.put_file(wheel, f"{plan.dirs['wheels']}/{wheel.name}")
            index_args = ("--no-index " if self.offline else "") + f"--find-links {q(plan.dirs['wheels'])}"
            self._do("packages")
        ours = stackctl_wheel(self.wheels)
        needs_stackctl = requires_stackctl(plan.packages)
        if needs_stackctl:
            if ours is None:  # wheels_for_upload adds it whenever a plan needs it
                raise DeployError("no stackctl wheel to install: this is a bug in stackctl (wheels_for_upload was not asked for it); pass --wheelhouse DIR with a stackctl-*.whl in it meanwhile.")
            requirements.append(f"{plan.dirs['wheels']}/{ours.name}")
        # --no-compile: byte-compiling all of torch and vLLM up front costs minutes per host;
        # Python compiles the modules a program really imports when it first starts.
        self.run(f"{pip} install -q --disable-pip-version-check --no-compile {index_args} {' '.join(q(r) for r in requirements)}", timeout=3600, hangup=True)
        if plan.remove_packages:  # after the install, which may just have brought them back
            self.run(f"{pip} uninstall -q -y {' '.join(q(n) for n in plan.remove_packages)}", timeout=600, hangup=True)
        if needs_stackctl:
            if not self.diff.has("venv"):  # a rebuilt wheel of the same version: pip skipped it above
                self.run(f"{pip} install -q --disable-pip-version-check --no-deps --force-reinstall {index_args} {q(plan.dirs['wheels'] + '/' + ours.name)}", timeout=600, hangup=True)
            marker = hashlib.sha256(ours.read_bytes()).hexdigest()
            self.conn.put_bytes(marker.encode(), plan.installed_marker)

    def _install_model(self) -> None:
        """Through the run's ModelDistributor (stackctl/models.py): from the operator or the Hub,
        or from another engine host that already holds the weights (model.distribute: peer)."""
        models = self.models or ModelDistributor(self.cluster, {self.plan.host.name: self.diff}, {self.plan.host.name: self.conn})
        models.install(self.plan.host.name, self._do)

    def _supervise(self) -> None:
        plan, diff = self.plan, self.diff
        ctl = lambda *args: shlex.join(plan.supervisorctl(*args))  # noqa: E731
        if diff.has("supervisord"):
            self._do("start supervisord")
            if uses_systemd(plan, diff.facts):
                if diff.facts.supervisor_running:  # started before the unit existed: hand it over
                    pid = int(diff.facts.raw["supervisor"]["pid"])
                    self.conn.run(f"{ctl('shutdown')}; for i in $(seq 1 600); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.5; done; exit 1", timeout=400)
                self.conn.run(f"systemctl restart {q(plan.unit_name)}", as_root=True, timeout=120)
            else:
                self.run(shlex.join(plan.supervisord()))
            return
        supervisor_dir = plan.dirs["supervisor"] + "/"
        if any(c.kind in ("file", "remove") and c.target.startswith(supervisor_dir) for c in diff.changes):
            self._do("supervisor update")
            self.run(f"{ctl('reread')} && {ctl('update')}")
        restart = [c.target for c in diff.changes if c.kind == "restart" and not self._updated_by_supervisor(c.target)]
        if restart:
            self._do("restart " + ",".join(restart))
            self.run(ctl("restart", *restart), timeout=600)
        for change in diff.changes:
            if change.kind == "reload":
                self._do("reload router")
                self.run(ctl("signal", "HUP", change.target))
            elif change.kind == "start":
                self._do(f"start {change.target}")
                self.conn.run(ctl("start", change.target), check=False, timeout=600)

    def _updated_by_supervisor(self, program: str) -> bool:
        """`supervisorctl update` already restarted a program whose section changed."""
        return any(c.kind == "file" and c.target == self.plan.program_file(program) for c in self.diff.changes)

    def wait_healthy(self, timeout: float) -> dict:
        urls = [p.health_url for p in self.plan.programs if p.kind == "engine" and p.health_url]
        health = {"healthy": [], "unhealthy": []}
        if urls:
            self._do("wait for engines")
            health = run_probe(self.conn, self.plan.python, {"action": "wait", "urls": urls, "timeout": timeout, "interval": 1.0}, timeout=timeout + 60)
        if not health["unhealthy"]:
            self._wait_running()
        return health

    def _wait_running(self) -> None:
        """Until supervisord calls every program RUNNING (up `startsecs`), so that `status`
        right after `up` shows them running with their pids, not STARTING."""
        programs = [p.name for p in self.plan.programs]
        if not programs:
            return
        self._do("wait for RUNNING")
        limit = max(p.startsecs for p in self.plan.programs) + 30
        status = shlex.join(self.plan.supervisorctl("status", *programs))
        # `supervisorctl status` exits 0 for STARTING too: read the states themselves.
        running = f"{status} | awk '{{n++}} $2 != \"RUNNING\" {{bad=1}} END {{exit bad || n != {len(programs)}}}'"
        result = self.conn.run(f"for i in $(seq 1 {limit}); do {running} && exit 0; sleep 1; done; {status}; exit 1",
                               check=False, timeout=limit * 3 + 60)
        if not result.ok:
            raise DeployError(f"supervisord did not report every program RUNNING within {limit} s:\n{result.stdout.strip()}")

    def log_tail(self, program: str, lines: int = 30) -> str:
        path = self.plan.log_file(program)
        return self.conn.run(f"tail -n {int(lines)} {q(path)} 2>/dev/null || true").stdout
