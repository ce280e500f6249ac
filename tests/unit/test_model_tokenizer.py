"""stackctl.model_tokenizer without vLLM: a tokenizer trained here with ``tokenizers`` the way
tests/helpers/tiny_model.py trains the tiny model's (same corpus, specials, chat template).

Equality with transformers and a real vLLM server is tests/e2e/test_model_tokenizer_vllm.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jinja2
import pytest
from tokenizers import (
    AddedToken,
    Tokenizer,
    normalizers,
    pre_tokenizers,
    processors,
)

from stackctl.model_tokenizer import (
    ModelTokenizer,
    ModelTokenizerError,
    UnsupportedRequest,
)
from tests.helpers import tiny_model as tm

HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tm.train_tokenizer().save(str(d / "tokenizer.json"))
    return d


def _model(tmp_path: Path, base_dir: Path, **config) -> Path:
    """A model directory: the trained tokenizer.json plus a tokenizer_config.json."""
    return tm.write_tokenizer_dir(tmp_path / "model", base_dir / "tokenizer.json", **config)


@pytest.fixture
def model_dir(tmp_path, base_dir) -> Path:
    return _model(tmp_path, base_dir)


def _expected_llama3(messages, generation=True) -> str:
    """What the tiny model's Llama-3-style template renders, written out by hand."""
    out = tm.BOS
    for m in messages:
        out += HEADER.format(role=m["role"]) + (m["content"] or "").strip() + tm.EOT
    return out + (HEADER.format(role="assistant") if generation else "")


CHAT = [
    {"role": "system", "content": "  You are terse.  "},
    {"role": "user", "content": "What is the capital of France? 你好 🙂"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And\n\nof Italy?\n"},
]


def test_render_chat_matches_the_template_with_generation_prompt(model_dir):
    mt = ModelTokenizer.from_dir(model_dir)
    assert mt.render_chat(CHAT) == _expected_llama3(CHAT)
    assert mt.render_chat(CHAT, add_generation_prompt=False) == _expected_llama3(CHAT, False)


def test_chat_ids_encode_the_rendered_text_without_adding_special_tokens(model_dir, base_dir):
    mt = ModelTokenizer.from_dir(model_dir)
    raw = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    ids = mt.chat_token_ids(CHAT)
    assert ids == raw.encode(_expected_llama3(CHAT), add_special_tokens=False).ids
    bos, eot = raw.token_to_id(tm.BOS), raw.token_to_id(tm.EOT)
    assert ids[0] == bos and ids.count(bos) == 1  # the template writes BOS, nothing adds one
    assert ids.count(eot) == len(CHAT)  # each special token in the text is one id


def _with_bos_post_processor(tmp_path: Path, base_dir: Path) -> Path:
    """A tokenizer.json whose post-processor adds BOS, as Llama 3's does."""
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tm.BOS} $A", special_tokens=[(tm.BOS, tok.token_to_id(tm.BOS))]
    )
    d = tmp_path / "bos-base"
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    return d


def test_the_post_processor_puts_bos_before_completion_prompts_only(tmp_path, base_dir):
    raw = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    bos = raw.token_to_id(tm.BOS)
    plain = ModelTokenizer.from_dir(_model(tmp_path / "a", base_dir))
    text = "The quick brown fox"
    assert plain.prompt_token_ids(text) == raw.encode(text).ids
    assert bos not in plain.prompt_token_ids(text)

    with_bos = ModelTokenizer.from_dir(
        _model(tmp_path / "b", _with_bos_post_processor(tmp_path, base_dir))
    )
    assert with_bos.prompt_token_ids(text) == [bos, *plain.prompt_token_ids(text)]
    assert with_bos.prompt_token_ids("") == [bos]
    assert with_bos.chat_token_ids(CHAT) == plain.chat_token_ids(CHAT)  # still one BOS


def test_config_add_bos_token_changes_nothing_when_tokenizer_json_exists(tmp_path, base_dir):
    """transformers 5 drops add_bos_token / add_eos_token from the config then."""
    plain = ModelTokenizer.from_dir(_model(tmp_path / "a", base_dir))
    flagged = ModelTokenizer.from_dir(
        _model(tmp_path / "b", base_dir, add_bos_token=True, add_eos_token=True)
    )
    text = "The quick brown fox"
    assert flagged.prompt_token_ids(text) == plain.prompt_token_ids(text)


def test_special_tokens_may_be_dicts_with_content(tmp_path, base_dir):
    d = _model(tmp_path, base_dir, bos_token={"content": tm.BOS, "lstrip": False})
    mt = ModelTokenizer.from_dir(d)
    assert mt.special_tokens["bos_token"] == tm.BOS
    assert mt.render_chat(CHAT).startswith(tm.BOS + "<|start_header_id|>")


def test_a_special_token_missing_from_tokenizer_json_is_added_as_one_token(tmp_path, base_dir):
    mt = ModelTokenizer.from_dir(_model(tmp_path, base_dir, unk_token="<|my_unk|>"))
    ids = mt.prompt_token_ids("a <|my_unk|> b")
    assert mt.tokenizer.token_to_id("<|my_unk|>") in ids
    assert len(ids) == len(mt.prompt_token_ids("a X b"))


def test_split_special_tokens_encodes_them_as_text(tmp_path, base_dir):
    whole = ModelTokenizer.from_dir(_model(tmp_path / "a", base_dir))
    split = ModelTokenizer.from_dir(_model(tmp_path / "b", base_dir, split_special_tokens=True))
    eot = whole.tokenizer.token_to_id(tm.EOT)
    assert eot in whole.prompt_token_ids(f"x{tm.EOT}")
    assert eot not in split.prompt_token_ids(f"x{tm.EOT}")


def test_list_of_templates_uses_default(tmp_path, base_dir):
    templates = [
        {"name": "tool_use", "template": "TOOLS{{ messages[0]['content'] }}"},
        {"name": "default", "template": "DEFAULT{{ messages[0]['content'] }}"},
    ]
    mt = ModelTokenizer.from_dir(_model(tmp_path, base_dir, chat_template=templates))
    assert mt.render_chat([{"role": "user", "content": "x"}]) == "DEFAULTx"


def test_list_of_templates_without_default_is_refused(tmp_path, base_dir):
    templates = [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]
    with pytest.raises(ModelTokenizerError, match=r"\['rag', 'tool_use'\].*'default'"):
        ModelTokenizer.from_dir(_model(tmp_path, base_dir, chat_template=templates))


def test_malformed_template_list_entry_is_refused(tmp_path, base_dir):
    with pytest.raises(ModelTokenizerError, match="'name' and 'template'"):
        ModelTokenizer.from_dir(_model(tmp_path, base_dir, chat_template=[{"name": "default"}]))


def test_chat_template_jinja_wins_over_the_config(model_dir):
    (model_dir / "chat_template.jinja").write_text("FILE{{ messages|length }}")
    assert ModelTokenizer.from_dir(model_dir).render_chat(CHAT) == "FILE4"


def test_missing_tokenizer_json_names_the_directory_and_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelTokenizerError, match=r"no tokenizer\.json") as info:
        ModelTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelTokenizerError, match="not a directory"):
        ModelTokenizer.from_dir(tmp_path / "absent")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ModelTokenizerError, match=r"tokenizer\.json: cannot load it"):
        ModelTokenizer.from_dir(tmp_path)


def test_unreadable_config_names_the_file(model_dir):
    (model_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(
        ModelTokenizerError, match=r"tokenizer_config\.json: cannot read it as JSON"
    ):
        ModelTokenizer.from_dir(model_dir)


def test_template_syntax_error_is_reported_at_load(tmp_path, base_dir):
    with pytest.raises(ModelTokenizerError, match="does not compile"):
        ModelTokenizer.from_dir(_model(tmp_path, base_dir, chat_template="{% for m in messages %}"))


def test_no_chat_template_still_tokenizes_completions(tmp_path, base_dir):
    mt = ModelTokenizer.from_dir(_model(tmp_path, base_dir, chat_template=None))
    assert mt.prompt_token_ids("hello")
    with pytest.raises(ModelTokenizerError, match="no chat template") as info:
        mt.chat_token_ids(CHAT)
    assert str(mt.path) in str(info.value)


def test_only_tokenizer_json_is_enough_for_completions(tmp_path, base_dir):
    shutil.copy(base_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    mt = ModelTokenizer.from_dir(tmp_path)
    assert mt.special_tokens == {} and mt.chat_template is None
    assert (
        mt.prompt_token_ids("hello")
        == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("hello").ids
    )


# --- the jinja environment -----------------------------------------------------------------


def _render(tmp_path, base_dir, template, messages=None, **config) -> str:
    mt = ModelTokenizer.from_dir(_model(tmp_path, base_dir, chat_template=template, **config))
    return mt.render_chat(messages or [{"role": "user", "content": "hi"}])


def test_raise_exception_refuses_the_conversation(tmp_path, base_dir):
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    with pytest.raises(jinja2.TemplateError, match="system first"):
        _render(tmp_path, base_dir, template)


def test_tojson_keeps_unicode_and_html_characters_and_takes_options(tmp_path, base_dir):
    template = (
        "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}"
    )
    msg = {"role": "user", "content": "<b>&'é你🙂"}
    out = _render(tmp_path, base_dir, template, [msg])
    assert out == (
        json.dumps(msg, ensure_ascii=False)
        + "|"
        + json.dumps({"b": 1, "a": [1, 2]}, indent=2, sort_keys=True)
    )


def test_strftime_now(tmp_path, base_dir):
    out = _render(tmp_path, base_dir, "{{ strftime_now('%Y') }}")
    assert out.isdigit() and len(out) == 4


def test_trim_and_lstrip_blocks_and_loop_controls(tmp_path, base_dir):
    template = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "[{{ m['content'] }}]\n"
        "{% endfor %}\n"
    )
    msgs = [{"role": "user", "content": str(i)} for i in range(4)]
    assert _render(tmp_path, base_dir, template, msgs) == "[0]\n[1]\n"


def test_generation_tag_renders_its_body(tmp_path, base_dir):
    template = (
        "{% for m in messages %}{% generation %}<{{ m['content'] }}>{% endgeneration %}{% endfor %}"
    )
    assert _render(tmp_path, base_dir, template) == "<hi>"


def test_templates_cannot_mutate_the_messages(tmp_path, base_dir):
    with pytest.raises(jinja2.exceptions.SecurityError):
        _render(tmp_path, base_dir, "{{ messages.append({'role': 'x'}) }}")


def test_template_sees_special_tokens_and_no_tools(tmp_path, base_dir):
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|{{ tools is none }}"
    assert _render(tmp_path, base_dir, template) == f"{tm.BOS}|{tm.EOT}|{tm.PAD}|False|True"


# --- messages as vLLM passes them ------------------------------------------------------------


STRING_TEMPLATE = "{% for m in messages %}({{ m['role'] }}:{{ m['content'] }}){% endfor %}"
PARTS_TEMPLATE = (
    "{% for m in messages %}({{ m['role'] }}:"
    "{% if m['content'] is string %}S{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}[{{ part['type'] }}={{ part['text'] }}]{% endfor %}"
    "{% endif %}){% endfor %}"
)
PARTS = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]


def test_string_templates_get_text_parts_joined_with_newlines(tmp_path, base_dir):
    msgs = [{"role": "user", "content": PARTS}, {"role": "assistant", "content": None}]
    assert _render(tmp_path, base_dir, STRING_TEMPLATE, msgs) == "(user:a\nb)(assistant:)"


def test_templates_that_loop_over_content_get_parts(tmp_path, base_dir):
    msgs = [{"role": "user", "content": PARTS}, {"role": "user", "content": "plain"}]
    out = _render(tmp_path, base_dir, PARTS_TEMPLATE, msgs)
    assert out == "(user:[text=a][text=b])(user:[text=plain])"
    aliased = "{% set loop_messages = messages %}" + PARTS_TEMPLATE.replace(
        "in messages", "in loop_messages"
    )
    assert _render(tmp_path / "b", base_dir, aliased, msgs) == out


def test_developer_messages_become_one_system_message_unless_the_template_knows_them(
    tmp_path, base_dir
):
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "developer", "content": "d"},
    ]
    assert _render(tmp_path / "a", base_dir, STRING_TEMPLATE, msgs) == "(system:s\n\nd)(user:u)"
    knows = STRING_TEMPLATE + "{# 'developer' #}"
    assert _render(tmp_path / "b", base_dir, knows, msgs) == "(system:s)(user:u)(developer:d)"


def test_tool_call_arguments_reach_the_template_as_objects(tmp_path, base_dir):
    template = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}"
    call = {
        "id": "1",
        "type": "function",
        "function": {"name": "w", "arguments": '{"city": "Oslo"}'},
    }
    msgs = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    assert _render(tmp_path, base_dir, template, msgs) == "Oslo"


def test_images_are_refused(model_dir):
    mt = ModelTokenizer.from_dir(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(UnsupportedRequest, match=r"messages\[0\]\.content\[0\].*'image_url'"):
        mt.chat_token_ids(msgs)
    with pytest.raises(UnsupportedRequest, match="empty"):
        mt.chat_token_ids([])


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  leading and trailing  ",
        "é\u0301 שלום عربى 你好 🙂👍🏽",
        "\n\n\t\r\n",
        "a" * 5000,
    ],
)
def test_the_offset_free_encode_gives_the_same_ids(model_dir, text):
    mt = ModelTokenizer.from_dir(model_dir)
    for special in (False, True):
        assert (
            mt.encode(text, add_special_tokens=special)
            == mt.tokenizer.encode(text, add_special_tokens=special).ids
        )


# --- pieces of chat prompts: cut after special tokens, encoded alone, cached ---------------


def _variant_tokenizer(base_dir: Path, kind: str) -> Tokenizer:
    """The trained tokenizer with one component changed, each a different splitting rule."""
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    if kind == "prefix-space":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif kind == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    elif kind == "metaspace-always":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    elif kind == "metaspace-first":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    elif kind == "rstrip":
        tok.add_special_tokens([AddedToken(tm.EOT, special=True, rstrip=True, normalized=False)])
    elif kind == "overlap":
        tok.add_special_tokens([AddedToken(tm.EOT + "x", special=True, normalized=False)])
    elif kind == "split-special":
        tok.encode_special_tokens = True
    return tok


PIECES = [
    tm.BOS,
    tm.EOT,
    HEADER.format(role="user"),
    HEADER.format(role="assistant"),
    " ",
    "  ",
    "\n",
    "\n\n",
    "x",
    " lead",
    "trail ",
    "The Quick brown fox",
    "你好 🙂 é\u0301 שלום",
    "ﬁ Ⅸ",  # NFKC changes these
    "<|eot_id",
    "|>",
]


@pytest.mark.parametrize(
    "kind, cuts",
    [
        ("as-trained", True),
        ("prefix-space", True),
        ("normalizer", True),
        ("metaspace-always", True),
        ("metaspace-first", False),
        ("rstrip", True),  # EOT strips: no cut after it, the other specials stay safe
        ("overlap", True),
        ("split-special", False),
    ],
)
def test_pieces_encode_to_the_same_ids_as_the_whole(base_dir, kind, cuts):
    import random

    from stackctl.model_tokenizer import SegmentCache, safe_boundaries, split_after

    tok = _variant_tokenizer(base_dir, kind)
    boundaries = safe_boundaries(tok)
    assert bool(boundaries) is cuts
    if kind in ("rstrip", "overlap"):
        assert tm.EOT not in boundaries and tm.BOS in boundaries
    if not cuts:
        return
    pattern = re.compile("|".join(map(re.escape, boundaries)))
    cache = SegmentCache(10_000)
    rnd = random.Random(kind)
    texts = ["".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, 30))) for _ in range(300)]
    texts += [texts[-1] + tm.EOT + p for p in PIECES]  # grown by one piece
    for text in texts:
        pieces = split_after(pattern, text)
        assert "".join(pieces) == text
        assert cache.encode(tok, pieces) == tok.encode(text, add_special_tokens=False).ids, text
    assert cache.hits > 0 and cache.tokens <= 10_000


def test_a_growing_conversation_encodes_only_its_new_messages(model_dir):
    mt = ModelTokenizer.from_dir(model_dir)
    cache = mt.segment_cache
    assert cache is not None
    chat: list[dict] = []
    for i in range(6):
        chat.append({"role": "user", "content": f"question {i} " + "word " * 50})
        misses = cache.misses
        assert mt.chat_token_ids(chat) == mt.encode(mt.render_chat(chat), add_special_tokens=False)
        if i:  # only the last answer and the new question are new pieces
            assert cache.misses - misses == 2
        chat.append({"role": "assistant", "content": f"answer {i}"})


def test_the_cache_stays_within_its_bound(model_dir):
    mt = ModelTokenizer.from_dir(model_dir, cache_tokens=300)
    cache = mt.segment_cache
    assert cache is not None
    for i in range(50):
        mt.chat_token_ids([{"role": "user", "content": f"message {i} " + "fox " * i}])
        assert cache.tokens <= 300
    assert 0 < len(cache) < 50
    assert ModelTokenizer.from_dir(model_dir, cache_tokens=0).segment_cache is None


def test_text_part_kinds_and_the_billing_header_line(tmp_path, base_dir):
    msgs = [
        {"role": "system", "content": "x-anthropic-billing-header: cch=42\nreal system"},
        {
            "role": "user",
            "content": [
                {"type": "refusal", "refusal": "no"},
                {"type": "thinking", "thinking": "hmm"},
                {"type": "text", "text": None},
                {"type": "input_text", "text": "x-anthropic-billing-header: kept outside system"},
            ],
        },
    ]
    out = _render(tmp_path, base_dir, STRING_TEMPLATE, msgs)
    assert (
        out == "(system:real system)(user:no\nhmm\nx-anthropic-billing-header: kept outside system)"
    )
