"""Hostile input against a real router process and a simulator engine (issue 13, item 5).

Every malformed request gets a 4xx (an OpenAI error object where the router or the engine
answers; aiohttp's own 400 for what its HTTP parser refuses) and at most one line in the
router's log, never a 500 or a traceback; the router keeps serving. The router runs as
``python -m stackctl.router`` (its own logging setup, uvloop), requests go over raw sockets
so that bytes no HTTP client would send reach it, and a hypothesis property test does the
same over generated bodies and header bytes. The simulator's own parsing is tested in
process at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackctl.sim.config import parse_args
from stackctl.sim.server import create_app
from stackctl.testing import free_port
from tests.helpers.sim_fleet import REPO_ROOT, start_sims, wait_healthy
from tests.integration.test_router_fake_engines import fleet, router_config, serve_router, spec

KEY = "hostile-test-key"
MODEL = "m"
MAX_BODY = 1_000_000
ANSWER_S = 5.0  # the longest any exchange may take: longer is a hang
WAIT_S = 0.2  # for an answer to bytes that may not be a whole request (none is no failure)
SETTLE_S = 0.3  # for a log line written after the answer (aiohttp's lingering read)
USER = {"role": "user", "content": "say hi"}

pytestmark = pytest.mark.slow


@dataclass
class RouterProcess:
    port: int
    proc: subprocess.Popen
    log_path: Path
    sim_port: int  # the engine behind it, for the simulator's own property test

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        """The log's lines after ``offset``, but the health checker's (it logs on its own
        schedule, e.g. each capacity it learns)."""
        with self.log_path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        return [line for line in lines if " stackctl.router.health: " not in line]


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """A router process (kv_aware, client keys) in front of one simulator."""
    tmp = tmp_path_factory.mktemp("hostile")
    sim_args = ["--served-model-name", MODEL, "--max-model-len", "256"]
    with start_sims(1, time_scale=1000, extra_args=sim_args) as sims:
        (tmp / "keys").write_text(KEY + "\n")
        port = free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "policy": "kv_aware",
            "api_keys_file": str(tmp / "keys"),
            "max_body_bytes": MAX_BODY,
            "engines": [{"name": "e0", "url": sims[0].url, "model": MODEL}],
            "health": {"interval_s": 0.5, "backoff_s": 0.2, "max_backoff_s": 1.0},
        }
        (tmp / "router.yaml").write_text(yaml.safe_dump(config))
        log_path = tmp / "router.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stackctl.router", "--config", str(tmp / "router.yaml")],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        running = RouterProcess(port, proc, log_path, sims[0].port)
        try:
            if not wait_healthy(f"http://127.0.0.1:{port}", 30, proc):
                pytest.fail("router did not become healthy:\n" + log_path.read_text())
            yield running
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert "Traceback" not in log_path.read_text()


# -- raw HTTP -------------------------------------------------------------------------------
def http_request(
    path: str = "/v1/chat/completions",
    body: bytes = b"",
    headers: tuple[bytes, ...] = (),
    auth: bytes | None = f"Bearer {KEY}".encode(),
    method: bytes = b"POST",
) -> bytes:
    """One HTTP/1.1 request as bytes; ``headers`` are raw lines (any bytes at all)."""
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: router"]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    lines += [*headers, b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat_body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [USER], "max_tokens": 2, **fields}).encode()


@dataclass
class Answer:
    status: int | None  # None: the connection closed with no answer
    body: bytes
    content_type: str

    def error(self) -> dict:
        """The OpenAI error object, checking its shape."""
        assert self.content_type.startswith("application/json"), (self.status, self.body)
        err = json.loads(self.body)["error"]
        assert set(err) >= {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        return err


def exchange(port: int, data: bytes, timeout: float = ANSWER_S) -> Answer:
    """Send ``data``, read one answer. A timeout (socket.timeout) is left to the caller."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered early
            sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method="POST")
        try:
            resp.begin()
            body = resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return Answer(None, b"", "")
        except http.client.IncompleteRead as exc:
            body = exc.partial
        return Answer(resp.status, body, resp.getheader("Content-Type", ""))


def serves(router: RouterProcess) -> None:
    """The router still answers a valid completion."""
    answer = exchange(router.port, http_request(body=chat_body()))
    assert answer.status == 200, (answer.status, answer.body[:300])
    assert json.loads(answer.body)["choices"][0]["message"]["role"] == "assistant"


# -- the probe's cases, one by one ----------------------------------------------------------
def _chat(messages) -> bytes:
    return http_request(body=json.dumps({"model": MODEL, "messages": messages}).encode())


# name, request, status, OpenAI error param (None: none named), or False: aiohttp's answer
CASES = [
    ("nested 200k deep", http_request(body=b"[" * 200_000 + b"]" * 200_000), 400, None),
    ("nested in messages", http_request(body=b'{"model":"m","messages":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), 400, None),
    ("content 5", _chat([{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("content true", _chat([{"role": "user", "content": True}]), 400, "messages[0].content"),
    ("content part 5", _chat([{"role": "user", "content": [5]}]), 400, "messages[0].content[0]"),
    ("role 5", _chat([{"role": 5, "content": "x"}]), 400, "messages[0].role"),
    ("messages a string", _chat("hi"), 400, "messages"),
    ("prompt an object", http_request("/v1/completions", json.dumps({"model": MODEL, "prompt": {}}).encode()), 400, "prompt"),
    ("stream a string", http_request(body=chat_body(stream="yes")), 400, "stream"),
    ("max_tokens 0", http_request(body=chat_body(max_tokens=0)), 400, "max_tokens"),
    ("model 5", http_request(body=json.dumps({"model": 5, "messages": [USER]}).encode()), 400, "model"),
    ("5000-digit number", http_request(body=b'{"model":"m","max_tokens":' + b"9" * 5000 + b"}"), 400, None),
    ("body not UTF-8", http_request(body=b'{"model":"\xff\xfe"}'), 400, None),
    ("lone surrogate (engine's 400)", http_request(body=b'{"model":"m","max_tokens":2,"messages":[{"role":"user","content":"\\ud800"}]}'), 400, None),
    ("Authorization not ASCII", http_request(body=chat_body(), auth="Bearer s\u00e9cret".encode("latin-1")), 401, None),
    ("Authorization not UTF-8", http_request(body=chat_body(), auth=b"Bearer \xff\xfe\x80"), 401, None),
    ("Authorization its key plus a high byte", http_request(body=chat_body(), auth=f"Bearer {KEY}\xe9".encode("latin-1")), 401, None),
    ("session header not UTF-8", http_request(body=chat_body(), headers=(b"x-session-id: \xe9\xff",)), 200, None),
    ("broken gzip body", http_request(body=b"not gzip at all", headers=(b"Content-Encoding: gzip",)), 400, None),
    ("gzip bomb", http_request(body=gzip.compress(b"{" + b" " * 20 * MAX_BODY + b"}"), headers=(b"Content-Encoding: gzip",)), 413, None),
    ("unknown path", http_request("/v1/nope", chat_body()), 404, None),
    ("path not UTF-8", http_request("/v1/%ff%fe", chat_body()), 404, None),
    ("wrong method", http_request(body=chat_body(), method=b"GET"), 405, None),
    ("header name with a space", http_request(body=chat_body(), headers=(b"Bad Header: y",)), 400, False),
    ("NUL in a header", http_request(body=chat_body(), headers=(b"X-A: a\x00b",)), 400, False),
    ("header line 10 kB", http_request(body=chat_body(), headers=(b"X-Long: " + b"a" * 10_000,)), 400, False),
    ("two Content-Lengths", http_request(body=chat_body(), headers=(b"Content-Length: 3",)), 400, False),
    ("bad chunked body", b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, False),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400, False),
]  # fmt: skip


@pytest.mark.parametrize(
    "request_bytes, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_input_is_a_4xx_and_at_most_one_log_line(router, request_bytes, status, param):
    offset = router.log_size()
    answer = exchange(router.port, request_bytes)
    assert answer.status == status, answer.body[:300]
    if param is not False and status != 200:
        err = answer.error()
        if param is not None:
            assert err["param"] == param
    time.sleep(SETTLE_S)
    lines = router.log_since(offset)
    assert len(lines) <= 1 and not any("Traceback" in line for line in lines), lines
    assert not any(KEY in line for line in lines)
    serves(router)


async def test_session_keys_that_are_not_text_are_still_routed():
    """The session policy hashes a header that is not UTF-8 and a ``user`` holding a lone
    surrogate (both were 500s: str.encode refused them)."""
    async with (
        fleet(2) as engines,
        serve_router(router_config(spec(engines), policy="session")) as in_process,
    ):
        port = int(in_process.url.rsplit(":", 1)[1])
        user = b'{"model":"m","user":"\\ud800","messages":[{"role":"user","content":"x"}]}'
        for data in (
            http_request(
                body=chat_body(model="m"), headers=(b"x-session-id: \xe9\xff",), auth=None
            ),
            http_request(body=user, auth=None),
        ):
            answer = await asyncio.to_thread(exchange, port, data)
            assert answer.status == 200, answer.body[:300]


def test_a_flood_of_parser_errors_is_rate_limited(router):
    offset = router.log_size()
    for _ in range(40):
        answer = exchange(router.port, http_request(headers=(b"Bad Header: y",)))
        assert answer.status == 400
    time.sleep(SETTLE_S)
    lines = router.log_since(offset)
    assert len(lines) <= 6, lines  # the burst (5 per 10 s), perhaps one "N more" line
    assert all("rejected a malformed HTTP request" in line for line in lines), lines
    serves(router)


# -- property: whatever a client sends, no 5xx, no hang, and the router keeps serving -----
# Text with lone surrogates too (hypothesis leaves them out by default): json.dumps writes
# them as "\\ud800" escapes or, encoded with surrogatepass, as bytes that are not UTF-8.
PLAIN = st.text(max_size=30)
TEXT = PLAIN | st.text(st.characters(exclude_categories=()), max_size=30)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats()
JSON = st.recursive(
    SCALAR | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
ROLE = st.sampled_from(["user", "system", "assistant"])
MESSAGE = st.fixed_dictionaries({"role": ROLE | JSON}, optional={"content": TEXT | JSON})
OPTIONS = {
    "stream": st.booleans() | JSON,
    "max_tokens": st.integers(1, 4) | JSON,
    "stream_options": st.just({"include_usage": True}) | JSON,
    "user": TEXT | JSON,
}
BODY = st.one_of(
    # anything in any field
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just(MODEL) | JSON,
            "messages": st.lists(MESSAGE, max_size=3) | JSON,
            "prompt": TEXT | JSON,
            **OPTIONS,
        },
    ),
    # a model the router serves, messages with a role and good options: what the engine
    # gets to render, with content and prompt that are not always text
    st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "messages": st.lists(
                st.fixed_dictionaries({"role": ROLE, "content": PLAIN | TEXT | SCALAR | JSON}),
                min_size=1,
                max_size=3,
            ),
            "prompt": PLAIN | TEXT | SCALAR | JSON,
        },
        optional={"stream": st.booleans(), "max_tokens": st.integers(1, 4), "user": TEXT},
    ),
)
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions"])
PROPERTY = settings(
    max_examples=200,
    deadline=None,  # each exchange is bounded by ANSWER_S instead (a slow CI core is no failure)
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _not_a_server_error(port: int, data: bytes, must_answer: bool) -> None:
    try:
        answer = exchange(port, data, ANSWER_S if must_answer else WAIT_S)
    except TimeoutError:
        if must_answer:
            raise AssertionError(f"no answer in {ANSWER_S} s to {data[:300]!r}") from None
        answer = Answer(None, b"", "")  # e.g. a Content-Length the bytes never reach
    assert must_answer is False or answer.status is not None, data[:300]
    assert answer.status is None or answer.status < 500, (answer.status, answer.body[:300])
    if (
        answer.status is not None
        and answer.status >= 400
        and answer.content_type.startswith("application/json")
    ):
        answer.error()


@PROPERTY
@given(path=PATHS, body=BODY, raw_json=st.booleans())
def test_property_generated_bodies_never_5xx(router, path, body, raw_json):
    data = (
        json.dumps(body).encode()
        if raw_json
        else json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )  # the second way sends lone surrogates as (invalid) UTF-8 bytes
    _not_a_server_error(router.port, http_request(path, data), must_answer=True)


@PROPERTY
@given(path=PATHS, body=BODY)
def test_property_the_simulator_never_5xx_either(router, path, body):
    """What the router lets through is the engine's to judge: the simulator, as vLLM,
    answers 4xx for what it cannot take (it is sent directly, without the router's checks)."""
    data = json.dumps(body).encode()
    _not_a_server_error(router.sim_port, http_request(path, data, auth=None), must_answer=True)


HEADER_BYTES = st.binary(max_size=40)


@PROPERTY
@given(
    kind=st.sampled_from(["header", "auth", "bearer", "raw", "body", "nested"]),
    name=HEADER_BYTES,
    value=HEADER_BYTES,
    raw=st.binary(max_size=200),
    depth=st.integers(1, 300_000),
)
def test_property_header_and_raw_bytes_never_5xx(router, kind, name, value, raw, depth):
    if kind == "header":  # any bytes as one header line, of an otherwise valid request
        data = http_request(body=chat_body(), headers=(name + b": " + value,))
    elif kind in ("auth", "bearer"):
        scheme = b"Bearer" if kind == "bearer" else name
        data = http_request(body=chat_body(), auth=scheme + b" " + value)
    elif kind == "body":
        data = http_request(body=raw)
    elif kind == "nested":  # JSON arrays ``depth`` deep, where the messages belong
        data = http_request(body=b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}")
    else:  # anything at all, ended as a request head would be
        data = raw + b"\r\n\r\n"
    _not_a_server_error(router.port, data, must_answer=kind != "raw")
    serves(router)


def test_the_log_after_all_that_holds_no_traceback(router):
    text = router.log_path.read_text(errors="replace")
    assert "Traceback" not in text
    assert KEY not in text


# -- the simulator's own parsing (in process) ---------------------------------------------
@pytest.fixture
async def sim():
    config = parse_args(
        ["--served-model-name", MODEL, "--max-model-len", "512", "--time-scale", "500"],
        environ={},
    )
    async with TestClient(TestServer(create_app(config))) as client:
        yield client


async def sim_error(response) -> dict:
    assert response.status == 400, await response.text()
    err = (await response.json())["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    return err


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"a \\ud800 b"}]}'),
        ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"x"}],"user":"\\udfff"}'),
        ("/v1/completions", b'{"prompt":"one \\udc00"}'),
        ("/v1/completions", b'{"prompt":["\\ud83d"]}'),
        ("/v1/completions", b"[" * 200_000 + b"]" * 200_000),
    ],
)
async def test_sim_refuses_lone_surrogates_and_deep_nesting(sim, path, raw):
    err = await sim_error(await sim.post(path, data=raw))
    assert err["message"].startswith("JSON decode error")


async def test_sim_takes_a_surrogate_pair():
    config = parse_args(["--served-model-name", MODEL, "--time-scale", "500"], environ={})
    async with TestClient(TestServer(create_app(config))) as client:
        raw = b'{"prompt":"smile \\ud83d\\ude00","max_tokens":2}'
        response = await client.post("/v1/completions", data=raw)
        assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": True}],
        [{"role": "user", "content": [5]}],
        [{"role": "user", "content": {"type": "text", "text": "x"}}],
        [{"role": 5, "content": "x"}],
        [{"content": "x"}],
        ["hi"],
    ],
)
async def test_sim_refuses_non_text_content_with_a_400(sim, messages):
    err = await sim_error(await sim.post("/v1/chat/completions", json={"messages": messages}))
    assert err["param"] == "messages"


async def test_sim_renders_content_parts(sim):
    parts = [{"type": "text", "text": "a b"}, "c", {"type": "image_url", "image_url": {}}]
    response = await sim.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1},
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["usage"]["prompt_tokens"] == 5  # <|user|> a b c <|assistant|>
