"""The simulator's command line (vLLM's own flags plus a few of its own) and LMCache settings.

The contract is in docs/architecture.md ("Simulator command line"): the engine role renders
one command line for vLLM and for the simulator, so unknown vLLM flags are accepted and
ignored with a warning, and the CPU tier is configured exactly the way LMCache is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from stackctl.sim import profiles
from stackctl.sim.engine import SimEngineConfig

log = logging.getLogger(__name__)

LMCACHE_CONNECTORS = ("LMCacheConnectorV1", "LMCacheConnectorV1Dynamic")
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class ConfigError(ValueError):
    """A flag or setting that cannot work; reported like a bad flag (exit 2)."""


@dataclass(frozen=True)
class LMCacheSettings:
    """The part of LMCache's configuration the simulator models (its local CPU backend)."""

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0  # GB, as LMCache counts them (GiB)


class KvEventsError(RuntimeError):
    """The KV event publisher cannot start (an endpoint cannot be bound); exit 1."""


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``--kv-events-config`` (vllm.config.KVEventsConfig): same keys, same defaults."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "zmq" or "null"; None: "zmq" when events are enabled
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000  # accepted; unused: each batch is sent at once, no queue
    topic: str = ""

    @property
    def active(self) -> bool:
        """Whether events are published (enabled, and the publisher is zmq)."""
        publisher = self.publisher or ("zmq" if self.enable_kv_cache_events else "null")
        return self.enable_kv_cache_events and publisher == "zmq"


def _kv_events_config(text: str) -> KVEventsConfig:
    """Parse ``--kv-events-config JSON``; unknown keys and wrong types are refused."""
    value = _json_object(text)
    known = [f.name for f in fields(KVEventsConfig)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    expected: dict[str, tuple[type, ...]] = {
        "enable_kv_cache_events": (bool,), "publisher": (str, type(None)), "endpoint": (str,),
        "replay_endpoint": (str, type(None)), "buffer_steps": (int,), "hwm": (int,),
        "max_queue_size": (int,), "topic": (str,),
    }  # fmt: skip
    for key, item in value.items():
        types = expected[key]
        if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise argparse.ArgumentTypeError(f"{key} must be {names}, got {json.dumps(item)}")
    if value.get("publisher") not in (None, "zmq", "null"):
        raise argparse.ArgumentTypeError(
            f'publisher must be "zmq" or "null", got {json.dumps(value["publisher"])}'
        )
    for key in ("buffer_steps", "hwm", "max_queue_size"):
        if value.get(key, 0) < 0:
            raise argparse.ArgumentTypeError(f"{key} must not be negative, got {value[key]}")
    return KVEventsConfig(**value)


@dataclass
class SimConfig:
    host: str
    port: int
    model: str
    served_model_names: list[str]
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    tensor_parallel_size: int
    enable_prefix_caching: bool
    block_size: int
    num_gpu_blocks: int
    hardware: profiles.HardwareProfile
    model_profile: profiles.ModelProfile
    time_scale: float
    seed: int
    kv_transfer_config: dict[str, Any] | None = None  # a JSON object
    lmcache: LMCacheSettings | None = None  # None: no CPU tier
    ignored_flags: list[str] = field(default_factory=list)
    api_keys: tuple[str, ...] = ()  # --api-key, else VLLM_API_KEY (as vLLM): none, no auth
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)  # --kv-events-config

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]

    def engine_config(self) -> SimEngineConfig:
        cpu_chunks = None
        if self.lmcache is not None:
            # LMCache runs one local CPU backend per tensor-parallel rank, each of
            # max_local_cpu_size holding that rank's 1/tp of the KV heads.
            tokens = profiles.cpu_kv_capacity_tokens(
                self.model_profile,
                self.lmcache.max_local_cpu_size * self.tensor_parallel_size,
                self.lmcache.chunk_size,
            )
            cpu_chunks = tokens // self.lmcache.chunk_size
        return SimEngineConfig(
            num_gpu_blocks=self.num_gpu_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            cpu_capacity_chunks=cpu_chunks,
            cpu_chunk_size=self.lmcache.chunk_size if self.lmcache else 256,
        )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _token_count(text: str) -> int:
    """A positive count, with vLLM's human-readable suffixes: 32k = 32000, 32K = 32768, 1m, 1M."""
    units = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}
    if text and text[-1] in units:
        try:
            value = float(text[:-1]) * units[text[-1]]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of tokens, got {text!r}") from None
        if value != int(value) or value <= 0:
            raise argparse.ArgumentTypeError(
                f"must be a positive whole number of tokens, got {text!r}"
            )
        return int(value)
    return _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackctl sim",
        usage="%(prog)s [serve] [MODEL] [vLLM flags] [simulator flags]",
        description="Simulated vLLM OpenAI-compatible server with a physical timing model.",
        allow_abbrev=False,
    )
    vllm = parser.add_argument_group("vLLM flags")
    vllm.add_argument("--host", default="0.0.0.0")
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument("--model", default=DEFAULT_MODEL)
    vllm.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME")
    vllm.add_argument("--gpu-memory-utilization", type=_positive_float, default=0.9)
    vllm.add_argument("--max-model-len", type=_token_count, default=None)
    vllm.add_argument("--max-num-seqs", type=_positive_int, default=256)
    vllm.add_argument("--max-num-batched-tokens", type=_token_count, default=None)
    vllm.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    vllm.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
    )
    vllm.add_argument("--kv-transfer-config", type=_json_object, default=None, metavar="JSON")
    vllm.add_argument(
        "--kv-events-config", type=_kv_events_config, default=KVEventsConfig(), metavar="JSON"
    )
    vllm.add_argument("--block-size", type=_positive_int, default=16)
    vllm.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None)
    vllm.add_argument("--seed", type=int, default=0)
    vllm.add_argument("--api-key", nargs="+", default=None, metavar="KEY")
    sim = parser.add_argument_group("simulator flags")
    sim.add_argument(
        "--hardware", default=profiles.REFERENCE_HARDWARE.name, choices=sorted(profiles.HARDWARE)
    )
    sim.add_argument("--model-profile", default=None, choices=sorted(profiles.MODELS),
                     help="model profile (default: the one matching --model, else llama-3.1-8b)")  # fmt: skip
    sim.add_argument("--time-scale", type=_positive_float, default=1.0,
                     help="divide every modelled duration by this (default 1.0: real time)")  # fmt: skip
    return parser


def _env_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def load_lmcache_settings(environ: Mapping[str, str]) -> LMCacheSettings:
    """LMCache's settings: the YAML file named by LMCACHE_CONFIG_FILE, else LMCACHE_* variables."""
    path = environ.get("LMCACHE_CONFIG_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"LMCACHE_CONFIG_FILE {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"LMCACHE_CONFIG_FILE {path}: expected a mapping")
        raw = {k: data[k] for k in ("chunk_size", "local_cpu", "max_local_cpu_size") if k in data}
        if data.get("remote_url"):
            log.warning(
                "LMCache remote backend %s is not simulated (only the local CPU tier is)",
                data["remote_url"],
            )
        source = path
    else:
        names = {"chunk_size": "LMCACHE_CHUNK_SIZE", "local_cpu": "LMCACHE_LOCAL_CPU",
                 "max_local_cpu_size": "LMCACHE_MAX_LOCAL_CPU_SIZE"}  # fmt: skip
        raw = {key: environ[var] for key, var in names.items() if var in environ}
        source = "LMCACHE_* environment"
    try:
        settings = LMCacheSettings(
            chunk_size=int(raw.get("chunk_size", 256)),
            local_cpu=raw["local_cpu"]
            if isinstance(raw.get("local_cpu"), bool)
            else _env_bool(str(raw.get("local_cpu", "true"))),
            max_local_cpu_size=float(raw.get("max_local_cpu_size", 5.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"LMCache settings from {source}: {exc}") from None
    if settings.chunk_size <= 0 or settings.max_local_cpu_size < 0:
        raise ConfigError(
            f"LMCache settings from {source}: chunk_size and max_local_cpu_size must be positive"
        )
    return settings


def parse_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> SimConfig:
    """Parse the command line; bad flags exit 2 with argparse's message (no traceback)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `vllm serve MODEL ...`: stackctl renders one command line for both
        argv = argv[1:]
    model_tag = (
        argv.pop(0) if argv and not argv[0].startswith("-") else None
    )  # vLLM's positional model
    args, unknown = parser.parse_known_args(argv)
    if model_tag is not None:
        args.model = model_tag  # as vLLM: the positional model wins over --model
    try:
        return _resolve(args, unknown, os.environ if environ is None else environ)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _resolve(args: argparse.Namespace, unknown: list[str], environ: Mapping[str, str]) -> SimConfig:
    hardware = profiles.HARDWARE[args.hardware]
    model = (
        profiles.MODELS[args.model_profile]
        if args.model_profile
        else profiles.model_for_hf_name(args.model)
    )
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError(
            f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}"
        )
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be 1-65535, got {args.port}")
    tp = args.tensor_parallel_size
    if model.kv_heads % tp and tp % model.kv_heads:
        raise ConfigError(
            f"--tensor-parallel-size {tp} does not divide {model.name}'s {model.kv_heads} KV heads"
        )
    blocks = profiles.gpu_kv_capacity_blocks(
        hardware, model, args.gpu_memory_utilization, tp, args.block_size
    )
    if args.num_gpu_blocks_override:
        blocks = args.num_gpu_blocks_override
    if blocks <= 0:
        raise ConfigError(
            f"no memory left for the KV cache: {model.name} needs {model.weight_bytes / tp / profiles.GIB:.1f} GiB "
            f"of weights per GPU on {hardware.name} at --gpu-memory-utilization {args.gpu_memory_utilization}"
        )
    max_model_len = args.max_model_len or model.max_position_embeddings
    if max_model_len > blocks * args.block_size:
        raise ConfigError(
            f"the KV cache holds {blocks * args.block_size} tokens, less than --max-model-len {max_model_len}; "
            "increase --gpu-memory-utilization or decrease --max-model-len"
        )
    lmcache = None
    connector = (args.kv_transfer_config or {}).get("kv_connector")
    if connector in LMCACHE_CONNECTORS:
        settings = load_lmcache_settings(environ)
        lmcache = settings if settings.local_cpu else None
    elif connector:
        log.warning("kv connector %r is not simulated; running without a CPU tier", connector)
    if unknown:
        log.warning("ignoring vLLM flags the simulator does not model: %s", " ".join(unknown))
    return SimConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_names=args.served_model_name or [args.model],
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens
        or hardware.default_max_num_batched_tokens,
        tensor_parallel_size=tp,
        enable_prefix_caching=args.enable_prefix_caching,
        block_size=args.block_size,
        num_gpu_blocks=blocks,
        hardware=hardware,
        model_profile=model,
        time_scale=args.time_scale,
        seed=args.seed,
        kv_transfer_config=args.kv_transfer_config,
        lmcache=lmcache,
        ignored_flags=unknown,
        api_keys=tuple(k for k in (args.api_key or [environ.get("VLLM_API_KEY")]) if k),
        kv_events=args.kv_events_config,
    )
