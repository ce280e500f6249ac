"""Connectors: run commands and put files on a host, over SSH (Fabric) or locally (invoke).

Nothing above this module knows which transport a host uses. Every command is a shell string
built with ``shlex.quote``/``shlex.join`` by the caller. SSH host keys are always verified
against the inventory's known_hosts file: unknown keys are refused unless the operator asked
to accept new ones (then they are recorded), and a changed key is always refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import invoke
import paramiko

from .errors import StackctlError
from .inventory import Host, ssh_key_problem
from .privilege import (
    BecomeError,
    Identity,
    handoff_command,
    needs_preflight,
    parse_preflight,
    preflight_command,
    useradd_command,
)


class ConnectError(StackctlError):
    """The host could not be reached or refused us (unreachable, auth, host key)."""


class CommandError(StackctlError):
    """A remote command exited non-zero."""

    def __init__(self, command: str, result: Result):
        self.command = command
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        how = (
            f"timed out after {result.timed_out_s:g} s"
            if result.timed_out_s is not None
            else f"exited with {result.exited}"
        )
        super().__init__(f"command {how}: {command[:200]}\n" + "\n".join(tail))


@dataclass
class Result:
    stdout: str
    stderr: str
    exited: int
    timed_out_s: float | None = None  # the command was killed at its timeout (of this many seconds)

    @property
    def ok(self) -> bool:
        return self.exited == 0


NO_EXIT_STATUS = -1  # what paramiko reports for a channel that closed without an exit status

_verbosity = 0  # `-v`: the transports echo each command to stderr (set_verbosity)
_trace_lock = threading.Lock()
_BLOB = re.compile(r"[A-Za-z0-9+/=]{120,}")  # the packed probe in a command line: shown as its size


def set_verbosity(level: int) -> None:
    """``-v`` and up: every command a connector runs, and every upload's path, on stderr. Only
    commands and paths are shown, never their output or an upload's bytes (secrets travel as
    uploads, and commands never carry secret values)."""
    global _verbosity
    _verbosity = level


def trace(host: Host, what: str) -> None:
    if _verbosity > 0:
        text = _BLOB.sub(lambda m: f"<{len(m.group())} chars>", what)
        with _trace_lock:
            print(f"[{host.name}] {text}", file=sys.stderr, flush=True)


def _result(
    res: invoke.Result, started: float, timeout: float | None, exc: Exception | None = None
) -> Result:
    """Our Result from invoke's (Fabric's is one too); ``exc``: what invoke raised with it.

    A command killed at its timeout without CommandTimedOut is timed out all the same: invoke
    asks its timer whether it fired before the timer's thread has returned from the kill, so
    under load a killed command can come back as a plain exit (-9 locally, no status over SSH).
    """
    timed_out: float | None = exc.timeout if isinstance(exc, invoke.CommandTimedOut) else None
    exited = res.exited if res.exited is not None else NO_EXIT_STATUS
    killed = exited < 0 and timeout is not None and time.monotonic() - started >= timeout
    if timed_out is None and killed:
        timed_out = timeout
    return Result(res.stdout, res.stderr, exited, timed_out)


class Connector:
    """The transport interface: ``run`` a shell command, ``put`` bytes atomically, ``close``."""

    host: Host

    def run(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float | None = None,
        stdin: str | None = None,
        stream: bool = False,
        hangup: bool = False,
        as_root: bool = False,
    ) -> Result:
        """Run a shell command. ``hangup``: give it a terminal (SSH: a pty), so that closing
        the connection (``close``, as the first Ctrl-C does) hangs it up and ends it instead
        of leaving it running on the host; its stderr then arrives merged into stdout.
        ``as_root``: as root (BecomeConnector); a transport has no user to switch to and runs
        every command as the SSH user, as a plain identity's ``as_root`` does."""
        raise NotImplementedError

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        raise NotImplementedError

    def put_file(self, local: Path, path: str, mode: int = 0o644) -> None:
        self.put_bytes(local.read_bytes(), path, mode)

    def endpoint(self) -> dict:
        """How the host was reached over the network (SSH connections only)."""
        raise NotImplementedError(
            f"{type(self).__name__} reaches {self.host.name} without a network endpoint"
        )

    def close(self) -> None:
        pass

    def _check(self, command: str, result: Result, check: bool) -> Result:
        if check and not result.ok:
            raise CommandError(command, result)
        return result


class LocalConnector(Connector):
    """This machine, through invoke: the same code path as SSH, without the network."""

    def __init__(self, host: Host):
        self.host = host
        self._context = invoke.Context()

    def run(
        self,
        command,
        *,
        check=True,
        timeout=None,
        stdin=None,
        stream=False,
        hangup=False,
        as_root=False,
    ):
        # ``hangup`` needs nothing here: a local command is this process's child, in the
        # terminal's process group, so the same Ctrl-C reaches it.
        kwargs = {
            "warn": True,
            "hide": not stream,
            "timeout": timeout,
            "in_stream": io.StringIO(stdin) if stdin is not None else False,
        }
        trace(self.host, f"$ {command}")
        started = time.monotonic()
        try:
            res = self._context.run(command, **kwargs)
        except Exception as exc:  # invoke.CommandTimedOut and friends
            res = getattr(exc, "result", None)
            if res is None:
                raise
            return self._check(command, _result(res, started, timeout, exc), check)
        return self._check(command, _result(res, started, timeout), check)

    def put_bytes(self, data, path, mode=0o644):
        trace(self.host, f"put {path} (mode {mode:04o}, {len(data)} bytes)")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, target)


class _AcceptNewHostKeys(paramiko.MissingHostKeyPolicy):
    """Record an unknown host key on first use (``--accept-new-host-keys``); paramiko itself
    refuses a key that differs from a recorded one."""

    _lock = threading.Lock()

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        with self._lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as fh:
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class SSHConnector(Connector):
    """A host over SSH with Fabric, honouring an OpenSSH config (User, IdentityFile, ProxyJump)."""

    def __init__(self, host: Host, *, accept_new_host_keys: bool = False):
        import fabric

        self.host = host
        ssh = host.ssh
        problem = ssh_key_problem(host)
        if (
            problem
        ):  # before any attempt: paramiko would fall back to other keys and say "auth failed"
            raise ConnectError(f"{host.name}: ssh.key: {problem}")
        self.known_hosts = Path(os.path.expanduser(ssh.known_hosts))
        config_path = os.path.expanduser(ssh.config) if ssh.config else None
        overrides = {"load_ssh_configs": True}
        config = (
            fabric.Config(runtime_ssh_path=config_path, overrides=overrides)
            if config_path
            else fabric.Config(overrides=overrides)
        )
        connect_kwargs = {"key_filename": [os.path.expanduser(ssh.key)]} if ssh.key else {}
        self._conn = fabric.Connection(
            host.address,
            user=ssh.user,
            port=ssh.port if ssh.port != 22 else None,
            config=config,
            connect_timeout=int(ssh.connect_timeout_s),
            connect_kwargs=connect_kwargs,
        )
        self._verify_host_keys(self._conn, accept_new_host_keys)
        self._closed = False

    def _verify_host_keys(self, conn, accept_new: bool) -> None:
        """Replace Fabric's auto-add policy on this connection and every jump host."""
        import fabric

        while isinstance(conn, fabric.Connection):
            client = conn.client
            if self.known_hosts.exists():
                client.load_host_keys(str(self.known_hosts))
            client.set_missing_host_key_policy(
                _AcceptNewHostKeys(self.known_hosts) if accept_new else paramiko.RejectPolicy()
            )
            conn = conn.gateway

    def open(self) -> None:
        where = f"{self.host.name} ({self.host.address}:{self.host.ssh.port})"
        if self._closed:  # closed by an interrupt: a worker must not quietly reconnect
            raise ConnectError(f"{where}: the connection was closed (interrupted).")
        try:
            self._conn.open()
        except paramiko.BadHostKeyException as exc:
            raise ConnectError(
                f"{where}: the host key CHANGED since it was recorded in {self.known_hosts} (got {exc.key.get_name()} {exc.key.get_fingerprint().hex()}). This may be an attack or a reinstalled host; check it, then remove the old line from {self.known_hosts}."
            ) from exc
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise ConnectError(
                    f"{where}: its host key is not in {self.known_hosts}, so it cannot be verified. Add it (ssh-keyscan, after checking the fingerprint) or run `up --accept-new-host-keys` to record it on first use."
                ) from exc
            raise ConnectError(f"{where}: SSH failed: {exc}.") from exc
        except OSError as exc:
            raise ConnectError(
                f"{where}: cannot connect: {exc.strerror or exc}. Is the host up and sshd running?"
            ) from exc
        except Exception as exc:  # socket.timeout, gaierror, auth errors from paramiko
            raise ConnectError(f"{where}: cannot connect: {type(exc).__name__}: {exc}.") from exc

    def run(
        self,
        command,
        *,
        check=True,
        timeout=None,
        stdin=None,
        stream=False,
        hangup=False,
        as_root=False,
    ):
        self.open()
        kwargs = {
            "warn": True,
            "hide": not stream,
            "timeout": timeout,
            "pty": hangup,
            "in_stream": io.StringIO(stdin) if stdin is not None else False,
        }
        trace(self.host, f"$ {command}")
        started = time.monotonic()
        try:
            res = self._conn.run(command, **kwargs)
        except Exception as exc:
            res = getattr(exc, "result", None)
            if res is None:
                raise self._lost(str(exc) or type(exc).__name__) from exc
            return self._check(command, _result(res, started, timeout, exc), check)
        if res.exited == NO_EXIT_STATUS and not self._conn.transport.is_active():
            raise self._lost("the host closed the connection before the command ended")
        return self._check(command, _result(res, started, timeout), check)

    def _lost(self, reason: str) -> ConnectError:
        return ConnectError(
            f"{self.host.name}: the connection failed while running a command: {reason}."
        )

    def put_bytes(self, data, path, mode=0o644):
        """Upload to a temporary name, set the mode, then rename over the target (atomic)."""
        trace(self.host, f"put {path} (mode {mode:04o}, {len(data)} bytes)")
        self.open()
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        sftp = self._conn.sftp()
        with sftp.open(tmp, "wb") as fh:
            fh.chmod(mode)
            fh.write(data)
        sftp.posix_rename(tmp, path)

    def put_file(self, local, path, mode=0o644):
        trace(self.host, f"put {path} (mode {mode:04o}, from {local})")
        self.open()
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        sftp = self._conn.sftp()
        sftp.put(str(local), tmp)
        sftp.chmod(tmp, mode)
        sftp.posix_rename(tmp, path)

    def endpoint(self) -> dict:
        """How this host was reached, after the SSH config resolved it (user, address, port),
        and the host key that was verified (type, base64): for an SSH client on another host."""
        self.open()
        key = self._conn.client.get_transport().get_remote_server_key()
        return {
            "user": self._conn.user,
            "address": self._conn.host,
            "port": int(self._conn.port),
            "host_key": (key.get_name(), key.get_base64()),
        }

    def close(self):
        self._closed = True
        self._conn.close()


STAGE_CLEANUP_TIMEOUT_S = 15  # a loaded host may take seconds to run one command; 1 s leaked dirs


class BecomeConnector(Connector):
    """A connector that runs each command as the service user (``as_root=True``: as root through
    ``become``; ``raw=True``: as the SSH user), and hands uploads over to the service user.

    It wraps the transport's connector, so transports know nothing of users; see privilege.py
    for who runs what. Uploads the service user must own are staged in a private directory of
    the SSH user (0711, random names), then installed by the service user with a rename."""

    STAGE_PARENT = "/var/tmp"  # on disk (wheels and weights can be large), shared by all users

    def __init__(self, inner: Connector, identity: Identity):
        self.inner = inner
        self.host = inner.host
        self.identity = identity
        self._stage: str | None = None
        self._stage_lock = threading.Lock()

    def run(self, command, *, as_root=False, raw=False, **kwargs):
        if not raw:
            command = (
                self.identity.as_root(command) if as_root else self.identity.as_service(command)
            )
        return self.inner.run(command, **kwargs)

    def _staged_path(self) -> str:
        with self._stage_lock:
            if self._stage is None:
                made = self.inner.run(
                    f'd=$(mktemp -d {q(self.STAGE_PARENT)}/stackctl-stage.XXXXXXXX) && chmod 711 "$d" && printf %s "$d"'
                )
                self._stage = made.stdout.strip()
        return f"{self._stage}/{uuid.uuid4().hex}"

    def _handoff(self, upload, path: str, mode: int) -> None:
        staged = self._staged_path()
        upload(staged)
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        self.inner.run(handoff_command(self.identity, staged, tmp, path, mode))

    def put_bytes(self, data, path, mode=0o644):
        if not self.identity.handoff:
            return self.inner.put_bytes(data, path, mode)
        self._handoff(lambda staged: self.inner.put_bytes(data, staged, 0o600), path, mode)

    def put_file(self, local, path, mode=0o644):
        if not self.identity.handoff:
            return self.inner.put_file(local, path, mode)
        self._handoff(lambda staged: self.inner.put_file(local, staged, 0o600), path, mode)

    def create_service_user(self, home: str) -> None:
        """Create the service account (as root) and switch to acting as it."""
        user = self.identity.service_user
        assert user is not None  # apply asks only when the plan has a service user
        self.run(useradd_command(user, home), as_root=True, timeout=120)
        uid = self.inner.run(f"id -u -- {q(user)}").stdout.strip()
        self.identity = self.identity.with_service_uid(int(uid))

    def close(self):
        if (
            self._stage
        ):  # staged files are removed as they are installed: only the empty dir is left
            with contextlib.suppress(Exception):
                self.inner.run(
                    f"rm -rf -- {q(self._stage)}", check=False, timeout=STAGE_CLEANUP_TIMEOUT_S
                )
        self.inner.close()

    def endpoint(self) -> dict:
        return self.inner.endpoint()

    def __getattr__(self, name):  # anything else the transport offers
        return getattr(self.inner, name)


def connect(host: Host, *, accept_new_host_keys: bool = False) -> Connector:
    """A connector to the host; with a service user or ``become``, checked up front (one
    command): a host that cannot run the privileged steps raises BecomeError before any change."""
    connector: Connector
    if host.is_local:
        connector = LocalConnector(host)
    else:
        connector = ssh = SSHConnector(host, accept_new_host_keys=accept_new_host_keys)
        ssh.open()
    if not needs_preflight(host):
        return BecomeConnector(connector, Identity.plain(host))
    try:
        identity = parse_preflight(host, connector.run(preflight_command(host), timeout=60).stdout)
        problem = identity.problem()
        if problem:
            raise BecomeError(problem)
    except BaseException:
        connector.close()
        raise
    return BecomeConnector(connector, identity)


def q(value: str) -> str:
    return shlex.quote(str(value))
