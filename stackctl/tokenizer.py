"""The project's shared, deterministic and cheap tokenizer.

One token is one maximal run of non-whitespace characters (``str.split()``). The simulator
counts and caches tokens with it and the benchmark sizes its prompts with it, so a prompt
built with ``N`` words is exactly ``N`` tokens to the simulator. It is deliberately not a
BPE tokenizer: nothing here may download a vocabulary, and the timing model only needs
token counts and stable token identities for prefix caching.

Chat requests are rendered to one prompt string by :func:`render_chat`, the stand-in for a
model's chat template; the router's prefix index and the simulator both use it so that a
conversation that grows round by round keeps a stable, growing prefix.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

ROLE_MARK = "<|{role}|>"
_MARK_OPEN, _MARK_CLOSE = ROLE_MARK.split("{role}")


def tokenize(text: str) -> list[str]:
    """Split text into tokens (whitespace-separated words)."""
    return text.split()


def token_id(token: str) -> int:
    """A token's id: the CRC-32 of its UTF-8 bytes (lone surrogates kept). Stable across
    processes and machines, so the simulator's KV events (stackctl.kv_events) carry ids the
    router computes for the same text. Collisions only merge two words' ids."""
    return zlib.crc32(token.encode("utf-8", "surrogatepass"))


_ID_CACHE: dict[str, int] = {}
_ID_CACHE_MAX = 1 << 20  # distinct words remembered; then the cache starts over


def token_ids(tokens: Sequence[str]) -> list[int]:
    """:func:`token_id` of each token, through a cache (a dict lookup is about 20 times
    cheaper than encoding and hashing the word again; prompts repeat their words)."""
    cache = _ID_CACHE
    if len(cache) > _ID_CACHE_MAX:
        cache.clear()
    get = cache.get
    out: list[int] = []
    append = out.append
    for t in tokens:
        i = get(t)
        if i is None:
            i = cache[t] = token_id(t)
        append(i)
    return out


def count_tokens(text: str) -> int:
    """Number of tokens in ``text``."""
    return len(text.split())


def _content_text(content: object) -> str:
    """Text of an OpenAI message ``content``: a string, or the text of a list of parts.

    Total: whatever is not text (an image part, a number where text belongs) adds nothing,
    so rendering never fails; the router and the simulator refuse such requests before.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
    return " ".join(parts)


def render_chat(messages: Iterable[Mapping[str, object]]) -> str:
    """Render OpenAI chat messages to one prompt, like a chat template would.

    Each message becomes ``<|role|> content`` on its own line, and the prompt ends with
    ``<|assistant|>`` (the generation prompt). Rendering message k never changes the text of
    messages before k, so a conversation's prompts share ever-longer prefixes.
    """
    lines = []
    for m in messages:
        role = m.get("role", "user")
        content = _content_text(m.get("content"))
        lines.append(
            f"{_MARK_OPEN}{role if isinstance(role, str) else 'user'}{_MARK_CLOSE} {content}"
        )
    lines.append(ROLE_MARK.format(role="assistant"))
    return "\n".join(lines)
