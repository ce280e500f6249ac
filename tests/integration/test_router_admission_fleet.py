"""Admission control end to end: the router in front of in-process fake engines.

Caps answer 429 with Retry-After, per-client caps and rate limits are independent, a client
that stops reading frees its slots after the write timeout, a huge prompt is routed but not
indexed, and a too-long prompt gets OpenAI's 400 context_length_exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from stackctl.router.app import Router
from stackctl.router.config import parse_config
from stackctl.testing import wait_until_async
from tests.helpers.fake_engine import FakeEngine


def config(engines, **overrides):
    raw = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "policy": "round_robin",
        "engines": [{"name": r.engine.name, "url": r.url, "model": "m"} for r in engines],
        "health": {"interval_s": 0.2, "timeout_s": 5.0, "backoff_s": 0.2, "max_backoff_s": 1.0},
        "timeouts": {"connect_s": 0.5, "first_byte_s": 10.0},
        "retries": 0,
    }
    raw.update(overrides)
    return raw


@contextlib.asynccontextmanager
async def stack(n=1, keys=(), **overrides):
    engines = [await FakeEngine(f"e{i}", ("m",)).start() for i in range(n)]
    router = Router(parse_config(config(engines, **overrides)), api_keys=keys)
    runner = web.AppRunner(router.build_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    router.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        yield router, engines
    finally:
        await runner.cleanup()
        for e in engines:
            await e.stop()


async def post(session, router, key=None, **body):
    body = {"model": "m", "prompt": "hello", **body}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(router.url + "/v1/completions", json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.json()


async def test_over_the_global_cap_429_with_retry_after_then_served_again():
    async with stack(admission={"max_inflight": 2}) as (router, engines):
        engines[0].engine.delay_s = 0.6
        async with aiohttp.ClientSession() as s:
            slow = [asyncio.ensure_future(post(s, router)) for _ in range(2)]
            await wait_until_async(lambda: router.admission.inflight == 2, timeout=5)
            status, headers, body = await post(s, router)
            assert status == 429
            assert headers["Retry-After"] == "1" and headers["retry-after-ms"] == "1000"
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert [r[0] for r in await asyncio.gather(*slow)] == [200, 200]
            assert router.admission.inflight == 0
            engines[0].engine.delay_s = 0
            assert (await post(s, router))[0] == 200
            async with s.get(router.url + "/metrics") as r:
                metrics = await r.text()
        assert (
            'router_admission_rejections_total{client="default",reason="global_inflight"} 1.0'
            in metrics
        )


async def test_request_bodies_in_flight_are_bounded_in_bytes():
    budget = {"max_body_bytes_inflight": 3 * 1024 * 1024}
    async with stack(admission=budget) as (router, engines):
        engines[0].engine.delay_s = 0.6
        prompt = "p" * (900 * 1024)  # ~0.9 MiB bodies: three fit, the fourth waits
        async with aiohttp.ClientSession() as s:
            slow = [asyncio.ensure_future(post(s, router, prompt=prompt)) for _ in range(3)]
            await wait_until_async(lambda: router.admission.inflight == 3, timeout=5)
            status, headers, body = await post(s, router, prompt=prompt)
            assert status == 429 and headers["Retry-After"] == "1"
            assert "bytes of request bodies" in body["error"]["message"]
            assert (await post(s, router))[0] == 200  # a small one still fits
            assert [r[0] for r in await asyncio.gather(*slow)] == [200, 200, 200]
        assert router.admission.body_bytes == 0


async def test_per_client_caps_are_independent_and_named_never_keyed():
    keys = (("team-a", b"sk-a-secret"), ("team-b", b"sk-b-secret"))
    async with stack(keys=keys, clients={"team-a": {"max_inflight": 1}}) as (router, engines):
        engines[0].engine.delay_s = 0.5
        async with aiohttp.ClientSession() as s:
            busy = asyncio.ensure_future(post(s, router, "sk-a-secret"))
            await wait_until_async(lambda: router.admission.inflight == 1, timeout=5)
            status, headers, body = await post(s, router, "sk-a-secret")
            assert status == 429 and headers["Retry-After"] == "1"
            assert "team-a" in body["error"]["message"]
            # team-b has no cap: two at once while team-a is at its limit
            b = await asyncio.gather(*(post(s, router, "sk-b-secret") for _ in range(2)))
            assert [r[0] for r in b] == [200, 200]
            assert (await busy)[0] == 200
            auth = {"Authorization": "Bearer sk-b-secret"}
            async with s.get(router.url + "/metrics", headers=auth) as r:
                metrics = await r.text()
            async with s.get(router.url + "/clients", headers=auth) as r:
                clients = await r.json()
            async with s.get(router.url + "/clients") as r:
                assert r.status == 401
        assert (
            'router_admission_rejections_total{client="team-a",reason="client_inflight"} 1.0'
            in metrics
        )
        view = {c["name"]: c for c in clients["clients"]}
        assert view["team-a"]["refused"] == 1 and view["team-a"]["max_inflight"] == 1
        assert view["team-b"]["admitted"] == 2 and view["team-b"]["keys"] == 1
        for text in (metrics, json.dumps(clients)):
            assert "secret" not in text


async def test_requests_and_tokens_rate_limits():
    keys = (("rps", b"k-rps"), ("tpm", b"k-tpm"))
    limits = {"rps": {"requests_per_s": 2}, "tpm": {"tokens_per_min": 100}}
    async with stack(keys=keys, clients=limits) as (router, _):
        async with aiohttp.ClientSession() as s:
            # tokens: ceil(chars / 4) + max_tokens; the bucket holds a minute's 100
            status, headers, body = await post(s, router, "k-tpm", prompt="x" * 400, max_tokens=10)
            assert status == 429 and "Request too large" in body["error"]["message"]
            assert "Retry-After" not in headers and headers["x-should-retry"] == "false"
            ok = await post(s, router, "k-tpm", prompt="x" * 200, max_tokens=10)  # 60 tokens
            assert ok[0] == 200
            status, headers, body = await post(s, router, "k-tpm", prompt="x" * 200, max_tokens=10)
            assert status == 429 and body["error"]["type"] == "tokens"
            assert headers["Retry-After"] == "12"  # 20 tokens short, at 100/60 a second
            # requests per second, for a client the other one's tokens do not affect
            assert [(await post(s, router, "k-rps"))[0] for _ in range(2)] == [200, 200]
            status, headers, body = await post(s, router, "k-rps")
            assert status == 429 and body["error"]["type"] == "requests"
            assert 1 <= int(headers["retry-after-ms"]) <= 500 and headers["Retry-After"] == "1"
            await asyncio.sleep(int(headers["retry-after-ms"]) / 1000 + 0.05)
            assert (await post(s, router, "k-rps"))[0] == 200


async def test_a_client_that_stops_reading_frees_its_slot_after_the_write_timeout():
    async with stack(admission={"write_timeout_s": 0.5}) as (router, engines):
        engine = engines[0].engine
        engine.words = ("x" * 65536,) * 400  # ~26 MB of events: far above every buffer
        port = int(router.url.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            body = json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode()
            head = (
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            await loop.sock_sendall(sock, head + body)
            first = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
            assert first.startswith(b"HTTP/1.1 200")
            # ... and read no more: the router's writes block
            await wait_until_async(lambda: router.admission.inflight == 1, timeout=5)
            await wait_until_async(
                lambda: router.admission.inflight == 0 and router.pool.backends["e0"].inflight == 0,
                timeout=5,
            )
            assert router.admission.write_timeouts == 1
            backend = router.pool.backends["e0"]  # the client's fault, not the engine's
            assert backend.healthy and backend.failures == 0, backend.last_error
        finally:
            sock.close()
        engine.words = ("ok",)
        async with aiohttp.ClientSession() as s:
            assert (await post(s, router))[0] == 200
            async with s.get(router.url + "/metrics") as r:
                assert 'router_write_timeouts_total{client="default"} 1.0' in await r.text()


@pytest.mark.parametrize("policy", ["kv_aware"])
async def test_a_huge_prompt_is_routed_but_not_indexed_and_a_too_long_one_refused(policy):
    options = {"max_indexed_chars": 20_000}
    async with stack(
        2, policy=policy, policy_options=options, admission={"max_prompt_chars": 200_000}
    ) as (router, engines):

        def indexed():
            return sum(
                router.policy.describe(b)["prefix_index_chunks"]
                for b in router.pool.backends.values()
            )

        async with aiohttp.ClientSession() as s:
            status, headers, _ = await post(s, router, prompt="y" * 150_000)
            assert status == 200 and headers["x-stackctl-engine"] in ("e0", "e1")
            assert indexed() == 0
            assert (await post(s, router, prompt="z" * 10_000))[0] == 200
            assert indexed() == 10_000 // 256
            status, _, body = await post(s, router, prompt="w" * 200_001)
            assert status == 400 and body["error"]["code"] == "context_length_exceeded"
            assert body["error"]["type"] == "invalid_request_error"
            assert body["error"]["param"] == "prompt"  # /v1/completions' field
        assert sum(e.engine.requests for e in engines) == 2  # the refused one never left


async def test_reload_reads_named_keys_and_new_limits(tmp_path):
    from stackctl.router.config import load_config

    engine = await FakeEngine("e0", ("m",)).start()
    keys = tmp_path / "router_api_keys"
    keys.write_text("sk-old-bare\n")  # the older format: client default
    path = tmp_path / "router.yaml"

    def write(clients):
        raw = config([engine], api_keys_file=str(keys), clients=clients)
        path.write_text(json.dumps(raw))  # JSON is YAML

    write({})
    router = Router(load_config(path), config_path=str(path))
    runner = web.AppRunner(router.build_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    router.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as s:
            assert (await post(s, router, "sk-old-bare"))[0] == 200
            keys.write_text("default sk-old-bare\nteam-a sk-a\n")
            write({"team-a": {"requests_per_s": 1}})
            assert router.reload()
            assert (await post(s, router, "sk-a"))[0] == 200
            assert (await post(s, router, "sk-a"))[0] == 429  # its new limit
            assert (await post(s, router, "sk-old-bare"))[0] == 200
            keys.write_text("team-a sk-a\nbroken line here\n")
            assert not router.reload()  # a bad keys file keeps the running keys
            assert (await post(s, router, "sk-old-bare"))[0] == 200
    finally:
        await runner.cleanup()
        await engine.stop()
