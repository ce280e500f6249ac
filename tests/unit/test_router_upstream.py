"""The lean upstream HTTP/1.1 client: response framing parsed right however bytes are split."""

from __future__ import annotations

import asyncio
import random

import pytest

from stackctl.router.upstream import UpstreamConnection, UpstreamError


class FakeTransport:
    def __init__(self):
        self.aborted = False

    def get_extra_info(self, name):
        return None

    def abort(self):
        self.aborted = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def feed(raw: bytes, seed: int) -> tuple[UpstreamConnection, bytes]:
    """Feed ``raw`` in random pieces; return the connection and the body it delivered."""
    loop = asyncio.new_event_loop()
    try:
        conn = UpstreamConnection(loop)
        conn.connection_made(FakeTransport())
        rng = random.Random(seed)
        pos = 0
        while pos < len(raw):
            step = rng.randint(1, 9)
            conn.data_received(raw[pos:pos + step])
            pos += step
        body = b"".join(conn._chunks)
        conn._chunks.clear()  # as the proxy's reads would
        return conn, body
    finally:
        loop.close()


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"d\r\ndata: hello\n\n\r\n" b"11;ext=1\r\ndata: [DONE]\n\n\n\n\n\r\n"
           b"0\r\nX-Trailer: 1\r\n\r\n")


@pytest.mark.parametrize("seed", range(20))
def test_chunked_body_is_dechunked_and_complete(seed):
    conn, body = feed(CHUNKED, seed)
    assert conn.status == 200 and conn.headers["content-type"] == "text/event-stream"
    assert body == b"data: hello\n\n" + b"data: [DONE]\n\n\n\n\n"
    assert conn.complete and conn.keep_alive and conn.content_length is None


@pytest.mark.parametrize("seed", range(10))
def test_content_length_body(seed):
    raw = b'HTTP/1.1 404 Not Found\r\ncontent-length: 11\r\n\r\n{"error":1}'
    conn, body = feed(raw, seed)
    assert (conn.status, body, conn.content_length, conn.complete) == (404, b'{"error":1}', 11,
                                                                      True)


def test_connection_close_framing_ends_at_eof():
    conn, body = feed(b"HTTP/1.0 200 OK\r\n\r\npartial", 0)
    assert not conn.complete and not conn.keep_alive
    assert body == b"partial"
    conn.connection_lost(None)
    assert conn.complete


def test_a_broken_chunked_stream_is_an_error_not_a_short_answer():
    conn, _ = feed(CHUNKED[:70], 0)
    conn.connection_lost(ConnectionResetError())
    assert not conn.complete and isinstance(conn._exc, UpstreamError)


def test_a_chunk_longer_than_announced_is_an_error():
    conn, _ = feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 0)
    assert isinstance(conn._exc, UpstreamError)


def test_malformed_chunk_size_is_an_error():
    conn, _ = feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 0)
    assert isinstance(conn._exc, UpstreamError) and conn.transport.aborted
