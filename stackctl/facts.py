"""What a host has now, gathered in one round trip by running stackctl/probe.py on it."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict, cast

from .connect import CommandError, Connector, q
from .plan import HostPlan
from .wheels import package_name

# The probe travels inside the command line (compressed), not on stdin: Fabric and invoke feed
# stdin one character per polling interval, which costs seconds for a few kilobytes.
_PROBE_PACKED = base64.b64encode(
    zlib.compress((Path(__file__).parent / "probe.py").read_bytes(), 9)
).decode()
# An interpreter too old to even parse the probe (before 3.6) still says which version it is, so
# that `up` refuses the host with that instead of a SyntaxError (this part parses on Python 2 too).
_TOO_OLD = (
    'import sys,json;sys.version_info<(3,6) and (sys.stdout.write(json.dumps({"partial":True,"python_info":'
    '{"version":list(sys.version_info[:3]),"executable":sys.executable}})+"\\n"),sys.exit(0));'
)
_PROBE_LOADER = (
    f"{_TOO_OLD}import base64,zlib;exec(zlib.decompress(base64.b64decode('{_PROBE_PACKED}')))"
)


def run_probe(
    conn: Connector,
    interpreter: str,
    request: dict,
    timeout: float | None = 120,
    env: dict | None = None,
    hangup: bool = False,
) -> object:
    """Run one probe action on the host (with ``env`` set for it); its JSON answer (the last
    line of its output, which ``hangup``'s terminal merges with stderr)."""
    prefix = "".join(f"{k}={q(v)} " for k, v in (env or {}).items())
    result = conn.run(
        f"{prefix}{q(interpreter)} -c {q(_PROBE_LOADER)} {q(json.dumps(request))}",
        timeout=timeout,
        hangup=hangup,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


class HttpAnswer(TypedDict):
    """One URL's answer (probe.http_one); ``status`` None: no HTTP answer, ``body`` says why."""

    url: str
    status: int | None
    body: str
    seconds: float


class WaitAnswer(TypedDict, total=False):
    """probe.wait: the URLs that answered 200 in time, those that did not, each one's last
    answer, and (with programs) why a program's URL was given up on: it kept exiting."""

    healthy: list[str]
    unhealthy: list[str]
    crashing: dict[str, str]
    last: dict[str, HttpAnswer]


def probe_http(
    conn: Connector, interpreter: str, requests: list[dict], timeout: float | None = 120
) -> list[HttpAnswer]:
    """The probe's ``http`` action: one answer per request, in their order."""
    answers = run_probe(
        conn, interpreter, {"action": "http", "requests": requests}, timeout=timeout
    )
    assert isinstance(answers, list), answers  # probe.http answers a list
    return answers


def probe_wait(
    conn: Connector,
    interpreter: str,
    urls: list[str],
    wait_s: float,
    interval: float,
    supervised: tuple[str, Mapping[str, str]] | None = None,
) -> WaitAnswer:
    """The probe's ``wait`` action: until every URL answers 200, or ``wait_s`` passes. With
    ``supervised`` (supervisord.conf, url -> program), a program that keeps exiting before
    its URL answers ends the wait for it (``crashing``)."""
    request: dict[str, Any] = {
        "action": "wait",
        "urls": urls,
        "timeout": wait_s,
        "interval": interval,
    }
    if supervised:
        request.update(python=interpreter, supervisor_conf=supervised[0], programs=supervised[1])
    answer = run_probe(conn, interpreter, request, timeout=wait_s + 60)
    assert isinstance(answer, dict), answer  # probe.wait answers an object of that shape
    return cast(WaitAnswer, answer)


@dataclass(frozen=True)
class PythonInfo:
    """The host's ``python:`` that ran the probe (``venv``/``ensurepip``: None when too old to ask)."""

    version: tuple[int, ...]
    executable: str
    venv: bool | None = None
    ensurepip: bool | None = None


@dataclass(frozen=True)
class PythonMissing:
    """The host's ``python:`` could not be started at all (the shell's 127, or 126: ``exists``)."""

    python: str
    output: str
    exists: bool


@dataclass(frozen=True)
class ProgramFacts:
    """One line of ``supervisorctl status``."""

    state: str
    detail: str = ""


@dataclass(frozen=True)
class SupervisorFacts:
    running: bool = False
    pid: int | None = None
    programs: Mapping[str, ProgramFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class SystemdFacts:
    """Whether systemd runs the host, and the cluster unit's state (``systemctl is-enabled``/``is-active``)."""

    present: bool = False
    unit: str | None = None
    enabled: str | None = None
    active: str | None = None
    unit_sha256: str | None = None  # of the installed unit file (None: not installed)


@dataclass(frozen=True)
class FileFacts:
    sha256: str | None  # None: the file does not exist
    mode: int | None


@dataclass(frozen=True)
class ModelFacts:
    """The model directory (probe.model_state): whether it is complete, and what a copy resumes from."""

    complete: bool = False
    manifest: bool = False
    partial_bytes: int | None = None
    problems: tuple[str, ...] = ()
    rsync: str | None = None  # the tools' paths on the host, None when missing
    rrsync: str | None = None


@dataclass(frozen=True)
class Gpu:
    """One row of nvidia-smi's --query-gpu (probe.GPU_FIELDS)."""

    index: int
    uuid: str | None = None
    name: str = ""
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    driver_version: str | None = None
    persistence_mode: str = ""
    ecc_uncorrected: int | None = None  # None: ECC off or not reported


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU; ``ours``: under our supervisord or in an engine's process group."""

    pid: int
    gpu_uuid: str
    used_mib: int | None = None
    ours: bool = False
    command: str | None = None


@dataclass(frozen=True)
class GpuFacts:
    error: str | None = None  # nvidia-smi missing or failing: nothing else is known
    gpus: tuple[Gpu, ...] = ()
    cuda_version: str | None = None
    apps: tuple[GpuProcess, ...] = ()
    apps_error: str | None = None  # the GPUs are known, their processes are not


@dataclass(frozen=True)
class AccountFacts:
    """Who owns the deploy dir (``account_facts``); ``manage``: `up` makes the account and the dir as root."""

    manage: bool = False
    user: str | None = None
    uid: int | None = None
    exists: bool = True


@dataclass(frozen=True)
class Facts:
    """What a host has now, built once from the probe's JSON answer (``from_probe``)."""

    partial: bool = False  # only the interpreter's facts: it is missing or too old to run the probe
    python_info: PythonInfo | None = None
    python_missing: PythonMissing | None = None
    hostname: str | None = None
    os: str | None = None
    mem_available_bytes: int | None = None
    disk_free_bytes: int | None = None  # on the deploy dir's filesystem
    weights_disk_free_bytes: int | None = (
        None  # where the weights go (the deploy dir's when no model was asked about)
    )
    listening_ports: frozenset[int] = frozenset()
    files: Mapping[str, FileFacts] = field(default_factory=dict)
    secrets: Mapping[str, str | None] = field(
        default_factory=dict
    )  # path -> sha256 (None: missing)
    venv_python: bool = False  # the venv's interpreter exists
    deploy_dir_uid: int | None = None
    nofile_hard: int | None = None  # its hard open-file limit (None: unlimited or unknown)
    systemd: SystemdFacts = SystemdFacts()
    supervisor: SupervisorFacts = SupervisorFacts()
    gpus: GpuFacts | None = None  # None: not asked (not a GPU vLLM host)
    packages: Mapping[str, str | None] | None = (
        None  # name -> version in the venv (None: no venv to ask)
    )
    installed_marker: str | None = None  # sha256 of the stackctl wheel installed last
    model: ModelFacts | None = None  # None: no model directory to check
    model_present: bool = False
    account: AccountFacts = AccountFacts()
    stale_program_files: tuple[str, ...] = ()  # program sections no longer planned

    @classmethod
    def from_probe(cls, doc: dict, stale_program_files: Iterable[str] = ()) -> Facts:
        """The probe's answer (stackctl/probe.py, ``facts``), plus the ``account`` that `gather`
        adds; keys it leaves out (a partial answer, `status`'s smaller request) get the defaults."""
        info, missing, model = doc.get("python_info"), doc.get("python_missing"), doc.get("model")
        return cls(
            partial=bool(doc.get("partial")),
            python_info=PythonInfo(
                tuple(info["version"]), info["executable"], info.get("venv"), info.get("ensurepip")
            )
            if info
            else None,
            python_missing=PythonMissing(
                missing["python"], missing.get("output", ""), bool(missing.get("exists"))
            )
            if missing
            else None,
            hostname=doc.get("hostname"),
            os=doc.get("os"),
            mem_available_bytes=doc.get("mem_available_bytes"),
            disk_free_bytes=doc.get("disk_free_bytes"),
            weights_disk_free_bytes=doc.get("model_disk_free_bytes", doc.get("disk_free_bytes")),
            listening_ports=frozenset(doc.get("listening_ports") or ()),
            files={
                path: FileFacts(f.get("sha256"), f.get("mode"))
                for path, f in (doc.get("files") or {}).items()
            },
            secrets=dict(doc.get("secrets") or {}),
            venv_python=bool(doc.get("venv_python")),
            deploy_dir_uid=doc.get("deploy_dir_uid"),
            nofile_hard=doc.get("nofile_hard"),
            systemd=_known(SystemdFacts, doc.get("systemd")),
            supervisor=_supervisor(doc.get("supervisor") or {}),
            gpus=_gpus(doc["gpus"]) if doc.get("gpus") is not None else None,
            packages=doc.get("packages"),
            installed_marker=doc.get("installed_marker"),
            model=ModelFacts(
                bool(model.get("complete")),
                bool(model.get("manifest")),
                model.get("partial_bytes"),
                tuple(model.get("problems") or ()),
                model.get("rsync"),
                model.get("rrsync"),
            )
            if model is not None
            else None,
            model_present=bool(doc.get("model_present")),
            account=_known(AccountFacts, doc.get("account")),
            stale_program_files=tuple(stale_program_files),
        )

    @property
    def supervisor_running(self) -> bool:
        return self.supervisor.running

    def program_state(self, name: str) -> str | None:
        program = self.supervisor.programs.get(name)
        return program.state if program else None


def _supervisor(doc: dict) -> SupervisorFacts:
    programs = {
        name: ProgramFacts(p.get("state", ""), p.get("detail", ""))
        for name, p in (doc.get("programs") or {}).items()
    }
    return SupervisorFacts(bool(doc.get("running")), doc.get("pid"), programs)


def _gpus(doc: dict) -> GpuFacts:
    gpus = tuple(_known(Gpu, g) for g in doc.get("gpus") or ())
    apps = tuple(_known(GpuProcess, a) for a in doc.get("apps") or ())
    return GpuFacts(doc.get("error"), gpus, doc.get("cuda_version"), apps, doc.get("apps_error"))


def _known(cls, doc: dict | None):
    """``cls`` from the keys of ``doc`` it has fields for (a part the probe left out: the defaults)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (doc or {}).items() if k in names})


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
        return {
            "manage": identity.become,
            "user": identity.login_user,
            "uid": identity.login_uid,
            "exists": True,
        }
    return {
        "manage": True,
        "user": identity.service_user,
        "uid": identity.service_uid,
        "exists": identity.service_uid is not None,
    }


def supervisor_request(plan: HostPlan) -> dict:
    """The probe's ``facts`` request for supervisord and the unit only (`status`, `down`);
    `gather` adds the rest."""
    return {
        "action": "facts",
        "deploy_dir": plan.deploy_dir,
        "python": plan.python,
        "supervisor_conf": plan.supervisor_conf,
        "supervisor_pidfile": plan.supervisor_pidfile,
        "unit": plan.unit_name,
        "unit_path": plan.system_unit_path,
    }


def supervisor_facts(conn: Connector, plan: HostPlan) -> Facts:
    """supervisord, its programs and the unit only (``supervisor_request``): `status`, `down`."""
    doc = run_probe(conn, bootstrap_interpreter(plan), supervisor_request(plan))
    assert isinstance(doc, dict), doc  # probe.facts answers an object
    return Facts.from_probe(doc)


def gather(conn: Connector, plan: HostPlan, needs_gpus: bool) -> Facts:
    """Everything `up` diffs against the plan, in one probe run (plus a listing of the program dir)."""
    conf_dir = plan.program_dir
    request = {
        **supervisor_request(plan),
        "files": [f.path for f in plan.files],
        "secrets": [s.path for s in plan.secrets],
        "packages": [package_name(p) for p in plan.packages] + plan.remove_packages,
        "installed_marker": plan.installed_marker,
        "model": {
            "path": plan.model.remote_path,
            "name": plan.model.name,
            "managed": plan.model.action in ("upload", "download"),
        }
        if plan.model and plan.model.action != "none"
        else None,
        "gpus": needs_gpus,
        "engine_pgid_files": [
            plan.engine_pgid_file(p.name) for p in plan.programs if p.kind == "engine"
        ],
    }
    interpreter = bootstrap_interpreter(plan)
    try:
        doc = run_probe(conn, interpreter, request)
    except CommandError as exc:
        if exc.result.exited not in (126, 127):  # the shell's "not found" / "not executable"
            raise
        output = (exc.result.stderr or exc.result.stdout).strip().splitlines()[-1:]
        return Facts(
            partial=True,
            python_missing=PythonMissing(
                interpreter, "".join(output), exists=exc.result.exited == 126
            ),
        )
    # probe.facts answers an object, and so does the loader for a Python too old to run it
    assert isinstance(doc, dict), doc
    if doc.get("partial"):
        return Facts.from_probe(doc)
    listing = conn.run(f"ls -1 {q(conf_dir)} 2>/dev/null || true").stdout.split()
    planned = {f.path for f in plan.files}
    stale = [
        f"{conf_dir}/{name}"
        for name in listing
        if name.endswith(".conf") and f"{conf_dir}/{name}" not in planned
    ]
    return Facts.from_probe({**doc, "account": account_facts(conn)}, stale)
