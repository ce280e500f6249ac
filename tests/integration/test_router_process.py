"""``python -m stackctl.router`` as a process: uvloop, SIGHUP reload, clean SIGTERM exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import yaml

from stackctl.testing import free_ports, wait_until
from tests.helpers.sim_fleet import REPO_ROOT, wait_healthy


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers, r.read()


def test_router_process_serves_reloads_on_sighup_and_exits_cleanly(tmp_path):
    *ports, router_port = free_ports(3)  # distinct: picked while all three are held
    engines = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers.fake_engine",
                "--port",
                str(p),
                "--name",
                f"e{i}",
                "--model",
                "m",
            ],
            cwd=REPO_ROOT,
        )
        for i, p in enumerate(ports)
    ]
    path = tmp_path / "router.yaml"

    def write(n):
        path.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": router_port},
                    "policy": "kv_aware",
                    "engines": [
                        {"name": f"e{i}", "url": f"http://127.0.0.1:{p}", "model": "m"}
                        for i, p in enumerate(ports[:n])
                    ],
                }
            )
        )

    write(1)
    router = subprocess.Popen(
        [sys.executable, "-m", "stackctl.router", "--config", str(path)],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{router_port}"
    try:
        assert all(wait_healthy(f"http://127.0.0.1:{p}", 30) for p in ports)
        assert wait_healthy(base, 30, router)
        status, headers, body = post(
            base + "/v1/chat/completions",
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert headers["x-stackctl-engine"] == "e0"
        write(2)
        router.send_signal(signal.SIGHUP)
        wait_until(
            lambda: len(get_json(base + "/engines")["engines"]) == 2,
            10,
            interval=0.1,
            what="SIGHUP to reload the engines (2 listed on /engines)",
        )
        router.send_signal(signal.SIGTERM)
        assert router.wait(15) == 0
        err = router.stderr.read()
        assert "Traceback" not in err and "reloaded" in err
    finally:
        for p in [router, *engines]:
            if p.poll() is None:
                p.kill()
                p.wait()
