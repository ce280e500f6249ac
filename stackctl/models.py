"""Model weights onto the engine hosts: every host ends with a complete, checked copy, and the
weights cross the operator's uplink (or the WAN, for a download) once.

A copy is assembled in a partial directory next to its target (``probe.partial_path``), checked
against a manifest (each file's relative path and size) and renamed into place; the facts call a
model present only when the target's manifest lists files that all exist with their sizes. An
interrupted copy is resumed from its partial directory: ``rsync --partial`` keeps what it had
sent, ``snapshot_download`` resumes into the same ``local_dir``. Sizes, not sha256: hashing 16 GB
takes tens of seconds a host and would have to run at every `up`'s facts to mean anything, while
the transfers check their own data (rsync verifies a whole-file checksum of every file it sends,
huggingface_hub the size of every download); what goes wrong in practice, a copy cut short, shows
in the sizes, and the manifest is written only after ``sync``, so a power loss cannot leave a
manifest in front of data that never reached the disk.

Distribution (``model.distribute``):
``direct``  every host gets the weights from the origin: an rsync over SSH from the operator
            (``model.source``, with the connector's SSH settings: user, port, key, known_hosts
            with StrictHostKeyChecking=yes, the SSH config and its ProxyJump) or its own download.
``peer``    (the default) the first host that needs the weights (the seed) gets them from the
            origin; every other host then pulls them with rsync over SSH from a host that already
            holds a complete copy, over the cluster network. A host serves one peer at a time and a
            host that has finished serves too, so the copies double each round (a tree: 8 hosts
            take 1 origin copy and 3 peer rounds). Hosts that hold a complete copy already are
            skipped and serve from the start.

Keys for host-to-host copies: at the first peer copy `up` generates a fresh Ed25519 key pair for
this run, in memory. The public half goes into the SSH user's ``~/.ssh/authorized_keys`` on each
serving host, locked down as ``restrict,from="<the engine hosts' addresses>",command="rrsync -ro
<model dir>"`` (rrsync ships with rsync: read-only, inside that directory only, no shell, no
forwarding); the private half is written 0600 to the pulling host's ``secrets/`` with a
known_hosts file holding the serving host's key as the operator's own connection verified it
(StrictHostKeyChecking=yes). Both are removed when `up` ends (stale ones, from an interrupted
run, when the next run authorizes the host again). No agent forwarding, no long-lived key, and
no host can write to another.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .connect import BecomeConnector, Connector, q
from .errors import DeployError
from .facts import ModelFacts, run_probe
from .inventory import Cluster, Host
from .plan import HostPlan, ModelSpec
from .probe import MODEL_MANIFEST, partial_path, scan_files, select_model_files

TRANSFER_TIMEOUT_S = 7200  # one copy or download of the weights
PEER_KEY = "model-peer-key"  # in the pulling host's secrets dir, this run only
PEER_KNOWN_HOSTS = "model-peer-known-hosts"
RSYNC = [
    "rsync",
    "-a",
    "--partial",
]  # --partial: a file cut short is kept, and the next try resumes it


# --------------------------------------------------------------------------- the operator's side


def local_model_files(source: str | Path) -> dict[str, int]:
    """The files of a local model directory that are copied (the ones vLLM reads), with sizes."""
    sizes = scan_files(str(Path(source).expanduser()))
    return {path: sizes[path] for path in select_model_files(sorted(sizes))}


def local_manifest(cluster: Cluster, source: str | Path) -> dict:
    return {
        "format": 1,
        "model": cluster.model.name,
        "origin": "upload",
        "files": local_model_files(source),
    }


def model_bytes(plan: HostPlan) -> int | None:
    """How many bytes the host's copy of the weights takes, when that is known before anything
    is copied: a ``model.source`` upload (the files vLLM reads); None for a download or
    ``model.path`` (the Hub's listing is only read on the host)."""
    model = plan.model
    if model is None or model.action != "upload" or not model.local_source:
        return None
    return sum(local_model_files(model.local_source).values())


def check_operator(plans: list[HostPlan]) -> None:
    """Before anything changes: the operator's machine needs rsync to upload a model."""
    if any(p.model and p.model.action == "upload" for p in plans) and shutil.which("rsync") is None:
        raise DeployError(
            "rsync is not installed on this machine, and `up` copies model.source to the hosts with it "
            "(resumable copies). Install it (Debian/Ubuntu: apt install rsync), then run `up` again."
        )


def ssh_argv(host: Host) -> list[str]:
    """The OpenSSH command line that reaches ``host`` exactly as its SSHConnector does: the same
    user, port, key, SSH config (ProxyJump) and known_hosts file, and never an unverified key."""
    ssh = host.ssh
    argv = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={os.path.expanduser(ssh.known_hosts)}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        f"ConnectTimeout={int(ssh.connect_timeout_s)}",
    ]
    if ssh.config:
        argv += ["-F", os.path.expanduser(ssh.config)]
    if ssh.key:
        argv += ["-i", os.path.expanduser(ssh.key)]
    if ssh.user:
        argv += ["-l", ssh.user]
    if ssh.port != 22:  # as the connector: port 22 lets the SSH config's Port apply
        argv += ["-p", str(ssh.port)]
    return argv


def remote_rsync(conn: Connector) -> str:
    """The host's rsync, run as whoever owns the deploy dir (the service user, see privilege.py),
    since the operator's rsync logs in as the SSH user: a command prefix rsync appends its
    arguments to, so no ``sh -c`` wrapper as the connector's own commands use."""
    identity = getattr(conn, "identity", None)
    if identity is None or identity.service_is_login:
        return "rsync"
    if identity.service_uid is None:  # no account yet: as root, as the connector would
        return (
            shlex.join(["sudo", "-n", "-u", identity.become_user, "--", "rsync"])
            if identity.uses_sudo
            else "rsync"
        )
    if identity.is_root:
        return shlex.join(["runuser", "-u", identity.service_user, "--", "rsync"])
    if identity.uses_sudo and identity.become_user != "root":
        return shlex.join(["sudo", "-n", "-u", identity.service_user, "--", "rsync"])
    if identity.uses_sudo:
        return shlex.join(
            [
                "sudo",
                "-n",
                "-u",
                "root",
                "--",
                "runuser",
                "-u",
                identity.service_user,
                "--",
                "rsync",
            ]
        )
    return "rsync"


def _as_login(conn: Connector, command: str, timeout: float | None = 120):
    """As the SSH user itself (its own ~/.ssh), not the service user the connector acts as."""
    if isinstance(conn, BecomeConnector):
        return conn.run(command, raw=True, timeout=timeout)
    return conn.run(command, timeout=timeout)


def _rsync_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def sent_bytes(stats: str) -> int | None:
    """``Total bytes sent`` from rsync --stats."""
    for line in stats.splitlines():
        if line.startswith("Total bytes sent:"):
            return int(line.split(":", 1)[1].strip().replace(",", ""))
    return None


# --------------------------------------------------------------------------- distribution


class ModelDistributor:
    """Gets the model onto every engine host of one `up` that needs it (see the module doc).

    ``install(name, report)`` is called from each host's apply thread and returns when that host
    holds a complete copy; ``close()`` removes this run's peer keys from the hosts."""

    def __init__(self, cluster: Cluster, diffs: dict, conns: dict[str, Connector]):
        self.cluster = cluster
        self.diffs = diffs
        self.conns = conns
        self.peer = cluster.model.distribute == "peer"
        self.marker = (
            "stackctl-model-peer-" + hashlib.sha256(cluster.name.encode()).hexdigest()[:12]
        )
        self._cond = threading.Condition()
        # hosts that hold a complete copy already serve from the start (refused ones stay untouched)
        self._holders = [
            n
            for n, d in diffs.items()
            if not d.problems and self._can_serve(n) and d.facts.model_present
        ]
        self._busy: set[str] = set()
        self._origin_busy = False
        self._key: tuple[bytes, str] | None = None
        self._authorized: set[str] = set()
        self._keyed: set[str] = set()
        self._manifest: dict | None = None
        self.transfers: list[
            dict
        ] = []  # what was copied, from where, when, how long: for reports and benchmarks
        self._created = time.monotonic()

    # ------------------------------------------------------------------ scheduling
    def _managed(self, name: str) -> bool:
        model = self.diffs[name].plan.model
        return bool(model and model.action in ("upload", "download"))

    def _tools(self, name: str) -> ModelFacts:
        """rsync and rrsync on the host (the model facts; none known when it has none)."""
        return self.diffs[name].facts.model or ModelFacts()

    def _can_pull(self, name: str) -> bool:
        conn = self.conns.get(name)
        return (
            self.peer
            and conn is not None
            and not conn.host.is_local
            and bool(self._tools(name).rsync)
        )

    def _can_serve(self, name: str) -> bool:
        return self._can_pull(name) and self._managed(name) and bool(self._tools(name).rrsync)

    def install(self, name: str, report=lambda step: None) -> None:
        """Until ``name`` holds a complete copy: from a free holder when there is one, else from
        the origin when no host holds or is getting the weights from there, else wait for a holder."""
        deadline = time.monotonic() + 3 * TRANSFER_TIMEOUT_S
        source, origin_claimed = None, False
        with self._cond:
            while self._can_pull(name):
                free = [h for h in self._holders if h not in self._busy and h != name]
                if free:
                    source = free[0]
                    self._busy.add(source)
                    break
                if (
                    not self._holders and not self._origin_busy
                ):  # the seed (or the next try after a failed seed)
                    self._origin_busy = origin_claimed = True
                    break
                if time.monotonic() > deadline:
                    raise DeployError(
                        f"{name}: gave up waiting for another engine host to receive the model first."
                    )
                report("model: waiting for a peer")
                self._cond.wait(timeout=5)
        done = False
        started = time.monotonic()
        try:
            how = (
                self._from_origin(name, report)
                if source is None
                else self._from_peer(source, name, report)
            )
            done = True
            self.transfers.append(
                dict(
                    how,
                    to=name,
                    started=round(started - self._created, 2),
                    seconds=round(time.monotonic() - started, 2),
                )
            )
        finally:
            with self._cond:
                if origin_claimed:
                    self._origin_busy = False
                self._busy.discard(source)
                if done and self._can_serve(name):
                    self._holders.append(name)
                self._cond.notify_all()

    # ------------------------------------------------------------------ transfers
    def _plan(self, name: str) -> HostPlan:
        return self.diffs[name].plan

    def _model(self, name: str) -> ModelSpec:
        """The model of a host this class copies to (only engine hosts with weights to fetch)."""
        model = self.diffs[name].plan.model
        assert model is not None and model.remote_path is not None, name
        return model

    def _probe(
        self,
        name: str,
        request: dict,
        timeout: float = 600,
        env: dict | None = None,
        hangup: bool = False,
    ) -> dict:
        plan = self._plan(name)
        answer = run_probe(
            self.conns[name], plan.python, request, timeout=timeout, env=env, hangup=hangup
        )
        assert isinstance(answer, dict), answer  # the model_* actions answer with an object
        return answer

    def _prepare(self, name: str) -> str:
        model = self._model(name)
        return self._probe(
            name, {"action": "model_prepare", "path": model.remote_path, "name": model.name}
        )["partial"]

    def _finish(self, name: str, manifest: dict | None) -> dict:
        model = self._model(name)
        answer = self._probe(
            name,
            {
                "action": "model_finish",
                "path": model.remote_path,
                "name": model.name,
                "manifest": manifest,
            },
        )
        if not answer["ok"]:
            raise DeployError(
                f"{name}: the copy of the model in {partial_path(model.remote_path)} is not complete after the transfer "
                f"({'; '.join(answer['problems'])}). Run `up` again to resume it."
            )
        return answer

    def _from_origin(self, name: str, report) -> dict:
        plan, model = self._plan(name), self._model(name)
        if model.action == "download":
            report("download model")
            token = plan.hf_token_file
            env = {
                "HF_HOME": f"{plan.dirs['cache']}/huggingface",
                "HF_TOKEN_PATH": token,
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            }
            answer = self._probe(
                name,
                {"action": "model_download", "path": model.remote_path, "name": model.name},
                timeout=TRANSFER_TIMEOUT_S,
                env=env,
                hangup=True,
            )
            if not answer["ok"]:
                raise DeployError(
                    f"{name}: the download of {model.name} is incomplete ({'; '.join(answer['problems'])}). Run `up` again to resume it."
                )
            return {
                "kind": "download",
                "from": "hub",
                "bytes": answer["bytes"],
                "sent_by_operator": 0,
            }
        report("upload model")
        assert model.local_source is not None  # an upload
        with self._cond:
            if self._manifest is None:
                self._manifest = local_manifest(self.cluster, model.local_source)
        partial = self._prepare(name)
        sent = self._rsync_from_operator(name, partial)
        answer = self._finish(name, self._manifest)
        return {
            "kind": "upload",
            "from": "operator",
            "bytes": answer["bytes"],
            "sent_by_operator": sent,
        }

    def _rsync_from_operator(self, name: str, partial: str) -> int | None:
        host = self._plan(name).host
        source = str(Path(self._model(name).local_source or "").expanduser())
        assert self._manifest is not None  # read before the first upload
        with tempfile.NamedTemporaryFile(
            "w", prefix="stackctl-model-files-", suffix=".txt"
        ) as listing:
            listing.write("".join(f"{path}\n" for path in self._manifest["files"]))
            listing.flush()
            args = [*RSYNC, "--stats", f"--files-from={listing.name}"]
            if (
                host.is_local
            ):  # this machine: a local copy, through the connector like every command
                result = self.conns[name].run(
                    shlex.join([*args, f"{source}/", f"{partial}/"]),
                    check=False,
                    timeout=TRANSFER_TIMEOUT_S,
                )
                ok, output = result.ok, result.stdout + result.stderr
            else:
                argv = [
                    *args,
                    "-e",
                    shlex.join(ssh_argv(host)),
                    f"--rsync-path={remote_rsync(self.conns[name])}",
                    f"{source}/",
                    f"{_rsync_host(host.address)}:{partial}/",
                ]
                try:
                    proc = subprocess.run(
                        argv,
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        text=True,
                        timeout=TRANSFER_TIMEOUT_S,
                    )
                except subprocess.TimeoutExpired:
                    raise DeployError(
                        f"{name}: uploading the model took more than {TRANSFER_TIMEOUT_S} s; run `up` again to resume it."
                    ) from None
                ok, output = proc.returncode == 0, proc.stdout + proc.stderr
        if not ok:
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise DeployError(
                f"{name}: uploading the model with rsync failed:\n{tail}\n"
                f"What arrived is kept in {partial}; run `up` again to resume."
            )
        return sent_bytes(output)

    # ------------------------------------------------------------------ host to host
    def _keypair(self) -> tuple[bytes, str]:
        """This run's key: (OpenSSH private key, public key line), made once, never on disk here."""
        with self._cond:
            if self._key is None:
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

                key = Ed25519PrivateKey.generate()
                private = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
                public = (
                    key.public_key()
                    .public_bytes(
                        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                    )
                    .decode()
                )
                self._key = (private, public)
            return self._key

    def _peer_addresses(self) -> list[str] | None:
        """The addresses the pulling hosts connect from (their own), for ``from=``; None when one
        of them is a name, which sshd would only match through DNS."""
        addresses = []
        for name, conn in self.conns.items():
            if name in self.diffs and self._managed(name) and not conn.host.is_local:
                address = conn.endpoint()["address"]
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    return None
                addresses.append(address)
        return sorted(set(addresses))

    def authorized_line(self, source: str) -> str:
        """The serving host's authorized_keys line: read-only rsync of its model dir, from the
        cluster's hosts only, nothing else (no shell, pty or forwarding)."""
        tools = self._tools(source)
        path = self._model(source).remote_path
        assert path is not None and tools.rrsync is not None  # only hosts that _can_serve
        if any(c in path for c in '"\n\\'):
            raise DeployError(
                f"{source}: the model path {path!r} cannot go into an authorized_keys command; "
                "use a path without quotes or backslashes, or set model.distribute: direct."
            )
        addresses = self._peer_addresses()
        options = ["restrict"] + ([f'from="{",".join(addresses)}"'] if addresses else [])
        options.append(f'command="{q(tools.rrsync)} -ro {q(path)}"')
        return f"{','.join(options)} {self._keypair()[1]} {self.marker}"

    def _authorize(self, source: str) -> None:
        with self._cond:
            if source in self._authorized:
                return
            self._authorized.add(source)
        keys = "~/.ssh/authorized_keys"  # of the SSH user, whom the pulling host logs in as
        _as_login(
            self.conns[source],
            f"umask 077 && mkdir -p ~/.ssh && touch {keys} && sed -i '/{self.marker}/d' {keys} && "
            f"printf '%s\\n' {q(self.authorized_line(source))} >> {keys}",
        )

    def _from_peer(self, source: str, name: str, report) -> dict:
        report(f"model from {source}")
        self._authorize(source)
        plan, conn = self._plan(name), self.conns[name]
        where = self.conns[source].endpoint()
        key_type, key = where["host_key"]
        pattern = (
            where["address"] if where["port"] == 22 else f"[{where['address']}]:{where['port']}"
        )
        key_file, known_hosts = (
            f"{plan.dirs['secrets']}/{PEER_KEY}",
            f"{plan.dirs['secrets']}/{PEER_KNOWN_HOSTS}",
        )
        conn.put_bytes(self._keypair()[0], key_file, 0o600)
        conn.put_bytes(f"{pattern} {key_type} {key}\n".encode(), known_hosts, 0o600)
        with self._cond:
            self._keyed.add(name)
        partial = self._prepare(name)
        ssh = shlex.join(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                key_file,
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-p",
                str(where["port"]),
            ]
        )
        remote = f"{where['user']}@{_rsync_host(where['address'])}:"  # rrsync serves the model dir itself
        result = conn.run(
            shlex.join([*RSYNC, "--delete", "-e", ssh, remote, f"{partial}/"]),
            check=False,
            timeout=TRANSFER_TIMEOUT_S,
            hangup=True,
        )
        if not result.ok:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise DeployError(
                f"{name}: copying the model from {source} ({where['address']}) with rsync over SSH failed:\n{tail}\n"
                f"The engine hosts must reach each other over SSH for model.distribute: peer; allow that, or set "
                f"model.distribute: direct. What arrived is kept in {partial}; `up` resumes it."
            )
        answer = self._finish(name, None)
        return {"kind": "peer", "from": source, "bytes": answer["bytes"], "sent_by_operator": 0}

    # ------------------------------------------------------------------ cleanup
    def close(self) -> list[str]:
        """Remove this run's key from every host that got it; what could not be removed."""
        left = []
        for name in sorted(self._authorized):
            with contextlib.suppress(Exception):
                _as_login(
                    self.conns[name],
                    f"sed -i '/{self.marker}/d' ~/.ssh/authorized_keys",
                    timeout=60,
                )
                continue
            left.append(
                f"{name}: ~/.ssh/authorized_keys still holds a read-only key marked {self.marker}"
            )
        for name in sorted(self._keyed):
            secrets = self._plan(name).dirs["secrets"]
            with contextlib.suppress(Exception):
                self.conns[name].run(
                    f"rm -f {q(secrets + '/' + PEER_KEY)} {q(secrets + '/' + PEER_KNOWN_HOSTS)}",
                    timeout=60,
                )
                continue
            left.append(f"{name}: {secrets}/{PEER_KEY} is still there")
        self._authorized.clear()
        self._keyed.clear()
        return left


__all__ = [
    "MODEL_MANIFEST",
    "ModelDistributor",
    "check_operator",
    "local_manifest",
    "local_model_files",
    "model_bytes",
    "ssh_argv",
]
