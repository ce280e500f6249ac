"""Timeouts, caps and failure semantics (issue 13): config keys, what an upstream error means
(retried? counted against the engine?), passive ejection, and the file-descriptor limit."""

from __future__ import annotations

import asyncio
import errno
import time

import aiohttp
import pytest

from stackctl.inventory import load_inventory
from stackctl.plan import UNIT_LIMIT_NOFILE, fd_limit
from stackctl.router.backends import Backend, BackendPool
from stackctl.router.config import (
    BackendConfig,
    ConnectionsConfig,
    HealthConfig,
    RouterConfig,
    RouterConfigError,
    TimeoutsConfig,
    fds_needed,
    parse_config,
)
from stackctl.router.health import HealthMonitor
from stackctl.router.policies import make_policy
from stackctl.router.upstream import (
    ClosedBeforeAnswer,
    ConnectFailed,
    Failure,
    UpstreamError,
    UpstreamPool,
    _StaleConnection,
    classify,
    local_resource_error,
)
from stackctl.testing import free_port
from tests.unit.test_engine_rendering import A100

ENGINES = [{"name": "e0", "url": "http://127.0.0.1:9", "model": "m"}]


def parse(**raw):
    return parse_config({"engines": ENGINES, **raw})


# -- config ----------------------------------------------------------------------------------
def test_timeouts_and_caps_have_bounded_defaults():
    config = parse()
    t = config.timeouts
    assert (t.header_s, t.body_s, t.keepalive_s) == (10.0, 60.0, 30.0)
    assert (t.connect_s, t.first_byte_s, t.chunk_gap_s, t.total_s) == (3.0, 60.0, 120.0, 1800.0)
    assert config.connections == ConnectionsConfig(max=16384, per_client=2048)
    assert fds_needed(config.connections.max) == 2 * 16384 + 1024 <= UNIT_LIMIT_NOFILE


def test_timeouts_and_caps_parse():
    config = parse(
        timeouts={"header_s": 1, "chunk_gap_s": 0.5, "total_s": 9},
        connections={"max": 10, "per_client": 3},
    )
    assert config.timeouts == TimeoutsConfig(header_s=1, chunk_gap_s=0.5, total_s=9)
    assert config.connections == ConnectionsConfig(max=10, per_client=3)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"timeouts": {"header_s": 0}}, "timeouts.header_s: must be > 0"),
        ({"timeouts": {"total_s": -1}}, "timeouts.total_s: must be > 0"),
        ({"timeouts": {"read_s": 1}}, "timeouts: unknown key(s) read_s"),
        ({"connections": {"max": 0}}, "connections.max: must be > 0"),
        ({"connections": {"per_client": 1.5}}, "connections.per_client: expected an integer"),
        ({"connections": {"maximum": 5}}, "connections: unknown key(s) maximum"),
    ],
)
def test_bad_timeouts_and_caps_are_named(raw, expected):
    with pytest.raises(RouterConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"engines": ENGINES, **raw}, "router.yaml")


def test_the_router_hosts_fd_limit_follows_its_connection_cap(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(A100.read_text().replace("router: {", "router: {max_connections: 40000, ", 1))
    cluster = load_inventory(path)
    limits = {h.name: fd_limit(cluster, h) for h in cluster.hosts}
    assert limits.pop("head") == 2 * 40000 + 1024
    assert set(limits.values()) == {UNIT_LIMIT_NOFILE}
    default = load_inventory(A100)
    assert {fd_limit(default, h) for h in default.hosts} == {UNIT_LIMIT_NOFILE}


def test_the_inventory_refuses_a_zero_cap(tmp_path):
    from stackctl.inventory import InventoryError

    path = tmp_path / "inv.yaml"
    path.write_text(A100.read_text().replace("router: {", "router: {max_connections: 0, ", 1))
    with pytest.raises(InventoryError, match="router.max_connections"):
        load_inventory(path)


# -- what a failure means --------------------------------------------------------------------
def _emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


@pytest.mark.parametrize(
    "exc, failure",
    [
        (ConnectFailed("refused"), Failure.UNREACHED),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Failure.UNREACHED),
        (ClosedBeforeAnswer("closed"), Failure.DIED),
        (_StaleConnection("stale"), Failure.DIED),
        (TimeoutError(), Failure.TIMEOUT),
        (UpstreamError("closed mid-answer"), Failure.BROKEN),
        (ConnectionResetError(errno.ECONNRESET, "reset"), Failure.BROKEN),
        (_emfile(), Failure.LOCAL),
        (OSError(errno.ENFILE, "file table full"), Failure.LOCAL),
        (OSError(errno.ENOBUFS, "no buffers"), Failure.LOCAL),
        (OSError(errno.ENOMEM, "no memory"), Failure.LOCAL),
    ],
)
def test_classify(exc, failure):
    assert classify(exc) is failure


def test_only_unreached_and_died_are_retried_and_neither_local_nor_timeouts_counted():
    assert {f for f in Failure if f.retried} == {Failure.UNREACHED, Failure.DIED}
    assert {f for f in Failure if not f.counted} == {Failure.LOCAL, Failure.TIMEOUT}


def test_local_shortage_is_found_behind_aiohttp_and_causes():
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    wrapped = aiohttp.ClientConnectorError(key, _emfile())
    assert local_resource_error(wrapped) and classify(wrapped) is Failure.LOCAL
    try:
        try:
            raise _emfile()
        except OSError as inner:
            raise UpstreamError("wrapped") from inner
    except UpstreamError as outer:
        assert local_resource_error(outer)
    assert not local_resource_error(ConnectionRefusedError(errno.ECONNREFUSED, "x"))


# -- the pool's errors, against real sockets -------------------------------------------------
async def test_a_closed_port_is_connect_failed():
    pool = UpstreamPool(connect_s=1.0, first_byte_s=1.0)
    with pytest.raises(ConnectFailed) as info:
        await pool.request(f"http://127.0.0.1:{free_port()}", "/v1/completions", b"{}")
    assert classify(info.value) is Failure.UNREACHED
    pool.close()


async def test_an_engine_that_closes_before_answering_is_closed_before_answer():
    async def close_at_once(reader, writer):
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(connect_s=1.0, first_byte_s=5.0)
    try:
        with pytest.raises(ClosedBeforeAnswer):
            await pool.request(f"http://127.0.0.1:{port}", "/v1/completions", b"{}")
    finally:
        pool.close()
        server.close()


async def test_the_head_timeout_is_per_request():
    async def never_answer(reader, writer):
        await asyncio.sleep(10)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(connect_s=1.0, first_byte_s=30.0)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError) as info:
            await pool.request(f"http://127.0.0.1:{port}", "/v1/completions", b"{}", 0.2)
        assert classify(info.value) is Failure.TIMEOUT
        assert 0.15 < time.monotonic() - start < 2.0
    finally:
        pool.close()
        server.close()


async def test_emfile_on_connect_stays_a_local_error(monkeypatch):
    loop = asyncio.get_running_loop()

    async def no_fds(*args, **kwargs):
        raise _emfile()

    monkeypatch.setattr(loop, "create_connection", no_fds)
    pool = UpstreamPool(connect_s=1.0, first_byte_s=1.0)
    with pytest.raises(OSError) as info:
        await pool.request("http://127.0.0.1:9", "/v1/completions", b"{}")
    assert classify(info.value) is Failure.LOCAL


# -- passive ejection and the health checker -------------------------------------------------
class _Session:
    """A stand-in for aiohttp.ClientSession: every GET raises ``exc`` (or answers 200)."""

    def __init__(self, exc=None):
        self.exc, self.gets = exc, 0

    def get(self, url, **kwargs):
        self.gets += 1
        session = self

        class _Ctx:
            async def __aenter__(self):
                if session.exc is not None:
                    raise session.exc
                return _Resp()

            async def __aexit__(self, *exc):
                return False

        return _Ctx()


class _Resp:
    status = 200

    async def read(self):
        return b'{"data": []}'

    async def text(self):
        return ""


def _monitor(failures_to_eject=1, session=None):
    config = RouterConfig(engines=(BackendConfig("e0", "http://127.0.0.1:9", "m"),))
    pool = BackendPool(config, make_policy("round_robin", {}))
    health = HealthConfig(failures_to_eject=failures_to_eject, backoff_s=0.1)
    return pool.backends["e0"], HealthMonitor(pool, health, session or _Session())


async def test_passive_failures_eject_after_failures_to_eject_in_a_row():
    engine, monitor = _monitor(failures_to_eject=3)
    monitor.request_failed(engine, "unreached")
    monitor.request_failed(engine, "unreached")
    monitor.request_succeeded(engine)  # a success in between resets the count
    monitor.request_failed(engine, "unreached")
    monitor.request_failed(engine, "unreached")
    assert engine.healthy
    monitor.request_failed(engine, "unreached")
    assert not engine.healthy


async def test_requests_failing_with_an_ejected_engine_do_not_push_its_next_probe_back():
    engine, monitor = _monitor(failures_to_eject=1)
    monitor.request_failed(engine, "died")  # ejected: next probe after backoff_s
    first_probe = engine.retry_at
    for _ in range(6):  # the other requests it had in flight when it died
        monitor.request_failed(engine, "died")
    assert not engine.healthy and engine.failures == 1
    assert engine.retry_at == first_probe


async def test_a_timeout_is_no_failure_but_checks_the_engine_now():
    session = _Session()
    engine, monitor = _monitor(failures_to_eject=1, session=session)
    monitor.request_timed_out(engine, "timeout at e0")
    monitor.request_timed_out(engine, "timeout at e0")  # one check at a time
    assert engine.healthy and engine.failures == 0
    await asyncio.sleep(0.05)
    assert session.gets >= 1 and engine.healthy and engine.failures == 0


async def test_a_timeout_on_an_engine_whose_health_fails_ejects_it():
    engine, monitor = _monitor(session=_Session(aiohttp.ServerTimeoutError("health timed out")))
    monitor.request_timed_out(engine, "timeout at e0")
    await asyncio.sleep(0.05)
    assert not engine.healthy


async def test_emfile_in_a_health_check_counts_against_no_engine():
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    engine, monitor = _monitor(session=_Session(aiohttp.ClientConnectorError(key, _emfile())))
    for _ in range(3):
        await monitor.check(engine)
    assert engine.healthy and engine.failures == 0


async def test_an_ejection_cuts_the_requests_that_sent_nothing_yet():
    engine, monitor = _monitor()
    expired = []

    async def waiting_request():
        async with asyncio.timeout(None) as scope:
            engine.waiting.add(scope)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise
            finally:
                engine.waiting.discard(scope)
        return "not cut"  # pragma: no cover

    async def run():
        try:
            return await waiting_request()
        except TimeoutError:
            expired.append(True)
            return "cut"

    tasks = [asyncio.create_task(run()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert len(engine.waiting) == 3
    start = time.monotonic()
    monitor.request_failed(engine, "unreached")  # failures_to_eject 1: ejected
    results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert results == ["cut"] * 3 and time.monotonic() - start < 0.5
    assert not engine.waiting


def test_backend_without_waiters_cuts_nothing():
    assert Backend(BackendConfig("e", "http://x:1", "m")).cut_waiting() == 0


def test_the_listener_cap_counts_per_client_and_frees_slots():
    from stackctl.router.listener import Listener

    config = parse(connections={"max": 3, "per_client": 2})
    listener = Listener(config, server=None)  # type: ignore[arg-type]
    assert listener.admit("a") and listener.admit("a")
    assert not listener.admit("a")  # per client
    assert listener.admit("b")
    assert not listener.admit("c")  # in all
    assert "c" not in listener.by_client  # refused clients leave no entry
    listener.gone("a")
    assert listener.admit("c") and listener.refused == 2
    for client in ("a", "b", "c"):
        listener.gone(client)
    assert listener.open == 0 and not listener.by_client


def test_the_router_raises_its_soft_fd_limit_up_to_the_hard_one(monkeypatch):
    import resource

    from stackctl.router import listener

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 20000))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    assert listener.raise_fd_limit(ConnectionsConfig(max=100)) == (1224, 1224)
    assert listener.raise_fd_limit(ConnectionsConfig(max=16384)) == (20000, 33792)
    assert calls == [(1224, 20000), (20000, 20000)]
