"""Runs ON a host (sent as the stdin of ``python3 - '<json>'``); standard library only.

One round trip gathers every fact `up` and `status` need, as JSON. Actions:
``facts``  what the host has now (OS, Python, GPUs, memory, disk, ports, packages, file hashes,
           supervisord and its programs, model directory, secrets' hashes);
``http``   GET or POST some loopback URLs from the host itself (health, metrics, a completion),
           so engines behind a bastion need no extra route;
``wait``   poll health URLs until all answer 200 or a deadline passes.
"""

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


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


def gpus():
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-500:]}
    result = []
    for line in out.stdout.strip().splitlines():
        index, name, total, used = [f.strip() for f in line.split(",")]
        result.append({"index": int(index), "name": name, "memory_total_mib": int(total), "memory_used_mib": int(used)})
    return {"gpus": result}


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
    res = subprocess.run([python, "-c", code] + list(names), capture_output=True, text=True, timeout=60)
    return json.loads(res.stdout) if res.returncode == 0 else None


def supervisor_state(python, conf, pidfile):
    pid = None
    try:
        with open(pidfile) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, 0)
        running = True
    except (OSError, ValueError):
        running = False
    programs = {}
    if running and os.path.exists(python):
        res = subprocess.run([python, "-m", "supervisor.supervisorctl", "-c", conf, "status"], capture_output=True, text=True, timeout=60)
        for line in res.stdout.splitlines():
            parts = line.split(None, 2)
            if len(parts) >= 2:
                programs[parts[0]] = {"state": parts[1], "detail": parts[2] if len(parts) > 2 else ""}
    return {"running": running, "pid": pid if running else None, "programs": programs}


def facts(spec):
    result = {
        "hostname": socket.gethostname(),
        "os": os_release(),
        "python": platform.python_version(),
        "mem_available_bytes": meminfo_available_bytes(),
        "disk_free_bytes": free_disk_bytes(spec["deploy_dir"]),
        "listening_ports": listening_ports(),
        "files": {},
        "secrets": {},
        "venv_python": os.path.exists(spec["python"]),
    }
    for path in spec.get("files", []):
        digest, mode = sha256_file(path)
        result["files"][path] = {"sha256": digest, "mode": mode}
    for path in spec.get("secrets", []):
        result["secrets"][path] = sha256_file(path)[0]
    if spec.get("gpus"):
        result["gpus"] = gpus()
    if spec.get("packages"):
        result["packages"] = installed_packages(spec["python"], spec["packages"])
    marker = spec.get("installed_marker")
    if marker:
        try:
            with open(marker) as fh:
                result["installed_marker"] = fh.read().strip()
        except OSError:
            result["installed_marker"] = None
    model = spec.get("model_path")
    if model:
        result["model_present"] = os.path.isfile(os.path.join(model, "config.json"))
    result["supervisor"] = supervisor_state(spec["python"], spec["supervisor_conf"], spec["supervisor_pidfile"])
    return result


def http_one(request):
    data = request.get("body")
    req = urllib.request.Request(request["url"], data=data.encode() if data is not None else None, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if request.get("bearer_file"):
        try:
            with open(request["bearer_file"]) as fh:
                key = fh.readline().strip().split(",")[0]
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
    except Exception as exc:
        body, status = f"{type(exc).__name__}: {exc}", None
    return {"url": request["url"], "status": status, "body": body[: request.get("max_body", 200000)], "seconds": time.monotonic() - started}


def http(spec):
    return [http_one(r) for r in spec["requests"]]


def wait(spec):
    deadline = time.monotonic() + spec["timeout"]
    pending = list(spec["urls"])
    last = {}
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            outcome = http_one({"url": url, "timeout": 5, "max_body": 300})
            last[url] = outcome
            if outcome["status"] == 200:
                pending.remove(url)
        if pending:
            time.sleep(spec.get("interval", 1.0))
    return {"healthy": [u for u in spec["urls"] if u not in pending], "unhealthy": pending, "last": last}


ACTIONS = {"facts": facts, "http": http, "wait": wait}

if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(ACTIONS[request["action"]](request)))
