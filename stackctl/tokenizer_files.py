"""The files of a model directory that the router's tokenizer reads (stackctl.model_tokenizer),
named once for it and for `up`, which copies them to a router host that has no copy of the
model (a light module: the operator's side does not import the tokenizer libraries)."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE)


def tokenizer_files(model_dir: str | Path) -> dict[str, bytes]:
    """File name -> content of the tokenizer files present in ``model_dir``."""
    root = Path(model_dir).expanduser()
    return {name: (root / name).read_bytes() for name in TOKENIZER_FILES if (root / name).is_file()}
