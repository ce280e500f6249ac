"""The lean upstream HTTP/1.1 client: response framing parsed right however bytes are split.

The parser is pure (bytes in, body out), so most of it is property-tested here: valid
responses cut at random points give back exactly their body, and any bytes at all give
either a result or the parser's own ParseError, never another exception.
"""

from __future__ import annotations

import asyncio
import random
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackctl.router.upstream import (
    ParseError,
    ParseState,
    ResponseParser,
    UpstreamConnection,
    UpstreamError,
)


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
            conn.data_received(raw[pos : pos + step])
            pos += step
        body = b"".join(conn._chunks)
        conn._chunks.clear()  # as the proxy's reads would
        return conn, body
    finally:
        loop.close()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"d\r\ndata: hello\n\n\r\n"
    b"11;ext=1\r\ndata: [DONE]\n\n\n\n\n\r\n"
    b"0\r\nX-Trailer: 1\r\n\r\n"
)


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
    assert (conn.status, body, conn.content_length, conn.complete) == (
        404,
        b'{"error":1}',
        11,
        True,
    )


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


# -- the pure parser, property-tested ---------------------------------------------------------
FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def run_parser(pieces: list[bytes], eof: bool = False) -> tuple[ResponseParser, bytes]:
    parser = ResponseParser()
    body = b"".join(parser.feed(piece) for piece in pieces)
    if eof:
        parser.feed_eof()
    return parser, body


@st.composite
def responses(draw):
    """(raw bytes, status, body, headers) of a well-formed keep-alive response."""
    status = draw(st.sampled_from([200, 201, 400, 404, 500, 503]))
    body = draw(st.binary(max_size=600))
    headers = {
        "Content-Type": draw(st.sampled_from(["application/json", "text/event-stream"])),
        "X-Engine": draw(st.text("abc-019", min_size=1, max_size=8)),
    }
    if draw(st.booleans()):  # chunked, with random chunk sizes, extensions and trailers
        sizes = draw(st.lists(st.integers(1, 80), max_size=12))
        parts, pos = [], 0
        for size in sizes:
            piece = body[pos : pos + size]
            pos += len(piece)
            if piece:
                ext = draw(st.sampled_from(["", ";x=1", " ;name"]))
                size_text = draw(st.sampled_from(["{:x}", "{:X}", "{:04x}"])).format(len(piece))
                parts.append(f"{size_text}{ext}\r\n".encode() + piece + b"\r\n")
        if pos < len(body):
            rest = body[pos:]
            parts.append(f"{len(rest):x}\r\n".encode() + rest + b"\r\n")
        trailers = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: b\r\nC: d\r\n"]))
        payload = b"".join(parts) + b"0\r\n" + trailers + b"\r\n"
        headers[draw(st.sampled_from(["Transfer-Encoding", "transfer-encoding"]))] = "chunked"
    else:
        payload = body
        headers[draw(st.sampled_from(["Content-Length", "content-length"]))] = str(len(body))
    head = (
        f"HTTP/1.1 {status} Whatever\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    return head.encode("latin-1") + payload, status, body, headers


@FUZZ
@given(responses(), st.lists(st.integers(0, 10_000), max_size=30))
def test_a_valid_response_cut_anywhere_gives_back_its_body(response, cuts):
    raw, status, body, headers = response
    parser, got = run_parser(split(raw, cuts))
    assert got == body
    assert parser.state is ParseState.DONE and parser.done and parser.keep_alive
    assert parser.status == status
    assert parser.headers["x-engine"] == headers["X-Engine"]
    assert parser.content_length == (None if "chunked" in str(headers).lower() else len(body))


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 10_000), max_size=20))
def test_a_body_framed_by_the_close_ends_at_eof(body, cuts):
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body
    parser, got = run_parser(split(raw, cuts), eof=True)
    assert got == body and parser.done and not parser.keep_alive


@FUZZ
@given(responses(), st.binary(min_size=1, max_size=20))
def test_bytes_after_the_end_forbid_reuse(response, extra):
    raw, _, body, _ = response
    parser, got = run_parser([raw + extra])
    assert got == body and parser.done and not parser.keep_alive


def _mutate(raw: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(raw)
    for op, at, value in edits:
        at %= len(data) + 1
        if op == 0:
            data.insert(at, value)
        elif op == 1 and at < len(data):
            data[at] = value
        elif op == 2 and at < len(data):
            del data[at]
    return bytes(data)


garbage = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda r, e: _mutate(r[0], e),
        responses(),
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)),
            min_size=1,
            max_size=6,
        ),
    ),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(
            [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        ),
        st.binary(max_size=200),
    ),
)


@FUZZ
@given(garbage, st.lists(st.integers(0, 10_000), max_size=20), st.booleans())
def test_any_bytes_give_a_result_or_a_parse_error_only(raw, cuts, eof):
    parser = ResponseParser()
    try:
        for piece in split(raw, cuts):
            parser.feed(piece)
        if eof:
            parser.feed_eof()
    except ParseError:
        assert parser.state is ParseState.FAILED and not parser.keep_alive
        with pytest.raises(ParseError):  # and it stays failed
            parser.feed(b"x")
        return
    assert parser.state is not ParseState.FAILED
    if eof:
        assert parser.done


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5_0\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1g;x\r\n",
    ],
)
def test_malformed_heads_and_sizes_are_parse_errors(raw):
    with pytest.raises(ParseError):
        run_parser([raw])


def test_eof_before_the_end_is_a_parse_error_naming_the_state():
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(ParseError, match="Content-Length"):
        parser.feed_eof()
