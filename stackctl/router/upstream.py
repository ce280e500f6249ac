"""A lean, pooled HTTP/1.1 client for the proxy hot path.

The router forwards one POST and streams back its answer, which needs a small fraction of
what ``aiohttp.ClientSession`` does per request (request/response objects, header
multidicts, cookie jar, tracing, timers): measured on the router benchmark, aiohttp's client
was about half of the router's CPU per request (benchmarks/aiohttp_upstream.py keeps that
comparison). This client writes the request head and the original body bytes in one
``writelines`` and parses only the status line, the headers it needs and the body framing
(Content-Length, chunked, or until close).

Three layers: :class:`ResponseParser` turns bytes into a status, headers and body pieces and
does no I/O (a state machine, :class:`ParseState`, property-tested in
tests/unit/test_router_upstream.py); :class:`UpstreamConnection` is the thin asyncio Protocol
that feeds it, applies flow control and wakes the reader; :class:`UpstreamPool` keeps idle
connections. The router depends only on :class:`UpstreamClient` / :class:`UpstreamResponse`.

Pooling: idle keep-alive connections per engine, no cap on connections (like
``TCPConnector(limit=0)``). An idle connection is dropped after ``idle_s`` (below uvicorn's
5 s keep-alive, so the engine never closes one under our feet); a reused connection that
turns out dead before any response byte is replaced by a fresh one, once, without blaming
the engine. TCP_NODELAY is set on every connection (uvloop sets it too).

Failures are sorted by :func:`classify` into what the router may do about them (app.py retries
and health.py counts by it; docs/architecture.md, "Router internals"): the request never
reached the engine (:class:`ConnectFailed`: refused, unreachable, connect timeout), the engine
closed the connection before any byte of its answer (:class:`ClosedBeforeAnswer`: it died, and
its work with it), a timeout after the request was sent (the engine has the work: not run
again elsewhere), a broken answer, or the router's own resources ran out (EMFILE and kin:
never the engine's fault).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import socket
import ssl as ssl_module
import time
from collections.abc import Mapping
from typing import Protocol, TypeVar, cast
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # status line + headers, and separately the trailers
_MAX_CHUNK_LINE = 1024
_HIGH_WATER = 1 << 20


class UpstreamError(ConnectionError):
    """The engine closed or broke the connection, or sent a malformed response."""


class ParseError(UpstreamError):
    """The bytes are not a well-formed HTTP/1.1 response (the only error the parser raises)."""


class ConnectFailed(UpstreamError):
    """No connection to the engine (refused, unreachable, timed out): it never saw the request."""


class ClosedBeforeAnswer(UpstreamError):
    """The engine closed or reset the connection before any byte of its answer's body (with or
    without its head: a streaming engine sends the head when it accepts the work)."""


class _StaleConnection(ClosedBeforeAnswer):
    """A reused idle connection died before any response byte: safe to resend."""


# -- what a failure means ---------------------------------------------------------------------
#: errnos that say the router itself is out of a resource (file descriptors, memory, buffers)
LOCAL_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))


class Failure(enum.Enum):
    """What a failed attempt at an engine means for the request and for the engine."""

    LOCAL = "local"  # the router ran out of a resource: not retried, not the engine's fault
    UNREACHED = "unreached"  # the engine never saw the request: retried elsewhere, counted
    DIED = "died"  # closed before any answer byte, the work died with it: retried, counted
    TIMEOUT = "timeout"  # sent and too slow: not retried, not counted (a health check decides)
    BROKEN = "broken"  # malformed answer or closed mid-answer: not retried, counted

    @property
    def retried(self) -> bool:
        return self is Failure.UNREACHED or self is Failure.DIED

    @property
    def counted(self) -> bool:
        """Counts toward the engine's ``failures_to_eject``."""
        return self is not Failure.LOCAL and self is not Failure.TIMEOUT


def local_resource_error(exc: BaseException | None) -> bool:
    """``exc`` (or what it wraps: aiohttp's ``os_error``, the cause) is EMFILE/ENFILE/ENOMEM/
    ENOBUFS, the router's own shortage."""
    for _ in range(8):  # a bounded walk down the chain
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            return True
        wrapped = getattr(exc, "os_error", None)
        exc = wrapped if isinstance(wrapped, BaseException) else (exc.__cause__ or exc.__context__)
    return False


def classify(exc: BaseException) -> Failure:
    """The :class:`Failure` an UpstreamClient's error stands for (any client: the shipped one
    raises the types below; others' refusals are ConnectionRefusedError, timeouts TimeoutError)."""
    if local_resource_error(exc):
        return Failure.LOCAL
    if isinstance(exc, (ConnectFailed, ConnectionRefusedError)):
        return Failure.UNREACHED
    if isinstance(exc, ClosedBeforeAnswer):
        return Failure.DIED
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    return Failure.BROKEN


# -- the declared interface the router uses ---------------------------------------------------
class UpstreamResponse(Protocol):
    """One engine answer being received. ``headers`` has lower-case names."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def complete(self) -> bool:
        """The whole body has been received and handed out by ``read``."""
        ...

    async def read(self, timeout: float) -> bytes:
        """The next body piece as it arrived; b"" at the end. Raises like ``request``."""
        ...


R = TypeVar("R", bound=UpstreamResponse)


class UpstreamClient(Protocol[R]):
    """What the proxy needs from an HTTP client: POST bytes, stream the answer back.

    Errors are ``OSError`` (refused, reset, DNS, TLS), :class:`UpstreamError` (closed early,
    malformed) or ``asyncio.TimeoutError`` (connect or head timeout), nothing else: the
    router retries or ejects on exactly these, as :func:`classify` sorts them.
    """

    connect_s: float  # connect timeout, updated on reload
    read_s: float  # head timeout when ``request`` is given none, updated on reload
    engine_key: str | None  # sent as ``Authorization: Bearer`` to every engine, updated on reload

    async def request(self, url: str, path: str, body: bytes, timeout: float | None = None) -> R:
        """Send ``body`` as a JSON POST to ``url + path``; return once the head arrived, within
        ``timeout`` seconds of sending (default ``read_s``)."""
        ...

    def release(self, response: R, url: str) -> None:
        """Done with ``response``: keep its connection if it was read to the end, else close."""
        ...

    def close(self) -> None: ...


# -- the pure parser ---------------------------------------------------------------------------
class ParseState(enum.Enum):
    HEAD = "head"  # status line and headers, up to the blank line
    BODY_LENGTH = "body with Content-Length"
    BODY_UNTIL_CLOSE = "body until the engine closes"
    CHUNK_SIZE = "chunk size line"
    CHUNK_DATA = "chunk data"
    CHUNK_DATA_END = "CRLF after chunk data"
    TRAILERS = "trailer lines after the last chunk"
    DONE = "done"
    FAILED = "failed"


# Module-level aliases: the hot path compares states by identity without attribute lookups.
_HEAD_S = ParseState.HEAD
_LENGTH = ParseState.BODY_LENGTH
_UNTIL_CLOSE = ParseState.BODY_UNTIL_CLOSE
_CHUNK_SIZE = ParseState.CHUNK_SIZE
_CHUNK_DATA = ParseState.CHUNK_DATA
_CHUNK_END = ParseState.CHUNK_DATA_END
_TRAILERS = ParseState.TRAILERS
_DONE = ParseState.DONE
_FAILED = ParseState.FAILED


class ResponseParser:
    """One HTTP/1.1 response, fed bytes in pieces of any size; no I/O, no clock.

    ``feed`` returns the body bytes found in the piece (de-chunked) and raises only
    :class:`ParseError`; after an error every further call raises it again. ``feed_eof`` says
    the peer closed: that ends a body framed by the close, and is an error anywhere else
    before the end. Bytes after the end mean the connection cannot be reused
    (``keep_alive`` becomes false) and are otherwise ignored.
    """

    __slots__ = ("state", "status", "headers", "content_length", "keep_alive", "_buf", "_remaining")

    def __init__(self) -> None:
        self.state = _HEAD_S
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length: int | None = None
        self.keep_alive = True
        self._buf = b""
        self._remaining = 0  # body bytes left (Content-Length) or left in the current chunk

    @property
    def head_complete(self) -> bool:
        return self.state is not _HEAD_S and self.state is not _FAILED

    @property
    def done(self) -> bool:
        return self.state is _DONE

    def _error(self, message: str) -> ParseError:
        self.state = _FAILED
        self.keep_alive = False
        self._buf = b""
        return ParseError(message)

    def feed(self, data: bytes) -> bytes:
        state = self.state
        if state is _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                return data
            self._remaining = 0
            self.state = _DONE
            if len(data) > remaining:
                self.keep_alive = False
                return data[:remaining]
            return data
        if state is _UNTIL_CLOSE:
            return data
        if state is _HEAD_S:
            buf = self._buf + data if self._buf else data
            end = buf.find(b"\r\n\r\n", max(0, len(self._buf) - 3))
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise self._error("response head too large")
                self._buf = buf
                return b""
            self._buf = b""
            self._parse_head(buf[:end])
            rest = buf[end + 4 :]
            return self.feed(rest) if rest else b""
        if state is _DONE:
            if data:
                self.keep_alive = False
            return b""
        if state is _FAILED:
            raise ParseError("the response was already malformed")
        return self._dechunk(data)

    def feed_eof(self) -> None:
        if self.state is _UNTIL_CLOSE:
            self.state = _DONE
        elif self.state is _FAILED:
            raise ParseError("the response was already malformed")
        elif self.state is not _DONE:
            raise self._error(f"connection closed in {self.state.value}")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise self._error(f"malformed status line {lines[0][:80]!r}")
        version, status = parts[0], parts[1]
        if len(status) != 3 or not (status.isascii() and status.isdigit()):
            raise self._error(f"malformed status code {status[:80]!r}")
        self.status = code = int(status)
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            name = name.strip()
            if not colon or not name:
                raise self._error(f"malformed header line {line[:80]!r}")
            headers[name.lower()] = value.strip()
        self.headers = headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = (
            ("close" not in connection) if version == "HTTP/1.1" else ("keep-alive" in connection)
        )
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit()):
                raise self._error(f"malformed Content-Length {length[:80]!r}")
            self._remaining = self.content_length = int(length)
            self.state = _LENGTH if self._remaining else _DONE
        elif code in (204, 304) or 100 <= code < 200:
            self.content_length = 0
            self.state = _DONE
        else:
            self.state = _UNTIL_CLOSE
            self.keep_alive = False

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        state, remaining = self.state, self._remaining
        out = []
        while pos < size:
            if state is _CHUNK_DATA:
                take = min(remaining, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                remaining -= take
                if remaining == 0:
                    state = _CHUNK_END
            elif state is _CHUNK_END:
                if size - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise self._error("malformed chunk: no CRLF after the data")
                pos += 2
                state = _CHUNK_SIZE
            elif state is _CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > _MAX_CHUNK_LINE:
                        raise self._error("malformed chunk size")
                    break
                digits = buf[pos:end]
                if b";" in digits:  # a chunk extension: ignored
                    digits = digits.split(b";", 1)[0].rstrip(b" \t")
                # int() alone would also take "+5", " 5", "5_0" and "0x5": ASCII letters and
                # digits only (int rejects g-z), at most 16 of them, no "0x".
                if not digits.isalnum() or len(digits) > 16 or digits[1:2] in (b"x", b"X"):
                    raise self._error(f"malformed chunk size {buf[pos:end][:80]!r}")
                try:
                    remaining = int(digits, 16)
                except ValueError:
                    raise self._error(f"malformed chunk size {buf[pos:end][:80]!r}") from None
                pos = end + 2
                state = _CHUNK_DATA if remaining else _TRAILERS
            elif state is _TRAILERS:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        raise self._error("trailers too large")
                    break
                last = end == pos  # the blank line that ends the message
                pos = end + 2
                if last:
                    state = _DONE
                    if pos < size:
                        self.keep_alive = False  # bytes after the end: do not reuse
                    pos = size
            else:  # unreachable: feed only calls this in a chunked state
                raise self._error(f"internal: dechunk in {state.value}")
        self.state, self._remaining = state, remaining
        self._buf = buf[pos:] if pos < size else b""
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)


# -- the protocol ------------------------------------------------------------------------------
class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; carries at most one request at a time.

    Feeds the parser, buffers body pieces for ``read`` (pausing the transport above 1 MiB)
    and wakes whoever waits for the head or the next piece. Implements UpstreamResponse.
    """

    __slots__ = (
        "transport",
        "closed",
        "loop",
        "parser",
        "_head_waiter",
        "_chunks",
        "_waiter",
        "_done",
        "_exc",
        "_buffered",
        "_paused",
        "reused",
        "idle_since",
        "_got_bytes",
        "_got_body",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = ResponseParser()
        self._head_waiter: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._exc: Exception | None = None
        self._buffered = 0
        self._paused = False
        self._got_bytes = False
        self._got_body = False  # any byte of the answer's body (an engine answering a stream
        # sends its head as soon as it accepts the work, the first body byte with the first token)

    # -- UpstreamResponse -------------------------------------------------------------------
    @property
    def status(self) -> int:
        return self.parser.status

    @property
    def headers(self) -> dict[str, str]:
        return self.parser.headers

    @property
    def content_length(self) -> int | None:
        return self.parser.content_length

    @property
    def keep_alive(self) -> bool:
        return self.parser.keep_alive

    @property
    def complete(self) -> bool:
        return self._done and self._exc is None and not self._chunks

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection makes a stream (read-write) transport; BaseTransport is only
        # what asyncio.Protocol's signature promises
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done or self._exc is not None:
            return
        try:
            self.parser.feed_eof()
        except ParseError:
            if not self._got_bytes and self.reused:
                self._fail(_StaleConnection("idle connection closed by the engine"))
            elif not self._got_body:  # died before any byte the client could have seen
                self._fail(ClosedBeforeAnswer(f"engine closed the connection: {exc or 'EOF'}"))
            else:
                self._fail(UpstreamError(f"engine closed the connection: {exc or 'EOF'}"))
        else:
            self._finish()  # a body framed by the close

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        parser = self.parser
        try:
            body = parser.feed(data)
        except ParseError as exc:
            self._fail(exc)
            return
        waiter = self._head_waiter
        if waiter is not None and parser.state is not _HEAD_S and not waiter.done():
            waiter.set_result(None)
        if body:
            self._got_body = True
            self._push(body)
        if parser.state is _DONE:
            self._finish()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost does the rest

    # -- delivery -----------------------------------------------------------------------------
    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self._exc is None and not self._done:
            self._exc = exc
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
        self._wake()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self) -> None:
        self._fail(TimeoutError("no byte from the engine within the timeout"))

    # -- waiting ------------------------------------------------------------------------------
    async def wait_head(self, timeout: float) -> None:
        if self.parser.head_complete:
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
                data = (
                    chunks.popleft()
                    if len(chunks) == 1
                    else b"".join([chunks.popleft() for _ in range(len(chunks))])
                )
                self._buffered = 0 if not chunks else self._buffered - len(data)
                if self._paused and self._buffered < _HIGH_WATER // 2:
                    self._paused = False
                    transport = self.transport
                    assert transport is not None  # _paused is only set with a transport
                    transport.resume_reading()
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


# (host, port, TLS context or None, netloc for the Host header, path prefix) of an engine URL
_Target = tuple[str | None, int, ssl_module.SSLContext | None, str, str]


class UpstreamPool:
    """Idle keep-alive connections per engine URL; no cap on how many are open.

    The router's :class:`UpstreamClient` (responses are :class:`UpstreamConnection`).
    """

    def __init__(self, connect_s: float, first_byte_s: float, idle_s: float = 4.0):
        self.connect_s = connect_s
        self.read_s = first_byte_s
        self.idle_s = idle_s
        self._idle: dict[str, collections.deque[UpstreamConnection]] = collections.defaultdict(
            collections.deque
        )
        self._heads: dict[tuple[str, str], bytes] = {}
        self._targets: dict[str, _Target] = {}
        self._open: set[UpstreamConnection] = set()
        self._engine_key: str | None = None
        self._auth = b""  # the engine key's header line, written into every cached head

    @property
    def engine_key(self) -> str | None:
        return self._engine_key

    @engine_key.setter
    def engine_key(self, key: str | None) -> None:
        """A new key re-renders the request heads once, not per request."""
        if key != self._engine_key:
            self._engine_key = key
            self._auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
            self._heads.clear()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            https = parts.scheme == "https"
            port = parts.port or (443 if https else 80)
            ssl = ssl_module.create_default_context() if https else None
            target = self._targets[url] = (
                parts.hostname,
                port,
                ssl,
                parts.netloc,
                parts.path.rstrip("/"),
            )
        return target

    def _head(self, url: str, path: str) -> bytes:
        head = self._heads.get((url, path))
        if head is None:
            host, port, ssl, netloc, prefix = self._target(url)
            head = self._heads[(url, path)] = (
                f"POST {prefix}{path} HTTP/1.1\r\nHost: {netloc}\r\n".encode()
                + self._auth
                + b"Content-Type: application/json\r\nAccept: */*\r\nContent-Length: "
            )
        return head

    async def _connect(self, url: str) -> UpstreamConnection:
        host, port, ssl, netloc, _ = self._target(url)
        loop = asyncio.get_running_loop()
        # cast: host is None only for a URL without one (http://:8000), which asyncio resolves
        # to loopback; typeshed's create_connection overloads do not allow for it
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(loop),
                    cast(str, host),
                    port,
                    ssl=ssl,
                    server_hostname=host if ssl else None,
                ),
                self.connect_s,
            )
        except OSError as exc:  # TimeoutError (the connect timeout) is one too
            if local_resource_error(exc):
                raise  # EMFILE and kin: the router's shortage, classify() says so
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        self._open.add(conn)
        return conn

    def _take_idle(self, url: str) -> UpstreamConnection | None:
        idle = self._idle.get(url)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely expired
            if conn.closed or now - conn.idle_since > self.idle_s:
                self._discard(conn)
                continue
            return conn
        return None

    async def request(
        self, url: str, path: str, body: bytes, timeout: float | None = None
    ) -> UpstreamConnection:
        """Send ``body`` and wait for the response head: connect_s to connect, then ``timeout``
        (default ``read_s``) for the head."""
        head = self._head(url, path) + str(len(body)).encode() + b"\r\n\r\n"
        conn = self._take_idle(url)
        for _ in range(2):
            if conn is None:
                conn = await self._connect(url)
            conn._reset()
            transport = conn.transport
            assert transport is not None  # set by connection_made before create_connection returns
            transport.writelines((head, body))
            try:
                await conn.wait_head(self.read_s if timeout is None else timeout)
                return conn
            except _StaleConnection:
                self._discard(conn)
                conn = None  # resend once on a fresh connection
            except BaseException:
                self._discard(conn)
                raise
        raise ClosedBeforeAnswer("engine closed a fresh connection before answering")

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
