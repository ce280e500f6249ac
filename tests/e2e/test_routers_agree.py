"""Routers that agree (issue 14): engines publish their KV events on a bound endpoint and every
router subscribes, so two routers that never talk to each other send a conversation's next
turn to the engine where the other one put its last turn.

One local fleet that `up` deployed (simulator engines publishing events), and two router
processes started here from the router.yaml that `up` rendered, each on its own port. The same
kind of conversations run twice, each request sent to one of the two routers at random: with
``kv_index: events`` and with ``kv_index: estimate`` (each router then knows only what it
routed itself). Agreement is counted over returning turns only: whether the turn lands on the
engine that served its conversation's previous turn (the ``x-stackctl-engine`` header). New
conversations are placed for balance by each router's own placement counts, which may differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from stackctl.router.app import ENGINE_HEADER
from stackctl.testing import free_ports, wait_until
from tests.e2e.test_kv_events_fleet import engines, words
from tests.helpers.chaos import MODEL, REPO_ROOT, deploy
from tests.helpers.sim_fleet import wait_healthy

pytestmark = [pytest.mark.slow]

ENGINES = 3
USERS = 50
ROUNDS = 20  # USERS x ROUNDS = 1,000 requests per run
ANSWER_TOKENS = 8
# the fastest profile, sped up: a request's modelled time is well below its HTTP overhead.
# Caches far larger than the conversations (no eviction): engines stay equally loaded.
ENGINE = {"sim": {"hardware": "h100-80gb", "time_scale": 50.0}, "lmcache": {"enabled": False}}
GOAL = 0.99  # issue 14: agreement with events when loads are equal
# With estimate, the half of the returning turns sent to the router that did not route the
# previous turn (the router is picked at random) land there only by chance, about 1 in ENGINES
# (that router places the conversation as new, or where it put an earlier turn): agreement
# about 0.5 + 0.5 / 3. Measured: estimate 0.643 (crossed turns 0.248), events 1.000 (crossed
# 1.000), 950 returning turns each; 0.2 leaves room for another seed's or machine's spread.
MARGIN = 0.2


def router_process(config: dict, path: Path) -> tuple[subprocess.Popen, str, Path]:
    """A router process on ``config`` (written to ``path``): (process, URL, its log)."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = path.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stackctl.router", "--config", str(path)],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{config['listen']['port']}", log


@contextlib.contextmanager
def two_routers(rendered: dict, kv_index: str, where: Path) -> Iterator[list[str]]:
    """Two routers on the rendered config with ``kv_index``, each on its own port; both up
    and seeing every engine healthy before their URLs are yielded."""
    procs: list[tuple[subprocess.Popen, str, Path]] = []
    try:
        for i, port in enumerate(free_ports(2)):
            config = {**rendered, "listen": {**rendered["listen"], "port": port}}
            config["kv_index"] = kv_index
            procs.append(router_process(config, where / f"router-{kv_index}-{i}.yaml"))
        for proc, url, log in procs:
            assert wait_healthy(url, 30, proc), log.read_text(errors="replace")[-3000:]

            def all_healthy(url: str = url) -> bool:
                return all(e["healthy"] for e in engines(url))

            wait_until(
                all_healthy,
                30,
                interval=0.2,
                what=f"every engine healthy in {url}",
                ignore=(OSError, ValueError),
            )
        yield [url for _, url, _ in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def conversations(routers: list[str], seed: int) -> dict[str, int]:
    """USERS growing chats sharing one system prompt, ROUNDS turns each, one request at a time
    in a random order of conversations, each request to a router picked at random."""
    rng = random.Random(seed)
    system = words(rng, 150)
    histories = [
        [{"role": "system", "content": system}, {"role": "user", "content": words(rng, 40)}]
        for _ in range(USERS)
    ]
    last: list[tuple[int, str] | None] = [None] * USERS  # (router, engine) of the previous turn
    turns = [k for k in range(USERS) for _ in range(ROUNDS)]
    rng.shuffle(turns)
    counts = {"requests": 0, "returning": 0, "agreed": 0, "crossed": 0, "crossed_agreed": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for k in turns:
            router = rng.randrange(len(routers))
            payload = {
                "model": MODEL,
                "messages": histories[k],
                "max_tokens": ANSWER_TOKENS,
                "ignore_eos": True,
            }
            url = f"{routers[router]}/v1/chat/completions"
            async with session.post(url, json=payload) as resp:
                body = await resp.json()
                assert resp.status == 200, body
                engine = resp.headers[ENGINE_HEADER]
            counts["requests"] += 1
            previous = last[k]
            if previous is not None:
                agreed = engine == previous[1]
                counts["returning"] += 1
                counts["agreed"] += agreed
                if previous[0] != router:  # the router that did not see the previous turn
                    counts["crossed"] += 1
                    counts["crossed_agreed"] += agreed
            last[k] = (router, engine)
            histories[k] = [
                *histories[k],
                {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                {"role": "user", "content": words(rng, 20)},
            ]
    return counts


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Both runs over one fleet (different conversations each); the events routers' views of
    every engine as they stood after their run."""
    root = tmp_path_factory.mktemp("routers-agree")
    started = time.monotonic()
    stack = deploy(root / "fleet", ENGINES, router={"kv_index": "events"}, engine=ENGINE)
    try:
        stack.wait_all_healthy()
        rendered = yaml.safe_load(Path(stack.plans["head"].router_config).read_text())
        results, views = {}, {}
        for seed, kv_index in enumerate(("events", "estimate")):
            with two_routers(rendered, kv_index, root) as routers:
                results[kv_index] = asyncio.run(conversations(routers, seed))
                if kv_index == "events":
                    views = {url: [e["kv_events"] for e in engines(url)] for url in routers}
    finally:
        stack.down()
    took = time.monotonic() - started
    for kv_index, c in results.items():
        c["agreement"] = c["agreed"] / c["returning"]
        c["crossed_agreement"] = c["crossed_agreed"] / c["crossed"]
        print(
            f"\n[routers-agree] {kv_index}: {c['requests']} requests through 2 routers, "
            f"{c['returning']} returning turns, agreement {c['agreement']:.3f} "
            f"({c['agreed']}/{c['returning']}); on the {c['crossed']} turns sent to the router "
            f"that did not route the previous one: {c['crossed_agreement']:.3f}"
        )
    print(f"[routers-agree] fleet up, both runs and down in {took:.1f} s")
    return results, views


def test_every_request_served_and_every_router_saw_every_engines_events(measured):
    results, views = measured
    for c in results.values():
        assert c["requests"] == USERS * ROUNDS and c["returning"] == USERS * (ROUNDS - 1), c
    for url, router_views in views.items():
        assert len(router_views) == ENGINES, (url, router_views)
        for view in router_views:
            assert view is not None and view["state"] == "synced", (url, view)
            assert view["gaps"] == 0 and view["malformed"] == 0 and view["gpu_blocks"] > 0, view
    # both routers hold the same blocks for each engine: what they route on is the same
    blocks = [[v["gpu_blocks"] for v in router_views] for router_views in views.values()]
    assert blocks[0] == blocks[1], json.dumps(views)


def test_routers_fed_by_events_agree(measured):
    results, _ = measured
    assert results["events"]["agreement"] >= GOAL, results["events"]


def test_routers_that_only_estimate_agree_clearly_less(measured):
    results, _ = measured
    events, estimate = results["events"], results["estimate"]
    assert events["agreement"] - estimate["agreement"] >= MARGIN, results
