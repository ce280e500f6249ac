"""Admission control (stackctl/router/admission.py) with an injected clock: token buckets,
in-flight caps, Retry-After values, named keys, the prompt cap, the write-timeout sweep."""

from __future__ import annotations

import math

import pytest

from stackctl.router.admission import Admission, Refusal, TokenBucket, completion_tokens
from stackctl.router.config import (
    AdmissionConfig,
    ClientLimits,
    RouterConfigError,
    load_api_keys,
    load_client_keys,
    parse_config,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(config=None, clients=None, keys=(), clock=None):
    return Admission(config or AdmissionConfig(), clients or {}, keys, clock=clock or Clock())


class Req:
    """Stands in for an aiohttp request (only its identity matters to enter/leave)."""


# -- token bucket ------------------------------------------------------------------------------
def test_bucket_starts_full_refills_at_its_rate_and_says_how_long_to_wait():
    bucket = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # one token at 2/s
    assert bucket.take(1, 0.25) == pytest.approx(0.25)  # half of it came back meanwhile
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.take(3, 10.0) == 0.0  # refilled, but never above its capacity
    assert bucket.take(2, 10.0) == pytest.approx(0.5)  # one left, one more at 2/s
    assert bucket.take(5, 10.0) == math.inf  # more than it can ever hold


def test_bucket_refusal_takes_nothing():
    bucket = TokenBucket(rate=1.0, capacity=10.0, now=0.0)
    assert bucket.take(8, 0.0) == 0.0
    assert bucket.take(5, 0.0) == pytest.approx(3.0)
    assert bucket.take(2, 0.0) == 0.0  # the refused 5 were not taken


# -- caps ----------------------------------------------------------------------------------------
def test_global_inflight_cap_refuses_with_retry_after_and_frees_on_leave():
    adm = admission(AdmissionConfig(max_inflight=2))
    client = adm.authenticate("")  # no keys: everyone is the default client
    first, second, third = Req(), Req(), Req()
    assert adm.enter(client, first) is None and adm.enter(client, second) is None
    refusal = adm.enter(client, third)
    assert isinstance(refusal, Refusal)
    assert (refusal.status, refusal.reason, refusal.code) == (
        429,
        "global_inflight",
        "rate_limit_exceeded",
    )
    assert refusal.headers() == {"Retry-After": "1", "retry-after-ms": "1000"}
    adm.leave(first)
    adm.leave(first)  # a second leave of the same request changes nothing
    assert adm.inflight == 1
    assert adm.enter(client, third) is None
    assert adm.inflight == 2


def test_body_bytes_budget_bounds_request_memory_but_never_starves_one_request():
    adm = admission(AdmissionConfig(max_body_bytes_inflight=100))
    client = adm.authenticate("")
    big, small, third = Req(), Req(), Req()
    assert adm.enter(client, big, 150) is None  # alone: admitted even above the budget
    refused = adm.enter(client, small, 1)
    assert refused is not None and refused.reason == "body_bytes_inflight"
    assert refused.headers()["Retry-After"] == "1"
    adm.leave(big)
    assert adm.body_bytes == 0
    assert adm.enter(client, small, 60) is None and adm.enter(client, third, 40) is None
    assert adm.enter(client, Req(), 1).reason == "body_bytes_inflight"
    adm.leave(small)
    assert adm.body_bytes == 40 and adm.describe()["body_bytes"] == 40


def test_per_client_caps_are_independent():
    keys = [("a", b"ka"), ("b", b"kb")]
    adm = admission(clients={"a": ClientLimits(max_inflight=1)}, keys=keys)
    a, b = adm.authenticate("Bearer ka"), adm.authenticate("Bearer kb")
    assert a is not None and b is not None and (a.name, b.name) == ("a", "b")
    assert adm.enter(a, Req()) is None
    refused = adm.enter(a, Req())
    assert refused is not None and refused.reason == "client_inflight"
    for _ in range(5):  # b has no cap of its own
        assert adm.enter(b, Req()) is None
    assert (a.inflight, b.inflight, adm.inflight, a.refused) == (1, 5, 6, 1)


def test_requests_per_second_bucket_and_its_retry_after():
    clock = Clock()
    adm = admission(clients={"a": ClientLimits(requests_per_s=2)}, keys=[("a", b"k")], clock=clock)
    a = adm.authenticate("Bearer k")
    assert a is not None
    for _ in range(2):  # a burst of one second's requests
        req = Req()
        assert adm.enter(a, req) is None
        adm.leave(req)
    refused = adm.enter(a, Req())
    assert refused is not None and refused.reason == "requests_per_s"
    assert refused.retry_after_s == pytest.approx(0.5)
    assert refused.headers() == {"Retry-After": "1", "retry-after-ms": "500"}
    clock.now += 0.5
    assert adm.enter(a, Req()) is None


def test_tokens_per_minute_counts_prompt_estimate_plus_max_tokens():
    clock = Clock()
    adm = admission(
        clients={"a": ClientLimits(tokens_per_min=600)}, keys=[("a", b"k")], clock=clock
    )
    a = adm.authenticate("Bearer k")
    assert a is not None and adm.needs_prompt(a)
    assert adm.charge(a, prompt_chars=400, completion=400) is None  # 100 + 400 tokens
    refused = adm.charge(a, prompt_chars=400, completion=100)  # 200 wanted, 100 left
    assert refused is not None and (refused.status, refused.reason, refused.type) == (
        429,
        "tokens_per_min",
        "tokens",
    )
    assert refused.retry_after_s == pytest.approx(10.0)  # 100 tokens at 10 tokens/s
    assert refused.headers()["Retry-After"] == "10"
    clock.now += 10
    assert adm.charge(a, prompt_chars=400, completion=100) is None
    too_big = adm.charge(a, prompt_chars=4000, completion=0)  # 1000 > a minute's 600
    assert too_big is not None and too_big.headers() == {"x-should-retry": "false"}
    assert "Request too large" in too_big.message


def test_a_refusal_after_enter_gives_the_request_token_back():
    adm = admission(
        clients={"a": ClientLimits(requests_per_s=1, tokens_per_min=60)}, keys=[("a", b"k")]
    )
    a = adm.authenticate("Bearer k")
    assert a is not None
    req = Req()
    assert adm.enter(a, req) is None
    assert adm.charge(a, 4000, 0, req) is not None
    adm.leave(req)
    assert adm.enter(a, Req()) is None  # the refused request did not use up the second


def test_prompt_cap_answers_like_openai_for_a_too_long_context():
    adm = admission(AdmissionConfig(max_prompt_chars=100))
    client = adm.authenticate("")
    assert adm.charge(client, 100, 0) is None
    refused = adm.charge(client, 101, 0)
    assert refused is not None
    assert (refused.status, refused.code, refused.type, refused.headers()) == (
        400,
        "context_length_exceeded",
        "invalid_request_error",
        {},
    )
    off = admission(AdmissionConfig(max_prompt_chars=None))
    assert not off.needs_prompt(off.authenticate(""))  # nothing to check: no prompt needed


@pytest.mark.parametrize(
    "body, tokens",
    [
        ({}, 0),
        ({"max_tokens": 50}, 50),
        ({"max_tokens": 50, "n": 3}, 150),
        ({"max_completion_tokens": 20, "max_tokens": 50}, 20),
        ({"max_tokens": True}, 0),
        ({"max_tokens": "9"}, 0),
        ({"max_tokens": 10, "n": 0}, 10),
    ],
)
def test_completion_tokens(body, tokens):
    assert completion_tokens(body) == tokens


# -- keys ---------------------------------------------------------------------------------------
def test_authenticate_names_the_client_and_refuses_bad_keys():
    adm = admission(keys=[("default", b"k0"), ("a", b"ka1"), ("a", b"ka2")])
    assert adm.authenticate("Bearer k0").name == "default"
    assert adm.authenticate("bearer ka2").name == "a"
    for header in ("", "Bearer", "Bearer ka", "Basic ka1", "Bearer ka1x", "Bearer \udcff"):
        assert adm.authenticate(header) is None, header
    described = adm.describe()
    assert {c["name"]: c["keys"] for c in described["clients"]} == {"default": 1, "a": 2}
    assert "ka1" not in repr(described) and "k0" not in repr(described)


def test_reload_keeps_counters_and_bucket_levels_of_clients_that_stay():
    clock = Clock()
    adm = admission(
        clients={"a": ClientLimits(requests_per_s=1)}, keys=[("a", b"k"), ("b", b"kb")], clock=clock
    )
    a = adm.authenticate("Bearer k")
    busy = Req()
    assert adm.enter(a, busy) is None
    adm.update(AdmissionConfig(), {"a": ClientLimits(requests_per_s=1)}, [("a", b"new")])
    assert adm.authenticate("Bearer k") is None and adm.authenticate("Bearer kb") is None
    again = adm.authenticate("Bearer new")
    assert again is a and a.inflight == 1
    assert adm.enter(a, Req()).reason == "requests_per_s"  # the bucket was not refilled
    adm.leave(busy)
    assert adm.inflight == 0 and a.inflight == 0 and "b" not in adm.clients


def test_keys_file_names_and_the_older_format(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\nsk-bare\nteam-a sk-a1\n\n  team-a   sk-a2  \ndefault sk-d\n")
    assert load_client_keys(str(path)) == (
        ("default", b"sk-bare"),
        ("team-a", b"sk-a1"),
        ("team-a", b"sk-a2"),
        ("default", b"sk-d"),
    )
    assert load_api_keys(str(path)) == (b"sk-bare", b"sk-a1", b"sk-a2", b"sk-d")
    path.write_text("ok sk-1\nthree fields sk-secret\n")
    with pytest.raises(RouterConfigError, match=r"keys:2: expected 'name key'") as info:
        load_client_keys(str(path))
    assert "sk-secret" not in str(info.value)


def test_router_yaml_admission_and_clients():
    engines = [{"name": "e", "url": "http://127.0.0.1:1", "model": "m"}]
    config = parse_config({"engines": engines})
    assert config.admission == AdmissionConfig() and config.clients == {}
    config = parse_config(
        {
            "engines": engines,
            "admission": {"max_inflight": None, "write_timeout_s": 5},
            "clients": {"team-a": {"requests_per_s": 0.5, "tokens_per_min": 1000}},
        }
    )
    assert config.admission.max_inflight is None and config.admission.write_timeout_s == 5
    assert config.clients["team-a"] == ClientLimits(requests_per_s=0.5, tokens_per_min=1000)
    for bad, match in [
        ({"admission": {"max_inflight": 0}}, "admission.max_inflight: must be > 0"),
        ({"admission": {"cap": 1}}, "admission: unknown key"),
        ({"clients": {"a b": {}}}, "clients.a b: a client name"),
        ({"clients": {"a": {"max_inflight": 1.5}}}, "clients.a.max_inflight: expected an int"),
        ({"clients": {"a": {"rps": 1}}}, "clients.a: unknown key"),
    ]:
        with pytest.raises(RouterConfigError, match=match):
            parse_config({"engines": engines, **bad})


# -- write timeout ------------------------------------------------------------------------------
class _Protocol:
    def __init__(self) -> None:
        self.writing_paused = False


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class _Request:
    def __init__(self) -> None:
        self.protocol = _Protocol()
        self.transport = _Transport()


def test_sweep_aborts_only_writes_paused_for_the_whole_timeout():
    clock = Clock()
    timed_out: list[str] = []
    adm = Admission(
        AdmissionConfig(write_timeout_s=10), {}, (), clock=clock, on_write_timeout=timed_out.append
    )
    client = adm.authenticate("")
    stuck, slow, fine = _Request(), _Request(), _Request()
    for req in (stuck, slow, fine):
        assert adm.enter(client, req) is None
    stuck.protocol.writing_paused = slow.protocol.writing_paused = True
    assert adm.sweep() == 0  # paused from now on
    clock.now += 6
    slow.protocol.writing_paused = False  # it read some: its pause ended
    assert adm.sweep() == 0
    slow.protocol.writing_paused = True  # paused again: counted afresh
    clock.now += 4
    assert adm.sweep() == 1
    assert (stuck.transport.aborted, slow.transport.aborted, fine.transport.aborted) == (
        True,
        False,
        False,
    )
    assert timed_out == ["default"] and adm.write_timeouts == 1
    clock.now += 10
    assert adm.sweep() == 1  # slow's turn (stuck, not gone yet, counts afresh)
    assert slow.transport.aborted and timed_out == ["default", "default"]
    adm.leave(stuck)
    adm.leave(slow)
    assert adm.inflight == 1


# -- kv_aware: prompts too long to index ---------------------------------------------------------
def test_kv_aware_routes_a_prompt_over_max_indexed_chars_without_hashing_or_indexing_it():
    from stackctl.router.backends import Backend
    from stackctl.router.config import BackendConfig
    from stackctl.router.policies import KvAwarePolicy, RouteRequest

    backends = [
        Backend(BackendConfig(f"e{i}", f"http://127.0.0.1:{9000 + i}", "m")) for i in range(2)
    ]
    policy = KvAwarePolicy(max_indexed_chars=4096)
    small = RouteRequest({"prompt": "a" * 4096}, {})
    home = policy.choose(backends, small).backend
    assert len(policy.index(home)) == 16
    huge = RouteRequest({"prompt": "a" * 4096 + "b" * 100_000}, {})  # shares small's prefix
    choice = policy.choose(backends, huge)
    assert huge._hashes is None  # never hashed
    assert choice.predicted_cached_tokens == 0 and choice.prompt_tokens_estimate > 0
    assert sum(len(policy.index(b)) for b in backends) == 16  # nothing of it recorded
    assert policy.choose(backends, small).backend is home  # the real prefix still routes home
