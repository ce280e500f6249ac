"""A model's own tokenizer and chat template, without transformers or torch.

vLLM's KV events name cached blocks by the model's token ids, so a router that matches
prompts against them must compute exactly the ids vLLM computes for each request. This
module does that with the ``tokenizers`` library (the Rust tokenizer that transformers'
fast tokenizers wrap) and jinja2, following what vLLM 0.32 does (its references below are
relative to the ``vllm`` package, and to ``transformers`` 5 for the tokenizer):

* ``/v1/chat/completions``: the messages are parsed (renderers/chat_utils.py:
  ``_parse_chat_message_content``: ``None`` content is empty, text parts are joined with
  ``"\\n"`` for templates that take string content, or kept as ``{"type": "text"}`` parts
  for templates that loop over a message's content, renderers/hf.py:
  ``_detect_content_format``), rendered with the chat template and
  ``add_generation_prompt=True`` (renderers/hf.py: ``safe_apply_chat_template``, which
  calls transformers' ``apply_chat_template(tokenize=False)``), then the text is encoded
  with ``add_special_tokens=False`` (the request field's default,
  entrypoints/openai/chat_completion/protocol.py: ``build_tok_params``; renderers/base.py:
  ``_tokenize_prompt``): the template writes BOS itself.
* ``/v1/completions``: the prompt string is encoded with ``add_special_tokens=True``
  (entrypoints/openai/completion/protocol.py: ``build_tok_params``), so the tokenizer's
  post-processor adds what it adds (BOS for Llama-style tokenizers).

What transformers changes on top of ``tokenizer.json`` when it loads a fast tokenizer
(tokenization_utils_tokenizers.py: ``TokenizersBackend.__init__``,
``update_post_processor``) is repeated in :meth:`ModelTokenizer.from_dir`: named special
tokens (and ``added_tokens_decoder`` entries) missing from the tokenizer are added,
``split_special_tokens`` is honoured, truncation and padding are off. The config's
``add_bos_token`` / ``add_eos_token`` change nothing: transformers 5 ignores them when
tokenizer.json exists, whose post-processor alone decides what completions get.

Not covered (each raises or is documented, never silently different): multimodal content
parts (:class:`UnsupportedRequest`), tokenizer classes that transformers rebuilds from
vocab and merges instead of reading ``tokenizer.json`` (see
:attr:`ModelTokenizer.tokenizer_class`), Mistral tokenizers, and vLLM's built-in fallback
templates for models that ship none.

Growing conversations are not encoded from scratch every round: chat prompts are cut right
after each special token that the tokenizer always splits on (:func:`safe_boundaries`
says which), and the ids of each piece are kept in a small LRU (:class:`SegmentCache`),
so a new round encodes only its new messages. ``tokenizers`` encodes the text between
added tokens piece by piece, and chat encoding adds no special tokens, so the ids are
those of the whole text. Added tokens that overlap others or strip whitespace are never cut
after, and a tokenizer with a first-piece-only rule (Metaspace ``prepend_scheme: first``)
or split special tokens encodes chat prompts whole.
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from .tokenizer_files import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_FILE,
)

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the template sees these.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Content part types vLLM reads as text (renderers/chat_utils.py: TEXT_PART_TYPES).
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
# Tokenizer classes transformers builds straight from tokenizer.json (others may rebuild it).
TOKENIZER_JSON_CLASSES = frozenset(
    {None, "TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer"}
)

ContentFormat = Literal["string", "openai"]


class ModelTokenizerError(ValueError):
    """A model directory's tokenizer files are missing, unreadable or inconsistent."""


class UnsupportedRequest(ValueError):
    """A request this module cannot tokenize as vLLM would (images, audio, bad shapes)."""


def _token_content(value: object) -> str | None:
    """A special token from a config: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelTokenizerError(
            f"{path}: cannot read it as JSON ({exc}); copy the model's file again."
        ) from None
    if not isinstance(data, dict):
        raise ModelTokenizerError(
            f"{path}: expected a JSON object, found {type(data).__name__}; copy the model's file again."
        )
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelTokenizerError(f"{path}: cannot read it ({exc}).") from None


# --- the jinja environment transformers renders chat templates in -------------------------


def _raise_exception(message: str) -> None:
    """Templates call it to refuse a conversation (e.g. roles out of order)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (jinja's own escapes HTML characters)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    """Templates that print today's date (Llama 3.1 and later) call it."""
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers marks
    assistant spans with it; rendering itself is unchanged)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# --- which content shape the template takes (vLLM: renderers/hf.py _detect_content_format) -


def _names_in(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    """``node`` is ``name`` (or ``name[key]`` / ``name.key``), maybe sliced, filtered or tested."""
    while True:
        wrapped = isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node
        sliced = isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)
        if not (wrapped or sliced):
            break
        node = node.node  # type: ignore[attr-defined]
    if key is not None:
        if isinstance(node, jinja2.nodes.Getitem):
            if not (isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key):
                return False
            node = node.node
        elif isinstance(node, jinja2.nodes.Getattr):
            if node.attr != key:
                return False
            node = node.node
        else:
            return False
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _aliases(root: jinja2.nodes.Template, name: str) -> set[str]:
    """``name`` and every variable assigned from it (``{% set loop_messages = messages[1:] %}``)."""
    found, todo = {name}, [name]
    while todo:
        current = todo.pop()
        for assign in root.find_all(jinja2.nodes.Assign):
            target = assign.target
            if (
                isinstance(target, jinja2.nodes.Name)
                and target.name not in found
                and _names_in(assign.node, current)
            ):
                found.add(target.name)
                todo.append(target.name)
    return found


def _content_loops(root: jinja2.nodes.Template) -> Iterator[jinja2.nodes.For]:
    loops = list(root.find_all(jinja2.nodes.For))
    messages = _aliases(root, "messages")
    message_vars = {
        loop.target.name
        for loop in loops
        if isinstance(loop.target, jinja2.nodes.Name)
        and any(_names_in(loop.iter, m) for m in messages)
    }

    def is_message_content(node: jinja2.nodes.Node) -> bool:
        return any(_names_in(node, m, "content") for m in message_vars)

    in_macros: set[int] = set()
    macro_param_loops: dict[int, set[str]] = {}
    for macro in root.find_all(jinja2.nodes.Macro):
        params = [arg.name for arg in macro.args]
        content_params: set[str] = set()
        for call in root.find_all(jinja2.nodes.Call):
            if not (isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name):
                continue
            for i, arg in enumerate(call.args[: len(params)]):
                if is_message_content(arg):
                    content_params.add(params[i])
            for kw in call.kwargs:
                if kw.key in params and is_message_content(kw.value):
                    content_params.add(kw.key)
        for loop in macro.find_all(jinja2.nodes.For):
            in_macros.add(id(loop))
            if content_params:
                macro_param_loops[id(loop)] = content_params

    for loop in loops:
        it = loop.iter
        over_param = isinstance(it, jinja2.nodes.Name) and (
            it.name in macro_param_loops.get(id(loop), ())
            or (id(loop) not in in_macros and it.name == "content")
        )
        if over_param or is_message_content(it):
            yield loop


def detect_content_format(env: jinja2.Environment, template: str) -> ContentFormat:
    """``"openai"`` when the template loops over a message's content (it wants a list of
    typed parts), else ``"string"``, as vLLM decides it with ``--chat-template-content-format
    auto`` (the default)."""
    try:
        root = env.parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"  # vLLM's default when it cannot parse; rendering then fails anyway
    return "openai" if next(_content_loops(root), None) is not None else "string"


# --- messages as vLLM hands them to the template ----------------------------------------


# The key that holds a text part's text (renderers/chat_utils.py: MM_PARSER_MAP).
_TEXT_KEY = {"refusal": "refusal", "thinking": "thinking"}
_BILLING_HEADER = "x-anthropic-billing-header"


def _drop_billing_header(text: str) -> str | None:
    """vLLM drops Claude Code's per-request attribution line from system texts and text
    parts (renderers/chat_utils.py: ``_strip_claude_code_billing_header``); None: drop all."""
    if not text.startswith(_BILLING_HEADER):
        return text
    return text.partition("\n")[2] or None


def _text_parts(role: str, content: object, index: int) -> list[str]:
    """The texts of one message's content (vLLM refuses or drops the rest)."""
    if content is None:
        return []
    if isinstance(content, str):
        content = [content]
    if not isinstance(content, list):
        raise UnsupportedRequest(
            f"messages[{index}].content: expected a string or a list of parts, found {type(content).__name__}"
        )
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = "text" if isinstance(part, str) else None
        if isinstance(part, str):
            text: object = part
        elif isinstance(part, Mapping):
            kind = part.get("type")
            if kind not in TEXT_PART_TYPES:
                raise UnsupportedRequest(
                    f"messages[{index}].content[{j}]: part type {kind!r} is not text; "
                    "only text parts can be tokenized without the engine's processor"
                )
            text = part.get(_TEXT_KEY.get(str(kind), "text"))
        else:
            raise UnsupportedRequest(f"messages[{index}].content[{j}]: not an object")
        if text is None:
            continue  # vLLM skips text parts without content
        if not isinstance(text, str):
            raise UnsupportedRequest(f"messages[{index}].content[{j}]: text is not a string")
        kept = _drop_billing_header(text) if role == "system" and kind == "text" else text
        if kept is not None:
            texts.append(kept)
    return texts


def _tool_calls(calls: object) -> list[Any] | None:
    """Tool calls as vLLM passes them: with the keys and key order of the OpenAI types its
    request model validates them into (``id``, ``function``: ``arguments``, ``name``;
    ``type``; others dropped), arguments parsed to objects (``_postprocess_messages``)."""
    if not isinstance(calls, list):
        return None
    if not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, Mapping):
            raise UnsupportedRequest("assistant tool_calls entries must be objects")
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, Mapping):
            raise UnsupportedRequest("only tool_calls of type 'function' are supported")
        call = {k: call[k] for k in ("id", "function", "type") if k in call}
        function = {k: function[k] for k in ("arguments", "name") if k in function}
        args = function.get("arguments")
        if not args:
            parsed: object = {}
        elif isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = {}
        else:
            parsed = args
        function["arguments"] = parsed if isinstance(parsed, dict) else {}
        call["function"] = function
        out.append(call)
    return out


def conversation(
    messages: Sequence[Mapping[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """OpenAI request messages as vLLM passes them to the chat template
    (renderers/chat_utils.py: ``parse_chat_messages``), text content only."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise UnsupportedRequest(f"messages[{i}]: expected an object with a string 'role'")
        role = message["role"]
        texts = _text_parts(role, message.get("content"), i)
        msg: dict[str, Any] = {"role": role}
        if content_format == "openai":
            msg["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            msg["content"] = "\n".join(texts)
        if role == "assistant":
            calls = _tool_calls(message.get("tool_calls"))
            if calls is not None:
                msg["tool_calls"] = calls
            if message.get("reasoning") is not None:
                msg["reasoning"] = msg["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                msg["tool_call_id"] = message["tool_call_id"]
            if isinstance(msg["content"], list):
                msg["content"] = "\n".join(texts)
        if isinstance(message.get("name"), str):
            msg["name"] = message["name"]
        if isinstance(message.get("task"), str):
            msg["task"] = message["task"]
        if role == "developer":
            msg["tools"] = message.get("tools")
        out.append(msg)
    return out


def _developer_as_system(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that know no 'developer' role vLLM makes developer messages system
    messages and merges all system messages into the first (renderers/hf.py:
    ``_convert_developer_to_system``, ``_consolidate_system_messages``)."""
    converted = []
    for msg in conv:
        if msg["role"] == "developer":
            msg = {k: v for k, v in msg.items() if k != "tools"}
            msg["role"] = "system"
        converted.append(msg)
    systems: list[str] = []
    others = []
    merge = False
    for i, msg in enumerate(converted):
        if msg["role"] != "system":
            others.append(msg)
            continue
        if i > 0 or systems:
            merge = True
        content = msg.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, Mapping) else p
                for p in content
                if isinstance(p, str) or (isinstance(p, Mapping) and "text" in p)
            )
        if content:
            systems.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(systems)}, *others]


# --- the tokenizer ------------------------------------------------------------------------


@dataclass
class ModelTokenizer:
    """Tokenizes chat and completion requests exactly as vLLM does for one model directory.

    Build it with :meth:`from_dir`. Thread-safe for encoding (``tokenizers`` is) and for
    rendering (jinja templates are)."""

    path: Path
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]  # the template's bos_token, eos_token, ...
    tokenizer_class: str | None
    content_format: ContentFormat = "string"
    segment_cache: SegmentCache | None = None  # None: chat prompts are encoded whole
    _template: jinja2.Template | None = field(default=None, repr=False)
    _boundary: re.Pattern[str] | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, path: str | Path, *, cache_tokens: int = 1 << 20) -> ModelTokenizer:
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json``,
        ``special_tokens_map.json`` and ``chat_template.jinja`` from a model directory.

        ``cache_tokens`` bounds the token ids kept for pieces of chat prompts (4 bytes each);
        0 turns the cache off."""
        path = Path(path)
        if not path.is_dir():
            raise ModelTokenizerError(f"{path}: not a directory (expected a model directory).")
        tok_path = path / TOKENIZER_FILE
        if not tok_path.is_file():
            raise ModelTokenizerError(
                f"{path}: no {TOKENIZER_FILE}; the router needs the model's fast tokenizer "
                "file (models with only a slow tokenizer, e.g. tokenizer.model, are not supported)."
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
            raise ModelTokenizerError(
                f"{tok_path}: cannot load it with tokenizers ({exc}); copy the model's file again."
            ) from None
        cfg_path = path / CONFIG_FILE
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        special = _special_tokens(path, config)
        template = _chat_template(path, config)
        _apply_transformers_load_rules(tokenizer, config, special)
        tclass = config.get("tokenizer_class")
        self = cls(
            path=path,
            tokenizer=tokenizer,
            chat_template=template,
            special_tokens=special,
            tokenizer_class=tclass if isinstance(tclass, str) else None,
        )
        if template is not None:
            env = _environment()
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateSyntaxError as exc:
                raise ModelTokenizerError(
                    f"{path}: the chat template does not compile (line {exc.lineno}: {exc.message})."
                ) from None
            self.content_format = detect_content_format(env, template)
        boundaries = safe_boundaries(tokenizer)
        if boundaries and cache_tokens > 0:
            self._boundary = re.compile("|".join(map(re.escape, boundaries)))
            self.segment_cache = SegmentCache(cache_tokens)
        return self

    @property
    def reads_tokenizer_json(self) -> bool:
        """Whether transformers, too, builds this tokenizer straight from tokenizer.json
        (true for ``TokenizersBackend`` / ``PreTrainedTokenizerFast``). Other classes are
        rebuilt from vocab and merges by transformers and may split text differently."""
        return self.tokenizer_class in TOKENIZER_JSON_CLASSES

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text vLLM renders for these chat messages (with the generation prompt,
        as ``/v1/chat/completions`` does by default)."""
        if self._template is None:
            raise ModelTokenizerError(
                f"{self.path}: the model has no chat template (none in {CONFIG_FILE}, no "
                f"{CHAT_TEMPLATE_FILE}); vLLM refuses chat requests for it too unless started "
                "with --chat-template."
            )
        if not messages:
            raise UnsupportedRequest("messages: empty; a chat needs at least one message")
        conv = conversation(messages, self.content_format)
        if any(m["role"] == "developer" for m in conv) and not _knows_developer(
            self.chat_template or ""
        ):
            conv = _developer_as_system(conv)
        return self._template.render(
            messages=conv,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``. Uses the batch path without offsets where tokenizers has it
        (``encode_batch_fast``): the same ids, about a quarter less CPU, and it releases the
        GIL, so a caller can run it in a worker thread without stalling an event loop
        (plain ``encode``, the fallback for older tokenizers, holds the GIL)."""
        fast = getattr(self.tokenizer, "encode_batch_fast", None)
        if fast is not None:
            return list(fast([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def chat_token_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt token ids vLLM computes for a ``/v1/chat/completions`` request with
        these messages (default fields: generation prompt on, no extra special tokens)."""
        text = self.render_chat(messages)
        cache, boundary = self.segment_cache, self._boundary
        if cache is None or boundary is None:
            return self.encode(text, add_special_tokens=False)
        return cache.encode(self.tokenizer, split_after(boundary, text))

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """The prompt token ids vLLM computes for a ``/v1/completions`` request with this
        prompt string (special tokens added, as the request field defaults to)."""
        return self.encode(prompt, add_special_tokens=True)


def _knows_developer(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


def _special_tokens(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens, as transformers reads them: tokenizer_config.json, overridden
    by the legacy special_tokens_map.json when the config has no added_tokens_decoder."""
    values: dict[str, object] = {k: config.get(k) for k in SPECIAL_TOKEN_NAMES}
    legacy = path / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" not in config and legacy.is_file():
        for key, value in _read_json(legacy).items():
            if key in values:
                values[key] = value
    # a dict of extra special tokens names more of them (``image_token``, ...): v5 adds
    # those names to its special tokens map, so templates see them too
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        values.update({k: v for k, v in extra.items() if isinstance(k, str)})
    out = {}
    for key, value in values.items():
        content = _token_content(value)
        if content is not None:
            out[key] = content
    return out


def _chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja when present (transformers prefers it
    to the config's), else the config's ``chat_template``, a string or a list of named
    templates of which "default" is used."""
    jinja_file = path / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return _read_text(jinja_file)
    template = config.get("chat_template")
    if template is None:
        return None
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {}
        for entry in template:
            if (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                named[entry["name"]] = entry["template"]
            else:
                raise ModelTokenizerError(
                    f"{path / CONFIG_FILE}: chat_template list entries must be objects with "
                    f"string 'name' and 'template', found {entry!r:.80}."
                )
        if "default" not in named:
            raise ModelTokenizerError(
                f"{path / CONFIG_FILE}: chat_template lists templates {sorted(named)} but none "
                "named 'default', which chat requests use."
            )
        return named["default"]
    raise ModelTokenizerError(
        f"{path / CONFIG_FILE}: chat_template must be a string or a list of named templates, "
        f"found {type(template).__name__}."
    )


def _apply_transformers_load_rules(
    tokenizer: Tokenizer, config: Mapping[str, Any], special: Mapping[str, str]
) -> None:
    """What transformers' TokenizersBackend does to tokenizer.json when it loads it.

    The post-processor (what ``add_special_tokens=True`` adds) stays tokenizer.json's:
    transformers 5 drops ``add_bos_token`` / ``add_eos_token`` from the config when a
    tokenizer.json exists (tokenization_utils_base.py: ``_from_pretrained``), and for a
    missing post-processor writes one that adds nothing."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # added_tokens_decoder entries the tokenizer.json lacks are added with their flags
    have = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
                continue
            if entry["content"] in have:
                continue
            flags = {
                k: bool(entry[k])
                for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                if k in entry
            }
            token = AddedToken(entry["content"], **flags)
            if flags.get("special"):
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
            have.add(entry["content"])
    # named and extra special tokens it still lacks are added as special tokens
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    listed = [_token_content(t) for t in extra] if isinstance(extra, list) else []
    wanted = list(special.values()) + [c for c in listed if c]
    for content in wanted:
        if content not in have:
            tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            have.add(content)
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))


# --- pieces of chat prompts ------------------------------------------------------------------

# Post-processors that add nothing when special tokens are not added (they only add tokens
# or fix offsets); any other keeps chat prompts whole.
_QUIET_POST_PROCESSORS = frozenset(
    {"ByteLevel", "TemplateProcessing", "BertProcessing", "RobertaProcessing"}
)


def _components(node: object) -> Iterator[Mapping[str, Any]]:
    """Every normalizer / pre-tokenizer / processor object in a tokenizer.json subtree."""
    if isinstance(node, Mapping):
        if "type" in node:
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


def _overlap(a: str, b: str) -> bool:
    """Some non-empty proper suffix of ``a`` is a prefix of ``b``."""
    return any(a[-k:] == b[:k] for k in range(1, min(len(a), len(b))))


def safe_boundaries(tokenizer: Tokenizer) -> list[str]:
    """Added tokens after which a chat prompt can be cut and its pieces encoded alone with
    the same ids as the whole (empty: never cut).

    ``tokenizers`` first splits text on added tokens, then normalizes, pre-tokenizes and
    encodes each piece by itself; a cut right after token ``B`` is exact when ``B`` always
    matches where it occurs (no other added token contains or overlaps it, no strip or
    single-word rule, special tokens not split), no component treats the first piece
    differently (Metaspace ``prepend_scheme: first``) and the post-processor adds nothing
    without special tokens."""
    if tokenizer.encode_special_tokens:
        return []
    spec = json.loads(tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer"):
        for comp in _components(spec.get(part)):
            if comp.get("type") == "Metaspace" and comp.get("prepend_scheme") == "first":
                return []
    post = spec.get("post_processor")
    if post is not None:
        kinds = {c.get("type") for c in _components(post)} - {"Sequence"}
        if not kinds <= _QUIET_POST_PROCESSORS:
            return []
    added = list(tokenizer.get_added_tokens_decoder().values())
    contents = [t.content for t in added]
    safe = []
    for token in added:
        b = token.content
        if not b or not token.special or token.normalized:
            continue
        if token.lstrip or token.rstrip or token.single_word:
            continue
        if any((x != b and b in x) or _overlap(b, x) or _overlap(x, b) for x in contents):
            continue
        safe.append(b)
    return safe


def split_after(boundary: re.Pattern[str], text: str) -> list[str]:
    """``text`` cut right after each match of ``boundary`` (the pieces join to ``text``)."""
    pieces = []
    start = 0
    for match in boundary.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces


class SegmentCache:
    """Token ids of recently seen prompt pieces, least recently used dropped first, bounded
    by the ids it holds. A conversation's earlier messages render to the same pieces every
    round, so only the new ones are encoded. Thread-safe."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self.misses = 0
        self._ids: OrderedDict[str, array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def encode(self, tokenizer: Tokenizer, pieces: Sequence[str]) -> list[int]:
        """The ids of the pieces joined: cached pieces looked up, the rest encoded in one
        batch (which releases the GIL) and remembered."""
        found: dict[str, array[int]] = {}
        with self._lock:
            for piece in pieces:
                ids = self._ids.get(piece)
                if ids is not None:
                    self._ids.move_to_end(piece)
                    found[piece] = ids
        missing = list(dict.fromkeys(p for p in pieces if p not in found))
        if missing:
            fast = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
            for piece, enc in zip(missing, fast(missing, add_special_tokens=False), strict=True):
                found[piece] = array("I", enc.ids)
        with self._lock:
            self.hits += len(pieces) - len(missing)
            self.misses += len(missing)
            for piece in missing:
                self._remember(piece, found[piece])
        out: list[int] = []
        for piece in pieces:
            out.extend(found[piece])
        return out

    def _remember(self, piece: str, ids: array[int]) -> None:
        if len(ids) > self.max_tokens or piece in self._ids:
            return
        self._ids[piece] = ids
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            _, old = self._ids.popitem(last=False)
            self.tokens -= len(old)
