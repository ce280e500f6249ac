"""Benchmark scenarios: the multi-round QA workload's parameters, read from YAML and checked.

A scenario file is a flat YAML mapping (see ``benchmarks/scenarios/reference.yaml``). Every
mistake is reported as a :class:`ScenarioError` naming the file and the key, because a
benchmark that silently runs with a typo'd parameter produces plausible but wrong numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stackctl.errors import InventoryError


class ScenarioError(InventoryError):
    """A scenario file or value is wrong (exit code 2, like a bad inventory)."""


@dataclass(frozen=True)
class Scenario:
    """Parameters of the multi-round QA workload (token counts use the shared tokenizer)."""

    name: str = "scenario"
    description: str = ""
    users: int = 320  # concurrent users (conversations in flight)
    rounds: int = 10  # questions per conversation before the user is replaced
    system_prompt_tokens: int = 1000  # shared by all users
    history_tokens: int = 20000  # per-user context, unique to each user
    question_tokens: int = 20  # each new question (filler mode)
    answer_tokens: int = 100  # max_tokens of every request
    qps: tuple[float, ...] = (0.1, 0.5, 0.9, 1.3, 1.7, 2.1, 2.5, 2.9, 3.3, 3.7, 4.1)
    duration_s: float = 100.0  # measured run per QPS point
    warmup_s: float = 200.0  # run before the points, discarded, to fill the caches
    warmup_qps: float | None = None  # QPS of the warm-up (default: the first point's QPS)
    seed: int = 0
    sharegpt: str | None = None  # path of a ShareGPT-format JSON file (real-text mode)
    stagger: bool = True  # start users at different rounds, like a steady state
    turn_order: str = "random"  # who asks next among idle users: random | cyclic (see Workload)
    ignore_eos: bool = True  # ask vLLM for exactly max_tokens (its ignore_eos extension)
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 120.0  # how long a point waits for its in-flight requests
    source: str = field(default="<defaults>", compare=False)

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> Scenario:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_INT_FIELDS = {
    "users": 1,
    "rounds": 1,
    "system_prompt_tokens": 0,
    "history_tokens": 0,
    "question_tokens": 1,
    "answer_tokens": 1,
}
_POSITIVE_FLOATS = ("duration_s", "request_timeout_s", "drain_timeout_s")


def _fail(scenario_source: str, key: str, message: str) -> None:
    raise ScenarioError(f"{scenario_source}: key '{key}': {message}")


def validate(s: Scenario) -> None:
    """Check types and ranges; raise ScenarioError naming the source and the key."""
    for key, minimum in _INT_FIELDS.items():
        value = getattr(s, key)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(s.source, key, f"must be an integer, got {value!r}")
        if value < minimum:
            _fail(s.source, key, f"must be >= {minimum}, got {value}")
    for key in _POSITIVE_FLOATS:
        value = getattr(s, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(s.source, key, f"must be a positive number, got {value!r}")
    if isinstance(s.warmup_s, bool) or not isinstance(s.warmup_s, (int, float)) or s.warmup_s < 0:
        _fail(s.source, "warmup_s", f"must be a number >= 0, got {s.warmup_s!r}")
    if s.warmup_qps is not None and (
        isinstance(s.warmup_qps, bool)
        or not isinstance(s.warmup_qps, (int, float))
        or s.warmup_qps <= 0
    ):
        _fail(s.source, "warmup_qps", f"must be a positive number or null, got {s.warmup_qps!r}")
    if not isinstance(s.qps, tuple) or not s.qps:
        _fail(s.source, "qps", f"must be a non-empty list of numbers, got {s.qps!r}")
    for value in s.qps:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(s.source, "qps", f"every QPS must be a positive number, got {value!r}")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int):
        _fail(s.source, "seed", f"must be an integer, got {s.seed!r}")
    if s.sharegpt is not None and not isinstance(s.sharegpt, str):
        _fail(s.source, "sharegpt", f"must be a file path or null, got {s.sharegpt!r}")
    for key in ("stagger", "ignore_eos"):
        if not isinstance(getattr(s, key), bool):
            _fail(s.source, key, f"must be true or false, got {getattr(s, key)!r}")
    if s.turn_order not in ("random", "cyclic"):
        _fail(s.source, "turn_order", f"must be random or cyclic, got {s.turn_order!r}")
    for key in ("name", "description"):
        if not isinstance(getattr(s, key), str):
            _fail(s.source, key, f"must be a string, got {getattr(s, key)!r}")


_KNOWN_KEYS = {f.name for f in dataclasses.fields(Scenario)} - {"source"}


def scenario_from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> Scenario:
    """Build a Scenario from a parsed YAML mapping; unknown keys are errors (typos)."""
    if not isinstance(data, Mapping):
        raise ScenarioError(
            f"{source}: a scenario must be a YAML mapping, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        _fail(source, unknown[0], f"unknown key (known keys: {', '.join(sorted(_KNOWN_KEYS))})")
    values = dict(data)
    if "qps" in values:
        qps = values["qps"]
        if isinstance(qps, (int, float)) and not isinstance(qps, bool):
            qps = [qps]
        if not isinstance(qps, list):
            _fail(source, "qps", f"must be a list of numbers, got {qps!r}")
        values["qps"] = tuple(qps)
    return Scenario(**values, source=source)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file.

    A relative ``sharegpt`` path is resolved against the scenario file's directory.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    scenario = scenario_from_mapping(data, source=str(path))
    if scenario.sharegpt and not Path(scenario.sharegpt).is_absolute():
        scenario = scenario.replace(sharegpt=str((path.parent / scenario.sharegpt).resolve()))
    return scenario
