"""HTTP side of the load client: one streaming chat completion, measured.

One shared :class:`aiohttp.ClientSession` without a connection cap carries every request, so
the client never queues requests of its own. Times come from ``time.monotonic`` (TTFT,
inter-token gaps, end-to-end); the wall clock is kept only to line records up with logs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import aiohttp

from stackctl.bench.workload import RequestSpec


@dataclass
class Record:
    """Everything measured about one request (one CSV row)."""

    profile: str
    qps_target: float
    phase: str  # "measure", "warmup" or "background"
    user: int
    round: int
    scheduled_s: float  # when the arrival was due, seconds since the run started
    start_s: float  # when it was sent (>= scheduled_s; the gap is client lag)
    start_time: float  # wall clock at send, epoch seconds
    launch_lag_s: float
    waited_for_idle_user: bool  # no user was idle when the arrival was due
    max_tokens: int
    prompt_tokens_sent: int  # counted by the shared tokenizer on the client
    prompt_tokens: int | None = None  # usage.prompt_tokens from the server
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    output_tokens: int | None = None  # usage.completion_tokens (or content chunks counted)
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_mean_s: float | None = None
    itl_p50_s: float | None = None
    itl_p99_s: float | None = None
    itl_max_s: float | None = None
    status: int | None = None
    error: str | None = None
    # the user's first turn (cold: nothing of its conversation could be cached but the shared
    # system prompt) or a returning one; None in results saved before this field existed
    first_turn: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def chat_completions_url(base_url: str) -> str:
    """``http://h:p`` or ``http://h:p/v1`` -> ``http://h:p/v1/chat/completions``."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def new_session() -> aiohttp.ClientSession:
    """The one session a run shares: no connection cap, no per-host cap."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))


@dataclass
class StreamOutcome:
    answer: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    gaps: list[float] | None = None
    usage: dict | None = None
    content_chunks: int = 0
    status: int | None = None
    error: str | None = None


def _chunk_text(chunk: dict) -> str:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content")
        if text:
            return text
    return ""


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    spec: RequestSpec,
    *,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    ignore_eos: bool = True,
) -> StreamOutcome:
    """Send one streaming chat completion and time its chunks."""
    payload = {
        "model": model,
        "messages": list(spec.messages),
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM extension: every answer is max_tokens long
    headers = {"x-user-id": str(spec.user_id)}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    gaps: list[float] = []
    out = StreamOutcome(gaps=gaps)
    parts: list[str] = []
    started = time.monotonic()
    last_chunk = started  # a gap is measured from the previous chunk, once there is one
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        async with session.post(url, json=payload, headers=headers, timeout=timeout) as resp:
            out.status = resp.status
            if resp.status >= 400:
                body = (await resp.text())[:300]
                out.error = f"HTTP {resp.status}: {body.strip()}"
                return out
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    err = chunk["error"]
                    out.error = (
                        f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    )
                    break
                if chunk.get("usage"):
                    out.usage = chunk["usage"]
                text = _chunk_text(chunk)
                if text:
                    now = time.monotonic()
                    if out.ttft_s is None:
                        out.ttft_s = now - started
                    else:
                        gaps.append(now - last_chunk)
                    last_chunk = now
                    out.content_chunks += 1
                    parts.append(text)
        if out.error is None and out.ttft_s is None:
            out.error = "no tokens received"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}".rstrip(": ") or type(exc).__name__
    finally:
        out.e2e_s = time.monotonic() - started
        out.answer = "".join(parts)
    return out


def fill_record(record: Record, out: StreamOutcome) -> Record:
    """Copy a stream's measurements into its record."""
    record.ttft_s, record.e2e_s = out.ttft_s, out.e2e_s
    record.status, record.error = out.status, out.error
    usage = out.usage or {}
    record.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = details.get("cached_tokens")
    record.output_tokens = usage.get(
        "completion_tokens", out.content_chunks if out.content_chunks else None
    )
    if out.gaps:
        record.itl_mean_s = sum(out.gaps) / len(out.gaps)
        record.itl_p50_s = percentile(out.gaps, 50)
        record.itl_p99_s = percentile(out.gaps, 99)
        record.itl_max_s = max(out.gaps)
    return record
