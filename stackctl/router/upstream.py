"""A lean, pooled HTTP/1.1 client for the proxy hot path.

The router forwards one POST and streams back its answer, which needs a small fraction of
what ``aiohttp.ClientSession`` does per request (request/response objects, header
multidicts, cookie jar, tracing, timers): measured on the router benchmark, aiohttp's client
was about half of the router's CPU per request. This client writes the request head and the
original body bytes in one ``writelines`` and parses only the status line, the headers it
needs and the body framing (Content-Length, chunked, or until close).

Pooling: idle keep-alive connections per engine, no cap on connections (like
``TCPConnector(limit=0)``). An idle connection is dropped after ``idle_s`` (below uvicorn's
5 s keep-alive, so the engine never closes one under our feet); a reused connection that
turns out dead before any response byte is replaced by a fresh one, once, without blaming
the engine. TCP_NODELAY is set on every connection (uvloop sets it too).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl as ssl_module
import time
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_HIGH_WATER = 1 << 20


class UpstreamError(ConnectionError):
    """The engine closed or broke the connection, or sent a malformed response."""


class _StaleConnection(UpstreamError):
    """A reused idle connection died before any response byte: safe to resend."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; carries at most one request at a time."""

    __slots__ = ("transport", "closed", "loop", "_head", "_head_waiter", "_chunks", "_waiter",
                 "_done", "_exc", "_framing", "_remaining", "_chunk_buf", "_buffered",
                 "_paused", "status", "headers", "content_length", "keep_alive", "reused",
                 "idle_since", "_timer", "_got_bytes")

    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self):
        self._head = b""
        self._head_waiter = None
        self._chunks = collections.deque()
        self._waiter = None
        self._done = False
        self._exc = None
        self._framing = None  # "length" | "chunked" | "close"
        self._remaining = 0
        self._chunk_buf = b""
        self._buffered = 0
        self._paused = False
        self._timer = None
        self._got_bytes = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length = None
        self.keep_alive = True

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc):
        self.closed = True
        if self._framing == "close" and self._exc is None:
            self._finish()
        elif not self._done:
            if not self._got_bytes and self.reused:
                self._fail(_StaleConnection("idle connection closed by the engine"))
            else:
                self._fail(UpstreamError(f"engine closed the connection: {exc or 'EOF'}"))

    def data_received(self, data):
        self._got_bytes = True
        if self._framing is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    self._fail(UpstreamError("response head too large"))
                return
            head, data = self._head[:end], self._head[end + 4:]
            self._head = b""
            try:
                self._parse_head(head)
            except (ValueError, IndexError) as exc:
                self._fail(UpstreamError(f"malformed response head: {exc}"))
                return
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._framing == "length" and self._remaining == 0:
                self._finish()
                return
        if self._framing == "length":
            if len(data) >= self._remaining:
                data = data[:self._remaining]
                self._remaining = 0
                self._push(data)
                self._finish()
            else:
                self._remaining -= len(data)
                self._push(data)
        elif self._framing == "chunked":
            self._dechunk(data)
        elif data:
            self._push(data)

    def eof_received(self):
        return False  # close the transport; connection_lost does the rest

    # -- parsing ----------------------------------------------------------------------------
    def _parse_head(self, head: bytes):
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        self.status = int(status)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = ("close" not in connection) if version == "HTTP/1.1" \
            else ("keep-alive" in connection)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in headers:
            self._framing = "length"
            self._remaining = self.content_length = int(headers["content-length"])
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._framing, self._remaining, self.content_length = "length", 0, 0
        else:
            self._framing = "close"
            self.keep_alive = False

    def _dechunk(self, data: bytes):
        buf = self._chunk_buf + data if self._chunk_buf else data
        pos, size = 0, len(buf)
        out = []
        while pos < size:
            if self._remaining > 0:  # inside a chunk's data
                take = min(self._remaining, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._remaining = -2  # expect the CRLF after the data
                continue
            if self._remaining == -2:
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    self._fail(UpstreamError("malformed chunk: no CRLF after the data"))
                    return
                pos += 2
                self._remaining = 0
                continue
            if self._remaining == -3:  # after the last chunk: trailer lines, then CRLF
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                trailer_empty = end == pos
                pos = end + 2
                if not trailer_empty:
                    continue
                self._chunk_buf = b""
                if out:
                    self._push(b"".join(out))
                self._finish()
                return
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size - pos > 1024:
                    self._fail(UpstreamError("malformed chunk size"))
                    return
                break
            try:
                length = int(buf[pos:end].split(b";", 1)[0], 16)
            except ValueError:
                self._fail(UpstreamError("malformed chunk size"))
                return
            pos = end + 2
            if length == 0:
                self._remaining = -3
            else:
                self._remaining = length
        self._chunk_buf = buf[pos:] if pos < size else b""
        if out:
            self._push(b"".join(out) if len(out) > 1 else out[0])

    # -- delivery -----------------------------------------------------------------------------
    def _push(self, data: bytes):
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self):
        self._done = True
        self._wake()

    def _fail(self, exc: Exception):
        if self._exc is None and not self._done:
            self._exc = exc
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
        self._wake()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def _wake(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self):
        self._fail(asyncio.TimeoutError("no byte from the engine within the timeout"))

    # -- API used by UpstreamPool / the proxy ---------------------------------------------------
    async def wait_head(self, timeout: float):
        if self._framing is not None:
            return
        if self._exc is not None:
            raise self._exc
        self._head_waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._timed_out)
        try:
            await self._head_waiter
        finally:
            timer.cancel()
            self._head_waiter = None

    async def read(self, timeout: float) -> bytes:
        """The next body piece as it arrived (several pieces joined), b"" at the end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(
                    [chunks.popleft() for _ in range(len(chunks))])
                self._buffered = 0 if not chunks else self._buffered - len(data)
                if self._paused and self._buffered < _HIGH_WATER // 2:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._exc is not None:
                raise self._exc
            if self._done:
                return b""
            self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, self._timed_out)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None

    @property
    def complete(self) -> bool:
        return self._done and self._exc is None and not self._chunks


class UpstreamPool:
    """Idle keep-alive connections per engine URL; no cap on how many are open."""

    def __init__(self, connect_s: float, first_byte_s: float, idle_s: float = 4.0):
        self.connect_s = connect_s
        self.read_s = first_byte_s
        self.idle_s = idle_s
        self._idle: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._heads: dict[tuple[str, str], bytes] = {}
        self._targets: dict[str, tuple] = {}
        self._open: set[UpstreamConnection] = set()

    def _target(self, url: str):
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            https = parts.scheme == "https"
            port = parts.port or (443 if https else 80)
            ssl = ssl_module.create_default_context() if https else None
            target = self._targets[url] = (parts.hostname, port, ssl, parts.netloc,
                                           parts.path.rstrip("/"))
        return target

    def _head(self, url: str, path: str) -> bytes:
        head = self._heads.get((url, path))
        if head is None:
            host, port, ssl, netloc, prefix = self._target(url)
            head = self._heads[(url, path)] = (
                f"POST {prefix}{path} HTTP/1.1\r\nHost: {netloc}\r\n"
                "Content-Type: application/json\r\nAccept: */*\r\nContent-Length: ").encode()
        return head

    async def _connect(self, url: str) -> UpstreamConnection:
        host, port, ssl, netloc, _ = self._target(url)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(loop), host, port, ssl=ssl,
                                   server_hostname=host if ssl else None),
            self.connect_s)
        self._open.add(conn)
        return conn

    def _take_idle(self, url: str):
        idle = self._idle.get(url)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely expired
            if conn.closed or now - conn.idle_since > self.idle_s:
                self._discard(conn)
                continue
            return conn
        return None

    async def request(self, url: str, path: str, body: bytes) -> UpstreamConnection:
        """Send ``body`` and wait for the response head (connect + first-byte timeouts)."""
        head = self._head(url, path) + str(len(body)).encode() + b"\r\n\r\n"
        conn = self._take_idle(url)
        for _ in range(2):
            if conn is None:
                conn = await self._connect(url)
            conn._reset()
            conn.transport.writelines((head, body))
            try:
                await conn.wait_head(self.read_s)
                return conn
            except _StaleConnection:
                self._discard(conn)
                conn = None  # resend once on a fresh connection
            except BaseException:
                self._discard(conn)
                raise
        raise UpstreamError("engine closed a fresh connection before answering")

    def release(self, conn: UpstreamConnection, url: str) -> None:
        """Return a connection whose response was read to the end; close any other."""
        if conn.complete and conn.keep_alive and not conn.closed:
            conn.reused = True
            conn.idle_since = time.monotonic()
            self._idle[url].append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: UpstreamConnection) -> None:
        self._open.discard(conn)
        if not conn.closed:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()  # also what cancels the engine's work

    def close(self) -> None:
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()


class _AiohttpResponse:
    """aiohttp's ClientResponse behind the UpstreamConnection interface (for A/B runs)."""

    __slots__ = ("resp", "status", "headers", "content_length")

    def __init__(self, resp):
        self.resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers.items()}
        self.content_length = resp.content_length

    async def read(self, timeout: float) -> bytes:
        return await self.resp.content.readany()

    @property
    def complete(self) -> bool:
        return self.resp.content.at_eof()


class AiohttpUpstreamPool:
    """The same interface on one aiohttp ClientSession with TCPConnector(limit=0).

    Selected with ``STACKCTL_ROUTER_UPSTREAM=aiohttp``; kept to measure the lean client
    against it side by side (benchmarks/router_overhead.py, target ``ours-kv-aiohttp``).
    """

    def __init__(self, connect_s: float, first_byte_s: float, idle_s: float = 4.0):
        import aiohttp
        self._aiohttp = aiohttp
        self.connect_s, self.read_s = connect_s, first_byte_s
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=idle_s),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s,
                                              sock_read=first_byte_s)

    async def request(self, url: str, path: str, body: bytes):
        resp = await self.session.post(url + path, data=body, timeout=self._timeout,
                                       headers={"Content-Type": "application/json"})
        return _AiohttpResponse(resp)

    def release(self, conn, url: str) -> None:
        if conn.complete:
            conn.resp.release()
        else:
            conn.resp.close()

    def close(self) -> None:
        asyncio.get_event_loop().create_task(self.session.close())


def make_pool(connect_s: float, first_byte_s: float):
    import os
    if os.environ.get("STACKCTL_ROUTER_UPSTREAM") == "aiohttp":
        return AiohttpUpstreamPool(connect_s, first_byte_s)
    return UpstreamPool(connect_s, first_byte_s)
