"""Stand-ins for the programs stackctl deploys (a vLLM engine, the router), standard library only.

They answer what stackctl itself asks of them, from the host, through the probe: ``/health``,
``/metrics`` (vLLM's sample names), the router's ``/engines`` (read from its router.yaml, again
on SIGHUP or ``reload()``, as the real router does) and ``/v1/completions``. Two ways to run one:

* in this process (``FakeService(port).start()``), for the deploy tests' fake supervisord;
* as a program under a real supervisord (``python tests/helpers/fake_services.py --port N``),
  for the status and ops tests: SIGHUP reloads the router's config, ``--unhealthy-if FILE``
  answers /health with 503 when FILE exists at start (an engine that never becomes healthy).

Knobs and records are attributes (in-process) or ``GET /_state`` (as a program).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="m"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="m"}} {waiting}
# HELP vllm:prefix_cache_queries Prefix cache queries, in tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{model_name="m"}} {queries}
# HELP vllm:prefix_cache_hits Prefix cache hits, in tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{{model_name="m"}} {hits}
"""


class FakeService:
    """One engine or router on 127.0.0.1:``port``; attributes are knobs a test may flip."""

    def __init__(
        self, port: int, *, kind: str = "engine", router_config: str | None = None, name: str = ""
    ):
        self.port, self.kind, self.router_config, self.name = port, kind, router_config, name
        self.health_status = 200
        self.completion_status = 200
        self.metrics_text: str | None = None  # None: METRICS with the numbers below
        self.running = self.waiting = 0
        self.busy_polls = 0  # /metrics reports one running request this many more times
        self.queries, self.hits = 1000, 250
        self.engines: list[dict] = []
        self.reloads: list[list[str]] = []  # the engine names after each load of router.yaml
        self.requests: list[dict] = []  # {"method", "path", "authorization"}
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------
    def start(self) -> FakeService:
        if self.kind == "router":
            self.reload()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    def reload(self) -> None:
        """Read router.yaml again (the real router does so on SIGHUP)."""
        doc = yaml.safe_load(Path(self.router_config).read_text()) if self.router_config else {}
        with self._lock:
            self.engines = [
                {"name": e["name"], "url": e["url"], "healthy": True}
                for e in (doc or {}).get("engines") or []
            ]
            self.reloads.append([e["name"] for e in self.engines])

    # -- answers ----------------------------------------------------------------
    def answer(self, method: str, path: str, authorization: str | None) -> tuple[int, str]:
        with self._lock:
            self.requests.append({"method": method, "path": path, "authorization": authorization})
            if path == "/health":
                return self.health_status, ""
            if path == "/pid":
                return 200, str(os.getpid())
            if path == "/_state":
                return 200, json.dumps(
                    {"pid": os.getpid(), "reloads": self.reloads, "requests": self.requests}
                )
            if path == "/metrics" and self.kind == "engine":
                if self.metrics_text is not None:
                    return 200, self.metrics_text
                running = self.running + (1 if self.busy_polls > 0 else 0)
                self.busy_polls = max(0, self.busy_polls - 1)
                return 200, METRICS.format(
                    running=running, waiting=self.waiting, queries=self.queries, hits=self.hits
                )
            if path == "/engines" and self.kind == "router":
                return 200, json.dumps({"policy": "kv_aware", "engines": self.engines})
            if path == "/v1/completions" and method == "POST":
                if self.completion_status != 200:
                    return self.completion_status, json.dumps({"error": "fake failure"})
                return 200, json.dumps(
                    {
                        "object": "text_completion",
                        "choices": [{"text": " ok"}],
                        "served_by": self.name,
                    }
                )
            return 404, "not found"


def _handler(service: FakeService):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, body = service.answer(method, self.path, self.headers.get("Authorization"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply("GET")

        def do_POST(self):
            self._reply("POST")

        def log_message(self, *args):  # quiet
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=("engine", "router"), default="engine")
    parser.add_argument("--router-config")
    parser.add_argument(
        "--unhealthy-if", help="answer /health with 503 when this file exists at start"
    )
    parser.add_argument("--metrics-text", help="serve this file's text as /metrics")
    args = parser.parse_args(argv)
    service = FakeService(args.port, kind=args.kind, router_config=args.router_config)
    if args.unhealthy_if and os.path.exists(args.unhealthy_if):
        service.health_status = 503
    if args.metrics_text:
        service.metrics_text = Path(args.metrics_text).read_text()
    stop = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: service.reload())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    service.start()
    print(f"fake {args.kind} listening on 127.0.0.1:{args.port}, pid {os.getpid()}", flush=True)
    while not stop.wait(0.05):
        pass
    service.stop()


if __name__ == "__main__":
    main()
