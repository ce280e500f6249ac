"""Multi-host SSH testbed on one machine: one network + mount + UTS namespace and one sshd per host.

Layout (run id R, subnet slot S):
  root namespace   bridge ``stktbR`` with 10.213.S.1/24
  host i           netns ``stktb-R-i``, veth ``stktbRvi`` <-> ``eth0`` (10.213.S.(10+i)),
                   a "holder" process (``sleep infinity``) that owns the host's private mount
                   and UTS namespaces (deploy dir bind-mounted, hostname = host name),
                   and an sshd entered into those namespaces.
Every process started over SSH inherits the host's namespaces, so each host has its own
loopback, addresses, hostname and deploy dir; the rest of the filesystem is shared, so SSH
sessions get the host's own ``bin`` dir first on their PATH for per-host stand-ins (a fake
nvidia-smi). Cleanup kills every process in each netns,
which also drops the private mounts, then deletes the netns, links, temp dir and state file.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stackctl.testing import WaitTimeout, wait_until

PREFIX = "stktb"
STATE_DIR = Path("/run/stackctl-testbed")
SUBNET_FIRST_SLOT = 7
SUBNET_TEMPLATE = "10.213.{slot}.0/24"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
BASTION_NAME = "bastion"
ROOT_SSH_DIR = Path("/root/.ssh")  # each host gets its own, bind-mounted over this one
SESSION_PATH = (
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # sshd's own default for root
)


class TestbedError(RuntimeError):
    """The testbed could not be built or driven."""


@dataclass
class TestHost:
    """One test host as stackctl sees it (name, address, ssh user/port/key) plus its plumbing."""

    __test__ = False  # not a pytest test class

    name: str
    address: str
    netns: str
    key_path: Path
    dir: Path
    deploy_dir: str
    port: int = 22
    user: str = "root"
    proxy_jump: str | None = None
    holder_pid: int | None = None
    sshd_pid: int | None = None

    @property
    def deploy_source(self) -> Path:
        """Where this host's deploy dir lives in the root namespace (inspect files without SSH)."""
        return self.dir / "deploy"

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def root_ssh_dir(self) -> Path:
        """The host's own /root/.ssh (bind-mounted there inside the host's namespaces)."""
        return self.dir / "root-ssh"

    @property
    def bin_dir(self) -> Path:
        """First on the PATH of the host's SSH sessions (empty: tests put stand-ins here, e.g. a fake nvidia-smi)."""
        return self.dir / "bin"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30, **kw
) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured, and an error that shows the command's stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise TestbedError(f"{shlex.join(cmd)} -> rc {proc.returncode}: {proc.stderr.strip()}")
    return proc


def environment_problem() -> str | None:
    """Why this machine cannot host a testbed, or None when it can (root, ip netns, sshd)."""
    if os.geteuid() != 0:
        return "the testbed needs root (ip netns, mounts)"
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen", "ssh", SSHD):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt: iproute2, util-linux, openssh-server, openssh-client)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    return None


# ---------------------------------------------------------------- state files (run registry)


def _state_path(run_id: str) -> Path:
    return STATE_DIR / f"{run_id}.json"


def _read_states() -> list[dict]:
    states = []
    for path in sorted(STATE_DIR.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            states.append(json.loads(path.read_text()))
    return states


@contextlib.contextmanager
def _registry_lock():
    """Serialise subnet allocation between parallel testbeds."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _slots_in_use() -> set[int]:
    used = {state["slot"] for state in _read_states()}
    addrs = run(["ip", "-4", "-o", "addr", "show"]).stdout
    for slot in range(1, 255):
        if f" 10.213.{slot}." in addrs:
            used.add(slot)
    return used


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- non-root SSH users

# The hosts share the machine's /etc, so these accounts exist on every host once made. Both log
# in with the testbed's client key (sshd's AuthorizedKeysFile is the testbed's own file).
SUDO_USER = "stktb-sudo"  # passwordless sudo (NOPASSWD), as on a cloud image's ubuntu user
SUDO_PASSWORD_USER = "stktb-sudopw"  # sudo asks for a password
SUDOERS_FILE = Path("/etc/sudoers.d/stackctl-testbed")


def ensure_test_users() -> None:
    """Create the two non-root SSH users and their sudo rules (idempotent; kept afterwards,
    since parallel testbeds share them)."""
    if shutil.which("sudo") is None:
        raise TestbedError("sudo is not installed (apt-get install sudo): the become tests need it")
    with _registry_lock():
        for user in (SUDO_USER, SUDO_PASSWORD_USER):
            if run(["id", "-u", user], check=False).returncode != 0:
                run(["useradd", "--create-home", "--shell", "/bin/bash", user])
        # sshd (UsePAM no) refuses locked accounts ("!" in shadow): no password, not locked...
        run(["usermod", "-p", "*", SUDO_USER])
        # ...and a real password for the one whose sudo asks for it (nobody ever types it).
        run(["chpasswd"], input=f"{SUDO_PASSWORD_USER}:{secrets.token_hex(16)}\n")
        rules = f"{SUDO_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n{SUDO_PASSWORD_USER} ALL=(ALL:ALL) ALL\n"
        if not SUDOERS_FILE.exists() or SUDOERS_FILE.read_text() != rules:
            tmp = SUDOERS_FILE.with_name(".stackctl-testbed.tmp")  # sudo ignores names with a '.'
            tmp.write_text(rules)
            os.chmod(tmp, 0o440)
            run(["visudo", "-cf", str(tmp)])
            os.replace(tmp, SUDOERS_FILE)


# ---------------------------------------------------------------- the testbed


@dataclass
class Testbed:
    """N SSH hosts in network namespaces behind one bridge; use as a context manager.

    bastion=True adds a host named "bastion" and makes the hosts in ``behind_bastion``
    (default: all) accept SSH only from the bastion's address (ProxyJump in ssh_config).
    keep=True leaves the hosts running when this process exits (``python -m tests.testbed up``).
    """

    __test__ = False

    n_hosts: int = 2
    bastion: bool = False
    behind_bastion: Iterable[str] | None = None
    deploy_dir: str = "/opt/stackctl"
    keep: bool = False
    base_dir: Path | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: list[TestHost] = field(default_factory=list, init=False)
    bastion_host: TestHost | None = field(default=None, init=False)
    slot: int | None = field(default=None, init=False)
    dir: Path | None = field(default=None, init=False)
    _procs: dict = field(default_factory=dict, init=False, repr=False)
    _made_mountpoint: bool = field(default=False, init=False, repr=False)
    _cleaned: bool = field(default=False, init=False, repr=False)

    # ----------------------------------------------------------- paths and names
    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.run_id}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(SUBNET_TEMPLATE.format(slot=self.slot))

    @property
    def root_address(self) -> str:
        return str(self.network[1])

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def all_hosts(self) -> list[TestHost]:
        """The hosts plus the bastion, when there is one."""
        return ([self.bastion_host] if self.bastion_host else []) + self.hosts

    def host(self, name: str) -> TestHost:
        for host in self.all_hosts:
            if name in (host.name, host.address):
                return host
        raise KeyError(name)

    # ----------------------------------------------------------- lifecycle
    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def start(self) -> Testbed:
        """Create every host and wait until each sshd answers; cleans up on any failure."""
        if not self.keep:
            atexit.register(self.cleanup)
            _exit_on_sigterm()
        try:
            self._allocate()
            self._make_keys_and_bridge()
            for host in self.all_hosts:
                self._create_host(host)
            self._write_client_files()
            for host in self.all_hosts:
                self.start_sshd(host, wait=False)
            for host in self.all_hosts:
                self.wait_ssh(host)
            self._save_state()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _allocate(self) -> None:
        """Pick a free /24, a temp dir and the host list, and register the run."""
        with _registry_lock():
            used = _slots_in_use()
            self.slot = next(s for s in range(SUBNET_FIRST_SLOT, 255) if s not in used)
            parent = self.base_dir or Path(tempfile.gettempdir())
            self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.run_id}-", dir=parent))
            self._plan_hosts()
            self._save_state()

    def _plan_hosts(self) -> None:
        def new_host(name: str, index: int) -> TestHost:
            return TestHost(
                name=name,
                address=str(self.network[10 + index]),
                netns=f"{PREFIX}-{self.run_id}-{index}",
                key_path=self.client_key,
                dir=self.dir / name,
                deploy_dir=self.deploy_dir,
            )

        self.hosts = [new_host(f"h{i}", i) for i in range(1, self.n_hosts + 1)]
        if self.bastion:
            self.bastion_host = new_host(BASTION_NAME, 0)
            hidden = set(self.behind_bastion) if self.behind_bastion is not None else None
            for host in self.hosts:
                if hidden is None or host.name in hidden:
                    host.proxy_jump = BASTION_NAME

    def _make_keys_and_bridge(self) -> None:
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{PREFIX}-client",
                "-f",
                str(self.client_key),
            ]
        )
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        # sshd reads authorized_keys as the logging-in user: let non-root users reach it.
        os.chmod(self.dir, 0o711)
        os.chmod(self.authorized_keys, 0o644)
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.root_address}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        if not os.path.isdir(self.deploy_dir):
            os.makedirs(self.deploy_dir)
            self._made_mountpoint = True
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        ROOT_SSH_DIR.mkdir(mode=0o700, exist_ok=True)  # the mount point of each host's own ~/.ssh

    def _veth(self, host: TestHost) -> str:
        return f"{PREFIX}{self.run_id}v{host.netns.rsplit('-', 1)[1]}"

    def _create_host(self, host: TestHost) -> None:
        host.deploy_source.mkdir(parents=True)
        host.bin_dir.mkdir()
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                host.name,
                "-f",
                str(host.host_key),
            ]
        )
        host.sshd_config.write_text(self._sshd_config(host))
        self._plumb_network(host)
        self._start_holder(host)

    def _plumb_network(self, host: TestHost) -> None:
        veth, ns = self._veth(host), host.netns
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"])
        run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        run(["ip", "link", "set", f"{veth}p", "netns", ns])
        in_ns = ["ip", "-n", ns]
        run([*in_ns, "link", "set", f"{veth}p", "name", "eth0"])
        run([*in_ns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
        run([*in_ns, "link", "set", "eth0", "up"])
        run([*in_ns, "link", "set", "lo", "up"])

    def _start_holder(self, host: TestHost) -> None:
        """A sleep process owning the host's private mount + UTS namespaces (survives sshd restarts)."""
        ready = host.dir / "holder.ready"
        # Its own /etc/hosts naming every testbed host, as a real host resolves its own name
        # (sudo warns "unable to resolve host" on every call otherwise).
        hosts_file = host.dir / "hosts"
        hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.all_hosts)
        )
        # And its own ~/.ssh for root (sshd also reads .ssh/authorized_keys, as on a real host: `up`
        # authorizes its host-to-host model copies there), never the machine's real one.
        host.root_ssh_dir.mkdir(mode=0o700)
        script = (
            'hostname "$1" && mount --bind "$2" "$3" && mount --bind "$5" /etc/hosts && mount --bind "$6" "$7" '
            '&& : > "$4" && exec sleep infinity'
        )
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.netns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "holder",
                host.name,
                str(host.deploy_source),
                self.deploy_dir,
                str(ready),
                str(hosts_file),
                str(host.root_ssh_dir),
                str(ROOT_SSH_DIR),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(host.dir / "holder.log", "w"),  # noqa: SIM115 - the holder's stderr while it lives
            start_new_session=True,
        )
        self._procs[f"holder:{host.name}"] = proc
        host.holder_pid = proc.pid
        _wait_for(lambda: ready.exists() or proc.poll() is not None, 10, f"{host.name} namespaces")
        if proc.poll() is not None:
            raise TestbedError(
                f"{host.name}: namespace holder died: {(host.dir / 'holder.log').read_text()}"
            )

    def _sshd_config(self, host: TestHost) -> str:
        lines = [
            "Port 22",
            "ListenAddress 0.0.0.0",
            f"HostKey {host.host_key}",
            f"PidFile {host.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys} .ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "AllowTcpForwarding yes",
            "MaxStartups 200",
            "MaxSessions 100",
            "LogLevel VERBOSE",
            f"Subsystem sftp {SFTP_SERVER}",
            f"SetEnv PATH={host.bin_dir}:{SESSION_PATH}",  # the hosts share /usr: per-host tools go in bin_dir
        ]
        if host.proxy_jump:
            bastion = self.host(host.proxy_jump) if self.bastion_host else None
            lines.append(f"AllowUsers root@{bastion.address}")
        return "\n".join(lines) + "\n"

    def _write_client_files(self) -> None:
        """known_hosts (name and address per host) and an OpenSSH client config."""
        known, config = [], []
        for host in self.all_hosts:
            public = Path(f"{host.host_key}.pub").read_text().split()
            known.append(f"{host.name},{host.address} {public[0]} {public[1]}")
            config += [
                f"Host {host.name} {host.address}",
                f"    HostName {host.address}",
                f"    Port {host.port}",
                f"    User {host.user}",
                f"    IdentityFile {self.client_key}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {self.known_hosts}",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    BatchMode yes",
                "    ConnectTimeout 5",
            ]
            if host.proxy_jump:
                config.append(f"    ProxyJump {host.proxy_jump}")
            config.append("")
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.ssh_config.write_text("\n".join(config))

    # ----------------------------------------------------------- sshd control
    def start_sshd(self, host: TestHost | str, *, wait: bool = True) -> None:
        """Start the host's sshd inside its namespaces (again, after stop_sshd)."""
        host = self._resolve(host)
        if self.sshd_running(host):
            return
        log = open(host.dir / "sshd.log", "a")  # noqa: SIM115 - sshd's output while it lives
        proc = subprocess.Popen(
            [*self._nsenter(host), SSHD, "-D", "-e", "-f", str(host.sshd_config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self._procs[f"sshd:{host.name}"] = proc
        host.sshd_pid = proc.pid
        if wait:
            self.wait_ssh(host)

    def stop_sshd(self, host: TestHost | str) -> None:
        """Stop the listening sshd: new connections are refused; open sessions live on."""
        host = self._resolve(host)
        proc = self._procs.pop(f"sshd:{host.name}", None)
        if host.sshd_pid and _pid_alive(host.sshd_pid):
            os.kill(host.sshd_pid, signal.SIGTERM)
            _wait_for(
                lambda: not _pid_alive(host.sshd_pid) or (proc and proc.poll() is not None),
                5,
                f"{host.name} sshd to stop",
            )
        if proc:
            proc.wait(5)
        host.sshd_pid = None

    def sshd_running(self, host: TestHost | str) -> bool:
        host = self._resolve(host)
        proc = self._procs.get(f"sshd:{host.name}")
        if proc is not None:
            return proc.poll() is None
        return _pid_alive(host.sshd_pid)

    def wait_ssh(self, host: TestHost | str, timeout: float = 10) -> None:
        """Wait until the host's sshd sends its banner (AllowUsers only bites after the banner)."""
        host = self._resolve(host)
        _wait_for(
            lambda: _banner(host.address, host.port),
            timeout,
            f"sshd on {host.name} ({host.address})",
        )

    def set_link(self, host: TestHost | str, up: bool) -> None:
        """Take the host's cable out (connections time out) or put it back."""
        host = self._resolve(host)
        run(["ip", "link", "set", self._veth(host), "up" if up else "down"])

    # ----------------------------------------------------------- running things on hosts
    def _nsenter(self, host: TestHost) -> list[str]:
        return ["nsenter", f"--target={host.holder_pid}", "--net", "--mount", "--uts", "--"]

    def exec_in(
        self,
        host: TestHost | str,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess:
        """Run a command inside the host's namespaces without SSH (a string goes to bash -c)."""
        host = self._resolve(host)
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return run([*self._nsenter(host), *argv], check=check, timeout=timeout)

    def ssh(
        self, host: TestHost | str, cmd: str, *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Run a command over real SSH with the testbed's client config (strict host keys)."""
        host = self._resolve(host)
        return run(
            ["ssh", "-F", str(self.ssh_config), host.name, cmd], check=check, timeout=timeout
        )

    def pids(self, host: TestHost | str) -> list[int]:
        """Every process living in the host's network namespace."""
        host = self._resolve(host)
        out = run(["ip", "netns", "pids", host.netns], check=False).stdout
        return [int(pid) for pid in out.split()]

    def fabric_connection(
        self, host: TestHost | str, *, strict: bool = True, use_ssh_config: bool = True
    ):
        """A Fabric Connection to the host; strict checks every hop against known_hosts.

        Fabric gives each Connection (gateways included) an AutoAddPolicy and never reads
        known_hosts itself, so strictness has to be set on each hop's paramiko client.
        """
        import fabric
        import paramiko

        host = self._resolve(host)
        if use_ssh_config:
            config = fabric.Config(runtime_ssh_path=str(self.ssh_config))
            conn = fabric.Connection(host.name, config=config)
        else:
            conn = fabric.Connection(
                host=host.address,
                user=host.user,
                port=host.port,
                connect_kwargs={"key_filename": str(host.key_path)},
            )
        hop = conn
        while strict and isinstance(hop, fabric.Connection):
            hop.client.load_host_keys(str(self.known_hosts))
            hop.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            hop = hop.gateway
        return conn

    def _resolve(self, host: TestHost | str) -> TestHost:
        return host if isinstance(host, TestHost) else self.host(host)

    # ----------------------------------------------------------- for stackctl's inventory
    def inventory_ssh_block(self, user: str = "root") -> dict:
        """The ``ssh:`` block of a stackctl inventory for these hosts (``user``: e.g.
        SUDO_USER, after ensure_test_users())."""
        return {
            "user": user,
            "port": 22,
            "key": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "config": str(self.ssh_config),
        }

    def inventory_hosts(self) -> list[dict]:
        return [{"name": h.name, "address": h.address} for h in self.hosts]

    def write_inventory(
        self,
        path: Path | str,
        engine_hosts: int | None = None,
        head: bool = True,
        extra: dict | None = None,
    ) -> Path:
        """A JSON (hence YAML) inventory skeleton: the lead's format owns the other keys via ``extra``."""
        hosts = self.inventory_hosts()
        engines = hosts[: engine_hosts if engine_hosts is not None else len(hosts)]
        data = {"ssh": self.inventory_ssh_block(), "hosts": engines, "deploy_dir": self.deploy_dir}
        if head:
            data["head"] = hosts[0]["name"]
        data.update(extra or {})
        path = Path(path)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def describe(self) -> dict:
        """Everything a person or a script needs: hosts, ssh files, namespaces."""
        return {
            "run_id": self.run_id,
            "dir": str(self.dir),
            "bridge": self.bridge,
            "root_address": self.root_address,
            "ssh": self.inventory_ssh_block(),
            "hosts": [{**_host_dict(h)} for h in self.all_hosts],
        }

    # ----------------------------------------------------------- cleanup
    def _save_state(self) -> None:
        state = {
            "run_id": self.run_id,
            "slot": self.slot,
            "dir": str(self.dir),
            "owner_pid": None if self.keep else os.getpid(),
            "bridge": self.bridge,
            "deploy_dir": self.deploy_dir,
            "made_mountpoint": self._made_mountpoint,
            "hosts": [_host_dict(h) for h in self.all_hosts],
        }
        _state_path(self.run_id).write_text(json.dumps(state, indent=2))

    def cleanup(self) -> None:
        """Idempotent: kill every process in each netns, delete netns/links/temp dir/state."""
        if self._cleaned:
            return
        self._cleaned = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)
        netns = [h.netns for h in self.all_hosts]
        cleanup_run(self.run_id, netns, self.dir, self._made_mountpoint and self.deploy_dir)
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(2)
        self._procs.clear()


def _host_dict(host: TestHost) -> dict:
    data = asdict(host)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (CI timeouts, kill) into SystemExit so finalizers and atexit still clean up."""
    import threading

    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _banner(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1) as sock:
            sock.settimeout(1)
            return sock.recv(4) == b"SSH-"
    except OSError:
        return False


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """stackctl.testing.wait_until, failing as a TestbedError (what callers of the testbed catch)."""
    try:
        wait_until(predicate, timeout, interval=interval, max_interval=0.2, what=what)
    except WaitTimeout as exc:
        raise TestbedError(str(exc)) from None


def kill_netns_processes(netns: str, timeout: float = 5) -> None:
    """SIGKILL everything in a netns until nothing is left (new children may appear meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        out = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        if not out:
            return
        for pid in out:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TestbedError(f"processes left in {netns}: {out}")
        time.sleep(0.05)


def cleanup_run(
    run_id: str,
    netns: Iterable[str] = (),
    dir: Path | str | None = None,
    mountpoint: str | None | bool = None,
) -> list[str]:
    """Remove one run's processes, namespaces, links, temp dir and state file; return what went."""
    removed = []
    names = set(netns) | {ns for ns in list_netns() if ns.startswith(f"{PREFIX}-{run_id}-")}
    for ns in sorted(names):
        with contextlib.suppress(TestbedError):
            kill_netns_processes(ns)
        if run(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(f"netns {ns}")
    for link in list_links():
        mine = link == f"{PREFIX}{run_id}" or link.startswith(f"{PREFIX}{run_id}v")
        if mine and run(["ip", "link", "del", link], check=False).returncode == 0:
            removed.append(f"link {link}")
    if dir and Path(dir).exists():
        shutil.rmtree(dir, ignore_errors=True)
        removed.append(f"dir {dir}")
    with contextlib.suppress(FileNotFoundError):
        _state_path(run_id).unlink()
    if mountpoint:
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)  # only if empty and no other testbed mounts on it
    return removed


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[str]:
    out = run(["ip", "-o", "link", "show"], check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _run_ids_on_machine() -> set[str]:
    ids = {
        ns.split("-")[1]
        for ns in list_netns()
        if ns.startswith(f"{PREFIX}-") and ns.count("-") == 2
    }
    ids |= {
        link[len(PREFIX) : len(PREFIX) + 4]
        for link in list_links()
        if link.startswith(PREFIX) and len(link) >= len(PREFIX) + 4
    }
    ids |= {state["run_id"] for state in _read_states()}
    return ids


def cleanup_stale(include_kept: bool = False) -> list[str]:
    """Remove leftovers of runs whose owning process is gone (kept runs too, if asked)."""
    states = {state["run_id"]: state for state in _read_states()}
    removed = []
    for run_id in sorted(_run_ids_on_machine()):
        state = states.get(run_id, {})
        owner = state.get("owner_pid")
        kept = run_id in states and owner is None
        if _pid_alive(owner) or (kept and not include_kept):
            continue
        netns = [h["netns"] for h in state.get("hosts", [])]
        mountpoint = state.get("made_mountpoint") and state.get("deploy_dir")
        removed += cleanup_run(run_id, netns, state.get("dir"), mountpoint)
    return removed


def kept_runs() -> list[dict]:
    """States of runs started with keep=True (``python -m tests.testbed up``)."""
    return [state for state in _read_states() if state.get("owner_pid") is None]
