"""The router's listener: connection caps and the client-side read deadlines.

aiohttp's server bounds only the idle time between requests (``keepalive_timeout``, passed
on as ``timeouts.keepalive_s``; its own default is 3,630 s) and has no cap on connections and
no deadline for reading a request's head or body. This module adds them without touching
aiohttp's internals: each accepted connection gets a :class:`GuardedConnection`, a thin
asyncio Protocol in front of aiohttp's ``RequestHandler``, and :func:`deadlines` (a
middleware) tells it when a request starts and when its body has been read.

- Caps (``connections.max`` in all, ``connections.per_client`` per source IP address): a
  connection above either gets a canned 503 and is closed at once, before aiohttp sees it;
  established connections are not affected.
- ``timeouts.header_s``: from the connection's opening, or from the first byte of a later
  request on it, to the end of the request's head. A slow-loris client gets 408 and is closed.
- ``timeouts.body_s``: from the end of the head to the end of the body; the connection is
  closed when it passes (the handler reading it is cancelled).

The caps and deadlines are read when used, so a reload (``Listener.update``) applies them to
new connections and requests at once; a new ``keepalive_s`` needs a restart (aiohttp takes it
once, at setup).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web

from .config import (
    ConnectionsConfig,
    RouterConfig,
    TimeoutsConfig,
    connections_within,
    fds_needed,
)

if TYPE_CHECKING:
    from .app import Router

log = logging.getLogger("stackctl.router.listener")

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_REFUSED_BODY = (
    b'{"error": {"message": "Too many connections; retry shortly.", '
    b'"type": "service_unavailable", "param": null, "code": "too_many_connections"}}'
)
REFUSED = _REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY)
HEAD_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class Listener:
    """Open connections by source address, the caps and deadlines, and counters."""

    def __init__(self, config: RouterConfig, server: web.Server, fd_limit: int | None = None):
        self.server = server  # aiohttp's protocol factory (AppRunner.server)
        self.connections: ConnectionsConfig = config.connections
        #: What this process's open-file limit holds (None: not bounded by it).
        self.fd_cap = connections_within(fd_limit) if fd_limit is not None else None
        self.timeouts: TimeoutsConfig = config.timeouts
        self.open = 0
        self.by_client: defaultdict[str, int] = defaultdict(int)
        self.refused = 0  # connections closed at once for a cap
        self.head_timeouts = 0
        self.body_timeouts = 0
        self._logged = 0.0

    def update(self, config: RouterConfig) -> None:
        if config.timeouts.keepalive_s != self.timeouts.keepalive_s:
            log.warning(
                "timeouts.keepalive_s changes need a restart; keeping %s",
                self.timeouts.keepalive_s,
            )
        self.connections, self.timeouts = config.connections, config.timeouts

    def stats(self) -> dict[str, int]:
        """For /metrics (telemetry.RouterMetrics.connections)."""
        return {
            "open": self.open,
            "refused": self.refused,
            "head_timeouts": self.head_timeouts,
            "body_timeouts": self.body_timeouts,
        }

    def protocol(self) -> GuardedConnection:
        return GuardedConnection(self)

    def admit(self, client: str) -> bool:
        caps = self.connections
        cap = caps.max if self.fd_cap is None else min(caps.max, self.fd_cap)
        if self.open >= cap or self.by_client[client] >= caps.per_client:
            self.refused += 1
            now = time.monotonic()
            if now - self._logged >= 10.0:  # one line per 10 s under a flood
                self._logged = now
                log.warning(
                    "connection from %s refused: %d open (max %d), %d from it (per_client %d); "
                    "%d refused so far",
                    client,
                    self.open,
                    cap,
                    self.by_client[client],
                    caps.per_client,
                    self.refused,
                )
            if not self.by_client[client]:
                del self.by_client[client]  # the defaultdict made it: keep the map bounded
            return False
        self.open += 1
        self.by_client[client] += 1
        return True

    def gone(self, client: str) -> None:
        self.open -= 1
        left = self.by_client[client] - 1
        if left > 0:
            self.by_client[client] = left
        else:
            del self.by_client[client]


class GuardedConnection(asyncio.Protocol):
    """One client connection: counted against the caps, its head and body read on a deadline,
    everything else passed to aiohttp's RequestHandler."""

    __slots__ = ("listener", "inner", "transport", "client", "busy", "_timer", "_body_timer")

    def __init__(self, listener: Listener):
        self.listener = listener
        self.inner: web.RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.busy = False  # a request is being handled
        self._timer: asyncio.TimerHandle | None = None  # the head deadline
        self._body_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a TCP server's: a stream transport
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.listener.admit(self.client):
            transport.write(REFUSED)
            transport.close()
            return
        self.transport = transport
        self.inner = inner = self.listener.server()
        inner.connection_made(transport)
        self._head_deadline()

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is None:
            return  # refused: closing
        if not self.busy and self._timer is None:
            self._head_deadline()  # the first byte of a later request: its head is timed
        inner.data_received(data)

    def eof_received(self) -> None:
        if self.inner is not None:
            self.inner.eof_received()  # aiohttp's returns None: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        inner = self.inner
        if inner is None:
            return  # refused: never counted
        self.inner = None
        self._cancel_timers()
        self.listener.gone(self.client)
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- deadlines ------------------------------------------------------------------------------
    def _head_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.listener.timeouts.header_s, self._head_late)

    def _head_late(self) -> None:
        self._timer = None
        transport = self.transport
        if self.busy or transport is None or transport.is_closing():
            return
        self.listener.head_timeouts += 1
        transport.write(HEAD_TIMED_OUT)
        transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.listener.body_timeouts += 1
            self.transport.abort()  # cancels the handler that waits for the body

    def _body_read(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._body_timer = None

    def request_started(self, request: web.BaseRequest) -> None:
        """The head arrived (aiohttp parsed it): stop its deadline, start the body's."""
        self.busy = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        content = request.content
        if request.body_exists and not content.is_eof() and self._body_timer is None:
            loop = asyncio.get_running_loop()
            self._body_timer = loop.call_later(self.listener.timeouts.body_s, self._body_late)
            content.on_eof(self._body_read)

    def request_finished(self) -> None:
        self.busy = False


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the connection's guard that a request started and finished (a no-op on a
    connection the listener did not make, e.g. a test's own TCPSite)."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, GuardedConnection):
        return await handler(request)
    guard.request_started(request)
    try:
        return await handler(request)
    finally:
        guard.request_finished()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`Listener` (web.TCPSite otherwise)."""

    def __init__(
        self,
        runner: web.AppRunner,
        listener: Listener,
        host: str,
        port: int,
        *,
        backlog: int = 2048,
        reuse_address: bool = True,
    ):
        super().__init__(runner, backlog=backlog)
        self.listener = listener
        self._host, self._port, self._reuse_address = host, port, reuse_address

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        server = self._server
        if server is not None and getattr(server, "sockets", None):
            return int(cast(asyncio.Server, server).sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.listener.protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


async def start_listener(
    router: Router, fd_limit: int | None = None
) -> tuple[web.AppRunner, GuardedSite]:
    """Serve ``router`` behind a guarded listener on its config's host and port (port 0: any
    free one, ``site.port`` tells); the caller awaits ``runner.cleanup()`` to stop. With
    ``fd_limit`` (this process's open-file limit), the connection cap never exceeds what it holds."""
    config = router.config
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream connection, which makes the engine abort the request.
    runner = web.AppRunner(
        router.build_app(),
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=config.timeouts.keepalive_s,
    )
    await runner.setup()
    assert runner.server is not None  # made by setup()
    router.listener = listener = Listener(config, runner.server, fd_limit)
    router.metrics.connections = listener.stats
    site = GuardedSite(runner, listener, config.host, config.port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def raise_fd_limit(connections: ConnectionsConfig) -> tuple[int, int]:
    """Raise this process's soft open-file limit toward what ``connections.max`` needs (up to
    the hard limit); returns (limit now, needed). supervisord's children often start with a
    soft limit of 1,024 under a far higher hard one."""
    needed = fds_needed(connections.max)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return (needed if soft == resource.RLIM_INFINITY else soft), needed
