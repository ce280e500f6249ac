"""Diff a host's facts against its plan, and apply the difference idempotently.

Each change is one small operation; nothing is touched that already matches the plan, so a
second `up` with nothing changed does nothing and restarts nothing. Programs are restarted
only when something they depend on changed: their supervisor section (``supervisorctl
update``), their LMCache file or the packages (restart), or, for the router, its config file
(SIGHUP, which reloads engines without dropping requests).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement

from . import hostchecks
from .connect import BecomeConnector, Connector, q
from .errors import DeployError
from .facts import Facts, FileFacts, ModelFacts, WaitAnswer, probe_wait, run_probe
from .hostchecks import uses_systemd
from .inventory import Cluster
from .models import ModelDistributor
from .parallel import Cancellation
from .plan import HostPlan, ProgramSpec, SecretSpec
from .privilege import own_dir_command
from .wheels import package_name, requires_stackctl, stackctl_wheel, wheels_needed

GIB = hostchecks.GIB
MEMORY_MARGIN_GIB = 8  # beyond LMCache's CPU offload: vLLM's own host memory and the OS


class ChangeKind(enum.StrEnum):
    """What one change does (docs/architecture.md's table); a str, so that output and
    comparisons with the plain names stay as they were."""

    USER = "user"  # create the service account
    OWNER = "owner"  # make the deploy dir the service user's
    VENV = "venv"
    PACKAGES = "packages"  # pip install / uninstall in the venv
    MODEL = "model"  # copy or download the weights
    SECRET = "secret"  # a 0600 secret file
    FILE = "file"  # a planned file (config, supervisor section, unit copy)
    REMOVE = "remove"  # a program section no longer planned
    UNIT = "unit"  # the systemd unit in /etc/systemd/system
    ENABLE = "enable"  # systemctl enable
    SUPERVISORD = "supervisord"  # start supervisord (directly or through the unit)
    RESTART = "restart"  # supervisorctl restart a program
    RELOAD = "reload"  # SIGHUP the router
    START = "start"  # supervisorctl start a program that is not running


@dataclass
class Change:
    kind: ChangeKind
    target: str
    detail: str = ""
    content_diff: str = ""  # a changed file's unified diff, host -> planned (``up --diff``)

    def __post_init__(self) -> None:
        self.kind = ChangeKind(
            self.kind
        )  # a plain name is accepted; a misspelt one is a ValueError


@dataclass
class HostDiff:
    plan: HostPlan
    facts: Facts
    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refusals: nothing is applied on this host
    warnings: list[str] = field(default_factory=list)  # shown with the diff, not blocking

    def has(self, kind: ChangeKind) -> bool:
        return any(c.kind == kind for c in self.changes)


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _requirement_satisfied(
    requirement: str,
    installed: str | None,
    stackctl_marker: str | None,
    stackctl_wheel_sha: str | None,
) -> bool:
    if installed is None:
        return False
    parsed = Requirement(requirement)
    if parsed.name == "stackctl":
        return stackctl_wheel_sha is not None and stackctl_marker == stackctl_wheel_sha
    return parsed.specifier.contains(installed, prereleases=True)


def secret_content(
    cluster: Cluster, secret: SecretSpec, value: str, secrets: Mapping[str, str] | None = None
) -> str:
    """What a secret file holds: the variable's value, except the router's API keys file,
    ``name key`` a line for every comma-separated key of each source
    (``RouterSettings.key_sources``: api_keys_env's are the client ``default``), which the
    router reads (``load_client_keys``); ``secrets``: every variable's value."""
    if Path(secret.path).name == "router_api_keys" and cluster.router.key_sources:
        values = secrets if secrets is not None else {secret.env_var: value}
        return "".join(
            f"{name} {key.strip()}\n"
            for name, var in cluster.router.key_sources
            for key in values.get(var, "").split(",")
            if key.strip()
        )
    return value


def compute_diff(
    cluster: Cluster,
    plan: HostPlan,
    facts: Facts,
    secrets: dict[str, str],
    stackctl_wheel_sha: str | None,
    weights_bytes: int | None = None,
) -> HostDiff:
    """What must change on this host to match the plan (pure: no I/O). ``weights_bytes``: the
    size of the model the host still needs (`models.model_bytes`), None when unknown."""
    diff = HostDiff(plan, facts)
    problems, diff.warnings = hostchecks.check_host(plan, facts, weights_bytes)
    diff.problems += problems
    if facts.partial:  # the host's Python cannot run the probe: nothing else is known
        return diff
    _check_host(cluster, plan, facts, diff)
    _account_changes(plan, facts, diff)
    if plan.venv and not facts.venv_python:
        diff.changes.append(Change(ChangeKind.VENV, plan.venv, f"create with {plan.host.python}"))
    packages_changed = _package_changes(plan, facts, diff, stackctl_wheel_sha)
    _model_change(cluster, plan, facts, diff)
    changed_files = _file_changes(cluster, plan, facts, diff, secrets)
    _supervisor_changes(plan, facts, diff, changed_files, packages_changed)
    return diff


def _package_changes(
    plan: HostPlan, facts: Facts, diff: HostDiff, stackctl_wheel_sha: str | None
) -> bool:
    """Requirements the venv does not satisfy, and packages to remove; whether there are any."""
    installed = facts.packages or {}
    missing = [
        r
        for r in plan.packages
        if not _requirement_satisfied(
            r, installed.get(package_name(r)), facts.installed_marker, stackctl_wheel_sha
        )
    ]
    unwanted = [name for name in plan.remove_packages if installed.get(name)]
    what = ([f"install {' '.join(missing)}"] if missing else []) + (
        [f"remove {' '.join(unwanted)}"] if unwanted else []
    )
    if what:
        diff.changes.append(Change(ChangeKind.PACKAGES, plan.venv or plan.python, "; ".join(what)))
    return bool(what)


def _model_change(cluster: Cluster, plan: HostPlan, facts: Facts, diff: HostDiff) -> None:
    """The weights, when `up` copies or downloads them and the host has no complete copy."""
    if not (plan.model and plan.model.action in ("upload", "download") and not facts.model_present):
        return
    how = (
        f"upload from {plan.model.local_source}"
        if plan.model.action == "upload"
        else "download from the Hugging Face Hub"
    )
    if cluster.model.distribute == "peer":
        how += ", or copy from an engine host that has it"
    partial = facts.model.partial_bytes if facts.model else None
    if partial:
        how += f"; resumes the {partial / GIB:.1f} GiB an earlier try left"
    assert plan.model.remote_path is not None  # plan._model_spec gives uploads and downloads one
    diff.changes.append(Change(ChangeKind.MODEL, plan.model.remote_path, how))


def _file_changes(
    cluster: Cluster, plan: HostPlan, facts: Facts, diff: HostDiff, secrets: dict[str, str]
) -> set[str]:
    """Secrets and planned files whose content or mode differ, program sections no longer
    planned; the paths written."""
    for secret in plan.secrets:
        if facts.secrets.get(secret.path) != sha256(
            secret_content(cluster, secret, secrets.get(secret.env_var, ""), secrets)
        ):
            diff.changes.append(
                Change(
                    ChangeKind.SECRET,
                    secret.path,
                    f"{secret.purpose} from {secret.source} (mode 0600, value not shown)",
                )
            )
    changed_files = {c.target for c in diff.changes if c.kind == ChangeKind.SECRET}
    for spec in plan.files:
        have = facts.files.get(spec.path) or FileFacts(None, None)
        if have.sha256 != sha256(spec.content) or have.mode != spec.mode:
            changed_files.add(spec.path)
            detail = (
                "new"
                if not have.sha256
                else ("mode" if have.sha256 == sha256(spec.content) else "changed")
            )
            diff.changes.append(Change(ChangeKind.FILE, spec.path, detail))
    for path in facts.stale_program_files:
        diff.changes.append(Change(ChangeKind.REMOVE, path, "program no longer planned"))
    return changed_files


def _supervisor_changes(
    plan: HostPlan, facts: Facts, diff: HostDiff, changed_files: set[str], packages_changed: bool
) -> None:
    """The systemd unit, supervisord itself, else its programs (restart, reload, start)."""
    use_unit = uses_systemd(plan, facts)
    if use_unit:
        # uses_systemd: the plan has a unit (unit_name, and so system_unit_path)
        assert plan.unit_name is not None and plan.system_unit_path is not None
        systemd = facts.systemd
        if systemd.unit_sha256 != sha256(unit_content(plan)):
            diff.changes.append(
                Change(
                    ChangeKind.UNIT,
                    plan.system_unit_path,
                    "changed (applies at its next start)" if systemd.unit_sha256 else "new",
                )
            )
        if systemd.enabled != "enabled":
            diff.changes.append(
                Change(ChangeKind.ENABLE, plan.unit_name, "start supervisord at boot")
            )
    if not facts.supervisor_running:
        diff.changes.append(
            Change(
                ChangeKind.SUPERVISORD,
                plan.supervisor_conf,
                f"start with systemctl ({plan.unit_name})" if use_unit else "start",
            )
        )
    elif use_unit and facts.systemd.active != "active":
        diff.changes.append(
            Change(
                ChangeKind.SUPERVISORD,
                plan.supervisor_conf,
                f"restart under systemd ({plan.unit_name}): it was started outside it",
            )
        )
    else:
        _program_changes(plan, facts, diff, changed_files, packages_changed=packages_changed)


def unit_content(plan: HostPlan) -> str:
    return next(f.content for f in plan.files if f.path == plan.unit_file)


def _account_changes(plan: HostPlan, facts: Facts, diff: HostDiff) -> None:
    """The service account and a deploy dir it owns (made as root: its parent, e.g. /opt, is root's)."""
    account = facts.account
    if not account.manage:
        return
    assert account.user is not None  # account_facts names the account it manages
    if not account.exists:
        diff.changes.append(
            Change(
                ChangeKind.USER,
                account.user,
                f"create system account (home {plan.deploy_dir}, no login shell)",
            )
        )
    owner = facts.deploy_dir_uid
    if owner is None:
        diff.changes.append(
            Change(ChangeKind.OWNER, plan.deploy_dir, f"create, owned by {account.user}")
        )
    elif owner != account.uid:
        diff.changes.append(
            Change(
                ChangeKind.OWNER,
                plan.deploy_dir,
                f"give it and everything in it to {account.user} (chown -R)",
            )
        )


def _program_changes(
    plan: HostPlan, facts: Facts, diff: HostDiff, changed_files: set[str], packages_changed: bool
) -> None:
    for program in plan.programs:
        conf_changed = plan.program_file(program.name) in changed_files
        state = facts.program_state(program.name)
        if conf_changed:
            diff.changes.append(
                Change(ChangeKind.RESTART, program.name, "its supervisor program changed")
            )
        elif packages_changed:
            diff.changes.append(Change(ChangeKind.RESTART, program.name, "packages changed"))
        elif any(path in changed_files for path in _program_inputs(plan, program)):
            if program.kind == "router":
                diff.changes.append(
                    Change(
                        ChangeKind.RELOAD,
                        program.name,
                        "router config changed (SIGHUP, no restart)",
                    )
                )
            else:
                diff.changes.append(
                    Change(ChangeKind.RESTART, program.name, "its configuration changed")
                )
        elif state not in ("RUNNING", "STARTING"):
            diff.changes.append(
                Change(ChangeKind.START, program.name, f"it is {state or 'not loaded'}")
            )


def _program_inputs(plan: HostPlan, program: ProgramSpec) -> list[str]:
    """Files a program reads at start (besides its supervisor section); the router also
    re-reads its API keys file on SIGHUP."""
    keys = [
        s.path
        for s in plan.secrets
        if program.kind == "router" and s.path in (plan.router_keys_file, plan.engine_key_file)
    ]
    secret_files = {
        s.path for s in plan.secrets
    }  # engine.env secrets: read by the command at start
    return (
        [
            arg
            for arg in program.command
            if arg.startswith(plan.dirs["config"]) or arg in secret_files
        ]
        + [v for v in program.environment.values() if str(v).startswith(plan.dirs["config"])]
        + keys
    )


def _check_host(cluster: Cluster, plan: HostPlan, facts: Facts, diff: HostDiff) -> None:
    host = plan.host
    settings = host.engine
    engines_running = any(
        facts.program_state(p.name) == "RUNNING" for p in plan.programs if p.kind == "engine"
    )
    if host.runs_engines and settings.is_vllm:
        lmcache = settings.lmcache
        if lmcache.local and not engines_running:
            need = len(host.engines) * lmcache.cpu_offload_gb * GIB + MEMORY_MARGIN_GIB * GIB
            have = facts.mem_available_bytes or 0
            if have < need:
                diff.problems.append(
                    f"not enough free memory: LMCache offload needs {len(host.engines)} x {lmcache.cpu_offload_gb} GB "
                    f"plus a {MEMORY_MARGIN_GIB} GB margin = {need / GIB:.0f} GiB, the host has {have / GIB:.1f} GiB available. "
                    "Lower engine.lmcache.cpu_offload_gb for this host or free memory."
                )
    for program in plan.programs:
        if program.port in facts.listening_ports and facts.program_state(program.name) not in (
            "RUNNING",
            "STARTING",
        ):
            diff.problems.append(
                f"port {program.port} (for {program.name}) is already taken by another process on this host; stop it or change the port in the inventory."
            )
    model_facts = facts.model or ModelFacts()
    if plan.model and plan.model.action == "present" and not facts.model_present:
        why = "; ".join(model_facts.problems or ["it has no config.json"])
        diff.problems.append(
            f"model.path {plan.model.remote_path} is not a complete model on this host ({why}); copy the weights there, or set model.source to upload them."
        )
    if (
        plan.model
        and plan.model.action == "upload"
        and not facts.model_present
        and facts.model is not None
        and not model_facts.rsync
    ):
        diff.problems.append(
            "rsync is not installed, and `up` copies model.source here with it (resumable copies); "
            "install it on this host (Debian/Ubuntu: apt install rsync), then run `up` again."
        )


def attach_content_diffs(conn: Connector, diff: HostDiff) -> None:
    """Read each changed file back from the host and keep its unified diff against the plan.

    Planned files never hold secrets (those are separate 0600 files, never read back), so the
    diff can be shown as is."""
    planned = {f.path: f.content for f in diff.plan.files}
    for change in diff.changes:
        if change.kind == ChangeKind.FILE and change.detail == "changed":
            current = conn.run(f"cat {q(change.target)}", check=False).stdout
            lines = difflib.unified_diff(
                current.splitlines(keepends=True),
                planned[change.target].splitlines(keepends=True),
                fromfile=f"{change.target} (on the host)",
                tofile=f"{change.target} (planned)",
            )
            change.content_diff = "".join(lines)


def format_diff(diff: HostDiff) -> str:
    name = diff.plan.host.name
    warnings = [f"  warning: {w}" for w in diff.warnings]
    if diff.problems:
        return "\n".join(
            [f"{name}: cannot deploy:"] + [f"  ! {p}" for p in diff.problems] + warnings
        )
    if not diff.changes:
        return "\n".join([f"{name}: no changes"] + warnings)
    lines = [f"{name}: {len(diff.changes)} change(s)"]
    for change in diff.changes:
        lines.append(
            f"  {_SYMBOL[change.kind]} {change.kind:<11} {change.target}  ({change.detail})"
        )
        lines.extend(f"      {line}" for line in change.content_diff.splitlines())
    return "\n".join(lines + warnings)


_SYMBOL = {
    ChangeKind.USER: "+",
    ChangeKind.OWNER: "~",
    ChangeKind.UNIT: "~",
    ChangeKind.ENABLE: "+",
    ChangeKind.FILE: "~",
    ChangeKind.REMOVE: "-",
    ChangeKind.VENV: "+",
    ChangeKind.PACKAGES: "+",
    ChangeKind.MODEL: "+",
    ChangeKind.SECRET: "~",
    ChangeKind.SUPERVISORD: "+",
    ChangeKind.RESTART: "↻",
    ChangeKind.RELOAD: "↻",
    ChangeKind.START: "▶",
}


# --------------------------------------------------------------------------- applying


class Applier:
    """Applies one host's diff, step by step, reporting progress through ``report(step)``."""

    def __init__(
        self,
        conn: Connector,
        cluster: Cluster,
        diff: HostDiff,
        secrets: dict[str, str],
        wheels: list[Path],
        offline: bool = False,
        report=lambda step: None,
        cancellation: Cancellation | None = None,
        models: ModelDistributor | None = None,
    ):
        self.conn = conn
        self.cluster = cluster
        self.diff = diff
        self.plan = diff.plan
        self.secrets = secrets
        self.wheels = wheels
        self.offline = offline  # install only from the uploaded wheelhouse (air-gapped hosts)
        self.report = report
        self.cancellation = cancellation or Cancellation()  # Ctrl-C: no new step starts
        self.models = (
            models  # the run's ModelDistributor, shared by its hosts (None: this host alone)
        )
        self.step = "start"
        # How each kind of change is applied (a diff's restarts go in one supervisorctl call: _restart).
        self._handlers: dict[ChangeKind, Callable[[Change], None]] = {
            ChangeKind.USER: self._create_user,
            ChangeKind.OWNER: self._own_deploy_dir,
            ChangeKind.VENV: self._create_venv,
            ChangeKind.PACKAGES: lambda _change: self._install_packages(),
            ChangeKind.SECRET: self._write_secret,
            ChangeKind.MODEL: lambda _change: self._install_model(),
            ChangeKind.FILE: self._write_file,
            ChangeKind.REMOVE: self._remove_file,
            ChangeKind.UNIT: self._install_unit,
            ChangeKind.ENABLE: self._enable_unit,
            ChangeKind.SUPERVISORD: self._start_supervisord,
            ChangeKind.RELOAD: self._reload,
            ChangeKind.START: self._start_program,
        }

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

    def _apply(self, *kinds: ChangeKind) -> None:
        """The diff's changes of these kinds, in the diff's order, each through its kind's handler."""
        for change in self.diff.changes:
            if change.kind in kinds:
                self._handlers[change.kind](change)

    def prepare(self) -> None:
        """Everything but (re)starting programs: the account and its deploy dir, directories, venv,
        packages, secrets, the model (after the secrets: a download reads the Hugging Face token),
        files, the systemd unit."""
        self._apply(ChangeKind.USER)
        self._apply(ChangeKind.OWNER)
        self._make_directories()
        for kind in (ChangeKind.VENV, ChangeKind.PACKAGES, ChangeKind.SECRET, ChangeKind.MODEL):
            self._apply(kind)
        self._do("configs")
        self._apply(ChangeKind.FILE, ChangeKind.REMOVE)
        self._apply(ChangeKind.UNIT)
        self._apply(ChangeKind.ENABLE)

    def start(self) -> None:
        """Make supervisord and its programs match: start supervisord (which starts them all), or
        update the changed sections, then restart, reload and start programs."""
        if self.diff.has(ChangeKind.SUPERVISORD):
            self._apply(ChangeKind.SUPERVISORD)
            return
        self._supervisor_update()
        self._restart()
        self._apply(ChangeKind.RELOAD, ChangeKind.START)

    def _ctl(self, *args: str) -> str:
        return shlex.join(self.plan.supervisorctl(*args))

    # ------------------------------------------------------------ one handler per change kind
    def _create_user(self, change: Change) -> None:
        self._do("service user")
        # A USER change comes from the connector's identity (facts.account_facts), which only a
        # BecomeConnector has (connect() always returns one).
        assert isinstance(self.conn, BecomeConnector)
        self.conn.create_service_user(self.plan.deploy_dir)

    def _own_deploy_dir(self, change: Change) -> None:
        self._do("deploy dir")
        existed = self.diff.facts.deploy_dir_uid is not None
        user = self.diff.facts.account.user
        assert user is not None  # an OWNER change is planned only for a managed account
        self.conn.run(
            own_dir_command(self.plan.deploy_dir, user, recursive=existed),
            as_root=True,
            timeout=600,
        )

    def _make_directories(self) -> None:
        plan = self.plan
        self._do("directories")
        dirs = " ".join(
            q(d)
            for d in [
                plan.deploy_dir,
                *plan.dirs.values(),
                plan.program_dir,
                *self._model_parents(),
                *sorted({str(PurePosixPath(f.path).parent) for f in plan.files}),
            ]
        )
        self.run(f"mkdir -p {dirs} && chmod 700 {q(plan.dirs['secrets'])}")

    def _create_venv(self, change: Change) -> None:
        self._do("venv")
        assert self.plan.venv is not None  # a VENV change is planned only for a plan with a venv
        self.run(
            f"{q(self.plan.host.python)} -m venv {q(self.plan.venv)}", timeout=300, hangup=True
        )

    def _write_secret(self, change: Change) -> None:
        self._do("secrets")
        secret = next(s for s in self.plan.secrets if s.path == change.target)
        self.conn.put_bytes(
            secret_content(
                self.cluster, secret, self.secrets[secret.env_var], self.secrets
            ).encode(),
            secret.path,
            0o600,
        )

    def _write_file(self, change: Change) -> None:
        spec = next(f for f in self.plan.files if f.path == change.target)
        self.conn.put_bytes(spec.content.encode(), spec.path, spec.mode)

    def _remove_file(self, change: Change) -> None:
        self.run(f"rm -f {q(change.target)}")

    def _install_unit(self, change: Change) -> None:
        """Install the unit as root from the planned text (never from the service user's copy
        in the deploy dir, which that user could have changed)."""
        plan = self.plan
        self._do("systemd unit")
        path, tmp = plan.system_unit_path, f"{plan.system_unit_path}.stackctl-tmp"
        assert path is not None  # a UNIT change is planned only where uses_systemd
        self.conn.run(
            f"umask 022 && printf %s {q(unit_content(plan))} > {q(tmp)} && mv -f -- {q(tmp)} {q(path)} && systemctl daemon-reload",
            as_root=True,
            timeout=120,
        )

    def _enable_unit(self, change: Change) -> None:
        self._do("systemd enable")
        unit = self.plan.unit_name
        assert unit is not None  # an ENABLE change is planned only where uses_systemd
        self.conn.run(f"systemctl enable {q(unit)}", as_root=True, timeout=120)

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
            index_args = (
                "--no-index " if self.offline else ""
            ) + f"--find-links {q(plan.dirs['wheels'])}"
            self._do("packages")
        ours = stackctl_wheel(self.wheels)
        needs_stackctl = requires_stackctl(plan.packages)
        if needs_stackctl:
            if ours is None:  # wheels_for_upload adds it whenever a plan needs it
                raise DeployError(
                    "no stackctl wheel to install: this is a bug in stackctl (wheels_for_upload was not asked for it); pass --wheelhouse DIR with a stackctl-*.whl in it meanwhile."
                )
            requirements.append(f"{plan.dirs['wheels']}/{ours.name}")
        # --no-compile: byte-compiling all of torch and vLLM up front costs minutes per host;
        # Python compiles the modules a program really imports when it first starts.
        self.run(
            f"{pip} install -q --disable-pip-version-check --no-compile {index_args} {' '.join(q(r) for r in requirements)}",
            timeout=3600,
            hangup=True,
        )
        if plan.remove_packages:  # after the install, which may just have brought them back
            self.run(
                f"{pip} uninstall -q -y {' '.join(q(n) for n in plan.remove_packages)}",
                timeout=600,
                hangup=True,
            )
        if needs_stackctl:
            assert ours is not None  # without it, the check above raised
            if not self.diff.has(
                ChangeKind.VENV
            ):  # a rebuilt wheel of the same version: pip skipped it above
                self.run(
                    f"{pip} install -q --disable-pip-version-check --no-deps --force-reinstall {index_args} {q(plan.dirs['wheels'] + '/' + ours.name)}",
                    timeout=600,
                    hangup=True,
                )
            marker = hashlib.sha256(ours.read_bytes()).hexdigest()
            self.conn.put_bytes(marker.encode(), plan.installed_marker)

    def _install_model(self) -> None:
        """Through the run's ModelDistributor (stackctl/models.py): from the operator or the Hub,
        or from another engine host that already holds the weights (model.distribute: peer)."""
        models = self.models or ModelDistributor(
            self.cluster, {self.plan.host.name: self.diff}, {self.plan.host.name: self.conn}
        )
        models.install(self.plan.host.name, self._do)

    def _start_supervisord(self, change: Change) -> None:
        plan, facts = self.plan, self.diff.facts
        self._do("start supervisord")
        if not uses_systemd(plan, facts):
            self.run(shlex.join(plan.supervisord()))
            return
        assert plan.unit_name is not None  # uses_systemd
        if facts.supervisor_running:  # started before the unit existed: hand it over
            assert facts.supervisor.pid is not None  # the probe gives a running one's pid
            pid = int(facts.supervisor.pid)
            self.conn.run(
                f"{self._ctl('shutdown')}; for i in $(seq 1 600); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.5; done; exit 1",
                timeout=400,
            )
        self.conn.run(f"systemctl restart {q(plan.unit_name)}", as_root=True, timeout=120)

    def _supervisor_update(self) -> None:
        """`supervisorctl reread` + `update` when a program section was written or removed."""
        supervisor_dir = self.plan.dirs["supervisor"] + "/"
        if any(
            c.kind in (ChangeKind.FILE, ChangeKind.REMOVE) and c.target.startswith(supervisor_dir)
            for c in self.diff.changes
        ):
            self._do("supervisor update")
            self.run(f"{self._ctl('reread')} && {self._ctl('update')}")

    def _restart(self) -> None:
        """The diff's restarts in one `supervisorctl restart` (but those `update` already did)."""
        restart = [
            c.target
            for c in self.diff.changes
            if c.kind == ChangeKind.RESTART and not self._updated_by_supervisor(c.target)
        ]
        if restart:
            self._do("restart " + ",".join(restart))
            self.run(self._ctl("restart", *restart), timeout=600)

    def _reload(self, change: Change) -> None:
        self._do("reload router")
        self.run(self._ctl("signal", "HUP", change.target))

    def _start_program(self, change: Change) -> None:
        self._do(f"start {change.target}")
        self.conn.run(self._ctl("start", change.target), check=False, timeout=600)

    def _updated_by_supervisor(self, program: str) -> bool:
        """`supervisorctl update` already restarted a program whose section changed."""
        return any(
            c.kind == ChangeKind.FILE and c.target == self.plan.program_file(program)
            for c in self.diff.changes
        )

    def wait_healthy(self, timeout: float) -> WaitAnswer:
        programs = {
            p.health_url: p.name for p in self.plan.programs if p.kind == "engine" and p.health_url
        }
        urls = list(programs)
        health: WaitAnswer = {"healthy": [], "unhealthy": [], "last": {}}
        if urls:
            self._do("wait for engines")
            supervised = (self.plan.supervisor_conf, programs)
            health = probe_wait(self.conn, self.plan.python, urls, timeout, 1.0, supervised)
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
        request = {
            "action": "supervisor_wait",
            "python": self.plan.python,
            "supervisor_conf": self.plan.supervisor_conf,
            "programs": programs,
            "timeout": limit,
        }
        answer = run_probe(self.conn, self.plan.python, request, timeout=limit + 60)
        assert isinstance(answer, dict)
        if not answer["running"]:
            states = ", ".join(
                f"{name} {state or 'not known to supervisord'}"
                for name, state in answer["states"].items()
            )
            raise DeployError(
                f"supervisord did not report every program RUNNING within {limit} s: {states}."
            )

    def log_tail(self, program: str, lines: int = 30) -> str:
        path = self.plan.log_file(program)
        return self.conn.run(f"tail -n {int(lines)} {q(path)} 2>/dev/null || true").stdout
