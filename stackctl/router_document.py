"""The router's ``router.yaml`` as data: one function for `plan` and for `up --rolling`'s drain.

The inventory's ``router:`` keys are a flat view of the document; their defaults are the
router's own (``stackctl.router.config``), so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import yaml

from .router.config import RouterConfig
from .settings import RouterSettings, as_dict

HEADER = "# Router configuration (rendered by stackctl from the inventory; reloaded on SIGHUP)\n"

# inventory key under `router:` -> its place in router.yaml
INVENTORY_KEYS: dict[str, tuple[str, ...]] = {
    "bind": ("listen", "host"),
    "port": ("listen", "port"),
    "policy": ("policy",),
    "policy_options": ("policy_options",),
    "kv_index": ("kv_index",),
    "health_interval_s": ("health", "interval_s"),
    "health_timeout_s": ("health", "timeout_s"),
    "header_timeout_s": ("timeouts", "header_s"),
    "body_timeout_s": ("timeouts", "body_s"),
    "keepalive_timeout_s": ("timeouts", "keepalive_s"),
    "connect_timeout_s": ("timeouts", "connect_s"),
    "first_byte_timeout_s": ("timeouts", "first_byte_s"),
    "chunk_gap_timeout_s": ("timeouts", "chunk_gap_s"),
    "total_timeout_s": ("timeouts", "total_s"),
    "max_connections": ("connections", "max"),
    "max_connections_per_client": ("connections", "per_client"),
    "retries": ("retries",),
    "max_body_bytes": ("max_body_bytes",),
    "max_inflight": ("admission", "max_inflight"),
    "max_body_bytes_inflight": ("admission", "max_body_bytes_inflight"),
    "max_prompt_chars": ("admission", "max_prompt_chars"),
    "write_timeout_s": ("admission", "write_timeout_s"),
}


def _config_default(path: tuple[str, ...]):
    config = RouterConfig(engines=())
    if path[0] == "listen":  # router.yaml's listen.host/port are RouterConfig.host/port
        return getattr(config, path[1])
    value = getattr(config, path[0])
    if len(path) == 2:
        value = getattr(value, path[1])
    return dict(value) if isinstance(value, dict) else value


def inventory_defaults() -> dict:
    """Defaults of the inventory's ``router:`` keys that router.yaml carries (the role's
    defaults.yaml holds only the others)."""
    return {key: _config_default(path) for key, path in INVENTORY_KEYS.items()}


def router_document(
    router: RouterSettings,
    engines: list[dict],
    api_keys_file: str | None,
    without: Collection[str] = (),
    engine_key_file: str | None = None,
    tokenizer_dir: str | None = None,
) -> dict:
    """router.yaml for the inventory's ``router`` settings and engines (``plan.router_engines``),
    minus the engines named in ``without`` (a rolling drain). Keys in the contract's order."""
    doc: dict = {}
    for key, path in INVENTORY_KEYS.items():
        value = getattr(router, key)
        if len(path) == 1:
            doc[path[0]] = dict(value) if isinstance(value, Mapping) else value
        else:
            doc.setdefault(path[0], {})[path[1]] = value
        if key == "policy_options":  # engines come next, as in docs/architecture.md
            doc["engines"] = [_engine_entry(e) for e in engines if e["name"] not in without]
    doc["api_keys_file"] = api_keys_file
    doc["clients"] = client_limits(router)
    doc["engine_key_file"] = engine_key_file
    if tokenizer_dir is not None:  # else the router's default: the simulator's tokenizer
        doc["tokenizer_dir"] = tokenizer_dir
    return doc


def client_limits(router: RouterSettings) -> dict:
    """router.yaml's ``clients:``: each named client's limits that are set (their keys go
    only into the 0600 keys file, never here)."""
    return {
        name: {
            key: value
            for key, value in as_dict(client).items()
            if key != "key_env" and value is not None
        }
        for name, client in router.clients.items()
    }


def _engine_entry(engine: dict) -> dict:
    entry = {"name": engine["name"], "url": engine["url"], "model": engine["model"]}
    for key in ("cache_capacity_tokens", "kv_events", "kv_events_replay", "kv_events_gpu_only"):
        if engine.get(key):
            entry[key] = engine[key]
    return entry


def dump(doc: dict) -> str:
    """The file's text: stable (insertion) order, block style, plain YAML any loader reads."""
    return HEADER + yaml.safe_dump(
        doc, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
