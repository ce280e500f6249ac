"""What the router accepts from a client, checked once, and how it answers and logs the rest.

:func:`parse_body` turns a completion request's body into a :class:`ClientRequest` (the parsed
object plus what routing and admission read: model, stream, max_tokens) or raises
:class:`BadRequest`, which the handler answers as OpenAI does: 400, ``invalid_request_error``,
the offending parameter named (``messages[0].content``). Only what the router itself reads is
checked (the model, the shape of ``messages`` or ``prompt`` that the prompt text is rendered
from, ``stream``, the token limits); sampling options, tools and the rest are the engine's to
judge, and it answers for them itself. Types are checked as the JSON types OpenAI documents:
``"stream": "true"`` and ``"max_tokens": 16.0`` are refused, where vLLM's lax parsing
would take them.

:class:`ParserErrorLog` keeps aiohttp's log of requests its HTTP parser rejects to one line
each, rate-limited.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

# What a message's content part or a body may hold is checked by type name in messages.
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: True is an int to Python, not to JSON
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)
MAX_ECHO_CHARS = 200  # of a client's value quoted back in an error message


class BadRequest(Exception):
    """A client's mistake, answered with ``status`` and an OpenAI error object."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """A completion request's body, parsed and checked; ``payload`` is the parsed object."""

    payload: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None  # max_completion_tokens or max_tokens, None when not given


def json_type(value: object) -> str:
    """``value``'s JSON type in OpenAI's words ("an integer", "null")."""
    if value is None:
        return "null"
    for type_, name in _JSON_TYPES:
        if isinstance(value, type_):
            return name
    return type(value).__name__


def echo(value: str) -> str:
    """A client's string, shortened to quote in an error message."""
    if len(value) <= MAX_ECHO_CHARS:
        return value
    return value[:MAX_ECHO_CHARS] + "..."


def _wrong_type(param: str, expected: str, value: object) -> BadRequest:
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.",
        param,
        "invalid_type",
    )


def unreadable_body(exc: RequestPayloadError) -> BadRequest:
    """A body aiohttp could not read: broken chunked framing or compression."""
    cause = exc.__cause__
    detail = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    return BadRequest(f"Request body could not be read: {echo(detail)}", code="invalid_body")


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or :class:`BadRequest` (not JSON, not UTF-8, or nested too deeply)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest(
            "Request body is not valid JSON: nested too deeply.", code="invalid_json"
        ) from None
    except ValueError as exc:  # includes UnicodeDecodeError and the int digit limit
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None


def parse_body(raw: bytes, chat: bool) -> ClientRequest:
    """Parse and check a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body."""
    payload = parse_json(raw)
    if not isinstance(payload, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    model = payload.get("model")
    if model is None or model == "":
        raise BadRequest("You must provide a model parameter.", "model", "missing_model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if chat:
        _check_messages(payload.get("messages"))
    else:
        _check_prompt(payload.get("prompt"))
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        value = _token_limit(payload, name)
        if max_tokens is None:
            max_tokens = value
    return ClientRequest(payload, model, bool(stream), max_tokens)


def _token_limit(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if value < 1:
        raise BadRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    return value


def _check_messages(messages: object) -> None:
    """``messages``: a non-empty array of objects with a string role and text content.

    Content is a string, null (an assistant turn with tool calls) or an array of parts: each
    an object with a string ``type`` (a ``text`` part's ``text`` a string) or a bare string,
    as vLLM also takes.
    """
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong_type(at, "an object", message)
        role = message.get("role")
        if role is None:
            raise BadRequest(
                f"Missing required parameter: '{at}.role'.",
                f"{at}.role",
                "missing_required_parameter",
            )
        if not isinstance(role, str):
            raise _wrong_type(f"{at}.role", "a string", role)
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _wrong_type(f"{at}.content", "one of a string or array of objects", content)
        for j, part in enumerate(content):
            where = f"{at}.content[{j}]"
            if isinstance(part, str):
                continue
            if not isinstance(part, dict):
                raise _wrong_type(where, "an object", part)
            kind = part.get("type")
            if not isinstance(kind, str):
                raise _wrong_type(f"{where}.type", "a string", kind)
            if kind == "text" and not isinstance(part.get("text"), str):
                raise _wrong_type(f"{where}.text", "a string", part.get("text"))


def _check_prompt(prompt: object) -> None:
    """``prompt``: a string, an array of strings, of token ids, or of arrays of token ids.

    Absent is allowed (vLLM takes ``prompt_embeds`` instead); the engine judges that.
    """
    if prompt is None or isinstance(prompt, str):
        return
    expected = (
        "one of a string, array of strings, array of integers, or array of arrays of integers"
    )
    if not isinstance(prompt, list):
        raise _wrong_type("prompt", expected, prompt)
    if all(isinstance(p, str) for p in prompt) or _token_ids(prompt):
        return
    if all(isinstance(p, list) and _token_ids(p) for p in prompt):
        return
    raise _wrong_type("prompt", expected, prompt[0] if len(prompt) == 1 else prompt)


def _token_ids(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class ParserErrorLog(logging.Filter):
    """One line, rate-limited, for each request aiohttp's HTTP parser rejects.

    aiohttp's server logger ("aiohttp.server", in ``RequestHandler.handle_error``) logs each
    request its parser rejects (a bad request line or header, a broken chunked or compressed
    body) with the exception's traceback: 15-25 lines of aiohttp's own frames that say only
    that a client sent bad bytes, as often as a client cares to send them. Attached to that
    logger, this rewrites such a record to one WARNING line naming the peer and the error's
    class, not its message, which quotes the offending bytes (they may be a header holding a
    key). At most ``burst`` such lines in ``window_s`` seconds; the first line after a window
    that dropped some says how many. Other records (a bug in a handler) pass unchanged.
    """

    def __init__(
        self, burst: int = 5, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ):
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._window_start = -float("inf")
        self._logged = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return True
        now = self.clock()
        if now - self._window_start >= self.window_s:
            self._window_start, self._logged = now, 0
        if self._logged >= self.burst:
            self._dropped += 1
            return False
        self._logged += 1
        args = record.args if isinstance(record.args, tuple) else ()
        peer = args[0] if len(args) == 1 and isinstance(args[0], str) else "a client"
        code = getattr(exc, "code", 400)
        note = f" ({self._dropped} more not logged)" if self._dropped else ""
        self._dropped = 0
        record.msg = "rejected a malformed HTTP request from %s: %s (answered %s)%s"
        record.args = (peer, type(exc).__name__, code, note)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
