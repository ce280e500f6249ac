"""Router configuration: the ``router.yaml`` contract (docs/architecture.md) as typed data.

Every problem is reported as one :class:`RouterConfigError` whose message names the file and
the key path, so ``stackctl router`` can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload
from urllib.parse import urlsplit

import yaml

POLICIES = ("round_robin", "least_loaded", "session", "kv_aware")

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
    },
}

TOP_LEVEL_KEYS = {
    "listen",
    "policy",
    "policy_options",
    "engines",
    "health",
    "timeouts",
    "retries",
    "max_body_bytes",
    "api_keys_file",
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


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 2.0
    failures_to_eject: int = 1
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class TimeoutsConfig:
    connect_s: float = 3.0
    first_byte_s: float = 300.0


@dataclass(frozen=True)
class RouterConfig:
    engines: tuple[BackendConfig, ...]
    host: str = "0.0.0.0"
    port: int = 8080
    policy: str = "kv_aware"
    policy_options: dict[str, Any] = field(default_factory=dict)
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retries: int = 2
    max_body_bytes: int = 16 * 1024 * 1024
    api_keys_file: str | None = None

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


_Section = TypeVar("_Section", HealthConfig, TimeoutsConfig)


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
    return BackendConfig(
        name=raw["name"], url=url, model=raw["model"], cache_capacity_tokens=capacity
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
        "timeouts", raw.get("timeouts"), TimeoutsConfig, positive={"connect_s", "first_byte_s"}
    )
    retries = _number("retries", raw.get("retries", 2), integer=True)
    max_body = _number(
        "max_body_bytes", raw.get("max_body_bytes", 16 * 1024 * 1024), integer=True, positive=True
    )
    keys_file = raw.get("api_keys_file")
    if keys_file is not None and (not isinstance(keys_file, str) or not keys_file):
        raise RouterConfigError("api_keys_file: expected a path or null")
    return RouterConfig(
        engines=engines,
        host=host,
        port=port,
        policy=policy,
        policy_options=_policy_options(policy, raw.get("policy_options")),
        health=health,
        timeouts=timeouts,
        retries=retries,
        max_body_bytes=max_body,
        api_keys_file=keys_file,
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
    """Accepted Bearer keys, one a line; empty tuple means authentication is off."""
    if path is None:
        return ()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RouterConfigError(
            f"api_keys_file {path}: cannot read: {exc.strerror or exc}"
        ) from None
    keys = tuple(
        line.strip().encode()
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not keys:
        raise RouterConfigError(f"api_keys_file {path}: contains no key")
    return keys
