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

from collections.abc import Iterable, Mapping

ROLE_MARK = "<|{role}|>"
_MARK_OPEN, _MARK_CLOSE = ROLE_MARK.split("{role}")


def tokenize(text: str) -> list[str]:
    """Split text into tokens (whitespace-separated words)."""
    return text.split()


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
