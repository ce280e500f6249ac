"""Authenticated engines: the simulator enforces the engine key as vLLM 0.32 does, the router
sends it (proxied requests and the health check's /v1/models) and re-reads it on reload, and
the router's /metrics and /engines want a client key when the router has keys."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from stackctl.router.config import RouterConfigError, load_engine_key
from stackctl.sim.config import parse_args
from stackctl.sim.server import create_app
from stackctl.testing import wait_until_async
from tests.integration.test_router_fake_engines import router_config, serve_router

MODEL = "sim-llama"
KEY = "engine-key-Zx8_vQ-0123456789abcdefghijklmnopqrstuv"
SIM_ARGS = ["--served-model-name", MODEL, "--max-model-len", "4096", "--time-scale", "200",
            "--num-gpu-blocks-override", "4096"]  # fmt: skip
COMPLETION = {"model": MODEL, "prompt": "hello there engine", "max_tokens": 3}


@contextlib.asynccontextmanager
async def sim(args=(), environ=None):
    config = parse_args([*SIM_ARGS, *args], environ=environ if environ is not None else {})
    async with TestClient(TestServer(create_app(config))) as client:
        client.url = str(client.make_url("")).rstrip("/")
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "args, environ", [((), {"VLLM_API_KEY": KEY}), (("--api-key", "other", KEY), {})]
)
async def test_the_simulator_enforces_its_key_like_vllm(args, environ):
    async with sim(args, environ) as client:
        for headers in ({}, bearer("wrong"), {"Authorization": KEY}, {"Authorization": "Basic x"}):
            for method, path, body in (
                ("GET", "/v1/models", None),
                ("POST", "/v1/completions", COMPLETION),
                ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}),
            ):
                resp = await client.request(method, path, json=body, headers=headers)
                assert resp.status == 401, (path, headers)
                assert await resp.json() == {"error": "Unauthorized"}  # vLLM's exact body
        resp = await client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY))
        assert resp.status == 200 and (await resp.json())["choices"][0]["text"]
        for path in ("/health", "/metrics", "/version", "/ping"):  # open, as in vLLM
            assert (await client.get(path)).status == 200, path


async def test_the_cli_key_wins_over_the_environment_and_no_key_means_no_auth():
    async with sim(("--api-key", "flag-key"), {"VLLM_API_KEY": KEY}) as client:
        assert (await client.get("/v1/models", headers=bearer(KEY))).status == 401
        assert (await client.get("/v1/models", headers=bearer("flag-key"))).status == 200
    async with sim((), {"VLLM_API_KEY": ""}) as client:  # empty: off, as vLLM
        assert (await client.get("/v1/models")).status == 200


async def test_the_router_sends_the_engine_key(tmp_path):
    key_file = tmp_path / "engine_api_key"
    key_file.write_text(KEY)
    async with sim(environ={"VLLM_API_KEY": KEY}) as engine:
        raw = router_config([("sim0", engine.url, MODEL)], engine_key_file=str(key_file))
        async with serve_router(raw) as router, aiohttp.ClientSession() as http:
            await wait_until_async(lambda: router.pool.healthy_models() == [MODEL], 10)
            for _ in range(3):  # the cached request head carries the key on every request
                async with http.post(router.url + "/v1/completions", json=COMPLETION) as resp:
                    assert resp.status == 200, await resp.text()
            async with http.post(engine.url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 401  # straight to the engine without the key: refused


async def test_a_refused_key_ejects_the_engine_and_a_reload_reads_the_new_one(tmp_path):
    key_file = tmp_path / "engine_api_key"
    key_file.write_text(KEY)
    path = tmp_path / "router.yaml"
    async with sim(environ={"VLLM_API_KEY": "new-key"}) as engine:
        raw = router_config([("sim0", engine.url, MODEL)], engine_key_file=str(key_file))
        path.write_text(yaml.safe_dump(raw))
        async with (
            serve_router(raw, config_path=str(path)) as router,
            aiohttp.ClientSession() as http,
        ):
            backend = router.pool.backends["sim0"]
            # the health check's /v1/models is refused: the engine is out, and says why
            await wait_until_async(
                lambda: not backend.healthy and "engine key" in (backend.last_error or ""), 10
            )
            async with http.post(router.url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 503  # no healthy engine; never the engine's own 401
            key_file.write_text("new-key\n")  # `up` wrote the new key; SIGHUP re-reads it
            assert router.reload()
            await wait_until_async(lambda: backend.healthy, 15)
            async with http.post(router.url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 200, await resp.text()
            key_file.write_text("")  # a broken file: the reload is refused, the old key kept
            assert not router.reload() and router.engine_key == "new-key"


async def test_admin_endpoints_want_a_client_key_when_the_router_has_keys(tmp_path):
    async with sim() as engine:
        raw = router_config([("sim0", engine.url, MODEL)])
        async with serve_router(raw, api_keys=(b"client-key",)) as router:
            async with aiohttp.ClientSession() as http:
                for path in ("/metrics", "/engines"):
                    for headers in ({}, bearer("wrong")):
                        async with http.get(router.url + path, headers=headers) as resp:
                            assert resp.status == 401, path
                            assert (await resp.json())["error"]["code"] == "invalid_api_key"
                    async with http.get(router.url + path, headers=bearer("client-key")) as resp:
                        assert resp.status == 200, path
                async with http.get(router.url + "/health") as resp:  # load balancers: open
                    assert resp.status in (200, 503)
        async with serve_router(raw) as router, aiohttp.ClientSession() as http:
            for path in ("/metrics", "/engines"):  # a router without keys: open as before
                async with http.get(router.url + path) as resp:
                    assert resp.status == 200, path


@pytest.mark.parametrize("text", ["", "\n", "two words\n", "caf\u00e9", "a\x00b"])
def test_a_bad_engine_key_file_is_a_config_error(tmp_path, text):
    path = tmp_path / "engine_api_key"
    path.write_text(text)
    with pytest.raises(RouterConfigError, match="engine_key_file"):
        load_engine_key(str(path))
    with pytest.raises(RouterConfigError, match="cannot read"):
        load_engine_key(str(tmp_path / "missing"))
    assert load_engine_key(None) is None
    path.write_text(KEY + "\n")
    assert load_engine_key(str(path)) == KEY
