"""Router configuration: the ``router.yaml`` contract (docs/architecture.md) as typed data.

Every problem is reported as one :class:`RouterConfigError` whose message names the file and
the key path, so ``stackctl router`` can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from ..model_tokenizer import ModelTokenizer

POLICIES = ("round_robin", "least_loaded", "session", "kv_aware", "cost")
#: Where kv_aware learns what engines hold: its own record of what it sent them, or their
#: KV-cache events (stackctl/router/kv_index.py; engines without an event endpoint estimate).
KV_INDEXES = ("estimate", "events")

#: Knobs each policy accepts, with their defaults (``policy_options``).
POLICY_OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "round_robin": {},
    "least_loaded": {},
    "session": {"header": "x-session-id", "load_factor": 1.25},
    "kv_aware": {
        "chunk_chars": 256,  # prompt characters per hashed chunk (a prefix "block")
        "chars_per_token": 4.0,  # converts capacity tokens to chunks and matches to tokens
        "beta": 0.75,  # weight of relative excess load against predicted cached fraction
        "load_factor": 2.0,  # engines above load_factor * mean in-flight are skipped
        "default_capacity_tokens": 1_000_000,  # when neither config nor engine tells
        # longer rendered prompts are routed as new ones and never indexed: one huge prompt
        # would evict real conversations' prefixes (and cost its hashing on the event loop)
        "max_indexed_chars": 524_288,
    },
}
# cost: kv_aware's knobs (its beta score decides until the engines' prefill rates are known)
POLICY_OPTION_DEFAULTS["cost"] = dict(POLICY_OPTION_DEFAULTS["kv_aware"])

TOP_LEVEL_KEYS = {
    "listen",
    "policy",
    "policy_options",
    "engines",
    "health",
    "timeouts",
    "connections",
    "retries",
    "max_body_bytes",
    "api_keys_file",
    "admission",
    "clients",
    "engine_key_file",
    "kv_index",
    "tokenizer_dir",
}


class RouterConfigError(Exception):
    """A user-facing configuration problem (exit code 2)."""


@dataclass(frozen=True)
class BackendConfig:
    """One ``engines:`` entry: an engine the router sends requests to."""

    name: str
    url: str
    model: str
    cache_capacity_tokens: int | None = None
    kv_events: str | None = None  # the engine's KV-event PUB endpoint (tcp://host:port, ipc://)
    kv_events_replay: str | None = None  # its replay (ROUTER) endpoint
    # its events report its GPU cache alone, while a CPU tier (LMCache, which publishes no
    # events) holds what the GPU evicted: the estimate, sized to both, stands beside the view
    kv_events_gpu_only: bool = False


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 2.0
    failures_to_eject: int = 1
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class TimeoutsConfig:
    """Every wait the router does on a client or an engine is bounded (docs/architecture.md,
    "Router internals": what each bounds and what happens when it fires)."""

    # the client's side (the router's listener, stackctl/router/listener.py)
    header_s: float = 10.0  # request line + headers: from the connection's opening (or the
    #                         first byte of a later request on it) to the end of the head
    body_s: float = 60.0  # the whole request body, from the end of its head
    keepalive_s: float = 30.0  # an idle keep-alive connection between two requests
    # the engine's side (stackctl/router/upstream.py, app.Router._forward)
    connect_s: float = 3.0  # TCP (and TLS) connect
    first_byte_s: float = 60.0  # request sent -> response head, for a streamed request (a
    #                             non-streamed answer's head comes with its end: total_s)
    chunk_gap_s: float = 120.0  # between two pieces of the body, streamed or not
    total_s: float = 1800.0  # the whole answer, from the request's arrival


@dataclass(frozen=True)
class ConnectionsConfig:
    """Caps on the router's listener; a connection above either is closed at once (with a
    canned 503) and established ones are not affected."""

    max: int = 16384  # open client connections, all clients together
    per_client: int = 2048  # open client connections from one source IP address


#: File descriptors besides the client connections and their upstream ones: idle upstream
#: connections, health checks, logs, the event loop's own.
FD_HEADROOM = 1024


def fds_needed(max_connections: int) -> int:
    """File descriptors the router may hold with ``max_connections`` clients: one for each
    client connection and one for the engine connection each may have in flight, plus
    headroom. The router host's ``LimitNOFILE`` is at least this (stackctl.plan.fd_limit)."""
    return 2 * max_connections + FD_HEADROOM


def connections_within(fd_limit: int) -> int:
    """The most client connections an open-file limit of ``fd_limit`` holds (the inverse of
    :func:`fds_needed`): the listener caps itself there, so a low limit costs refused
    connections (a canned 503), never EMFILE blamed on an engine."""
    return max(1, (fd_limit - FD_HEADROOM) // 2)


#: A client name: a metric label and a keys-file field, so no spaces, quotes or control bytes.
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The client of the keys given one a line without a name (``api_keys_env``'s), and of every
#: request when authentication is off.
DEFAULT_CLIENT = "default"


@dataclass(frozen=True)
class AdmissionConfig:
    """Router-wide caps; null (None) turns a cap off."""

    max_inflight: int | None = 1024  # requests admitted and not finished, body read included
    # their bodies' bytes (Content-Length; a chunked body counts as max_body_bytes): the
    # router's request memory (a body costs about 3x its size while parsed and routed)
    max_body_bytes_inflight: int | None = 268_435_456
    max_prompt_chars: int | None = 2_097_152  # rendered prompt; longer: 400 context_length_exceeded
    write_timeout_s: float = 30.0  # a response write blocked this long ends the request


@dataclass(frozen=True)
class ClientLimits:
    """One named client's limits (``clients.<name>``); None: no such limit."""

    max_inflight: int | None = None
    requests_per_s: float | None = None  # token bucket, burst of one second's requests
    tokens_per_min: int | None = None  # token bucket, burst of one minute's tokens


@dataclass(frozen=True)
class RouterConfig:
    engines: tuple[BackendConfig, ...]
    host: str = "0.0.0.0"
    port: int = 8080
    policy: str = "kv_aware"
    policy_options: dict[str, Any] = field(default_factory=dict)
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    retries: int = 2
    max_body_bytes: int = 16 * 1024 * 1024
    api_keys_file: str | None = None
    admission: AdmissionConfig = AdmissionConfig()
    clients: Mapping[str, ClientLimits] = field(default_factory=dict)
    engine_key_file: str | None = None  # the key every engine requires (sent as a Bearer token)
    kv_index: str = "estimate"  # KV_INDEXES
    # the model's tokenizer files, for token ids equal to vLLM's (kv_index: events with vLLM
    # engines); None: the simulator's tokenizer
    tokenizer_dir: str | None = None

    @property
    def models(self) -> set[str]:
        return {e.model for e in self.engines}


@overload
def _number(
    where: str, value: Any, *, integer: Literal[True], minimum: float = 0.0, positive: bool = False
) -> int: ...
@overload
def _number(
    where: str, value: Any, *, integer: bool = False, minimum: float = 0.0, positive: bool = False
) -> float: ...
def _number(
    where: str, value: Any, *, integer: bool = False, minimum: float = 0.0, positive: bool = False
) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        kind = "an integer" if integer else "a number"
        raise RouterConfigError(f"{where}: expected {kind}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (positive and value <= 0):
        bound = "> 0" if positive else f">= {minimum:g}"
        raise RouterConfigError(f"{where}: must be {bound}, got {value!r}")
    return value


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RouterConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


_Section = TypeVar("_Section", HealthConfig, TimeoutsConfig, ConnectionsConfig)


def _section(
    where: str,
    raw: Any,
    cls: type[_Section],
    *,
    integers: Collection[str] = (),
    positive: Collection[str] = (),
) -> _Section:
    raw = _mapping(where, raw)
    known = cls.__dataclass_fields__
    unknown = set(raw) - set(known)
    if unknown:
        raise RouterConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(known)}"
        )
    # Any: each value was checked by _number, an int where the field is (``integers``)
    values: dict[str, Any] = {
        k: _number(f"{where}.{k}", v, integer=k in integers, positive=k in positive)
        for k, v in raw.items()
    }
    return cls(**values)


def _engine(where: str, raw: Any) -> BackendConfig:
    raw = _mapping(where, raw)
    unknown = set(raw) - set(BackendConfig.__dataclass_fields__)
    if unknown:
        raise RouterConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("name", "url", "model"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise RouterConfigError(f"{where}.{key}: required, a non-empty string")
    url = raw["url"].rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RouterConfigError(f"{where}.url: expected http(s)://host:port, got {raw['url']!r}")
    capacity = raw.get("cache_capacity_tokens")
    if capacity is not None:
        _number(f"{where}.cache_capacity_tokens", capacity, integer=True, positive=True)
    endpoints = {key: raw.get(key) for key in ("kv_events", "kv_events_replay")}
    for key, value in endpoints.items():
        if value is not None and not (
            isinstance(value, str) and value.startswith(("tcp://", "ipc://")) and len(value) > 6
        ):
            raise RouterConfigError(
                f"{where}.{key}: expected a ZMQ endpoint tcp://host:port or ipc:///path, "
                f"got {value!r}"
            )
    if endpoints["kv_events_replay"] and not endpoints["kv_events"]:
        raise RouterConfigError(f"{where}.kv_events_replay: needs kv_events")
    gpu_only = raw.get("kv_events_gpu_only", False)
    if not isinstance(gpu_only, bool):
        raise RouterConfigError(f"{where}.kv_events_gpu_only: expected true or false")
    return BackendConfig(
        name=raw["name"],
        url=url,
        model=raw["model"],
        cache_capacity_tokens=capacity,
        kv_events=endpoints["kv_events"],
        kv_events_replay=endpoints["kv_events_replay"],
        kv_events_gpu_only=gpu_only,
    )


def _policy_options(policy: str, raw: Any) -> dict[str, Any]:
    raw = _mapping("policy_options", raw)
    defaults = POLICY_OPTION_DEFAULTS[policy]
    unknown = set(raw) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise RouterConfigError(
            f"policy_options: unknown key(s) {', '.join(sorted(unknown))} "
            f"for policy {policy} (allowed: {allowed})"
        )
    options = dict(defaults)
    for key, value in raw.items():
        if isinstance(defaults[key], str):
            if not isinstance(value, str) or not value:
                raise RouterConfigError(f"policy_options.{key}: expected a non-empty string")
            options[key] = value.lower() if key == "header" else value
        else:
            options[key] = _number(
                f"policy_options.{key}",
                value,
                integer=isinstance(defaults[key], int),
                positive=key != "beta",
            )
    return options


def check_policy_options(policy: str, raw: Any) -> dict[str, Any]:
    """``policy_options`` of ``policy`` with defaults filled in, or RouterConfigError: the one
    schema, used by the router when it loads its config and by ``stackctl validate``."""
    return _policy_options(policy, raw)


def parse_config(raw: Any, source: str = "<config>") -> RouterConfig:
    """Validate a parsed YAML document; errors are prefixed with ``source``."""
    try:
        return _parse(raw)
    except RouterConfigError as exc:
        raise RouterConfigError(f"{source}: {exc}") from None


def _parse(raw: Any) -> RouterConfig:
    raw = _mapping("top level", raw)
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise RouterConfigError(f"unknown top-level key(s) {', '.join(sorted(unknown))}")
    listen = _mapping("listen", raw.get("listen"))
    host = listen.get("host", "0.0.0.0")
    if not isinstance(host, str) or not host:
        raise RouterConfigError("listen.host: expected a non-empty string")
    port = _number("listen.port", listen.get("port", 8080), integer=True)
    if port > 65535:
        raise RouterConfigError(f"listen.port: must be <= 65535, got {port}")
    policy = raw.get("policy", "kv_aware")
    if policy not in POLICIES:
        raise RouterConfigError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    engines_raw = raw.get("engines")
    if not isinstance(engines_raw, list) or not engines_raw:
        raise RouterConfigError("engines: expected a non-empty list of engines")
    engines = tuple(_engine(f"engines[{i}]", e) for i, e in enumerate(engines_raw))
    names = [e.name for e in engines]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RouterConfigError(f"engines: duplicate name(s) {', '.join(duplicates)}")
    health = _section(
        "health",
        raw.get("health"),
        HealthConfig,
        integers={"failures_to_eject"},
        positive={"interval_s", "timeout_s", "failures_to_eject", "backoff_s", "max_backoff_s"},
    )
    timeouts = _section(
        "timeouts",
        raw.get("timeouts"),
        TimeoutsConfig,
        positive=TimeoutsConfig.__dataclass_fields__,
    )
    connections = _section(
        "connections",
        raw.get("connections"),
        ConnectionsConfig,
        integers=ConnectionsConfig.__dataclass_fields__,
        positive=ConnectionsConfig.__dataclass_fields__,
    )
    retries = _number("retries", raw.get("retries", 2), integer=True)
    max_body = _number(
        "max_body_bytes", raw.get("max_body_bytes", 16 * 1024 * 1024), integer=True, positive=True
    )
    keys_file = raw.get("api_keys_file")
    if keys_file is not None and (not isinstance(keys_file, str) or not keys_file):
        raise RouterConfigError("api_keys_file: expected a path or null")
    engine_key_file = raw.get("engine_key_file")
    if engine_key_file is not None and (
        not isinstance(engine_key_file, str) or not engine_key_file
    ):
        raise RouterConfigError("engine_key_file: expected a path or null")
    tokenizer_dir = raw.get("tokenizer_dir")
    if tokenizer_dir is not None and (not isinstance(tokenizer_dir, str) or not tokenizer_dir):
        raise RouterConfigError("tokenizer_dir: expected a model directory's path or null")
    kv_index = raw.get("kv_index", "estimate")
    if kv_index not in KV_INDEXES:
        raise RouterConfigError(
            f"kv_index: expected one of {', '.join(KV_INDEXES)}, got {kv_index!r}"
        )
    return RouterConfig(
        kv_index=kv_index,
        tokenizer_dir=tokenizer_dir,
        engines=engines,
        host=host,
        port=port,
        policy=policy,
        policy_options=_policy_options(policy, raw.get("policy_options")),
        health=health,
        timeouts=timeouts,
        connections=connections,
        retries=retries,
        max_body_bytes=max_body,
        api_keys_file=keys_file,
        admission=parse_admission(raw.get("admission")),
        clients=parse_clients(raw.get("clients")),
        engine_key_file=engine_key_file,
    )


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate ``path``; every failure is a :class:`RouterConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RouterConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RouterConfigError(f"{where}: invalid YAML: {problem}") from None
    config = parse_config(raw, str(path))
    return config


def load_api_keys(path: str | None) -> tuple[bytes, ...]:
    """Accepted Bearer keys (names dropped: :func:`load_client_keys`); empty: no auth."""
    return tuple(key for _, key in load_client_keys(path))


def load_tokenizer(path: str | None) -> ModelTokenizer | None:
    """The model's tokenizer from ``tokenizer_dir`` (None: the config names none)."""
    if path is None:
        return None
    # imported here: tokenizers and jinja2 load only for routers that use them
    from ..model_tokenizer import ModelTokenizer, ModelTokenizerError

    try:
        return ModelTokenizer.from_dir(path)
    except ModelTokenizerError as exc:
        raise RouterConfigError(f"tokenizer_dir: {exc}") from None


def load_engine_key(path: str | None) -> str | None:
    """The key the engines require (one line, the file `up` writes with mode 0600), or None
    when the config names no file (engines without a key)."""
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise RouterConfigError(f"engine_key_file {path}: cannot read: {why}") from None
    if not key or not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        raise RouterConfigError(
            f"engine_key_file {path}: expected one key on one line (no spaces), "
            "as `up` writes it; run `stackctl up` again to rewrite it"
        )
    return key


# --------------------------------------------------------------------------- admission control
# router.yaml's ``admission:`` (router-wide caps) and ``clients:`` (per named client: the
# names the keys file gives its keys). Enforced by stackctl/router/admission.py.


def _optional(where: str, value: Any, *, integer: bool) -> Any:
    return None if value is None else _number(where, value, integer=integer, positive=True)


def parse_admission(raw: Any) -> AdmissionConfig:
    raw = _mapping("admission", raw)
    known = AdmissionConfig.__dataclass_fields__
    unknown = set(raw) - set(known)
    if unknown:
        raise RouterConfigError(
            f"admission: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(known)}"
        )
    default = AdmissionConfig()
    return AdmissionConfig(
        max_inflight=_optional(
            "admission.max_inflight", raw.get("max_inflight", default.max_inflight), integer=True
        ),
        max_body_bytes_inflight=_optional(
            "admission.max_body_bytes_inflight",
            raw.get("max_body_bytes_inflight", default.max_body_bytes_inflight),
            integer=True,
        ),
        max_prompt_chars=_optional(
            "admission.max_prompt_chars",
            raw.get("max_prompt_chars", default.max_prompt_chars),
            integer=True,
        ),
        write_timeout_s=_number(
            "admission.write_timeout_s",
            raw.get("write_timeout_s", default.write_timeout_s),
            positive=True,
        ),
    )


def parse_clients(raw: Any) -> dict[str, ClientLimits]:
    raw = _mapping("clients", raw)
    known = ClientLimits.__dataclass_fields__
    out: dict[str, ClientLimits] = {}
    for name, limits in raw.items():
        where = f"clients.{name}"
        if not isinstance(name, str) or not CLIENT_NAME.match(name):
            raise RouterConfigError(
                f"{where}: a client name is 1-64 letters, digits, '_', '.' or '-', starting "
                "with a letter or digit"
            )
        limits = _mapping(where, limits)
        unknown = set(limits) - set(known)
        if unknown:
            raise RouterConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(known)}"
            )
        out[name] = ClientLimits(
            max_inflight=_optional(
                f"{where}.max_inflight", limits.get("max_inflight"), integer=True
            ),
            requests_per_s=_optional(
                f"{where}.requests_per_s", limits.get("requests_per_s"), integer=False
            ),
            tokens_per_min=_optional(
                f"{where}.tokens_per_min", limits.get("tokens_per_min"), integer=True
            ),
        )
    return out


def load_client_keys(path: str | None) -> tuple[tuple[str, bytes], ...]:
    """(client name, key) of every accepted Bearer key; empty: authentication is off.

    A line is ``name key`` (what `up` writes) or, the older format, a bare ``key``, which
    belongs to the client ``default``. Errors name the line, never the key.
    """
    if path is None:
        return ()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise RouterConfigError(f"api_keys_file {path}: cannot read: {why}") from None
    keys: list[tuple[str, bytes]] = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 1:
            name, key = DEFAULT_CLIENT, fields[0]
        elif len(fields) == 2 and CLIENT_NAME.match(fields[0]):
            name, key = fields
        else:
            raise RouterConfigError(
                f"api_keys_file {path}:{number}: expected 'name key' or 'key' (a name is "
                "letters, digits, '_', '.' or '-'; the line is not shown: it holds a key)"
            )
        keys.append((name, key.encode()))
    if not keys:
        raise RouterConfigError(f"api_keys_file {path}: contains no key")
    return tuple(keys)
