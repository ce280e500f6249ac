"""A fake transport for unit tests of deploy, status, ops, facts and probe: no SSH, root or netns.

``FakeConnector`` is the real ``LocalConnector`` (``connection: local``) with hooks: commands
really run in a shell on this machine, the probe really runs, files really land in the test's
temp deploy dirs. What it adds, all recorded in one ``FakeFleet`` shared by a test's hosts:

* a log of every command, upload, connect and close, per host and in global order (``calls``);
* injected faults: a command that exits non-zero (``fail``), one that runs past its timeout
  (``timeout``: a real ``sleep`` under the connector's real timeout), a connection lost mid-step
  (``lose_connection``; the host stays closed after, as an SSH session would), a host that cannot
  be reached (``unreachable``), and Ctrl-C while a command runs (``interrupt``: a real SIGINT to
  this process, then the hang-up an SSH session sees once the connection is closed);
* scripted answers where the real thing cannot run here (``answer``: sudo's preflight, ...);
* optionally a fake supervisord (``FakeFleet(fake_supervisor=True)``) for `up`: the planned
  programs (a vLLM engine, the router) cannot start in a unit test, and supervisord's startsecs
  makes real ones slow, so ``supervisord``/``supervisorctl`` invocations are answered by
  ``FakeSupervisor``. It reads the program files `up` really wrote, runs an in-process
  ``FakeService`` on each program's port (so health waits, metrics, the router's /engines and
  the verify completion go through the real probe over real HTTP), and answers the probe's
  supervisor facts for hosts it runs. Status and ops tests use a real supervisord instead
  (``RealSupervisord``), with fake services as its programs.

Install it with the ``fleet`` fixture pattern::

    fleet = FakeFleet()
    monkeypatch.setattr(stackctl.connect, "LocalConnector", fleet.connector)

``write_inventory`` writes a small local cluster (the e2e shape: ``connection: local``,
``python: current``, ``install: false``) for ``stackctl.inventory.load_inventory``.
"""

from __future__ import annotations

import configparser
import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stackctl.connect import ConnectError, LocalConnector, Result
from stackctl.testing import free_ports, wait_until

from .fake_services import FakeService

FAKE_SERVICES = Path(__file__).with_name("fake_services.py")
_PROBE_MARK = "exec(zlib.decompress("


def write_inventory(
    root: Path,
    engine_hosts: int = 2,
    *,
    engine: dict | None = None,
    router: dict | None = None,
    hosts: dict[str, dict] | None = None,
    top: dict | None = None,
) -> tuple[Path, dict[str, int]]:
    """A local cluster: ``head`` runs the router, ``sim1..N`` one simulator engine each, every
    host with its own deploy dir under ``root``. Returns the inventory's path and the ports
    (``router``, ``sim1``, ...). ``engine``/``router``/``top``: merged into those sections;
    ``hosts``: extra keys per host name (a dict, such as ``engine``, is merged into the host's)."""
    router_port, *engine_ports = free_ports(1 + engine_hosts)
    ports = {"router": router_port, **{f"sim{i}": p for i, p in enumerate(engine_ports, start=1)}}
    inventory = {
        "cluster": "unit",
        "python": "current",
        "install": False,
        "deploy_dir": str(root / "head"),
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "engine": {"kind": "sim", "bind": "127.0.0.1", "health_timeout_s": 5, **(engine or {})},
        "router": {"host": "head", "port": router_port, "bind": "127.0.0.1", **(router or {})},
        "hosts": [{"name": "head", "connection": "local", "roles": ["router"]}]
        + [
            {
                "name": f"sim{i}",
                "connection": "local",
                "deploy_dir": str(root / f"sim{i}"),
                "engine": {"port": p},
            }
            for i, p in enumerate(engine_ports, start=1)
        ],
        **(top or {}),
    }
    for entry in inventory["hosts"]:
        for key, value in (hosts or {}).get(entry["name"], {}).items():
            entry[key] = {**entry.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path, ports


def probe_request(command: str) -> dict | None:
    """The JSON request of a probe run (``facts.run_probe``'s command line), else None."""
    if _PROBE_MARK not in command:
        return None
    try:
        return json.loads(shlex.split(command)[-1])
    except ValueError:
        return None


@dataclass
class Call:
    seq: int
    host: str
    op: str  # connect | run | put | close
    text: str  # the command, or the upload's path
    mode: int | None = None
    request: dict | None = None  # a probe run's request

    @property
    def action(self) -> str | None:
        return self.request.get("action") if self.request else None


@dataclass
class Rule:
    """What to do instead of (or before) running a matching command."""

    pattern: re.Pattern
    host: str | None
    kind: str  # answer | fail | timeout | lose | interrupt | hook
    exited: int = 0
    stdout: str = ""
    stderr: str = ""
    after: float = 0.2
    hook: Callable[[str, str], None] | None = None
    times: int | None = None  # None: every match
    hits: int = 0

    def matches(self, host: str, command: str) -> bool:
        return (
            (self.host in (None, host))
            and (self.times is None or self.hits < self.times)
            and bool(self.pattern.search(command))
        )


class FakeFleet:
    """The connectors of one test, the faults and answers injected into them, and what they did."""

    def __init__(self, fake_supervisor: bool = False):
        self.calls: list[Call] = []
        self.rules: list[Rule] = []
        self.unreachable_hosts: dict[str, str] = {}
        self.connectors: list[FakeConnector] = []
        self.supervisor = FakeSupervisor() if fake_supervisor else None
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # -- installing ---------------------------------------------------------------
    def connector(self, host) -> FakeConnector:
        """Stands in for ``LocalConnector(host)`` (monkeypatch it into stackctl.connect)."""
        self.record(host.name, "connect", host.name)
        if host.name in self.unreachable_hosts:
            raise ConnectError(self.unreachable_hosts[host.name])
        conn = FakeConnector(host, self)
        with self._lock:
            self.connectors.append(conn)
        return conn

    # -- injecting ----------------------------------------------------------------
    def _rule(
        self, pattern: str, host: str | None, kind: str, times: int | None = None, **kw
    ) -> Rule:
        rule = Rule(re.compile(pattern), host, kind, times=times, **kw)
        self.rules.append(rule)
        return rule

    def answer(
        self,
        pattern: str,
        stdout: str = "",
        *,
        host: str | None = None,
        exited: int = 0,
        stderr: str = "",
        times: int | None = None,
    ) -> Rule:
        """Matching commands do not run; they print ``stdout`` and exit with ``exited``."""
        return self._rule(
            pattern, host, "answer", times, exited=exited, stdout=stdout, stderr=stderr
        )

    def fail(
        self,
        pattern: str,
        *,
        host: str | None = None,
        exited: int = 1,
        stderr: str = "injected failure",
        times: int | None = None,
    ) -> Rule:
        """Matching commands do not run and exit non-zero with ``stderr``."""
        return self._rule(pattern, host, "answer", times, exited=exited, stderr=stderr)

    def timeout(
        self, pattern: str, *, host: str | None = None, after: float = 0.2, times: int | None = None
    ) -> Rule:
        """Matching commands hang (a real ``sleep``) and the connector's timeout ends them."""
        return self._rule(pattern, host, "timeout", times, after=after)

    def lose_connection(
        self, pattern: str, *, host: str | None = None, times: int | None = 1
    ) -> Rule:
        """The connection drops while a matching command runs; the host stays disconnected."""
        return self._rule(pattern, host, "lose", times)

    def interrupt(self, pattern: str, *, host: str | None = None, times: int | None = 1) -> Rule:
        """Ctrl-C while a matching command runs: SIGINT to this process (the main thread's
        handler cancels), then the command ends as an SSH command does when its connection is
        closed under it."""
        return self._rule(pattern, host, "interrupt", times)

    def before(
        self,
        pattern: str,
        hook: Callable[[str, str], None],
        *,
        host: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Call ``hook(host, command)`` before a matching command runs (it then runs as usual)."""
        return self._rule(pattern, host, "hook", times, hook=hook)

    def unreachable(self, host: str, message: str | None = None) -> None:
        """Connecting to ``host`` fails as an unreachable SSH host does."""
        self.unreachable_hosts[host] = (
            message
            or f"{host} (192.0.2.1:22): cannot connect: [Errno 113] No route to host. Is the host up and sshd running?"
        )

    # -- recording ----------------------------------------------------------------
    def record(self, host: str, op: str, text: str, mode: int | None = None) -> Call:
        with self._lock:
            call = Call(
                next(self._seq), host, op, text, mode, probe_request(text) if op == "run" else None
            )
            self.calls.append(call)
        return call

    def runs(self, host: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.op == "run" and host in (None, c.host)]

    def commands(self, host: str | None = None) -> list[str]:
        return [c.text for c in self.runs(host)]

    def probes(self, host: str | None = None, action: str | None = None) -> list[Call]:
        return [c for c in self.runs(host) if c.request is not None and action in (None, c.action)]

    def puts(self, host: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.op == "put" and host in (None, c.host)]

    def closed(self, host: str) -> bool:
        """Every connection made to ``host`` was closed."""
        mine = [c for c in self.connectors if c.host.name == host]
        return bool(mine) and all(c.closed for c in mine)

    def first(self, host: str, predicate: Callable[[Call], bool]) -> Call | None:
        return next((c for c in self.calls if c.host == host and predicate(c)), None)

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop_all()


class FakeConnector(LocalConnector):
    """LocalConnector plus the fleet's hooks; after ``close`` it behaves as a closed SSH
    connection does (commands raise ConnectError), so interrupted work cannot carry on."""

    def __init__(self, host, fleet: FakeFleet):
        super().__init__(host)
        self.fleet = fleet
        self.closed = False

    def _gone(self, why: str) -> ConnectError:
        return ConnectError(
            f"{self.host.name}: the connection failed while running a command: {why}."
        )

    def run(self, command, *, check=True, timeout=None, stdin=None, stream=False, hangup=False):
        name = self.host.name
        if self.closed:
            raise ConnectError(f"{name} (local): the connection was closed (interrupted).")
        self.fleet.record(name, "run", command)
        for rule in self.fleet.rules:
            if not rule.matches(name, command):
                continue
            rule.hits += 1
            if rule.kind == "hook":
                rule.hook(name, command)
                continue
            if rule.kind == "answer":
                return self._check(command, Result(rule.stdout, rule.stderr, rule.exited), check)
            if rule.kind == "timeout":
                hung = super().run(
                    "sleep 30", check=False, timeout=rule.after, stdin=stdin, stream=stream
                )
                return self._check(command, hung, check)
            if rule.kind == "lose":
                self.closed = True
                raise self._gone("Socket is closed")
            if rule.kind == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
                deadline = time.monotonic() + 5
                while not self.closed and time.monotonic() < deadline:  # Cancellation closes us
                    time.sleep(0.01)
                raise self._gone("Socket is closed (hung up by the interrupt)")
        supervisor = self.fleet.supervisor
        if supervisor is not None and supervisor.handles(command):
            return self._check(command, supervisor.run(name, command), check)
        wait = probe_request(command) if supervisor is not None else None
        if (
            wait and wait.get("action") == "supervisor_wait"
        ):  # the probe would ask a real supervisord
            return self._check(command, Result(supervisor.wait_answer(wait) + "\n", "", 0), check)
        result = super().run(
            command, check=check, timeout=timeout, stdin=stdin, stream=stream, hangup=hangup
        )
        request = probe_request(command)
        if supervisor is not None and request and request.get("action") == "facts":
            result.stdout = supervisor.overlay_facts(result.stdout, request["supervisor_conf"])
        return result

    def put_bytes(self, data, path, mode=0o644):
        if self.closed:
            raise ConnectError(
                f"{self.host.name} (local): the connection was closed (interrupted)."
            )
        self.fleet.record(self.host.name, "put", path, mode)
        super().put_bytes(data, path, mode)

    def close(self):
        if not self.closed:
            self.fleet.record(self.host.name, "close", "")
        self.closed = True
        super().close()


# ------------------------------------------------------------------ a fake supervisord for `up`


@dataclass
class FakeProgram:
    name: str
    conf: str  # its section's text as loaded
    state: str = "STOPPED"
    pid: int | None = None
    started_at: float = 0.0
    service: FakeService | None = None


@dataclass
class FakeDaemon:
    conf: str
    host: str
    pid: int
    programs: dict[str, FakeProgram] = field(default_factory=dict)


class FakeSupervisor:
    """supervisord and supervisorctl as `up` drives them, for hosts whose programs cannot run.

    Each ``<python> -m supervisor.supervisorctl -c CONF ARGS`` in a command is done in order
    (status, reread, update, start, stop, restart, signal, shutdown; ``all`` for every program),
    and the command's result is the first failing one's (else success) with their output
    concatenated, which is how stackctl's command lines (``reread && update``, the wait-for-
    RUNNING loop) read them. Programs come from the files in the ``[include]`` dir that `up`
    wrote. A started program gets a ``FakeService`` on the port in its command line (engines:
    ``--port``; the router: router.yaml's ``listen.port``), kept across restarts so its knobs
    (``configure``) and records stay."""

    _CTL = "supervisor.supervisorctl"
    _DAEMON = "supervisor.supervisord"

    def __init__(self) -> None:
        self.daemons: dict[str, FakeDaemon] = {}  # conf path -> the running daemon
        self.services: dict[tuple[str, str], FakeService] = {}  # (host, program)
        self.knobs: dict[tuple[str, str], dict] = {}
        self.history: list[tuple[str, str, str]] = []  # (host, verb, program or "")
        self._pids = itertools.count(41000)
        self._lock = threading.Lock()

    def configure(self, host: str, program: str, **knobs) -> None:
        """Set FakeService attributes on that program's service (now and whenever it starts)."""
        self.knobs[(host, program)] = {**self.knobs.get((host, program), {}), **knobs}
        service = self.services.get((host, program))
        if service is not None:
            for key, value in knobs.items():
                setattr(service, key, value)

    def handles(self, command: str) -> bool:
        return f"-m {self._CTL} " in command or f"-m {self._DAEMON} " in command

    # -- commands -----------------------------------------------------------------
    def run(self, host: str, command: str) -> Result:
        tokens = shlex.split(command)
        out: list[str] = []
        failed = 0
        with self._lock:
            for i in range(len(tokens) - 4):
                if (
                    tokens[i + 1] != "-m"
                    or tokens[i + 2] not in (self._CTL, self._DAEMON)
                    or tokens[i + 3] != "-c"
                ):
                    continue
                conf = tokens[i + 4]
                args = []
                for token in tokens[i + 5 :]:
                    if token in ("|", "||", "&&", ";") or token.startswith(("|", ";")):
                        break
                    args.append(token.rstrip(";"))
                    if token.endswith(";"):
                        break
                if tokens[i + 2] == self._DAEMON:
                    code, text = self._daemon(host, conf, args)
                else:
                    code, text = self._ctl(host, conf, args)
                out.append(text)
                failed = failed or code
        if not out:
            raise AssertionError(f"FakeSupervisor does not understand: {command}")
        return Result("".join(t + "\n" for t in out if t), "", failed)

    def _daemon(self, host: str, conf: str, args: list[str]) -> tuple[int, str]:
        if conf in self.daemons:
            return (
                2,
                "Error: Another program is already listening on a port that one of our HTTP servers is configured to use.",
            )
        daemon = self.daemons[conf] = FakeDaemon(conf, host, next(self._pids))
        self.history.append((host, "supervisord", ""))
        for name, text in self._sections(conf).items():
            program = daemon.programs[name] = FakeProgram(name, text)
            self._start(daemon, program)
        return 0, ""

    def _ctl(self, host: str, conf: str, args: list[str]) -> tuple[int, str]:
        daemon = self.daemons.get(conf)
        if daemon is None:
            return 7, f"unix://{Path(conf).parent.parent}/run/supervisor.sock no such file"
        verb, names = args[0], args[1:]
        self.history.append((host, verb, " ".join(names)))
        if names == ["all"] or (not names and verb in ("status", "stop")):
            names = list(daemon.programs)
        if verb == "status":
            lines, code = [], 0
            for name in names:
                program = daemon.programs.get(name)
                if program is None:
                    lines.append(f"{name}: ERROR (no such process)")
                    code = 4
                    continue
                detail = (
                    f"pid {program.pid}, uptime 0:00:{min(59, int(time.monotonic() - program.started_at)):02d}"
                    if program.state == "RUNNING"
                    else "Not started"
                )
                lines.append(f"{name:<33}{program.state:<10}{detail}")
                code = code or (0 if program.state == "RUNNING" else 3)
            return code, "\n".join(lines)
        if verb in ("reread", "update"):
            return 0, self._update(daemon, apply=verb == "update")
        if verb == "shutdown":
            for program in daemon.programs.values():
                self._stop(program)
            del self.daemons[conf]
            return 0, "Shut down"
        lines, code = [], 0
        for name in names[1:] if verb == "signal" else names:
            program = daemon.programs.get(name)
            if program is None:
                lines.append(f"{name}: ERROR (no such process)")
                code = 4
            elif verb == "signal":
                if program.service is not None and program.service.kind == "router":
                    program.service.reload()
                lines.append(f"{name}: signalled")
            elif verb in ("stop", "restart"):
                self._stop(program)
                lines.append(f"{name}: stopped")
                if verb == "restart":
                    self._start(daemon, program)
                    lines.append(f"{name}: started")
            elif verb == "start":
                if program.state == "RUNNING":
                    lines.append(f"{name}: ERROR (already started)")
                    code = 7
                else:
                    self._start(daemon, program)
                    lines.append(f"{name}: started")
            else:
                raise AssertionError(f"FakeSupervisor: supervisorctl {verb} is not faked")
        return code, "\n".join(lines)

    def _update(self, daemon: FakeDaemon, apply: bool) -> str:
        now = self._sections(daemon.conf)
        lines = []
        for name, text in now.items():
            program = daemon.programs.get(name)
            if program is None:
                lines.append(f"{name}: {'added process group' if apply else 'available'}")
                if apply:
                    program = daemon.programs[name] = FakeProgram(name, text)
                    self._start(daemon, program)
            elif program.conf != text:
                lines.append(f"{name}: {'stopped' if apply else 'changed'}")
                if apply:
                    self._stop(program)
                    program.conf = text
                    self._start(daemon, program)
                    lines.append(f"{name}: updated process group")
        for name in [n for n in daemon.programs if n not in now]:
            lines.append(f"{name}: {'removed process group' if apply else 'disappeared'}")
            if apply:
                self._stop(daemon.programs.pop(name))
        return "\n".join(lines)

    # -- programs -----------------------------------------------------------------
    @staticmethod
    def _sections(conf: str) -> dict[str, str]:
        """``[program:x]`` sections of the conf's include dir, as files on disk say now."""
        parser = configparser.RawConfigParser()
        parser.read(conf)
        pattern = parser.get("include", "files")
        sections = {}
        for path in sorted(Path(pattern).parent.glob(Path(pattern).name)):
            text = path.read_text()
            for line in text.splitlines():
                match = re.match(r"\[program:([^\]]+)\]", line.strip())
                if match:
                    sections[match.group(1)] = text
        return sections

    def _start(self, daemon: FakeDaemon, program: FakeProgram) -> None:
        key = (daemon.host, program.name)
        service = self.services.get(key)
        if service is None:
            service = self._service_for(program)
            if service is not None:
                self.services[key] = service
        if service is not None:
            for attr, value in self.knobs.get(key, {}).items():
                setattr(service, attr, value)
            try:
                service.start()
            except OSError:  # its port is taken: supervisord gives up on it
                program.state, program.pid, program.service = "FATAL", None, service
                return
        program.state, program.pid, program.started_at, program.service = (
            "RUNNING",
            next(self._pids),
            time.monotonic(),
            service,
        )
        self.history.append((daemon.host, "started", program.name))

    @staticmethod
    def _stop(program: FakeProgram) -> None:
        if program.service is not None:
            program.service.stop()
        program.state, program.pid = "STOPPED", None

    @staticmethod
    def _service_for(program: FakeProgram) -> FakeService | None:
        parser = configparser.RawConfigParser()
        parser.read_string(program.conf)
        argv = shlex.split(parser.get(f"program:{program.name}", "command").replace("%%", "%"))
        if "--port" in argv:
            return FakeService(
                int(argv[argv.index("--port") + 1]), kind="engine", name=program.name
            )
        if "--config" in argv:
            config = argv[argv.index("--config") + 1]
            port = yaml.safe_load(Path(config).read_text())["listen"]["port"]
            return FakeService(int(port), kind="router", router_config=config, name=program.name)
        return None

    # -- what the probe sees --------------------------------------------------------
    def overlay_facts(self, stdout: str, conf: str) -> str:
        """The probe's facts with its ``supervisor`` part as this fake supervisord's."""
        lines = stdout.strip().splitlines()
        facts = json.loads(lines[-1])
        with self._lock:
            daemon = self.daemons.get(conf)
            if daemon is None:
                facts["supervisor"] = {"running": False, "pid": None, "programs": {}}
            else:
                facts["supervisor"] = {
                    "running": True,
                    "pid": daemon.pid,
                    "programs": {
                        p.name: {
                            "state": p.state,
                            "detail": f"pid {p.pid}, uptime 0:00:01" if p.pid else "Not started",
                        }
                        for p in daemon.programs.values()
                    },
                }
        return "\n".join(lines[:-1] + [json.dumps(facts)]) + "\n"

    def wait_answer(self, request: dict) -> str:
        """The probe's ``supervisor_wait`` answer: this fake's programs start at once, so no wait."""
        with self._lock:
            daemon = self.daemons.get(request["supervisor_conf"])
            programs = daemon.programs if daemon else {}
            states = {
                name: programs[name].state if name in programs else None
                for name in request["programs"]
            }
        return json.dumps(
            {
                "running": all(v == "RUNNING" for v in states.values()),
                "states": states,
                "programs": {},
            }
        )

    def state(self, host: str, program: str) -> str | None:
        for daemon in self.daemons.values():
            if daemon.host == host and program in daemon.programs:
                return daemon.programs[program].state
        return None

    def stop_all(self) -> None:
        for service in self.services.values():
            service.stop()


# ------------------------------------------------------------------ a real supervisord, fake programs


class RealSupervisord:
    """The real supervisord with the plan's own supervisord.conf, running fake services as the
    plan's programs (same names and ports; startsecs 0), for `status`, `down` and `restart`.

    ``programs``: program name -> extra fake_services.py arguments (``--kind router`` is added
    for the router with its planned router.yaml). Only the programs named are loaded."""

    def __init__(self, plan, programs: dict[str, list[str]] | None = None):
        self.plan = plan
        self.names = list(programs) if programs is not None else [p.name for p in plan.programs]
        self.extra = programs or {}

    def write(self) -> None:
        plan = self.plan
        for path in [plan.deploy_dir, *plan.dirs.values(), plan.program_dir]:
            Path(path).mkdir(parents=True, exist_ok=True)
        planned = {f.path: f for f in plan.files}
        Path(plan.supervisor_conf).write_text(planned[plan.supervisor_conf].content)
        if plan.router_config in planned:
            Path(plan.router_config).write_text(planned[plan.router_config].content)
        for program in plan.programs:
            if program.name not in self.names:
                continue
            argv = [sys.executable, str(FAKE_SERVICES), "--port", str(program.port)]
            if program.kind == "router":
                argv += ["--kind", "router", "--router-config", plan.router_config]
            argv += self.extra.get(program.name, [])
            Path(plan.program_file(program.name)).write_text(
                f"; rendered by the tests\n[program:{program.name}]\ncommand={shlex.join(argv)}\ndirectory={plan.deploy_dir}\n"
                f"autostart=true\nautorestart=false\nstartsecs=0\nstopasgroup=true\nkillasgroup=true\nstopwaitsecs=5\n"
                f"redirect_stderr=true\nstdout_logfile={plan.log_file(program.name)}\n"
            )

    def start(self, wait: bool = True) -> RealSupervisord:
        """Launch it (it daemonizes at once); with ``wait``, until every program listens
        (supervisord spawns them about a second after it starts)."""
        self.write()
        subprocess.run(self.plan.supervisord(), check=True, timeout=30)
        if wait:
            self.wait()
        return self

    def wait(self) -> None:
        for program in self.plan.programs:
            if program.name in self.names:
                wait_listening(program.port)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.plan.supervisorctl(*args), capture_output=True, text=True, timeout=30
        )

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(self.plan.supervisor_pidfile).read_text().strip())
        return None

    def kill(self) -> None:
        """End it and its programs now, if it still runs (a test that ran `down` already did):
        SIGKILL, because a graceful shutdown takes supervisord seconds of its 1 s ticks."""
        pid = self.pid
        if pid is None or not _alive(pid):
            return
        children = [
            int(p) for p in self.ctl("pid", "all").stdout.split() if p.isdigit() and int(p) > 0
        ]
        for victim in [pid, *children]:
            with contextlib.suppress(OSError):
                os.kill(victim, signal.SIGKILL)
        for program in self.plan.programs:
            if program.name in self.names:
                wait_listening(program.port, up=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def wait_listening(port: int, timeout: float = 30.0, up: bool = True) -> None:
    """Until 127.0.0.1:port accepts connections (``up``) or refuses them."""

    def state() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return (s.connect_ex(("127.0.0.1", port)) == 0) == up

    wait_until(state, timeout, interval=0.02, what=f"port {port} to {'open' if up else 'close'}")


def http_get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read().decode()
