"""Inventory: YAML -> a typed, validated :class:`Cluster`.

The YAML is composed into nodes first so that every value keeps its line number; all checks
report ``file:line: key.path: what is wrong; what would be right`` and exit with code 2.
Layering, lowest first: role defaults (roles/*/defaults.yaml), the inventory's cluster-level
keys, the chosen profile (a deep-merged overlay), then each host's own ``engine:`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml

from .errors import InventoryError
from .resources import roles_dir
from .roles import control_char, supervisor_env_problem
from .settings import (
    MODEL_DEFAULTS,
    CpuSettings,
    EngineKind,
    EngineSettings,
    LMCacheSettings,
    ModelSettings,
    RouterSettings,
    SimSettings,
    as_dict,
    build,
    schema,
)
from .tokenizer_files import TOKENIZER_FILE

ENGINE_KINDS = get_args(EngineKind)
CONNECTIONS = ("ssh", "local")
HOST_ROLES = ("engine", "router")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# deploy_dir is written bare into supervisord.conf (directory=, logfile=, include files=, which
# splits on spaces and expands %) and into rsync paths (where ':' means a remote): path
# characters only.
DEPLOY_DIR = re.compile(r"^(/[\w.+@-]+)+/?$")
# Refused as deploy_dir (down --purge empties it): these and anything of depth < 2; under the
# trees below nothing at all.
SYSTEM_DIRS = (
    "/usr/local",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/lib64",
    "/usr/share",
    "/usr/include",
    "/usr/src",
    "/var/lib",
    "/var/log",
    "/var/tmp",
    "/var/cache",
    "/var/spool",
    "/var/run",
    "/var/opt",
    "/var/mail",
    "/var/www",
    "/var/backups",
    "/var/local",
)
SYSTEM_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/run",
)
# What a token pasted where an environment variable's name belongs looks like.
KeyPath = tuple[
    str | int, ...
]  # where a value sits in the inventory: ("hosts", 1, "engine", "port")
TOKEN_PREFIXES = ("hf_", "sk-", "sk_", "ghp_", "gho_", "github_pat_", "xoxb-", "xoxp-", "glpat-")

# --------------------------------------------------------------------------- schema
# A schema is a dict of key -> type spec. Type specs: a Python type or tuple of types, a
# nested dict (a mapping with known keys), ("list", spec), ("map", spec) (free keys), or
# ("enum", values). ``None`` in a tuple allows null.

NUM = (int, float)
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))

LMCACHE_SCHEMA = schema(LMCacheSettings)
SIM_SCHEMA = schema(SimSettings)
CPU_SCHEMA = schema(CpuSettings)
ENGINE_SCHEMA = schema(EngineSettings)
ROUTER_SCHEMA = schema(RouterSettings)
MODEL_SCHEMA = schema(ModelSettings)
SSH_SCHEMA = {
    "user": OPT_STR,
    "port": int,
    "key": OPT_STR,
    "known_hosts": OPT_STR,
    "config": OPT_STR,
    "connect_timeout_s": NUM,
}
# engine.bind: auto (the default) listens on the host's cluster_address when it names one,
# else on every address (ENGINE_BIND_ANY), as before there was a cluster address.
ENGINE_BIND_AUTO = "auto"
ENGINE_BIND_ANY = "0.0.0.0"
HOST_SCHEMA = {
    "name": str,
    "address": OPT_STR,
    "cluster_address": OPT_STR,
    "connection": ("enum", CONNECTIONS),
    "roles": ("list", ("enum", HOST_ROLES)),
    "gpus": ("list", int),
    "ssh": SSH_SCHEMA,
    "deploy_dir": str,
    "python": str,
    "install": bool,
    "become": bool,
    "become_user": str,
    "service_user": OPT_STR,
    "engine": ENGINE_SCHEMA,
}
CLUSTER_SCHEMA = {
    "cluster": str,
    "ssh": SSH_SCHEMA,
    "deploy_dir": str,
    "python": str,
    "install": bool,
    "become": bool,
    "become_user": str,
    "service_user": OPT_STR,
    "model": MODEL_SCHEMA,
    "engine": ENGINE_SCHEMA,
    "router": ROUTER_SCHEMA,
    "hosts": ("list", HOST_SCHEMA),
    "profiles": ("map", {"engine": ENGINE_SCHEMA, "router": ROUTER_SCHEMA, "model": MODEL_SCHEMA}),
}
REQUIRED = {
    (): ("cluster", "model", "hosts"),
    ("model",): ("name",),
    ("hosts", "*"): ("name",),
}
TOP_DEFAULTS = {
    "deploy_dir": "/opt/stackctl",
    "python": "python3",
    "install": True,
    "become": False,
    "become_user": "root",
}
# Programs run as this system account (created by `up`) on SSH hosts; on local hosts as the
# user running stackctl (service_user: null), so the demo needs neither sudo nor new accounts.
SERVICE_USER_DEFAULT = "stackctl"
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SSH_DEFAULTS = {
    "user": None,
    "port": 22,
    "key": None,
    "known_hosts": "~/.ssh/known_hosts",
    "config": None,
    "connect_timeout_s": 10,
}

# --------------------------------------------------------------------------- typed model


@dataclass(frozen=True)
class SshSettings:
    user: str | None
    port: int
    key: str | None
    known_hosts: str
    config: str | None
    connect_timeout_s: float


@dataclass(frozen=True)
class Engine:
    """One engine process: a vLLM (or simulator) server on some GPUs of one host."""

    host: str
    index: int
    port: int
    gpus: tuple[int, ...]
    kv_events_port: int = 0  # its KV events' PUB port (replay: + 1), with router.kv_index: events

    @property
    def name(self) -> str:
        return f"{self.host}-{self.index}"

    @property
    def program(self) -> str:
        return f"engine-{self.index}"


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    connection: str
    roles: tuple[str, ...]
    gpus: tuple[int, ...]
    ssh: SshSettings
    deploy_dir: str
    python: str  # interpreter on the host: creates the venv, or runs programs when install is off
    install: bool  # create <deploy_dir>/venv and install packages, or use `python` as it is
    engine: EngineSettings
    engines: tuple[Engine, ...]
    line: int
    become: bool = (
        False  # privileged steps (accounts, the deploy dir) through `sudo -n -u become_user`
    )
    become_user: str = "root"
    service_user: str | None = None  # the account programs run as; None: the connecting user
    # the address the router reaches this host's engines at (and, with engine.bind: auto, the
    # only one they listen on); None: ``address``
    cluster_address: str | None = None

    @property
    def is_local(self) -> bool:
        return self.connection == "local"

    @property
    def runs_engines(self) -> bool:
        return "engine" in self.roles


@dataclass(frozen=True)
class Cluster:
    name: str
    source: str
    profile: str | None
    model: ModelSettings
    engine: EngineSettings
    router: RouterSettings
    hosts: tuple[Host, ...]
    profiles: tuple[str, ...] = field(default=())

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    @property
    def router_hosts(self) -> tuple[Host, ...]:
        """Every host that runs a router, in inventory order: roles naming ``router``, and
        ``router.host`` (the older one-router spelling). Each router routes to every engine."""
        return tuple(h for h in self.hosts if self.runs_router(h))

    @property
    def router_host(self) -> Host:
        """The first router host: it keeps the generated engine key, and `bench` and `up`'s
        summary use its router."""
        return self.router_hosts[0]

    def runs_router(self, host: Host) -> bool:
        return "router" in host.roles or host.name == self.router.host

    @property
    def engines(self) -> list[Engine]:
        return [e for h in self.hosts for e in h.engines]

    @property
    def router_url(self) -> str:
        """The first router's URL (see :attr:`router_host`)."""
        return self.router_url_of(self.router_host)

    def router_url_of(self, host: Host) -> str:
        return f"http://{_url_host(host.address)}:{self.router.port}"

    @property
    def router_urls(self) -> list[str]:
        """Every router's URL, in :attr:`router_hosts` order."""
        return [self.router_url_of(h) for h in self.router_hosts]

    def kv_event_endpoints(self, engine: Engine) -> KvEventEndpoints | None:
        """Where ``engine`` publishes its KV events and the router reaches them (None unless
        ``router.kv_index: events``)."""
        return _kv_event_endpoints(self, engine)

    def engine_url(self, engine: Engine) -> str:
        host = self.host(engine.host)
        return f"http://{_url_host(host.cluster_address or host.address)}:{engine.port}"

    def secret_env_vars(self) -> list[tuple[str, str]]:
        """(key path, environment variable name) of every secret the inventory references."""
        return [(format_path(path), name) for path, name in self.secret_refs()]

    def secret_refs(self) -> list[tuple[KeyPath, str]]:
        """As :meth:`secret_env_vars`, with key paths as tuples (for file:line errors)."""
        refs: list[tuple[KeyPath, str]] = []
        if self.model.hf_token_env:
            refs.append((("model", "hf_token_env"), self.model.hf_token_env))
        if self.router.api_keys_env:
            refs.append((("router", "api_keys_env"), self.router.api_keys_env))
        if self.router.engine_key_env:
            refs.append((("router", "engine_key_env"), self.router.engine_key_env))
        for client_name, client in self.router.clients.items():
            if client.key_env:
                refs.append((("router", "clients", client_name, "key_env"), client.key_env))
        for key, value in self.engine.env.items():
            if (name := env_secret(value)) is not None:
                refs.append((("engine", "env", key, "from_env"), name))
        for i, host in enumerate(self.hosts):
            for key, value in host.engine.env.items():
                if (name := env_secret(value)) is not None and self.engine.env.get(
                    key
                ) != value:  # the host's own
                    refs.append((("hosts", i, "engine", "env", key, "from_env"), name))
        return refs


def env_secret(value) -> str | None:
    """The variable an ``engine.env`` value ``{from_env: VAR}`` takes its secret from, or None."""
    return value.get("from_env") if isinstance(value, Mapping) else None


def _url_host(address: str) -> str:
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]"
    except ValueError:
        pass
    return address


# --------------------------------------------------------------------------- loading


class _Doc:
    """Plain data from a YAML node tree, plus the line of every key path."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[tuple, int] = {}
        self._constructor = yaml.SafeLoader("")  # turns resolved scalar nodes into values

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def error(self, path: tuple, message: str) -> InventoryError:
        line = self.line(path)
        where = f"{self.source}:{line}" if line else self.source
        key = format_path(path)
        return InventoryError(f"{where}: {key + ': ' if key else ''}{message}")

    def to_python(self, node: yaml.Node, path: tuple = ()) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.error(path, "keys must be plain strings.")
                key = key_node.value
                if key in result:
                    self.lines[path + (key,)] = key_node.start_mark.line + 1
                    raise self.error(path + (key,), f"the key '{key}' appears twice; keep one.")
                result[key] = self.to_python(value_node, path + (key,))
                self.lines[path + (key,)] = key_node.start_mark.line + 1
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.to_python(item, path + (i,)) for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)


def format_path(path: tuple) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _read_yaml(path: Path) -> tuple[Any, _Doc]:
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InventoryError(
            f"{source}: no such file. Give the path of an inventory YAML file, e.g. inventory/local.yaml."
        ) from None
    except OSError as exc:
        raise InventoryError(f"{source}: cannot read the inventory: {exc.strerror}.") from None
    doc = _Doc(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise InventoryError(
            f"{where}: the file is not valid YAML ({problem}). Fix the syntax at that line (indentation, a missing ':' or an unclosed bracket or quote)."
        ) from None
    if node is None:
        raise InventoryError(
            f"{source}: the inventory is empty; it needs at least 'cluster', 'model' and 'hosts' (see docs/inventory.md)."
        )
    data = doc.to_python(node)
    if not isinstance(data, dict):
        raise doc.error(
            (),
            "the inventory must be a mapping of keys (cluster, model, hosts, ...), not a list or a scalar.",
        )
    return data, doc


def _load_role_defaults(role: str) -> dict:
    defaults = yaml.safe_load((roles_dir() / role / "defaults.yaml").read_text()) or {}
    if role == "router":  # what router.yaml carries defaults to the router's own config
        from .router_document import inventory_defaults

        defaults = {**inventory_defaults(), **defaults}
    return defaults


# --------------------------------------------------------------------------- checking

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
    list: "a list",
    dict: "a mapping",
}


def _describe(spec) -> str:
    if isinstance(spec, dict):
        return "a mapping"
    if isinstance(spec, tuple) and spec and spec[0] == "list":
        return "a list"
    if isinstance(spec, tuple) and spec and spec[0] == "map":
        return "a mapping"
    if isinstance(spec, tuple) and spec and spec[0] == "enum":
        return "one of " + ", ".join(spec[1])
    if isinstance(spec, tuple):
        names = [_TYPE_NAMES.get(t, t.__name__) for t in spec]
        if names[:2] == ["an integer", "a number"]:
            names = names[1:]
        return " or ".join(names)
    return _TYPE_NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def _type_ok(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def check_schema(doc: _Doc, value, spec, path: tuple) -> None:
    """Raise an InventoryError for the first value that does not fit ``spec``."""
    if spec is object:
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise doc.error(
                path, f"expected a mapping of keys ({', '.join(spec)}), got {_show(value)}."
            )
        for key, item in value.items():
            if key not in spec:
                raise doc.error(
                    path + (key,),
                    f"unknown key '{key}'.{_did_you_mean(key, spec)} Allowed keys here: {', '.join(spec)}.",
                )
            check_schema(doc, item, spec[key], path + (key,))
        return
    if isinstance(spec, tuple) and spec and spec[0] == "list":
        if not isinstance(value, list):
            raise doc.error(
                path,
                f"expected a list, got {_show(value)}; write it as [a, b] or one '- item' per line.",
            )
        for i, item in enumerate(value):
            check_schema(doc, item, spec[1], path + (i,))
        return
    if isinstance(spec, tuple) and spec and spec[0] == "map":
        if not isinstance(value, dict):
            raise doc.error(path, f"expected a mapping, got {_show(value)}.")
        for key, item in value.items():
            check_schema(doc, item, spec[1], path + (key,))
        return
    if isinstance(spec, tuple) and spec and spec[0] == "enum":
        if value not in spec[1]:
            hint = _did_you_mean(str(value), spec[1])
            raise doc.error(
                path, f"'{value}' is not allowed.{hint} Use one of: {', '.join(spec[1])}."
            )
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    if float in types and int not in types:
        types = types + (int,)
    if not _type_ok(value, types):
        raise doc.error(path, f"expected {_describe(spec)}, got {_show(value)}.")


def _check_text(doc: _Doc, value, path: tuple) -> None:
    """No control characters or line breaks anywhere: strings end up in supervisor's INI files,
    systemd units and command lines, where a newline would start a new section or program."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (char := control_char(key)) is not None:
                raise doc.error(
                    path,
                    f"a key here holds a control character or line break (U+{ord(char):04X}); keys are plain names: remove it.",
                )
            _check_text(doc, item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(doc, item, path + (i,))
    elif isinstance(value, str) and (char := control_char(value)) is not None:
        raise doc.error(
            path,
            f"the value holds a control character or line break (U+{ord(char):04X}), which would break the supervisor config, unit or command line it is written into; remove it (the value is not shown: it may be a secret).",
        )


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )
    return f"'{value}' ({kind})"


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_required(doc: _Doc, data: dict) -> None:
    for key in REQUIRED[()]:
        if key not in data or data[key] is None:
            raise doc.error((), f"the required key '{key}' is missing. {_REQUIRED_HINTS[key]}")
    if "name" not in data["model"]:
        raise doc.error(
            ("model",),
            "the required key 'name' is missing; name the model, e.g. name: meta-llama/Llama-3.1-8B-Instruct.",
        )
    for i, host in enumerate(data["hosts"]):
        if "name" not in host:
            raise doc.error(
                ("hosts", i),
                "the required key 'name' is missing; give every host a unique name, e.g. name: gpu01.",
            )


_REQUIRED_HINTS = {
    "cluster": "Name the cluster, e.g. cluster: a100-8.",
    "model": "Say which model to serve, e.g. model: {name: meta-llama/Llama-3.1-8B-Instruct}.",
    "hosts": "List the hosts, e.g. hosts: [{name: gpu01, address: 10.0.0.11, gpus: [0]}].",
}


def deep_merge(base: dict, overlay: dict) -> dict:
    """A new dict: ``overlay`` merged into ``base``, recursing into mappings."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _relocate_lines(doc: _Doc, src: tuple, dst: tuple) -> None:
    """Make errors about merged-in values point at the overlay that set them."""
    for path, line in list(doc.lines.items()):
        if path[: len(src)] == src and len(path) > len(src):
            doc.lines[dst + path[len(src) :]] = line


def load_inventory(path: str | Path, profile: str | None = None) -> Cluster:
    """Read, merge and validate an inventory; raise InventoryError on any mistake."""
    path = Path(path)
    data, doc = _read_yaml(path)
    check_schema(doc, data, CLUSTER_SCHEMA, ())
    _check_text(doc, data, ())
    _check_required(doc, data)
    profiles = data.get("profiles") or {}
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(profiles) or "none are defined"
            raise InventoryError(
                f"{path}: profile '{profile}' is not defined under 'profiles'.{_did_you_mean(profile, profiles)} Defined profiles: {known}."
            )
        for key in profiles[profile]:
            _relocate_lines(doc, ("profiles", profile, key), (key,))
            doc.lines.setdefault((key,), doc.lines[("profiles", profile, key)])
        data = deep_merge(data, profiles[profile])
    engine = deep_merge(_load_role_defaults("engine"), data.get("engine") or {})
    router = deep_merge(_load_role_defaults("router"), data.get("router") or {})
    model = build(ModelSettings, deep_merge(MODEL_DEFAULTS, data["model"]))
    top = deep_merge(
        TOP_DEFAULTS, {k: data[k] for k in (*TOP_DEFAULTS, "service_user") if k in data}
    )
    ssh = deep_merge(SSH_DEFAULTS, data.get("ssh") or {})
    hosts = tuple(_build_host(doc, i, h, engine, ssh, top) for i, h in enumerate(data["hosts"]))
    cluster = Cluster(
        name=data["cluster"],
        source=str(path),
        profile=profile,
        model=model,
        engine=build(EngineSettings, engine),
        router=build(RouterSettings, router),
        hosts=hosts,
        profiles=tuple(profiles),
    )
    _check_cluster(doc, cluster)
    return cluster


def _build_host(doc: _Doc, i: int, raw: dict, engine: dict, ssh: dict, top: dict) -> Host:
    path = ("hosts", i)
    connection = raw.get("connection", "ssh")
    roles = tuple(raw.get("roles") or ("engine",))
    host_engine = build(EngineSettings, deep_merge(engine, raw.get("engine") or {}))
    if host_engine.bind == ENGINE_BIND_AUTO:  # the host's cluster address, when it names one
        host_engine = dataclasses.replace(
            host_engine, bind=raw.get("cluster_address") or ENGINE_BIND_ANY
        )
    address = raw.get("address")
    if address is None:
        if connection != "local":
            raise doc.error(
                path,
                f"host '{raw['name']}' has no 'address'; give its IP or DNS name, or set connection: local for this machine.",
            )
        address = "127.0.0.1"
    if "engine" in roles and raw.get("gpus") == []:
        raise doc.error(
            path + ("gpus",),
            f"host '{raw['name']}' runs engines but lists no GPUs; list its GPU indices (e.g. gpus: [0, 1]), or give it roles: [router] if it runs no engine.",
        )
    gpus = tuple(raw.get("gpus") or ((0,) if "engine" in roles else ()))
    _check_gpus(doc, path, raw["name"], gpus, host_engine)
    engines: tuple[Engine, ...] = ()
    if "engine" in roles:
        tp = host_engine.tensor_parallel_size
        engines = tuple(
            Engine(
                host=raw["name"],
                index=k,
                port=host_engine.port + k,
                gpus=gpus[k * tp : (k + 1) * tp],
                kv_events_port=host_engine.kv_events_port + 2 * k,
            )
            for k in range(len(gpus) // tp)
        )
    return Host(
        name=raw["name"],
        address=address,
        connection=connection,
        roles=roles,
        gpus=gpus,
        ssh=SshSettings(**deep_merge(ssh, raw.get("ssh") or {})),
        deploy_dir=raw.get("deploy_dir", top["deploy_dir"]),
        python=raw.get("python", top["python"]),
        install=raw.get("install", top["install"]),
        engine=host_engine,
        engines=engines,
        line=doc.line(path) or 0,
        become=raw.get("become", top["become"]),
        become_user=raw.get("become_user", top["become_user"]),
        service_user=raw.get(
            "service_user",
            top.get("service_user", None if connection == "local" else SERVICE_USER_DEFAULT),
        ),
        cluster_address=raw.get("cluster_address"),
    )


def _check_gpus(doc: _Doc, path: tuple, name: str, gpus: tuple, engine: EngineSettings) -> None:
    seen = set()
    for k, gpu in enumerate(gpus):
        if gpu < 0:
            raise doc.error(
                path + ("gpus", k),
                f"GPU index {gpu} is negative; use the indices nvidia-smi shows (0, 1, ...).",
            )
        if gpu in seen:
            raise doc.error(
                path + ("gpus", k),
                f"GPU index {gpu} is listed twice on host '{name}'; list each GPU once.",
            )
        seen.add(gpu)
    tp = engine.tensor_parallel_size
    if tp < 1:
        raise doc.error(path, f"engine.tensor_parallel_size is {tp}; it must be 1 or more.")
    if gpus and len(gpus) % tp:
        raise doc.error(
            path + ("gpus",),
            f"host '{name}' has {len(gpus)} GPU(s), which tensor_parallel_size {tp} does not divide; list a multiple of {tp} GPUs or change tensor_parallel_size.",
        )


def _check_cluster(doc: _Doc, cluster: Cluster) -> None:
    _check_values(doc, ("engine",), cluster.engine)  # first, so a shared mistake points at engine:
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], str] = {}
    for i, host in enumerate(cluster.hosts):
        path = ("hosts", i)
        if not HOST_NAME.match(host.name):
            raise doc.error(
                path + ("name",),
                f"'{host.name}' is not a usable host name; use letters, digits, '-', '_' and '.'.",
            )
        if host.name in names:
            raise doc.error(
                path + ("name",),
                f"host name '{host.name}' is used twice (also at hosts[{names[host.name]}]); host names must be unique.",
            )
        names[host.name] = i
        if not host.is_local:
            key = (host.address, host.ssh.port)
            if key in addresses:
                raise doc.error(
                    path + ("address",),
                    f"address {host.address} (ssh port {host.ssh.port}) is used twice (also by host '{addresses[key]}'); each host needs its own address.",
                )
            addresses[key] = host.name
        if not host.deploy_dir.startswith("/"):
            raise doc.error(
                path + ("deploy_dir",),
                f"deploy_dir '{host.deploy_dir}' must be an absolute path, e.g. /opt/stackctl.",
            )
        problem = _deploy_dir_problem(host.deploy_dir)
        if problem:
            raise doc.error(
                path + ("deploy_dir",) if path + ("deploy_dir",) in doc.lines else ("deploy_dir",),
                problem,
            )
        _check_ssh(doc, path, host)
        _check_accounts(doc, path, host)
        _check_values(doc, path + ("engine",), host.engine)
    named = cluster.router.host
    if named is not None and named not in names:
        raise doc.error(
            ("router", "host"),
            f"router host '{named}' is not one of the hosts.{_did_you_mean(named, names)} Hosts: {', '.join(names)}.",
        )
    if not cluster.router_hosts:
        raise doc.error(
            ("hosts",),
            "no host runs the router; give the host that should run it roles: [router] (or [engine, router] on an engine host), or name it in router.host.",
        )
    for i, host in enumerate(cluster.hosts):
        loopback = host.engine.bind in ("127.0.0.1", "localhost", "::1")
        for router_host in cluster.router_hosts:
            if (
                host.runs_engines
                and loopback
                and host.name != router_host.name
                and not (host.is_local and router_host.is_local)
            ):
                raise doc.error(
                    ("hosts", i),
                    f"the engines of '{host.name}' would listen on {host.engine.bind} only, so the router on '{router_host.name}' could not reach them; set engine.bind to 0.0.0.0 or the host's address.",
                )
    if not cluster.engines:
        raise doc.error(
            ("hosts",),
            "no host runs an engine; give at least one host the 'engine' role (the default) and GPUs, e.g. gpus: [0].",
        )
    _check_router(doc, cluster.router)
    _check_vip(doc, cluster)
    _check_kv_index(doc, cluster)
    _check_context(doc, cluster)
    _check_ports(doc, cluster)
    _check_extra_args(doc, cluster)
    for key_path, env_name in cluster.secret_refs():
        problem = _secret_name_problem(env_name)
        if problem:
            raise doc.error(key_path, problem)


def _deploy_dir_problem(deploy_dir: str) -> str | None:
    """`down --purge` empties the deploy dir: it must be a directory of stackctl's own."""
    norm = deploy_dir.rstrip("/") or "/"
    parts = [p for p in norm.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return f"deploy_dir '{deploy_dir}' has '.' or '..' in it; write the plain absolute path, e.g. /opt/stackctl."
    shared = len(parts) < 2 or norm in SYSTEM_DIRS or (parts[0] == "home" and len(parts) == 2)
    if shared or any(norm == t or norm.startswith(t + "/") for t in SYSTEM_TREES):
        return (
            f"deploy_dir '{deploy_dir}' is not a directory of its own (a system directory, a home directory or one "
            "just below /): stackctl owns the deploy dir and `down --purge` removes what it made there. "
            "Use a dedicated directory, e.g. /opt/stackctl or /home/you/stackctl."
        )
    if not DEPLOY_DIR.match(deploy_dir):
        return (
            f"deploy_dir '{deploy_dir}' may hold only letters, digits, '.', '_', '+', '@' and '-' between slashes "
            "(it is written unquoted into supervisord.conf); choose a plain path, e.g. /opt/stackctl."
        )
    return None


def _secret_name_problem(name: str) -> str | None:
    """Secrets are named by environment variable; a pasted token is refused, never echoed."""
    lower, upper, digit = (any(f(c) for c in name) for f in (str.islower, str.isupper, str.isdigit))
    if (name.startswith(TOKEN_PREFIXES) and len(name) >= 16) or (
        lower and digit and (len(name) >= 32 or (upper and len(name) >= 20))
    ):
        return (
            "this looks like a secret value (a token), not an environment variable name (the value is not shown). "
            "Put the secret in an environment variable (export HF_TOKEN=...) and write the variable's name here, e.g. HF_TOKEN; "
            "if the token was shared or committed anywhere, revoke it."
        )
    if not ENV_NAME.match(name):
        return (
            "the value is not an environment variable name (letters, digits and '_', not starting with a digit); "
            "name the variable that holds the secret (e.g. HF_TOKEN), never the secret itself."
        )
    return None


def _check_ssh(doc: _Doc, path: tuple, host: Host) -> None:
    def where(key):  # the host's own key, else the top-level one
        return path + ("ssh", key) if path + ("ssh", key) in doc.lines else ("ssh", key)

    if not 1 <= host.ssh.port <= 65535:
        raise doc.error(
            where("port"),
            f"port {host.ssh.port} is out of range; use 1-65535 (SSH listens on 22 by default).",
        )
    if not host.ssh.connect_timeout_s > 0:
        raise doc.error(
            where("connect_timeout_s"),
            f"connect_timeout_s is {host.ssh.connect_timeout_s}; a duration must be above 0 seconds (e.g. 10).",
        )


ROUTER_DURATIONS = (
    "health_interval_s",
    "health_timeout_s",
    "header_timeout_s",
    "body_timeout_s",
    "keepalive_timeout_s",
    "connect_timeout_s",
    "first_byte_timeout_s",
    "chunk_gap_timeout_s",
    "total_timeout_s",
)


def _check_router(doc: _Doc, router: RouterSettings) -> None:
    """What the router itself would refuse in router.yaml, caught before anything is deployed."""
    from .router.config import POLICY_OPTION_DEFAULTS, RouterConfigError, check_policy_options

    if not 1 <= router.port <= 65535:
        raise doc.error(("router", "port"), f"port {router.port} is out of range; use 1-65535.")
    for key in ROUTER_DURATIONS:
        if not getattr(router, key) > 0:
            raise doc.error(
                ("router", key),
                f"{key} is {getattr(router, key)}; a duration must be above 0 seconds.",
            )
    if router.retries < 0:
        raise doc.error(
            ("router", "retries"), f"retries is {router.retries}; use 0 (no retry) or more."
        )
    if router.max_body_bytes <= 0:
        raise doc.error(
            ("router", "max_body_bytes"),
            f"max_body_bytes is {router.max_body_bytes}; use a positive size in bytes (default 16777216).",
        )
    for key in ("max_connections", "max_connections_per_client"):
        if getattr(router, key) <= 0:
            raise doc.error(
                ("router", key),
                f"{key} is {getattr(router, key)}; use a positive number of connections.",
            )
    policy = router.policy
    for key, value in router.policy_options.items():
        try:  # one key at a time, so the error points at its line
            check_policy_options(policy, {key: value})
        except RouterConfigError as exc:
            hint = _did_you_mean(str(key), POLICY_OPTION_DEFAULTS[policy])
            raise doc.error(
                ("router", "policy_options", key),
                f"the router would refuse its config: {exc}.{hint}",
            ) from None
    _check_admission(doc, router)


def _check_admission(doc: _Doc, router: RouterSettings) -> None:
    """Admission caps and named clients (router.clients), as the router would check them."""
    from .router.config import CLIENT_NAME, DEFAULT_CLIENT, RouterConfigError, parse_clients

    for key in ("max_inflight", "max_body_bytes_inflight", "max_prompt_chars", "write_timeout_s"):
        value = getattr(router, key)
        if value is not None and not value > 0:
            raise doc.error(
                ("router", key),
                f"{key} is {value}; use a positive number"
                + (", or null for no cap." if key != "write_timeout_s" else " of seconds."),
            )
    seen: dict[str, KeyPath] = (
        {router.api_keys_env: ("router", "api_keys_env")} if router.api_keys_env else {}
    )
    for name, client in router.clients.items():
        path = ("router", "clients", name)
        if not CLIENT_NAME.match(name):
            raise doc.error(
                path,
                f"client name '{name}' is not a plain name; use 1-64 letters, digits, '_', '.' "
                "or '-', starting with a letter or digit (it names the client in metrics).",
            )
        if name == DEFAULT_CLIENT and client.key_env:
            raise doc.error(
                path + ("key_env",),
                f"the client '{DEFAULT_CLIENT}' has the keys of router.api_keys_env (or, without "
                "keys, every request); give it limits only, or name the client differently.",
            )
        if name != DEFAULT_CLIENT and not client.key_env:
            raise doc.error(
                path,
                f"client '{name}' has no key_env; name the environment variable that holds its "
                f"key(s), e.g. key_env: {re.sub(r'[^A-Z0-9]', '_', name.upper())}_KEY.",
            )
        if client.key_env in seen:
            raise doc.error(
                path + ("key_env",),
                f"{client.key_env} is also {format_path(seen[client.key_env])}; a key belongs "
                "to one client: give each its own variable.",
            )
        if client.key_env:
            seen[client.key_env] = path + ("key_env",)
        for key, value in as_dict(client).items():
            if key == "key_env":
                continue
            try:  # the router's own schema, one key at a time for the line
                parse_clients({name: {key: value}})
            except RouterConfigError as exc:
                raise doc.error(
                    path + (key,), f"the router would refuse its config: {exc}."
                ) from None


def _check_extra_args(doc: _Doc, cluster: Cluster) -> None:
    """extra_args may not repeat a flag stackctl renders: the later copy wins on vLLM's command
    line, and `up` would then check the engine on the port (model, ...) the inventory says."""
    from .plan import managed_engine_flags

    checked: list[tuple[KeyPath, tuple[str, ...]]] = [(("engine",), cluster.engine.extra_args)]
    checked += [
        (("hosts", i, "engine"), h.engine.extra_args)
        for i, h in enumerate(cluster.hosts)
        if h.runs_engines
    ]
    managed = managed_engine_flags(cluster, next(h for h in cluster.hosts if h.runs_engines))
    for path, extra_args in checked:
        for k, arg in enumerate(extra_args):
            name = arg.split("=", 1)[0].replace("_", "-")
            flag = "--" + name[len("--no-") :] if name.startswith("--no-") else name
            if not arg.startswith("--") or flag not in managed:
                continue
            key = managed[flag]
            fix = (
                f"set {key} instead"
                if key
                else "stackctl always passes it (prefix caching is what the router's cache-aware policies rely on)"
            )
            raise doc.error(
                path + ("extra_args", k),
                f"{name} is a flag stackctl sets on every engine; remove it from extra_args and {fix}. A second copy would override stackctl's, and `up` would check the engine by the inventory's settings.",
            )


def _check_accounts(doc: _Doc, path: tuple, host: Host) -> None:
    """User names go into sudo/useradd command lines and supervisord.conf: plain names only."""
    for key in ("become_user", "service_user"):
        name = getattr(host, key)
        where = (
            path + (key,) if path + (key,) in doc.lines else (key,)
        )  # the host's own key, else the top-level one
        if name is not None and not USER_NAME.match(name):
            raise doc.error(
                where,
                f"'{name}' is not a usable user name; use lower-case letters, digits, '_' and '-' (at most 32), e.g. stackctl.",
            )
        if key == "service_user" and name == "root":
            raise doc.error(
                where,
                "programs must not run as root; name an unprivileged account (the default, stackctl, is created by `up`), or null for the connecting user.",
            )


def _check_values(doc: _Doc, path: tuple, engine: EngineSettings) -> None:
    if not 0 < engine.gpu_memory_utilization <= 1:
        raise doc.error(
            path + ("gpu_memory_utilization",),
            f"gpu_memory_utilization is {engine.gpu_memory_utilization}; it is a fraction of GPU memory, above 0 and at most 1 (e.g. 0.9).",
        )
    for port_key, port in (
        (("port",), engine.port),
        (("lmcache", "server_port"), engine.lmcache.server_port),
    ):
        if not 1 <= port <= 65535:
            raise doc.error(path + port_key, f"port {port} is out of range; use 1-65535.")
    if engine.max_model_len < 1:
        raise doc.error(
            path + ("max_model_len",),
            f"max_model_len is {engine.max_model_len}; give the longest context in tokens an engine accepts (e.g. 32768), at most the model's own.",
        )
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        value = getattr(engine, key)
        if value is not None and value < 1:
            raise doc.error(
                path + (key,), f"{key} is {value}; use 1 or more, or null for vLLM's default."
            )
    if engine.dtype is not None and engine.dtype not in VLLM_DTYPES:
        raise doc.error(
            path + ("dtype",),
            f"dtype '{engine.dtype}' is not one of vLLM's.{_did_you_mean(engine.dtype, VLLM_DTYPES)} Use one of: {', '.join(VLLM_DTYPES)}, or null for vLLM's default (auto).",
        )
    if not engine.health_timeout_s > 0:
        raise doc.error(
            path + ("health_timeout_s",),
            f"health_timeout_s is {engine.health_timeout_s}; a duration must be above 0 seconds (e.g. 900: loading a model takes minutes).",
        )
    for key, value in engine.env.items():
        if not ENV_NAME.match(str(key)):
            raise doc.error(
                path + ("env", key),
                f"'{key}' is not an environment variable name; use letters, digits and '_', not starting with a digit (e.g. WANDB_PROJECT).",
            )
        if key == "VLLM_API_KEY":  # plan.ENGINE_KEY_VAR: the engines' key is the cluster's
            raise doc.error(
                path + ("env", key),
                "VLLM_API_KEY is set by stackctl: it is the cluster's engine key, which the router sends. Remove it here; to choose the key yourself, set router.engine_key_env to the name of the variable that holds it.",
            )
        if isinstance(value, Mapping):
            if set(value) != {"from_env"} or not isinstance(value["from_env"], str):
                raise doc.error(
                    path + ("env", key),
                    "a mapping here must be {from_env: VARIABLE}: the name of an environment variable on this machine that holds a secret value.",
                )
            continue
        problem = supervisor_env_problem(str(value))
        if problem:
            raise doc.error(
                path + ("env", key),
                f"this value cannot be written into supervisor's environment= ({problem}); change it, or pass it as a secret with {{from_env: VARIABLE}}.",
            )
    problem = supervisor_env_problem(engine.cpu.threads_bind)
    if problem:
        raise doc.error(
            path + ("cpu", "threads_bind"),
            f"threads_bind cannot be written into supervisor's environment= ({problem}); give a core list such as 0-31 or auto.",
        )
    if engine.lmcache.cpu_offload_gb < 0:
        raise doc.error(
            path + ("lmcache", "cpu_offload_gb"),
            "cpu_offload_gb must be 0 or more (GB of CPU memory per engine).",
        )
    if engine.is_sim:
        from .sim.profiles import HARDWARE, MODELS

        sim = engine.sim
        if sim.hardware not in HARDWARE:
            raise doc.error(
                path + ("sim", "hardware"),
                f"unknown simulator hardware '{sim.hardware}'.{_did_you_mean(sim.hardware, HARDWARE)} Known: {', '.join(HARDWARE)}.",
            )
        if sim.model_profile is not None and sim.model_profile not in MODELS:
            raise doc.error(
                path + ("sim", "model_profile"),
                f"unknown simulator model profile '{sim.model_profile}'.{_did_you_mean(sim.model_profile, MODELS)} Known: {', '.join(MODELS)}.",
            )
        if sim.time_scale <= 0:
            raise doc.error(
                path + ("sim", "time_scale"), "time_scale must be above 0 (1.0 is real time)."
            )
    if engine.lmcache.chunk_size <= 0:
        raise doc.error(
            path + ("lmcache", "chunk_size"),
            "chunk_size must be a positive number of tokens (LMCache's default is 256).",
        )


# The keys of a Hugging Face config.json vLLM takes the model's context length from (the
# smallest present wins, as in vLLM's max-length check), and rope scaling that stretches it.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
LONG_CONTEXT_OVERRIDE = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"  # vLLM's own escape hatch


def model_context_length(config: Mapping) -> int | None:
    """The longest context a model's config.json allows, or None when it does not say. An
    upper bound: a rope scaling factor is applied whatever its type, so nothing is refused
    that vLLM would accept."""
    config = config.get("text_config") or config  # multimodal configs nest the language model's
    lengths = [config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int) and config[k] > 0]
    if not lengths:
        return None
    scaling = config.get("rope_scaling") or {}
    factor = scaling.get("factor") if isinstance(scaling, Mapping) else None
    return int(min(lengths) * (factor if isinstance(factor, (int, float)) and factor > 1 else 1))


def _model_context(cluster: Cluster, engine: EngineSettings) -> tuple[int, str] | None:
    """(context length, where it comes from) of the served model, when this machine can know
    it: a simulator profile, or the config.json of ``model.source``. Otherwise vLLM itself
    refuses a longer max_model_len when the engine starts (`up` shows its log)."""
    if engine.is_sim:
        from .sim.profiles import MODELS

        profile = MODELS.get(engine.sim.model_profile or "") or next(
            (
                m
                for m in MODELS.values()
                if cluster.model.name.lower() in (n.lower() for n in m.hf_names)
            ),
            None,
        )
        return (
            (profile.max_position_embeddings, f"the simulator's {profile.name} profile")
            if profile
            else None
        )
    if not cluster.model.source:
        return None
    config_path = Path(os.path.expanduser(cluster.model.source)) / "config.json"
    try:
        length = model_context_length(json.loads(config_path.read_text()))
    except (OSError, ValueError, AttributeError):
        return None  # not here (validate may run elsewhere) or not a config `up` can use: checked there
    return (length, str(config_path)) if length else None


def _check_context(doc: _Doc, cluster: Cluster) -> None:
    sections: list[tuple[KeyPath, EngineSettings]] = [(("engine",), cluster.engine)]
    sections += [
        (("hosts", i, "engine"), h.engine)
        for i, h in enumerate(cluster.hosts)
        if h.runs_engines and h.engine != cluster.engine
    ]
    for path, engine in sections:
        known = None if LONG_CONTEXT_OVERRIDE in engine.env else _model_context(cluster, engine)
        if known and engine.max_model_len > known[0]:
            where = (
                path + ("max_model_len",)
                if path + ("max_model_len",) in doc.lines
                else ("engine", "max_model_len")
            )
            raise doc.error(
                where,
                f"max_model_len is {engine.max_model_len}, beyond the model's context of {known[0]} tokens ({known[1]}); "
                f"vLLM would refuse to start. Use at most {known[0]} (or set engine.env.{LONG_CONTEXT_OVERRIDE}: 1 if you know the model extrapolates).",
            )


@dataclass(frozen=True)
class KvEventEndpoints:
    """Where an engine publishes its KV events (``bind``, ``replay_bind``: what it is told)
    and where the router reaches them (``connect``, ``replay``)."""

    bind: str
    replay_bind: str
    connect: str
    replay: str


IPC_PATH_MAX = 100  # a Unix socket path holds 107 bytes; ZMQ's ipc:// endpoints are those


def _kv_event_endpoints(cluster: Cluster, engine: Engine) -> KvEventEndpoints | None:
    """None unless ``router.kv_index: events``. vLLM binds a ``tcp://*:PORT`` endpoint (every
    interface; anything else it connects to), so remote engines bind their event ports and
    the router connects to the host's cluster address; a local fleet uses Unix sockets in the
    host's run dir (nothing on the network), or abstract ones where that path is too long."""
    if cluster.router.kv_index != "events":
        return None
    host = cluster.host(engine.host)
    port = engine.kv_events_port
    if host.is_local:
        from .plan import host_dirs

        base = f"{host_dirs(host.deploy_dir.rstrip('/') or '/')['run']}/kv-events-{engine.index}"
        if len(base) + len("-replay.sock") > IPC_PATH_MAX:  # Linux's abstract namespace
            digest = hashlib.sha256(base.encode()).hexdigest()[:16]
            base = f"@stackctl-kv-{digest}"
        pub, replay = f"ipc://{base}.sock", f"ipc://{base}-replay.sock"
        return KvEventEndpoints(pub, replay, pub, replay)
    address = _url_host(host.cluster_address or host.address)
    return KvEventEndpoints(
        f"tcp://*:{port}",
        f"tcp://*:{port + 1}",
        f"tcp://{address}:{port}",
        f"tcp://{address}:{port + 1}",
    )


INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # Linux's IFNAMSIZ - 1, no spaces
VIP_MAX_ROUTERS = 20  # keepalived.PRIORITY_FIRST / PRIORITY_STEP: distinct VRRP priorities


def _check_vip(doc: _Doc, cluster: Cluster) -> None:
    """``router.vip``: what keepalived needs (an interface, a VRRP id, IP peers of the VIP's
    family), checked before `up` renders keepalived.conf on each router host."""
    vip = cluster.router.vip
    where = ("router", "vip")
    if vip.address is None:
        return
    try:
        address = ipaddress.ip_interface(vip.address)
    except ValueError:
        raise doc.error(
            (*where, "address"),
            f"router.vip.address {vip.address!r} is not an IP address; give one with its prefix, e.g. 10.0.0.100/24.",
        ) from None
    if vip.interface is None or not INTERFACE_NAME.fullmatch(vip.interface):
        raise doc.error(
            (*where, "interface") if vip.interface is not None else where,
            f"router.vip needs the network interface that carries the VIP on every router host (got {vip.interface!r}); set interface, e.g. interface: eth0 (up to 15 letters, digits, '_', '.', '-').",
        )
    if not 1 <= vip.virtual_router_id <= 255:
        raise doc.error(
            (*where, "virtual_router_id"),
            f"router.vip.virtual_router_id {vip.virtual_router_id} is out of range; use 1-255, unique among the VRRP groups on that network.",
        )
    if vip.advert_int_s != int(vip.advert_int_s) or not 1 <= vip.advert_int_s <= 255:
        raise doc.error(
            (*where, "advert_int_s"),
            f"router.vip.advert_int_s {vip.advert_int_s} must be whole seconds, 1-255 (VRRP version 2).",
        )
    if len(cluster.router_hosts) > VIP_MAX_ROUTERS:
        raise doc.error(
            where,
            f"router.vip: {len(cluster.router_hosts)} router hosts, but one VIP is shared by at most {VIP_MAX_ROUTERS}; give the others no router role, or no VIP.",
        )
    for host in cluster.router_hosts:
        i = cluster.hosts.index(host)
        if host.is_local:
            raise doc.error(
                ("hosts", i),
                f"router.vip moves an address between router hosts, but router host '{host.name}' is connection: local; a VIP needs routers on separate machines reached over SSH.",
            )
        own = host.cluster_address or host.address
        try:
            peer = ipaddress.ip_address(own)
        except ValueError:
            peer = None
        if peer is None or peer.version != address.version:
            raise doc.error(
                ("hosts", i),
                f"router.vip: keepalived on '{host.name}' talks to the other routers by IP, but its address {own!r} is not an IPv{address.version} address; set cluster_address to its IPv{address.version} address on the interface {vip.interface}.",
            )
        if peer == address.ip:
            raise doc.error(
                (*where, "address"),
                f"router.vip.address {address.ip} is the address of host '{host.name}'; the VIP must be a free address that no host owns.",
            )


def _check_kv_index(doc: _Doc, cluster: Cluster) -> None:
    """``router.kv_index: events`` needs a cache-aware policy (kv_aware, cost), and with vLLM
    engines the model's tokenizer on the router host (``plan.router_tokenizer_dir``)."""
    tokenizer_dir = cluster.router.tokenizer_dir
    if tokenizer_dir is not None and (
        not tokenizer_dir.startswith("/") or "\n" in tokenizer_dir or "\0" in tokenizer_dir
    ):
        raise doc.error(
            ("router", "tokenizer_dir"),
            f"router.tokenizer_dir {tokenizer_dir!r} must be an absolute path on the router host, e.g. /models/Llama-3.1-8B-Instruct.",
        )
    if cluster.router.kv_index != "events":
        return
    if cluster.router.policy not in ("kv_aware", "cost"):
        raise doc.error(
            ("router", "kv_index"),
            f"kv_index: events is what kv_aware and cost routing match prompts on, but router.policy is {cluster.router.policy}; set policy: kv_aware or cost, or remove kv_index.",
        )
    vllm_hosts = [h.name for h in cluster.hosts if h.runs_engines and not h.engine.is_sim]
    without_model = [
        h for h in cluster.router_hosts if not (h.runs_engines and not h.engine.is_sim)
    ]
    if not vllm_hosts or cluster.router.tokenizer_dir is not None or not without_model:
        return
    router_host = without_model[0]
    needs = (
        f"router.kv_index: events with vLLM engines (on {', '.join(vllm_hosts)}) needs the "
        f"model's tokenizer on the router host '{router_host.name}', which runs no vLLM engine "
        "(vLLM's events name blocks by the model's own token ids)"
    )
    if not cluster.model.source:
        raise doc.error(
            ("router", "kv_index"),
            f"{needs}; `up` copies the tokenizer files there from model.source, but the model is not uploaded from this machine. Set router.tokenizer_dir to a directory on '{router_host.name}' that holds the model's tokenizer.json and tokenizer_config.json, or set model.source, or put the router on an engine host, or keep kv_index: estimate.",
        )
    tokenizer = Path(os.path.expanduser(cluster.model.source)) / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise doc.error(
            ("model", "source"),
            f"{needs}, and `up` copies it from model.source, but {tokenizer} does not exist. Point model.source at a model directory with its tokenizer, or set router.tokenizer_dir to a directory on '{router_host.name}' that holds it.",
        )


def _check_ports(doc: _Doc, cluster: Cluster) -> None:
    """No two processes on one machine may listen on one port (all local hosts are one machine)."""
    taken: dict[tuple, str] = {}
    for i, host in enumerate(cluster.hosts):
        machine = "local" if host.is_local else host.name
        claims = [(e.port, f"engine {e.name}") for e in host.engines]
        for e in host.engines:
            endpoints = cluster.kv_event_endpoints(e)
            if endpoints and endpoints.bind.startswith("tcp://"):  # a local fleet's: ipc://
                claims += [
                    (e.kv_events_port, f"the KV events of engine {e.name}"),
                    (e.kv_events_port + 1, f"the KV event replay of engine {e.name}"),
                ]
        if host.runs_engines and host.engine.lmcache.server:
            claims.append((host.engine.lmcache.server_port, f"the LMCache server of {host.name}"))
        if cluster.runs_router(host):
            claims.append((cluster.router.port, f"the router of {host.name}"))
        for port, what in claims:
            if not 1 <= port <= 65535:  # engine i listens on engine.port + i
                raise doc.error(
                    ("hosts", i),
                    f"{what} would listen on port {port}, above 65535 (engine i of a host uses engine.port + i); lower engine.port.",
                )
            if (machine, port) in taken:
                raise doc.error(
                    ("hosts", i),
                    f"{what} would listen on port {port}, which {taken[(machine, port)]} already uses on the same machine; "
                    + (
                        "give each host's engines their own KV event ports (engine.kv_events_port sets the first; engine i uses kv_events_port + 2i and + 2i + 1)."
                        if "KV event" in what
                        else "run one router per machine (router.port is the cluster's), or move engine.port off it."
                        if what.startswith("the router")
                        or taken[(machine, port)].startswith("the router")
                        else "give each engine its own port (engine.port sets the first; engine i uses port + i)."
                    ),
                )
            taken[(machine, port)] = what


def ssh_key_problem(host: Host) -> str | None:
    """A missing ssh.key file on this machine. Not a load-time error: `validate` and `plan` run
    where the key may not be (CI, a colleague's laptop); `validate` warns, connecting refuses."""
    if host.is_local or not host.ssh.key:
        return None
    path = os.path.expanduser(host.ssh.key)
    if os.path.isfile(path):
        return None
    return (
        f"host '{host.name}': the SSH key file {host.ssh.key} ({path}) does not exist on this machine; "
        "fix ssh.key, or remove it to use your SSH agent and ~/.ssh/config."
    )


def check_secrets(cluster: Cluster, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secrets the inventory names, read from the environment (at `up`, not `plan`)."""
    environ = os.environ if environ is None else environ
    values = {}
    for key_path, env_name in cluster.secret_env_vars():
        if not environ.get(env_name):
            raise InventoryError(
                f"{cluster.source}: {key_path}: the environment variable {env_name} is not set (or empty), but the inventory says it holds the secret. Export it before running stackctl (export {env_name}=...), or remove {key_path}."
            )
        values[env_name] = environ[env_name]
    key_vars = {var for _, var in cluster.router.key_sources}
    for key_path, env_name in cluster.secret_env_vars():
        if env_name not in key_vars:
            continue
        keys = [k.strip() for k in values[env_name].split(",") if k.strip()]
        if not keys or any(c.isspace() or not c.isprintable() for k in keys for c in k):
            raise InventoryError(
                f"{cluster.source}: {key_path}: the environment variable {env_name} must hold comma-separated API keys, none with a space or line break in it (the router's keys file has one 'name key' a line); fix its value (not shown)."
            )
    return values
