"""Runs ON a host (sent as the stdin of ``python3 - '<json>'``); standard library only.

One round trip gathers every fact `up` and `status` need, as JSON. Actions:
``facts``  what the host has now (OS, Python, GPUs, memory, disk, ports, packages, file hashes,
           supervisord and its programs, model directory, secrets' hashes);
``http``   GET or POST some loopback URLs from the host itself (health, metrics, a completion),
           so engines behind a bastion need no extra route;
``wait``   poll health URLs until all answer 200 or a deadline passes;
``model_prepare``, ``model_finish``, ``model_download``  assemble a model's copy in its partial
           directory, check it against its manifest and rename it into place (stackctl/models.py).

It runs with the host's ``python:`` (the interpreter that creates the venv), which may be older
than stackctl needs: keep this file valid Python 3.6 (no walrus, no ``capture_output``/``text``
for subprocess) so that it can report the version for `up` to refuse the host cleanly.
"""

import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PIPE = subprocess.PIPE


def run_text(argv, timeout):
    """subprocess.run with text output captured, in Python 3.6's spelling."""
    return subprocess.run(argv, stdout=PIPE, stderr=PIPE, universal_newlines=True, timeout=timeout)


def sha256_file(path):
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mode & 0o7777
    except OSError:
        return None, None


def os_release():
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def meminfo_available_bytes():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk_bytes(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def listening_ports():
    """TCP ports in LISTEN state, from /proc/net/tcp{,6} (no ss/netstat needed)."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    if fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except (OSError, StopIteration):
            pass
    return sorted(ports)


# What `up` checks on a GPU host, in one nvidia-smi call (fields nvidia-smi has had for years).
GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.used",
    "driver_version",
    "persistence_mode",
    "ecc.errors.uncorrected.volatile.total",
)
GPU_QUERY = ["nvidia-smi", "--query-gpu=" + ",".join(GPU_FIELDS), "--format=csv,noheader,nounits"]
APPS_QUERY = [
    "nvidia-smi",
    "--query-compute-apps=pid,gpu_uuid,used_memory",
    "--format=csv,noheader,nounits",
]
CUDA_VERSION = re.compile(r"CUDA Version\s*:\s*([0-9]+(?:\.[0-9]+)*)")


def _int_or_none(text):
    """nvidia-smi's numbers; "[N/A]" (ECC off, not supported) and the like are None."""
    try:
        return int(text)
    except ValueError:
        return None


def parse_gpu_csv(text):
    """The rows of GPU_QUERY's answer."""
    rows = []
    for fields in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not fields:
            continue
        if len(fields) != len(GPU_FIELDS):
            raise ValueError(
                "unexpected nvidia-smi --query-gpu line: {!r}".format(",".join(fields))
            )
        f = dict(zip(GPU_FIELDS, [field.strip() for field in fields]))
        rows.append(
            {
                "index": int(f["index"]),
                "uuid": f["uuid"],
                "name": f["name"],
                "memory_total_mib": _int_or_none(f["memory.total"]),
                "memory_used_mib": _int_or_none(f["memory.used"]),
                "driver_version": f["driver_version"],
                "persistence_mode": f["persistence_mode"],
                "ecc_uncorrected": _int_or_none(f["ecc.errors.uncorrected.volatile.total"]),
            }
        )
    return rows


def parse_compute_apps(text):
    """The rows of APPS_QUERY's answer (lines that are not a process, e.g. a notice, are skipped)."""
    apps = []
    for fields in csv.reader(io.StringIO(text), skipinitialspace=True):
        if len(fields) != 3 or _int_or_none(fields[0].strip()) is None:
            continue
        apps.append(
            {
                "pid": int(fields[0].strip()),
                "gpu_uuid": fields[1].strip(),
                "used_mib": _int_or_none(fields[2].strip()),
            }
        )
    return apps


def parse_cuda_version(text):
    """The CUDA version the driver supports, from plain `nvidia-smi` (or `nvidia-smi -q`)."""
    match = CUDA_VERSION.search(text)
    return match.group(1) if match else None


def _proc_stat(pid):
    """(parent pid, process group) of a process, None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def _command(pid):
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return None


def is_ours(pid, supervisor_pid, engine_groups):
    """A GPU process of our own: under our supervisord, or in the process group our engine
    launcher recorded (an engine's leftover, which the launcher kills before starting again)."""
    stat = _proc_stat(pid)
    if stat and stat[1] in engine_groups:
        return True
    for _ in range(64):  # bounded walk up the process tree
        if not stat or pid <= 1:
            return False
        if pid == supervisor_pid:
            return True
        pid = stat[0]
        stat = _proc_stat(pid)
    return False


def _read_pgids(paths):
    groups = set()
    for path in paths:
        try:
            with open(path) as fh:
                groups.add(int(fh.read().strip()))
        except (OSError, ValueError):
            pass
    return groups


def _nvidia_smi(argv):
    try:
        out = run_text(argv, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if out.returncode != 0:
        return None, (out.stderr or out.stdout).strip()[-500:]
    return out.stdout, None


def gpus(supervisor_pid=None, pgid_files=()):
    """GPUs, driver, CUDA version and the compute processes on them, each marked ours or not."""
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi not found"}
    text, error = _nvidia_smi(GPU_QUERY)
    if error is not None:
        return {"error": error}
    try:
        result = {"gpus": parse_gpu_csv(text)}
    except ValueError as exc:
        return {"error": str(exc)}
    header, _ = _nvidia_smi(["nvidia-smi"])
    result["cuda_version"] = parse_cuda_version(header or "")
    text, error = _nvidia_smi(APPS_QUERY)
    if error is not None:
        result["apps_error"] = error
        return result
    groups = _read_pgids(pgid_files)
    result["apps"] = [
        dict(app, ours=is_ours(app["pid"], supervisor_pid, groups), command=_command(app["pid"]))
        for app in parse_compute_apps(text)
    ]
    return result


def python_facts():
    """The interpreter running this probe, which is the host's ``python:``: its version, and
    whether it can create a venv (Debian's python3 lacks ensurepip without python3-venv)."""

    def importable(name):
        try:
            __import__(name)
            return True
        except Exception:  # noqa: BLE001 - a broken module is as good as a missing one here
            return False

    return {
        "version": list(sys.version_info[:3]),
        "executable": sys.executable,
        "venv": importable("venv"),
        "ensurepip": importable("ensurepip"),
    }


def installed_packages(python, names):
    if not os.path.exists(python):
        return None
    code = (
        "import json,sys,importlib.metadata as m\n"
        "out={}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n]=m.version(n)\n"
        "    except m.PackageNotFoundError: out[n]=None\n"
        "print(json.dumps(out))"
    )
    res = run_text([python, "-c", code] + list(names), timeout=60)
    return json.loads(res.stdout) if res.returncode == 0 else None


# supervisord's own XML-RPC interface, asked over its unix socket with supervisor's transport in
# the interpreter that has supervisor (the probe itself has only the standard library): the
# states supervisord holds, not supervisorctl's text, and its pid, so that a live process that
# merely reuses a dead supervisord's pid is not taken for it.
SUPERVISOR_RPC = (
    "import json,sys,xmlrpc.client\n"
    "from supervisor.xmlrpc import SupervisorTransport\n"
    "s=xmlrpc.client.ServerProxy('http://127.0.0.1',transport=SupervisorTransport(None,None,sys.argv[1])).supervisor\n"
    "print(json.dumps({'pid':s.getPID(),'programs':{(i['name'] if i['group']==i['name'] else i['group']+':'+i['name']):"
    "{'state':i['statename'],'detail':i['description']} for i in s.getAllProcessInfo()}}))\n"
)


# One program's process as supervisord holds it (getProcessInfo): its state and pid (0 when none).
SUPERVISOR_PROCESS_RPC = (
    "import json,sys,xmlrpc.client\n"
    "from supervisor.xmlrpc import SupervisorTransport\n"
    "s=xmlrpc.client.ServerProxy('http://127.0.0.1',transport=SupervisorTransport(None,None,sys.argv[1])).supervisor\n"
    "i=s.getProcessInfo(sys.argv[2])\n"
    "print(json.dumps({'state':i['statename'],'pid':i['pid']}))\n"
)


def supervisor_serverurl(conf):
    """``serverurl`` of the ``[supervisorctl]`` section of supervisord.conf (as stackctl writes it)."""
    try:
        with open(conf) as fh:
            text = fh.read()
    except OSError:
        return None
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif (
            section == "supervisorctl"
            and line.split("=", 1)[0].strip() == "serverurl"
            and "=" in line
        ):
            return line.split("=", 1)[1].strip()
    return None


def supervisor_rpc(python, conf):
    """supervisord's answer ({"pid", "programs"}), or None when none answers on its socket."""
    url = supervisor_serverurl(conf)
    if not url or not os.path.exists(python):
        return None
    try:
        res = run_text([python, "-c", SUPERVISOR_RPC, url], timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def supervisor_state(python, conf, pidfile):
    pid = None
    try:
        with open(pidfile) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, 0)
        alive = True
    except (OSError, ValueError):
        alive = False
    answer = supervisor_rpc(python, conf) if alive else None
    running = answer is not None and answer.get("pid") == pid
    programs = answer["programs"] if running else {}
    return {"running": running, "pid": pid if running else None, "programs": programs}


def supervisor_wait(spec):
    """Until supervisord calls every named program RUNNING (past its startsecs), or the timeout."""
    deadline = time.monotonic() + spec["timeout"]
    while True:
        answer = supervisor_rpc(spec["python"], spec["supervisor_conf"]) or {"programs": {}}
        states = {name: answer["programs"].get(name, {}).get("state") for name in spec["programs"]}
        remaining = deadline - time.monotonic()
        if all(state == "RUNNING" for state in states.values()) or remaining <= 0:
            return {
                "running": all(state == "RUNNING" for state in states.values()),
                "states": states,
                "programs": {name: answer["programs"].get(name) for name in spec["programs"]},
            }
        time.sleep(min(spec.get("interval", 1.0), remaining))


def supervisor_signal(spec):
    """Send ``signal`` to the process supervisord runs as ``program``, as an operator's ``kill``
    would (the pid from supervisord's XML-RPC, not from supervisorctl's text): so that
    supervisord sees its child die unexpectedly and restarts it. Answers the pid it went to."""
    url = supervisor_serverurl(spec["supervisor_conf"])
    if not url or not os.path.exists(spec["python"]):
        return {"pid": None, "error": "no supervisord configured here (run `stackctl up`)"}
    try:
        res = run_text(
            [spec["python"], "-c", SUPERVISOR_PROCESS_RPC, url, spec["program"]], timeout=60
        )
    except subprocess.TimeoutExpired:
        return {"pid": None, "error": "supervisord did not answer within 60 s"}
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:]
        return {"pid": None, "error": "supervisord did not answer: " + "".join(tail)}
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if info["state"] != "RUNNING" or not info["pid"]:
        return {
            "pid": None,
            "error": "{} is {}, not running".format(spec["program"], info["state"]),
        }
    try:
        os.kill(info["pid"], spec["signal"])
    except OSError as exc:
        return {"pid": info["pid"], "error": "kill {}: {}".format(info["pid"], exc)}
    return {"pid": info["pid"], "error": None}


# ------------------------------------------------------------------ model weights
# `up` assembles a model's copy in its partial directory (next to the target, same filesystem),
# checks every file against the manifest, then renames it into place: a directory at the target
# whose manifest lists files that all exist with their sizes is a complete copy; nothing else is.
MODEL_MANIFEST = ".stackctl-manifest.json"
WEIGHT_FORMATS = (
    ".safetensors",
    ".bin",
    ".pt",
)  # vLLM's load_format auto: the first one present wins
NOT_FOR_INFERENCE = (
    "training_args.bin",
    "optimizer.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
)
OTHER_FRAMEWORKS = (
    ".h5",
    ".msgpack",
    ".ot",
    ".onnx",
    ".onnx_data",
    ".tflite",
)  # TF, Flax, Rust, ONNX weights
SKIPPED_DIRS = ("original/", ".cache/", ".git/")


def partial_path(path):
    """Where a copy of the model at ``path`` is assembled, and resumed from on a re-run."""
    path = path.rstrip("/")
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")


def select_model_files(paths):
    """The files of a model repository or directory (relative paths) that vLLM reads, which are
    the ones `up` downloads or copies.

    As vLLM 0.32 does (vllm/model_executor/model_loader/default_loader.py, _prepare_weights,
    and weight_utils.py, download_weights_from_hf): load_format auto globs ``*.safetensors``,
    then ``*.bin``, then ``*.pt`` and uses only the first format present (safetensors over
    .bin/.pt); LoadConfig.ignore_patterns defaults to ``original/**/*`` (Meta's consolidated
    checkpoints, as large as the safetensors); filter_files_not_needed_for_inference drops
    training state. Weights of other frameworks are never loaded. Config, tokenizer and other
    small files are kept (vLLM fetches those separately).
    """
    kept = [
        p for p in paths if not p.startswith(SKIPPED_DIRS) and os.path.basename(p) != MODEL_MANIFEST
    ]
    kept = [
        p
        for p in kept
        if not p.endswith(OTHER_FRAMEWORKS) and os.path.basename(p) not in NOT_FOR_INFERENCE
    ]
    chosen = next((s for s in WEIGHT_FORMATS if any(p.endswith(s) for p in kept)), ())
    return sorted(p for p in kept if not p.endswith(WEIGHT_FORMATS) or p.endswith(chosen))


def scan_files(directory):
    """Relative path -> size of every file under ``directory`` (empty when it does not exist)."""
    sizes = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            try:
                sizes[os.path.relpath(full, directory).replace(os.sep, "/")] = os.stat(full).st_size
            except OSError:
                pass
    return sizes


def manifest_problems(directory, name=None):
    """Why ``directory`` is not a complete copy (an empty list: it is one)."""
    try:
        with open(os.path.join(directory, MODEL_MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return [f"no complete manifest ({MODEL_MANIFEST}): the copy was never finished"]
    return files_problems(directory, manifest, name)


def files_problems(directory, manifest, name=None):
    """What in ``directory`` does not match ``manifest`` (a missing or short file, another model)."""
    try:
        files = dict(manifest["files"])
    except (KeyError, TypeError, ValueError):
        return [f"the manifest ({MODEL_MANIFEST}) lists no files"]
    problems = []
    if name is not None and manifest.get("model") != name:
        problems.append(
            "its manifest is for model {!r}, not {!r}".format(manifest.get("model"), name)
        )
    for rel, size in sorted(files.items()):
        try:
            have = os.stat(os.path.join(directory, rel)).st_size
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if have != size:
            problems.append(f"{rel} has {have} of its {size} bytes")
    return problems


def light_problems(directory):
    """A model directory the operator provides (``model.path``): config.json and weights."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return [f"{directory} has no config.json"]
    sizes = scan_files(directory)
    if not any(
        p.endswith(WEIGHT_FORMATS) and sizes[p] > 0 for p in select_model_files(sorted(sizes))
    ):
        return [f"{directory} has no weights (*.safetensors, *.bin or *.pt)"]
    return []


def model_state(spec):
    """Whether the model at spec["path"] is complete, and what a resumed copy would start from."""
    path, partial = spec["path"], partial_path(spec["path"])
    state = {
        "manifest": os.path.isfile(os.path.join(path, MODEL_MANIFEST)),
        "partial_bytes": sum(scan_files(partial).values()) if os.path.isdir(partial) else None,
        "rsync": shutil.which("rsync"),
        "rrsync": shutil.which("rrsync"),
    }
    if not os.path.isdir(path):
        problems = [f"{path} does not exist"]
    elif state["manifest"] or spec.get("managed"):
        problems = manifest_problems(path, spec.get("name") if spec.get("managed") else None)
    else:
        problems = light_problems(path)
    state["problems"] = problems[:5]
    state["complete"] = not problems
    return state


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def model_prepare(spec):
    """The partial directory, ready to fill: what an earlier try left there, else an incomplete
    copy found at the target (moved there to resume from), else a new empty directory."""
    path, partial = spec["path"], partial_path(spec["path"])
    if not os.path.isdir(partial):
        if os.path.isdir(path) and manifest_problems(path, spec.get("name")):
            os.rename(path, partial)
        else:
            os.makedirs(partial, exist_ok=True)
    return {"partial": partial, "bytes": sum(scan_files(partial).values())}


def model_finish(spec):
    """Check the assembled copy against its manifest (``spec["manifest"]`` when given, else the
    one that came with a peer's copy) and rename it into place; a stale target is removed."""
    path, partial = spec["path"], partial_path(spec["path"])
    os.sync()  # the files reach the disk before a manifest says they are complete
    if spec.get("manifest") is not None:
        problems = files_problems(partial, spec["manifest"], spec.get("name"))
        if not problems:
            _write_json(os.path.join(partial, MODEL_MANIFEST), spec["manifest"])
    else:
        problems = manifest_problems(partial, spec.get("name"))
    if problems:
        return {"ok": False, "problems": problems[:10]}
    with open(os.path.join(partial, MODEL_MANIFEST)) as fh:
        files = json.load(fh)["files"]
    for rel in scan_files(partial):  # what an earlier copy left that this one does not have
        if rel not in files and rel != MODEL_MANIFEST and not rel.startswith(".cache/"):
            os.remove(os.path.join(partial, rel))  # (vLLM would load a stray *.safetensors)
    if os.path.lexists(path):
        stale = partial[: -len(".partial")] + ".stale-" + str(os.getpid())
        os.rename(path, stale)
        os.rename(partial, path)
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.remove(stale)
    else:
        os.rename(partial, path)
    shutil.rmtree(
        os.path.join(path, ".cache"), ignore_errors=True
    )  # huggingface_hub's resume records
    return {"ok": True, "files": len(files), "bytes": sum(files.values())}


def model_download(spec):
    """Download the files vLLM uses from the Hugging Face Hub into the partial directory
    (snapshot_download resumes what an earlier try left in that local_dir), then finish."""
    import glob

    from huggingface_hub import HfApi, snapshot_download

    partial = model_prepare(spec)["partial"]
    info = HfApi().model_info(spec["name"], revision=spec.get("revision"), files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    wanted = select_model_files(sorted(sizes))
    snapshot_download(
        spec["name"],
        revision=info.sha,
        local_dir=partial,
        allow_patterns=[glob.escape(p) for p in wanted],
    )
    have = scan_files(partial)
    files = {p: sizes[p] if sizes[p] is not None else have.get(p, -1) for p in wanted}
    manifest = {
        "format": 1,
        "model": spec["name"],
        "origin": "hub:{}@{}".format(spec["name"], info.sha),
        "files": files,
    }
    return model_finish(dict(spec, manifest=manifest))


def owner_uid(path):
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def systemd_facts(unit, unit_path):
    """Whether systemd runs this host (its runtime dir and systemctl), and the unit's state."""
    present = os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None
    result = {
        "present": present,
        "unit": unit,
        "enabled": None,
        "active": None,
        "unit_sha256": sha256_file(unit_path)[0] if unit_path else None,
    }
    if present and unit:
        for key, verb in (("enabled", "is-enabled"), ("active", "is-active")):
            try:
                out = run_text(["systemctl", verb, unit], timeout=30)
                result[key] = out.stdout.strip() or None
            except (OSError, subprocess.TimeoutExpired):
                pass
    return result


def nofile_hard():
    """The hard open-file limit of what this connection starts (supervisord, outside systemd);
    None: unlimited or unknown."""
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (ImportError, OSError, ValueError):
        return None
    return None if hard == resource.RLIM_INFINITY else hard


def facts(spec):
    result = {
        "hostname": socket.gethostname(),
        "os": os_release(),
        "python": platform.python_version(),
        "python_info": python_facts(),
        "mem_available_bytes": meminfo_available_bytes(),
        "disk_free_bytes": free_disk_bytes(spec["deploy_dir"]),
        "listening_ports": listening_ports(),
        "files": {},
        "secrets": {},
        "venv_python": os.path.exists(spec["python"]),
        "deploy_dir_uid": owner_uid(spec["deploy_dir"]),
        "systemd": systemd_facts(spec.get("unit"), spec.get("unit_path")),
        "nofile_hard": nofile_hard(),
    }
    for path in spec.get("files", []):
        digest, mode = sha256_file(path)
        result["files"][path] = {"sha256": digest, "mode": mode}
    for path in spec.get("secrets", []):
        result["secrets"][path] = sha256_file(path)[0]
    result["supervisor"] = supervisor_state(
        spec["python"], spec["supervisor_conf"], spec["supervisor_pidfile"]
    )
    if spec.get("gpus"):
        result["gpus"] = gpus(result["supervisor"]["pid"], spec.get("engine_pgid_files", []))
    if spec.get("packages"):
        result["packages"] = installed_packages(spec["python"], spec["packages"])
    marker = spec.get("installed_marker")
    if marker:
        try:
            with open(marker) as fh:
                result["installed_marker"] = fh.read().strip()
        except OSError:
            result["installed_marker"] = None
    model = spec.get("model")
    if model:
        result["model"] = model_state(model)
        result["model_present"] = result["model"]["complete"]
        result["model_disk_free_bytes"] = free_disk_bytes(model["path"])
    return result


def http_one(request):
    data = request.get("body")
    req = urllib.request.Request(
        request["url"],
        data=data.encode() if data is not None else None,
        method="POST" if data is not None else "GET",
    )
    req.add_header("Content-Type", "application/json")
    if request.get("bearer_file"):
        try:
            with open(request["bearer_file"]) as fh:
                fields = fh.readline().split()  # "name key" (older files: a bare key)
                key = fields[-1].split(",")[0] if fields else ""
            req.add_header("Authorization", "Bearer " + key)
        except OSError:
            pass
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=request.get("timeout", 10)) as resp:
            body = resp.read().decode(errors="replace")
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(errors="replace"), exc.code
    except Exception as exc:  # noqa: BLE001 - any failure is the answer for this URL, not the end of the probe
        body, status = f"{type(exc).__name__}: {exc}", None
    return {
        "url": request["url"],
        "status": status,
        "body": body[: request.get("max_body", 200000)],
        "seconds": time.monotonic() - started,
    }


def http(spec):
    return [http_one(r) for r in spec["requests"]]


#: supervisord states of a program that has just exited (it restarts it from BACKOFF).
EXITED_STATES = ("BACKOFF", "EXITED", "FATAL")
#: Exits while its engine was still not healthy after which a wait stops waiting for it.
CRASH_LOOP_EXITS = 3


def wait(spec):
    """Until every URL answers 200, or the timeout. With ``programs`` (url -> supervisord
    program), a program that keeps exiting before its URL answers stops the wait for it
    (``crashing``): an engine that dies at start (a bad flag, too little memory) fails `up`
    after a few restarts, not after the whole health timeout."""
    deadline = time.monotonic() + spec["timeout"]
    pending = list(spec["urls"])
    programs = spec.get("programs") or {}
    last, exits, crashing, states = {}, {}, {}, {}
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            outcome = http_one({"url": url, "timeout": 5, "max_body": 300})
            last[url] = outcome
            if outcome["status"] == 200:
                pending.remove(url)
        if programs and pending:
            answer = supervisor_rpc(spec["python"], spec["supervisor_conf"]) or {}
            for url in list(pending):
                info = (answer.get("programs") or {}).get(programs.get(url)) or {}
                state = info.get("state")
                if state in EXITED_STATES and states.get(url) not in EXITED_STATES:
                    exits[url] = exits.get(url, 0) + 1
                states[url] = state
                if exits.get(url, 0) >= CRASH_LOOP_EXITS:
                    crashing[url] = "{} exited {} times before it answered ({}: {})".format(
                        programs[url], exits[url], state, info.get("detail") or "no detail"
                    )
                    pending.remove(url)
        if pending:
            time.sleep(max(0.0, min(spec.get("interval", 1.0), deadline - time.monotonic())))
    return {
        "healthy": [u for u in spec["urls"] if u not in pending and u not in crashing],
        "unhealthy": pending + list(crashing),
        "crashing": crashing,
        "last": last,
    }


ACTIONS = {
    "facts": facts,
    "http": http,
    "wait": wait,
    "supervisor_wait": supervisor_wait,
    "supervisor_signal": supervisor_signal,
    "model_prepare": model_prepare,
    "model_finish": model_finish,
    "model_download": model_download,
}

if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(ACTIONS[request["action"]](request)))
