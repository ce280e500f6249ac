"""Check a rendered LMCache YAML with LMCache's own config loader.

``check_lmcache_config(path)`` runs, in the vLLM test venv (which has ``lmcache``), the
same loading path vLLM's ``LMCacheConnectorV1`` uses
(``lmcache.integration.vllm.utils.lmcache_get_or_create_config``)::

    cfg = LMCacheEngineConfig.from_file(path)   # lmcache/v1/config_base.py
    cfg.update_config_from_env()                # applies LMCACHE_* env, then cfg.validate()

and returns the effective values of the keys the file sets.

LMCache itself is lenient: an unknown key is only *logged* ("Unknown configuration key:
<key> (source: file: <path>)") and dropped, and a value its converter rejects (e.g.
``chunk_size: lots``) is logged ("Failed to convert value for ...") and becomes ``None``.
vLLM would then start with defaults silently.  This check turns those LMCache warnings
into failures (``LMCacheConfigError`` carrying LMCache's own message), as well as any
exception from ``from_file``/``validate()`` (e.g. ``min_retrieve_tokens must be >= 0``).
Deprecated-but-aliased keys (LMCache logs "... is deprecated ...") also fail: a
freshly rendered config should not use them.

The ``LMCACHE_*`` environment is cleared for the check, so only the file is judged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


class LMCacheConfigError(AssertionError):
    """LMCache rejected (or would silently ignore part of) a config file."""


def check_lmcache_config(path: Path, python: Path | None = None) -> dict:
    """Load ``path`` with LMCache's loader; return ``{"values": {key: effective value},
    "lmcache_version": ..., "log": [...]}``; raise ``LMCacheConfigError`` on any
    unknown key, unconvertible value, deprecated key or validation error."""
    (result,) = check_lmcache_configs([path], python=python)
    if isinstance(result, LMCacheConfigError):
        raise result
    return result


def check_lmcache_configs(
    paths: list[Path], python: Path | None = None
) -> list[dict | LMCacheConfigError]:
    """Like ``check_lmcache_config`` for several files in one subprocess (importing LMCache
    takes ~15 s); returns, per file, the result dict or the ``LMCacheConfigError``."""
    paths = [Path(p).resolve() for p in paths]
    if python is None:
        from tests.helpers.vllm_env import ensure_vllm_venv, read_stamp

        venv = ensure_vllm_venv()
        stamp = read_stamp(venv) or {}
        if "lmcache" in stamp and not stamp["lmcache"]:
            raise LMCacheConfigError(f"lmcache is not installed in {venv} (see its build log)")
        python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--in-venv", *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    results = [
        json.loads(line.split(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith(_MARK)
    ]
    if len(results) != len(paths):
        raise LMCacheConfigError(
            f"LMCache config check crashed (rc={proc.returncode}) for {paths}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    out: list[dict | LMCacheConfigError] = []
    for path, result in zip(paths, results, strict=True):
        if result["errors"]:
            out.append(
                LMCacheConfigError(f"LMCache rejects {path}:\n  " + "\n  ".join(result["errors"]))
            )
        else:
            out.append(result)
    return out


_MARK = "STACKCTL_LMCACHE_CHECK "


def check_lmcache_server_args(args: list[str], python: Path) -> dict:
    """Parse ``lmcache server``'s arguments (without ``lmcache server`` itself) with LMCache's
    own parser and config builders (lmcache/cli/commands/server.py: ``add_arguments`` then the
    ``parse_args_to_*`` calls ``execute`` makes before it starts anything); returns the MP
    server's, HTTP frontend's and L1's effective values, or raises ``LMCacheConfigError`` with
    LMCache's message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--server-args", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if not lines:
        raise LMCacheConfigError(
            f"LMCache server args check crashed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = json.loads(lines[0])
    if result["errors"]:
        raise LMCacheConfigError(
            "LMCache rejects `lmcache server "
            + " ".join(args)
            + "`:\n  "
            + "\n  ".join(result["errors"])
        )
    return result


def _check_server_args_in_venv(args: list[str]) -> dict:
    import argparse
    import contextlib
    import io

    from lmcache import _version as lmcache_version
    from lmcache.cli.commands.server import ServerCommand
    from lmcache.v1.distributed.config import parse_args_to_config
    from lmcache.v1.multiprocess.config import (
        parse_args_to_http_frontend_config,
        parse_args_to_mp_server_config,
    )

    parser = argparse.ArgumentParser(prog="lmcache server", exit_on_error=False)
    ServerCommand().add_arguments(parser)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = parser.parse_args(args)
        mp = parse_args_to_mp_server_config(parsed)
        http = parse_args_to_http_frontend_config(parsed)
        storage = parse_args_to_config(parsed)
    except SystemExit:
        return {"errors": [stderr.getvalue().strip() or "argparse exited"]}
    except Exception as exc:  # noqa: BLE001 - LMCache's own message
        return {"errors": [f"{type(exc).__name__}: {exc}"]}
    l1 = storage.l1_manager_config
    return {
        "errors": [],
        "mp": {"host": mp.host, "port": mp.port, "chunk_size": mp.chunk_size},
        "http": {"host": http.http_host, "port": http.http_port},
        "l1_size_gb": l1.memory_config.size_in_bytes / 1024**3,
        "eviction_policy": storage.eviction_config.eviction_policy,
        "lmcache_version": getattr(lmcache_version, "__version__", None),
    }


# ------------------------------------------------------------------------------------------
# runs inside the venv


def _check_in_venv(path: str) -> dict:
    import logging

    errors: list[str] = []
    log: list[str] = []

    class _Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            log.append(f"{record.levelname}: {msg}")
            if record.levelno >= logging.WARNING and (
                msg.startswith("Unknown config")
                or msg.startswith("Failed to convert value")
                or "deprecated" in msg
            ):
                errors.append(msg)

    from lmcache import _version as lmcache_version
    from lmcache.v1 import config as lmc_config

    # LMCache loggers do not propagate: attach to each of them.
    handler = _Capture(level=logging.WARNING)
    loggers = [
        lg
        for name, lg in list(logging.Logger.manager.loggerDict.items())
        if name.startswith("lmcache") and isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        return _load(path, errors, log, lmc_config, lmcache_version)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _load(path: str, errors: list, log: list, lmc_config, lmcache_version) -> dict:
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"top level of {path} must be a mapping, got {type(raw).__name__}")
        return {"errors": errors, "values": {}, "log": log}

    values: dict = {}
    try:
        cfg = lmc_config.LMCacheEngineConfig.from_file(path)
        cfg.update_config_from_env()  # -> validate()
    except Exception as exc:  # noqa: BLE001 - LMCache's own message
        errors.append(f"{type(exc).__name__}: {exc}")
    else:
        defs = lmc_config._CONFIG_DEFINITIONS
        for key, given in raw.items():
            key = lmc_config._CONFIG_ALIASES.get(key, key)
            if key in defs:
                value = getattr(cfg, key)
                if value is None and given is not None:
                    errors.append(f"{key}: LMCache turned {given!r} into None")
                values[key] = (
                    value
                    if isinstance(value, (str, int, float, bool, type(None), list, dict))
                    else repr(value)
                )
    # belt and braces, independent of log wording: keys LMCache does not define
    known = (
        set(lmc_config._CONFIG_DEFINITIONS)
        | set(lmc_config._CONFIG_ALIASES)
        | set(lmc_config._DEPRECATED_CONFIGS)
    )
    for key in raw:
        if key not in known and not any(key in e for e in errors):
            errors.append(f"Unknown configuration key: {key} (source: file: {path})")
    return {
        "errors": errors,
        "values": values,
        "log": log,
        "lmcache_version": getattr(lmcache_version, "__version__", None),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--server-args":
        print(
            _MARK + json.dumps(_check_server_args_in_venv(json.loads(sys.argv[2])), default=repr),
            flush=True,
        )
        sys.exit(0)
    if len(sys.argv) >= 3 and sys.argv[1] == "--in-venv":
        for arg in sys.argv[2:]:
            try:
                out = _check_in_venv(arg)
            except Exception as exc:  # noqa: BLE001 - e.g. YAML syntax error
                out = {"errors": [f"{type(exc).__name__}: {exc}"], "values": {}, "log": []}
            print(_MARK + json.dumps(out, default=repr), flush=True)
        sys.exit(0)
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers.lmcache_check import check_lmcache_config as _check

    print(json.dumps(_check(Path(sys.argv[1])), indent=2, default=repr))
