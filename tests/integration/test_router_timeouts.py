"""Timeouts, connection caps and failure semantics of the router (issue 13), against fake and
simulator engines on loopback: slow-loris clients are cut, idle connections closed, the caps
hold, slow answers are neither retried nor ejections, stuck streams end, a frozen engine's
requests fail over, and the router's own EMFILE blames no engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml

from stackctl.router.app import Router
from stackctl.router.config import FD_HEADROOM, parse_config
from stackctl.router.listener import start_listener
from stackctl.testing import free_port, wait_until_async
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.sim_fleet import REPO_ROOT, start_sims

MODEL = "m"
COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 3}


def config(engines, **overrides):
    raw = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "policy": "round_robin",
        "engines": [{"name": n, "url": u, "model": m} for n, u, m in engines],
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "backoff_s": 0.2, "max_backoff_s": 1.0},
        "timeouts": {"connect_s": 0.5, "header_s": 5.0, "keepalive_s": 5.0},
        "retries": 2,
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@contextlib.asynccontextmanager
async def guarded_router(raw):
    """The router as `stackctl router` serves it: behind the listener (caps, deadlines)."""
    router = Router(parse_config(raw), api_keys=())
    runner, site = await start_listener(router)
    router.url = f"http://127.0.0.1:{site.port}"
    router.port = site.port
    try:
        yield router
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fakes(n=2):
    running = []
    try:
        for i in range(n):
            running.append(await FakeEngine(f"e{i}", (MODEL,)).start())
        yield running
    finally:
        for r in running:
            await r.stop()


def spec(running):
    return [(r.engine.name, r.url, MODEL) for r in running]


async def read_until_closed(reader, timeout):
    """Everything the router sends until it closes the connection (bounded by ``timeout``)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    return data


async def http_get(reader, writer, path="/health"):
    """One keep-alive GET on an open connection: (status, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: r\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split(b" ", 2)[1]), body


# -- the client's side -----------------------------------------------------------------------
async def test_a_slow_loris_head_is_cut_at_header_s():
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), timeouts={"header_s": 0.5})) as router,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        start = time.monotonic()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n")

        async def trickle():
            with contextlib.suppress(ConnectionError):
                for i in range(50):  # one header line every 0.1 s: never a whole head
                    writer.write(f"X-Slow-{i}: y\r\n".encode())
                    await asyncio.sleep(0.1)

        trickler = asyncio.create_task(trickle())
        data = await read_until_closed(reader, 4)
        elapsed = time.monotonic() - start
        trickler.cancel()
        writer.close()
        assert data.startswith(b"HTTP/1.1 408")
        assert 0.4 < elapsed < 2.5, elapsed
        assert router.listener.head_timeouts == 1


async def test_a_half_sent_body_is_cut_at_body_s():
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), timeouts={"body_s": 0.5})) as router,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": '
        )
        start = time.monotonic()

        async def trickle():
            with contextlib.suppress(ConnectionError):
                for _ in range(50):
                    writer.write(b" ")
                    await asyncio.sleep(0.1)

        trickler = asyncio.create_task(trickle())
        data = await read_until_closed(reader, 4)
        elapsed = time.monotonic() - start
        trickler.cancel()
        writer.close()
        assert not data.startswith(b"HTTP/1.1 200")
        assert 0.4 < elapsed < 2.5, elapsed
        assert router.listener.body_timeouts == 1
        assert engines[0].engine.requests == 0


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_s():
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), timeouts={"keepalive_s": 0.5})) as router,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        assert (await http_get(reader, writer))[0] == 200
        assert (await http_get(reader, writer))[0] == 200  # kept alive between requests
        start = time.monotonic()
        assert await read_until_closed(reader, 4) == b""
        assert 0.4 < time.monotonic() - start < 2.5
        writer.close()
        assert router.listener.open == 0


async def test_the_connection_cap_holds_and_established_connections_keep_working():
    n = 20
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), connections={"max": n, "per_client": 1000})) as router,
    ):
        conns = []
        try:
            for _ in range(n + 10):
                conns.append(await asyncio.open_connection("127.0.0.1", router.port))
            # the 10 above the cap: a 503 and closed at once
            for reader, _ in conns[n:]:
                data = await read_until_closed(reader, 3)
                assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
            # the first n still work
            for reader, writer in conns[:n]:
                assert (await http_get(reader, writer))[0] == 200
            assert router.listener.refused == 10 and router.listener.open == n
            status, text = await http_get(*conns[0], "/metrics")
            assert b"router_connections_refused_total 10.0" in text
            assert b"router_client_connections 20.0" in text and b"process_open_fds" in text
        finally:
            for _, writer in conns:
                writer.close()
        await wait_until_async(lambda: router.listener.open == 0, 3, what="slots freed")
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        assert (await http_get(reader, writer))[0] == 200  # a freed slot is taken again
        writer.close()


async def test_the_per_client_cap_counts_each_source_address():
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), connections={"max": 100, "per_client": 5})) as router,
    ):
        conns = []
        try:
            for _ in range(6):
                conns.append(
                    await asyncio.open_connection(
                        "127.0.0.1", router.port, local_addr=("127.0.0.2", 0)
                    )
                )
            other = await asyncio.open_connection(
                "127.0.0.1", router.port, local_addr=("127.0.0.3", 0)
            )
            conns.append(other)
            assert (await read_until_closed(conns[5][0], 3)).startswith(b"HTTP/1.1 503")
            for reader, writer in [*conns[:5], other]:
                assert (await http_get(reader, writer))[0] == 200
            assert router.listener.by_client == {"127.0.0.2": 5, "127.0.0.3": 1}
        finally:
            for _, writer in conns:
                writer.close()


async def test_a_reload_applies_new_caps_to_new_connections():
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), connections={"max": 2})) as router,
    ):
        conns = [await asyncio.open_connection("127.0.0.1", router.port) for _ in range(3)]
        assert (await read_until_closed(conns[2][0], 3)).startswith(b"HTTP/1.1 503")
        raw = config(spec(engines), connections={"max": 3})
        raw["listen"]["port"] = router.config.port  # unchanged: no restart warning
        router.apply(parse_config(raw), ())
        conns.append(await asyncio.open_connection("127.0.0.1", router.port))
        assert (await http_get(*conns[3]))[0] == 200
        for _, writer in conns:
            writer.close()


# -- the engine's side -----------------------------------------------------------------------
async def test_an_engine_that_dies_before_answering_is_retried_elsewhere_and_counted():
    async def die(reader, writer):  # healthy on GET; a POST: closed without a byte of answer
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
        writer.close()

    dying = await asyncio.start_server(die, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{dying.sockets[0].getsockname()[1]}"
    try:
        async with (
            fakes(1) as engines,
            guarded_router(
                config([("dying", url, MODEL), *spec(engines)], health={"interval_s": 30})
            ) as router,
        ):
            async with aiohttp.ClientSession() as s:
                for _ in range(2):  # round robin: one of them starts at the dying engine
                    status, body = await post(s, router, COMPLETION)
                    assert status == 200 and json.loads(body)["system_fingerprint"] == "e0"
            dead = router.pool.backends["dying"]
            assert not dead.healthy and dead.last_error.startswith("died at dying")
    finally:
        dying.close()


async def post(session, router, body, **kw):
    async with session.post(router.url + "/v1/completions", json=body, **kw) as r:
        return r.status, await r.read()


@pytest.mark.slow
async def test_a_slow_non_streamed_answer_within_total_is_neither_retried_nor_an_ejection():
    async with (
        fakes(2) as engines,
        guarded_router(
            config(spec(engines), timeouts={"first_byte_s": 0.2, "total_s": 2.0})
        ) as router,
    ):
        for e in engines:
            e.engine.delay_s = 1.0  # far past first_byte_s: the head comes with the end
        async with aiohttp.ClientSession() as s:
            start = time.monotonic()
            status, body = await post(s, router, COMPLETION)
            assert status == 200 and json.loads(body)["choices"]
            assert 0.9 < time.monotonic() - start < 2.0
            assert sum(e.engine.requests for e in engines) == 1  # not retried
            for e in engines:
                e.engine.delay_s = 5.0  # past total_s now
            start = time.monotonic()
            status, body = await post(s, router, COMPLETION)
            assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
            assert 1.9 < time.monotonic() - start < 3.5
            assert sum(e.engine.requests for e in engines) == 2  # not run again elsewhere
        await asyncio.sleep(0.3)  # the health check the timeout asked for
        assert all(b.healthy for b in router.pool.backends.values())


async def test_a_streamed_answer_whose_head_is_late_is_504_and_not_retried():
    async with (
        fakes(2) as engines,
        guarded_router(config(spec(engines), timeouts={"first_byte_s": 0.3})) as router,
    ):
        for e in engines:
            e.engine.delay_s = 30
        async with aiohttp.ClientSession() as s:
            start = time.monotonic()
            status, _ = await post(s, router, {**COMPLETION, "stream": True})
            assert status == 504 and time.monotonic() - start < 2.5
        assert sum(e.engine.requests for e in engines) == 1
        await asyncio.sleep(0.3)
        assert all(b.healthy for b in router.pool.backends.values())


async def test_a_stuck_stream_is_cut_at_the_chunk_gap():
    async with (
        fakes(1) as engines,
        guarded_router(config(spec(engines), timeouts={"chunk_gap_s": 0.5})) as router,
    ):
        engine = engines[0].engine
        engine.chunk_delay_s = 5.0  # the first event, then nothing for 5 s
        got = b""
        async with aiohttp.ClientSession() as s:
            start = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(
                    router.url + "/v1/completions", json={**COMPLETION, "stream": True}
                ) as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_any():
                        got += chunk
            elapsed = time.monotonic() - start
        assert got.startswith(b"data: ") and b"[DONE]" not in got  # a broken, not a short, answer
        assert 0.4 < elapsed < 2.5, elapsed
        await wait_until_async(lambda: engine.cancelled == 1, 3, what="the engine's stream ended")
        assert router.pool.backends["e0"].healthy  # a stuck stream alone is no ejection


async def test_a_client_that_leaves_mid_stream_counts_against_no_engine():
    async with fakes(1) as engines, guarded_router(config(spec(engines))) as router:
        engine = engines[0].engine
        engine.chunk_delay_s = 0.1
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
            payload = json.dumps({**COMPLETION, "stream": True}).encode()
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            assert b"data: " in await asyncio.wait_for(reader.readuntil(b"data: "), 5)
            writer.transport.abort()  # gone mid-answer
            await asyncio.sleep(0.25)  # the router writes into the closed connection
        backend = router.pool.backends["e0"]
        assert backend.healthy and backend.failures == 0, backend.last_error


# -- a frozen engine (SIGSTOP), a real simulator process -------------------------------------
@pytest.mark.slow
async def test_a_frozen_engines_requests_fail_over_and_it_is_readmitted_after_sigcont():
    with start_sims(2) as sims:
        raw = config(
            [(f"sim{i}", s.url, "meta-llama/Llama-3.1-8B-Instruct") for i, s in enumerate(sims)],
            health={"interval_s": 0.3, "timeout_s": 0.5, "backoff_s": 0.5, "max_backoff_s": 1.0},
            # only the ejection can end these waits early: the timeouts are far off
            timeouts={"connect_s": 1.0, "first_byte_s": 30.0, "total_s": 30.0},
        )
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hi", "max_tokens": 3}
        async with guarded_router(raw) as router, aiohttp.ClientSession() as s:
            assert (await post(s, router, body))[0] == 200
            os.kill(sims[0].proc.pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                results = await asyncio.wait_for(
                    asyncio.gather(
                        *(post(s, router, body) for _ in range(6)),
                        *(post(s, router, {**body, "stream": True}) for _ in range(2)),
                    ),
                    10,
                )
                done_after = time.monotonic() - start
                assert [status for status, _ in results] == [200] * 8
                # ejected after health interval + timeout (0.8 s); their waits cut at once
                assert done_after < 4.0, done_after
                assert not router.pool.backends["sim0"].healthy
            finally:
                os.kill(sims[0].proc.pid, signal.SIGCONT)
            resumed = time.monotonic()
            await wait_until_async(
                lambda: router.pool.backends["sim0"].healthy, 8, what="sim0 readmitted"
            )
            assert time.monotonic() - resumed < 4.0
            assert (await post(s, router, body))[0] == 200


# -- the router's own EMFILE -----------------------------------------------------------------
def _limit_fds(n):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


def _router_process(tmp_path, engine, port, preexec_fn=None, **overrides):
    """`stackctl router` in a subprocess over one fake engine, on ``port``, stderr piped."""
    path = tmp_path / "router.yaml"
    raw = config(
        [("e0", engine.url, MODEL)],
        listen={"host": "127.0.0.1", "port": port},
        connections={"max": 1000, "per_client": 1000},
        **overrides,
    )
    path.write_text(yaml.safe_dump(raw))
    return subprocess.Popen(
        [sys.executable, "-m", "stackctl.router", "--config", str(path)],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def _stop_router(router: subprocess.Popen) -> str:
    """Stop the router subprocess (SIGTERM, then SIGKILL after 10 s); its stderr."""
    router.terminate()
    try:
        return router.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        router.kill()
        return router.communicate()[1]


@pytest.mark.slow
async def test_a_low_open_file_limit_caps_connections_instead_of_meeting_emfile(tmp_path):
    cap = 8
    engine = await FakeEngine("e0", (MODEL,)).start()
    port = free_port()
    # a hard limit of what `cap` connections need
    router = _router_process(tmp_path, engine, port, _limit_fds(FD_HEADROOM + 2 * cap))
    conns = []
    try:
        for _ in range(100):  # bounded: 10 s
            with contextlib.suppress(OSError):
                conns.append(await asyncio.open_connection("127.0.0.1", port))
                break
            await asyncio.sleep(0.1)
        assert conns, "router did not start"
        for _ in range(cap + 3):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        refused = []
        for reader, _ in conns:  # a refused one is answered at once; a served one waits
            with contextlib.suppress(TimeoutError):
                refused.append(await asyncio.wait_for(reader.read(65536), 0.5))
        assert all(a.startswith(b"HTTP/1.1 503") for a in refused)
        assert len(refused) == 4 and all(b"too_many_connections" in a for a in refused)
        for reader, writer in conns[:cap]:  # the first `cap` are served
            assert (await http_get(reader, writer))[0] == 200
    finally:
        for _, w in conns:
            w.close()
        stderr = _stop_router(router)
        await engine.stop()
    assert f"holds at most {cap} client connections" in stderr, stderr[-2000:]
    assert "out of resources" not in stderr, stderr[-2000:]


@pytest.mark.slow
async def test_emfile_in_the_router_answers_503_and_ejects_no_engine(tmp_path):
    engine = await FakeEngine("e0", (MODEL,)).start()
    port = free_port()
    router = _router_process(
        tmp_path, engine, port, timeouts={"header_s": 30.0, "keepalive_s": 30.0}
    )
    fill = []
    try:

        async def up():
            with contextlib.suppress(OSError):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                ok = (await http_get(r, w))[0] == 200
                w.close()
                return ok
            return False

        async def wait_up():
            for _ in range(100):  # bounded: 10 s
                if await up():
                    return True
                await asyncio.sleep(0.1)
            return False

        assert await wait_up(), "router did not start"
        # Lowered after the start: the listener sized its cap to the limit it started with
        # (test_a_low_open_file_limit_caps_connections), so only a limit that shrinks under it
        # (or descriptors it does not count) can still bring EMFILE.
        resource.prlimit(router.pid, resource.RLIMIT_NOFILE, (48, 48))  # ~16 in use
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await http_get(reader, writer))[0] == 200
        fds = f"/proc/{router.pid}/fd"
        for _ in range(80):  # bounded: well past the limit
            fill.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.01)
        await wait_until_async(lambda: len(os.listdir(fds)) >= 46, 5, what="router at its fd limit")
        payload = json.dumps(COMPLETION).encode()
        request = (
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        assert head.startswith(b"HTTP/1.1 503") and answer["error"]["code"] == "router_overloaded"
        await asyncio.sleep(1.0)  # five health rounds, at the limit all along
        status, body = await http_get(reader, writer, "/engines")
        state = json.loads(body)["engines"][0]
        assert status == 200 and state["healthy"] is True and state["failures"] == 0
        for _, w in fill:
            w.close()
        fill = []
        await wait_until_async(lambda: len(os.listdir(fds)) < 30, 5, what="fds released")
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        for _, w in fill:
            w.close()
        stderr = _stop_router(router)
        await engine.stop()
    assert "out of resources" in stderr and "ejected" not in stderr, stderr[-2000:]
