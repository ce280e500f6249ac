"""The router's request checks (stackctl/router/requests.py) and the total chat renderer."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader

from stackctl.router.requests import BadRequest, ParserErrorLog, parse_body, parse_json
from stackctl.tokenizer import render_chat

USER = {"role": "user", "content": "hi"}


def chat(**fields):
    return json.dumps({"model": "m", "messages": [USER], **fields}).encode()


def completion(**fields):
    return json.dumps({"model": "m", "prompt": "one two", **fields}).encode()


def refusal(raw: bytes, chat_path: bool = True) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_body(raw, chat=chat_path)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    "messages, param, code",
    [
        ([{"role": "user", "content": 5}], "messages[0].content", "invalid_type"),
        ([{"role": "user", "content": True}], "messages[0].content", "invalid_type"),
        ([{"role": "user", "content": {"type": "text"}}], "messages[0].content", "invalid_type"),
        ([USER, {"role": "user", "content": [5]}], "messages[1].content[0]", "invalid_type"),
        ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0].type", "invalid_type"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text", "invalid_type"),
        ([{"role": 5, "content": "x"}], "messages[0].role", "invalid_type"),
        ([{"content": "x"}], "messages[0].role", "missing_required_parameter"),
        (["hi"], "messages[0]", "invalid_type"),
        ("hi", "messages", "invalid_type"),
        ([], "messages", "empty_array"),
        (None, "messages", "missing_required_parameter"),
    ],
)  # fmt: skip
def test_bad_messages_name_the_parameter(messages, param, code):
    err = refusal(json.dumps({"model": "m", "messages": messages}).encode())
    assert (err.param, err.code) == (param, code)
    assert param in err.message


@pytest.mark.parametrize(
    "raw, chat_path, param, code",
    [
        (chat(stream="yes"), True, "stream", "invalid_type"),
        (chat(max_tokens="10"), True, "max_tokens", "invalid_type"),
        (chat(max_tokens=16.0), True, "max_tokens", "invalid_type"),
        (chat(max_completion_tokens=0), True, "max_completion_tokens", "integer_below_min_value"),
        (completion(max_tokens=True), False, "max_tokens", "invalid_type"),
        (completion(prompt={"a": 1}), False, "prompt", "invalid_type"),
        (completion(prompt=[True, 1]), False, "prompt", "invalid_type"),
        (completion(prompt=["a", 1]), False, "prompt", "invalid_type"),
        (completion(prompt=[[1, "x"]]), False, "prompt", "invalid_type"),
        (json.dumps({"model": 5, "prompt": "x"}).encode(), False, "model", "invalid_type"),
        (json.dumps({"prompt": "x"}).encode(), False, "model", "missing_model"),
        (b"[1]", False, None, "invalid_json"),
        (b"[" * 200_000 + b"]" * 200_000, True, None, "invalid_json"),
        (b'{"model": "m", "messages": ' + b"[" * 100_000, True, None, "invalid_json"),
        (b'{"model": "\xff"}', True, None, "invalid_json"),
        (b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", True, None, "invalid_json"),
    ],
)  # fmt: skip
def test_bad_fields_and_bodies(raw, chat_path, param, code):
    err = refusal(raw, chat_path)
    assert (err.param, err.code) == (param, code)


def test_nesting_error_is_short():
    err = refusal(b"[" * 200_000)
    assert err.message == "Request body is not valid JSON: nested too deeply."


def test_good_requests_pass_with_what_routing_reads():
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, "b"]
    got = parse_body(
        chat(messages=[{"role": "user", "content": parts}, {"role": "assistant", "content": None}],
             stream=True, max_completion_tokens=7, max_tokens=9),
        chat=True,
    )  # fmt: skip
    assert (got.model, got.stream, got.max_tokens) == ("m", True, 7)
    for prompt in ("x", ["x", "y"], [1, 2], [[1], [2, 3]], [], None):
        got = parse_body(completion(prompt=prompt, stream=None), chat=False)
        assert (got.stream, got.max_tokens) == (False, None)
    # a lone surrogate is the engine's to judge; the router routes it
    assert parse_json(b'{"a": "\\ud800"}') == {"a": "\ud800"}


def test_render_chat_is_total():
    weird = [
        {"role": "user", "content": 5},
        {"role": 7, "content": True},
        {"role": "user", "content": [5, None, {"type": "text", "text": 3}, "s", {"type": "text", "text": "t"}]},
        {"role": "user", "content": {"type": "text", "text": "x"}},
        {"role": "user"},
    ]  # fmt: skip
    assert render_chat(weird) == (
        "<|user|> \n<|user|> \n<|user|> s t\n<|user|> \n<|user|> \n<|assistant|>"
    )


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def parser_record(exc, level=logging.ERROR, peer="10.1.2.3"):
    return logging.LogRecord(
        "aiohttp.server", level, __file__, 1, "Error handling request from %s", (peer,),
        (type(exc), exc, None),
    )  # fmt: skip


def test_parser_errors_become_one_rate_limited_line_without_the_bytes():
    clock = Clock()
    quiet = ParserErrorLog(burst=2, window_s=10.0, clock=clock)
    secret = b"Authorization: Bearer sk-secret\x01"
    records = [parser_record(InvalidHeader(secret)) for _ in range(5)]
    passed = [quiet.filter(r) for r in records]
    assert passed == [True, True, False, False, False]
    first = records[0]
    assert first.exc_info is None and first.levelno == logging.WARNING
    line = logging.Formatter("%(levelname)s %(message)s").format(first)
    assert line == (
        "WARNING rejected a malformed HTTP request from 10.1.2.3: InvalidHeader (answered 400)"
    )
    assert "sk-secret" not in line
    clock.now += 10.0
    later = parser_record(BadHttpMessage("Duplicate 'Content-Length' header found."))
    assert quiet.filter(later)
    assert later.getMessage().endswith("BadHttpMessage (answered 400) (3 more not logged)")
    # a bug in a handler keeps its traceback
    bug = parser_record(ZeroDivisionError("x"))
    assert quiet.filter(bug) and bug.exc_info is not None and bug.levelno == logging.ERROR
    # debug-level records (a first request that is not HTTP at all) stay at debug
    debug = parser_record(BadHttpMessage("x"), level=logging.DEBUG)
    assert quiet.filter(debug) and debug.levelno == logging.DEBUG
