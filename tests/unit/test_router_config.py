"""Router config parsing: good files load, bad ones give one clear message and exit code 2."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from stackctl.router.__main__ import main
from stackctl.router.config import RouterConfigError, load_api_keys, load_config

GOOD = """
listen: {host: 127.0.0.1, port: 9000}
policy: kv_aware
policy_options: {beta: 0.3, chunk_chars: 128}
engines:
  - {name: gpu01-0, url: "http://10.0.0.11:8000/", model: m1, cache_capacity_tokens: 1900000}
  - {name: gpu01-1, url: "http://10.0.0.11:8001", model: m2}
health: {interval_s: 1.0, timeout_s: 0.5}
timeouts: {connect_s: 1.0, first_byte_s: 10}
retries: 1
max_body_bytes: 1024
api_keys_file: null
"""


def write(tmp_path, text):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_loads_with_defaults_filled(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert (config.host, config.port, config.policy) == ("127.0.0.1", 9000, "kv_aware")
    assert config.policy_options["beta"] == 0.3 and config.policy_options["chunk_chars"] == 128
    assert config.policy_options["load_factor"] == 2.0  # default kept
    assert config.engines[0].url == "http://10.0.0.11:8000"  # trailing slash dropped
    assert config.engines[0].cache_capacity_tokens == 1900000
    assert config.engines[1].cache_capacity_tokens is None
    assert config.health.interval_s == 1.0 and config.health.max_backoff_s == 30.0
    assert config.timeouts.first_byte_s == 10 and config.retries == 1
    assert config.models == {"m1", "m2"}


@pytest.mark.parametrize(
    "change, expected",
    [
        ("policy: fastest", "policy: expected one of"),
        ("engines: []", "engines: expected a non-empty list"),
        ("policy_options: {gamma: 1}", "unknown key(s) gamma for policy kv_aware"),
        ("policy_options: {beta: fast}", "policy_options.beta: expected a number"),
        ("health: {interval_s: 0}", "health.interval_s: must be > 0"),
        ("health: {interval: 1}", "health: unknown key(s) interval"),
        ("timeouts: {connect_s: -1}", "timeouts.connect_s: must be > 0"),
        ("retries: 1.5", "retries: expected an integer"),
        ("listen: {port: 70000}", "listen.port: must be <= 65535"),
        ("routes: []", "unknown top-level key(s) routes"),
    ],
)
def test_bad_values_are_named(tmp_path, change, expected):
    raw = yaml.safe_load(GOOD)
    raw.update(yaml.safe_load(change))
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(RouterConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "engine, expected",
    [
        ("{name: a, model: m}", "engines[0].url: required"),
        ('{name: a, url: "ftp://x", model: m}', "engines[0].url: expected http(s)"),
        (
            '{name: a, url: "http://x:1", model: m, cache_capacity_tokens: 0}',
            "engines[0].cache_capacity_tokens: must be > 0",
        ),
        ('{name: a, url: "http://x:1", model: m, gpu: 1}', "engines[0]: unknown key(s) gpu"),
    ],
)
def test_bad_engines_are_named(tmp_path, engine, expected):
    path = write(tmp_path, f"engines:\n  - {engine}\n")
    with pytest.raises(
        RouterConfigError,
        match=expected.replace("[", r"\[")
        .replace("]", r"\]")
        .replace("(", r"\(")
        .replace(")", r"\)"),
    ):
        load_config(path)


def test_duplicate_engine_names(tmp_path):
    path = write(
        tmp_path,
        """
        engines:
          - {name: a, url: "http://x:1", model: m}
          - {name: a, url: "http://x:2", model: m}
        """,
    )
    with pytest.raises(RouterConfigError, match="duplicate name"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "engines:\n  - {name: a\n")
    with pytest.raises(RouterConfigError, match=r"router.yaml:\d+: invalid YAML"):
        load_config(path)


def test_api_keys_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nsk-one\n\n  sk-two  \n")
    assert load_api_keys(str(keys)) == (b"sk-one", b"sk-two")
    keys.write_text("\n")
    with pytest.raises(RouterConfigError, match="contains no key"):
        load_api_keys(str(keys))
    with pytest.raises(RouterConfigError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing"))


@pytest.mark.parametrize("text", ["policy: nope\nengines: []\n", "engines: [\n", None])
def test_main_exits_2_with_a_message_and_no_traceback(tmp_path, capsys, text):
    path = tmp_path / "router.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stackctl router: error: ")
    assert "Traceback" not in err
    assert str(path) in err


def test_main_reports_an_unreadable_api_keys_file(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("api_keys_file: null", f"api_keys_file: {tmp_path}/nokeys"))
    assert main(["--config", str(path)]) == 2
    assert "nokeys" in capsys.readouterr().err
