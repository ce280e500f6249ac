"""The backend pool: served names, and the policy hooks it calls on every change."""

from __future__ import annotations

from stackctl.router.backends import BackendPool
from stackctl.router.config import parse_config
from stackctl.router.health import served_models
from stackctl.router.policies import KvAwarePolicy, Policy, RouteRequest


class Recorder(Policy):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def backend_added(self, backend):
        self.calls.append(("added", backend.name))

    def backend_removed(self, backend):
        self.calls.append(("removed", backend.name))

    def backend_ejected(self, backend):
        self.calls.append(("ejected", backend.name))

    def backend_readmitted(self, backend):
        self.calls.append(("readmitted", backend.name))

    def capacity_changed(self, backend):
        self.calls.append(("capacity", backend.name))


def config(*engines):
    return parse_config({"engines": [dict(e) for e in engines]})


A = {"name": "a", "url": "http://127.0.0.1:1", "model": "m"}
B = {"name": "b", "url": "http://127.0.0.1:2", "model": "m"}


def test_the_pool_tells_the_policy_about_every_change():
    policy = Recorder()
    pool = BackendPool(config(A, B), policy)
    assert policy.calls == [("added", "a"), ("added", "b")]
    a = pool.backends["a"]
    policy.calls.clear()
    pool.update(
        config(
            A,
            {**B, "url": "http://127.0.0.1:3"},
        )
    )  # b moved: a new backend
    assert policy.calls == [("removed", "b"), ("added", "b")]
    assert pool.backends["a"] is a  # a survives with its state
    policy.calls.clear()
    pool.update(config({**A, "cache_capacity_tokens": 5000}))
    assert policy.calls == [("removed", "b"), ("capacity", "a")]
    policy.calls.clear()
    pool.set_learned_capacity(a, 7000)  # configured capacity wins: no change
    assert policy.calls == []
    pool.update(config(A))  # configured capacity gone: the learned one applies
    assert policy.calls == [("capacity", "a")]
    policy.calls.clear()
    pool.ejected(a)
    pool.readmitted(a)  # forgets the learned capacity: it may have restarted
    assert policy.calls == [("ejected", "a"), ("capacity", "a"), ("readmitted", "a")]
    assert a.capacity_tokens is None
    fresh = Recorder()
    pool.set_policy(fresh)
    assert fresh.calls == [("added", "a")] and pool.policy is fresh


def test_kv_aware_state_follows_the_pool():
    policy = KvAwarePolicy(chunk_chars=16)
    pool = BackendPool(config(A), policy)
    a = pool.backends["a"]
    request = RouteRequest({"model": "m", "prompt": "x" * 160}, {})
    policy.choose([a], request)
    assert policy.describe(a) == {"prefix_index_chunks": 10, "cached_tokens_estimate": 40}
    pool.ejected(a)
    assert policy.describe(a)["prefix_index_chunks"] == 0
    policy.choose([a], request)
    pool.update(config({**A, "cache_capacity_tokens": 12}))  # 12 tokens * 4 / 16 = 3 chunks
    assert policy.index(a).capacity_chunks == 3 and len(policy.index(a)) == 3
    pool.update(config(B))
    assert policy.describe(a)["prefix_index_chunks"] == 0 and a not in policy._indexes


def test_served_names_keep_the_configured_one_first_and_route_each():
    pool = BackendPool(config(A, B), Recorder())
    a = pool.backends["a"]
    assert pool.set_served_models(a, ["alias", "m", "alias", "other"])
    assert a.models == ("m", "alias", "other")
    assert not pool.set_served_models(a, ["m", "alias", "other"])  # unchanged
    assert [b.name for b in pool.by_model["m"]] == ["a", "b"]
    assert [b.name for b in pool.by_model["alias"]] == ["a"]
    assert pool.healthy_models() == ["alias", "m", "other"]
    a.healthy = False
    assert pool.healthy_models() == ["m"]
    pool.update(config(A, B))  # a reload keeps what was learned
    assert pool.backends["a"].models == ("m", "alias", "other") and "alias" in pool.by_model
    pool.set_served_models(a, [])
    assert a.models == ("m",) and "alias" not in pool.by_model


def test_served_models_reads_openai_model_lists_only():
    body = b'{"object": "list", "data": [{"id": "a"}, {"id": "b", "object": "model"}, {}]}'
    assert served_models(body) == ["a", "b"]
    for bad in (b"not json", b"[1]", b'{"data": 3}', b"\xff"):
        assert served_models(bad) is None
    assert served_models(b'{"data": [{"id": ""}, {"id": 7}]}') == []
