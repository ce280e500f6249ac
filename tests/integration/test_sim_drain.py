"""SIGTERM drains the simulator like vLLM's server: in-flight streams finish, new work gets 503."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

from stackctl.testing import wait_until
from tests.helpers.sim_fleet import start_sim, stop_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def post(url: str, body: dict, timeout: float = 30.0):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def test_sigterm_finishes_in_flight_streams_and_refuses_new_requests():
    sim = start_sim(time_scale=1.0)
    try:
        chunks: list[bytes] = []

        def stream() -> None:
            with post(
                f"{sim.url}/v1/completions",
                {"model": MODEL, "prompt": "hello " * 50, "max_tokens": 150, "stream": True},
            ) as resp:
                for line in resp:
                    chunks.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        wait_until(lambda: chunks, 10, interval=0.01, what="the stream to start")
        sim.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = None
        try:
            with urllib.request.urlopen(f"{sim.url}/health", timeout=2):
                pass
        except urllib.error.HTTPError as exc:
            refused = exc.code
        except OSError:
            refused = "connection refused"  # the listener is already closed: also fine for a router
        assert refused in (503, "connection refused")
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert chunks[-2:] and b"[DONE]" in b"".join(chunks[-3:]), "the in-flight stream was cut"
        tokens = [c for c in chunks if c.startswith(b"data: {")]
        assert len(tokens) >= 150
        assert sim.proc.wait(timeout=30) == 0
    finally:
        stop_sim(sim)
