"""stackctl.model_tokenizer gives exactly the token ids of transformers and of a real vLLM.

1. Against transformers in the vLLM test venv (a subprocess prints
   ``AutoTokenizer.from_pretrained(dir).apply_chat_template(..., tokenize=True,
   add_generation_prompt=True)`` and ``tokenizer(prompt)`` as JSON) for several hundred
   generated chats and prompts, on three copies of the tiny model: its own Llama-3-style
   template; a richer one (default system prompt, ``tojson``, ``raise_exception``, block
   whitespace control) in ``chat_template.jinja`` beside a different config template, with
   a BOS-adding post-processor (as Llama 3's tokenizer.json has) and a special token that
   only the config names; and a config that lists named templates and sets
   ``add_bos_token``, which transformers 5 ignores beside a tokenizer.json.
2. Against one CPU vLLM server's ``/tokenize`` (chat: ``messages`` +
   ``add_generation_prompt``; completion: ``prompt``) serving the richer copy, for a subset
   plus message shapes that vLLM rewrites before templating (content parts, ``None``
   content, developer messages, tool calls).

When the venv cannot be built: skipped locally, a failure when env CI is set.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from tokenizers import Tokenizer, processors

from stackctl.model_tokenizer import ModelTokenizer
from stackctl.testing import free_ports
from tests.helpers import tiny_model as tm
from tests.helpers.tiny_model import ensure_tiny_model
from tests.helpers.vllm_env import VllmServer, vllm_venv_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(2400)]

MODEL = "tiny-llama-rich"
MAX_MODEL_LEN = 4096

# A Llama-3.1-like template written for this test: it exercises trim/lstrip of block tags,
# slicing and aliasing messages, tojson, raise_exception and the loop over tool calls.
# (``tools is defined``: vLLM's Anthropic endpoint probes the template at startup without
# ``tools``, and an undefined value is "not none".)
RICH_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful assistant." %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{%- if tools is defined and tools is not none %}
    {{- "\\n\\nTools: " + tools | tojson }}
{%- endif %}
{{- "<|eot_id|>" }}
{% if loop_messages | length > 4 %}
[long conversation: {{ loop_messages | length }} turns]
{% endif %}
{%- for message in loop_messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message.tool_calls is defined and message.tool_calls %}
        {%- for call in message.tool_calls %}
            {{- call.function | tojson }}
        {%- endfor %}
    {%- else %}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# A template that loops over a message's content: vLLM hands it typed parts, not strings.
PARTS_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- 'STRING:' + message['content'] | trim }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}
            {%- if not loop.last %}{{- '\\n' }}{%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# transformers' reference, run with the vLLM venv's python: JSON in on stdin, JSON out.
REFERENCE = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoTokenizer
req = json.load(sys.stdin)
out = {}
for name, path in req["models"].items():
    tok = AutoTokenizer.from_pretrained(path)
    chats = []
    for messages in req["chats"]:
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
            chats.append({"text": text, "ids": list(ids)})
        except Exception as exc:
            chats.append({"error": f"{type(exc).__name__}: {exc}"})
    prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in req["prompts"]]
    out[name] = {"chats": chats, "prompts": prompts}
print(json.dumps(out))
"""

UNICODE = [
    "你好，世界。今天天气很好。",  # CJK
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "🙂👍🏽👨‍👩‍👧‍👦🏳️‍🌈",  # emoji, skin tone, ZWJ sequences, flags
    "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",  # combining marks, Devanagari conjunct
    "שלום עולם",  # RTL Hebrew
    "مرحبا بالعالم 123",  # RTL Arabic with digits
    "mixed עברית and English and عربى",
    "\u200bzero\u200dwidth\u2060joiners",
    "Ωμέγα ÄÖÜß ñ ç",
]
WHITESPACE = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\t",
    "\r\n",
    " leading",
    "trailing ",
    "  both  ",
    "line one\nline two\n\nline four",
    "tabs\tand\u00a0nbsp\u2028line sep",
    "  \n indented\n    code\n",
]
SPECIAL_LOOKALIKES = [
    "<|eot_id|>",
    "text <|start_header_id|>user<|end_header_id|> injected",
    "<|begin_of_text|><|begin_of_text|>",
    "<|eot_id",
    "fox fox fox",  # 'fox' is a special token in the rich copy
]


def _words(rnd: random.Random, n: int) -> str:
    words = " ".join(tm.training_corpus()).split()
    return " ".join(rnd.choice(words) for _ in range(n))


def _content(rnd: random.Random) -> str:
    kind = rnd.random()
    if kind < 0.25:
        return _words(rnd, rnd.randint(1, 40))
    if kind < 0.45:
        return rnd.choice(UNICODE) + " " + _words(rnd, rnd.randint(0, 5))
    if kind < 0.65:
        return rnd.choice(WHITESPACE)
    if kind < 0.75:
        return rnd.choice(SPECIAL_LOOKALIKES)
    if kind < 0.85:
        return _words(rnd, rnd.randint(200, 400))  # long
    return "".join(rnd.choice([*UNICODE, *WHITESPACE, " ", "x"]) for _ in range(rnd.randint(2, 6)))


def generated_chats(count: int, seed: int = 20261202) -> list[list[dict]]:
    """Valid OpenAI chats with string content: system prompt or not, 1-6 rounds."""
    rnd = random.Random(seed)
    chats = []
    for _ in range(count):
        messages = []
        if rnd.random() < 0.5:
            messages.append({"role": "system", "content": _content(rnd)})
        rounds = rnd.randint(1, 6)
        for r in range(rounds):
            messages.append({"role": "user", "content": _content(rnd)})
            if r < rounds - 1:
                messages.append({"role": "assistant", "content": _content(rnd)})
        chats.append(messages)
    return chats


def growing(chats: list[list[dict]]) -> list[list[dict]]:
    """Every round of each chat as the client sends it: the history up to a user message."""
    return [c[:j] for c in chats for j in range(1, len(c)) if c[j - 1]["role"] == "user"]


def generated_prompts(count: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [_content(rnd) for _ in range(count)]


def _variant(
    src: Path,
    dst: Path,
    *,
    config: dict,
    jinja: str | None = None,
    bos_post_processor: bool = False,
) -> Path:
    shutil.copytree(src, dst)
    if bos_post_processor:  # as Llama 3's tokenizer.json: completions start with BOS
        tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tm.BOS} $A", special_tokens=[(tm.BOS, tok.token_to_id(tm.BOS))]
        )
        tok.save(str(dst / "tokenizer.json"))
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(config)
    path.write_text(json.dumps(cfg, indent=2))
    if jinja is not None:
        (dst / "chat_template.jinja").write_text(jinja)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    vllm_venv_or_skip()
    tiny = ensure_tiny_model()
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": tiny,
        "rich": _variant(
            tiny,
            root / "rich",
            config={
                "unk_token": "fox",
                "chat_template": "config template, must lose to chat_template.jinja",
            },
            jinja=RICH_TEMPLATE,
            bos_post_processor=True,
        ),
        "listed": _variant(
            tiny,
            root / "listed",
            config={
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS {{ messages | tojson }}"},
                    {"name": "default", "template": tm.CHAT_TEMPLATE},
                ],
                "add_bos_token": True,  # ignored by transformers 5 beside a tokenizer.json
            },
        ),
    }


def _reference(models: dict[str, Path], chats: list, prompts: list[str]) -> dict:
    venv = vllm_venv_or_skip()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", REFERENCE],
        input=json.dumps(
            {"models": {k: str(v) for k, v in models.items()}, "chats": chats, "prompts": prompts}
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ours(mt: ModelTokenizer, messages: list[dict]) -> dict:
    try:
        return {"text": mt.render_chat(messages), "ids": mt.chat_token_ids(messages)}
    except Exception as exc:  # noqa: BLE001 - compared with the reference's outcome
        return {"error": f"{type(exc).__name__}: {exc}"}


def test_equal_to_transformers(models):
    chats = generated_chats(240)
    chats += growing(chats[:40])  # rounds reuse cached pieces of earlier ones
    prompts = generated_prompts(120)
    ref = _reference(models, chats, prompts)
    compared = mismatches = 0
    first: str | None = None
    for name, path in models.items():
        mt = ModelTokenizer.from_dir(path)
        assert mt.segment_cache is not None
        for messages, want in zip(chats, ref[name]["chats"], strict=True):
            got = _ours(mt, messages)
            compared += 1
            same = ("error" in want) == ("error" in got) and (
                "error" in want or (got["ids"] == want["ids"] and got["text"] == want["text"])
            )
            if not same:
                mismatches += 1
                first = first or f"{name}: {messages!r}\n want {want!r:.600}\n got  {got!r:.600}"
        assert mt.segment_cache.hits > mt.segment_cache.misses  # the cache path was taken
        for prompt, want_ids in zip(prompts, ref[name]["prompts"], strict=True):
            compared += 1
            if mt.prompt_token_ids(prompt) != want_ids:
                mismatches += 1
                first = (
                    first
                    or f"{name}: prompt {prompt!r}: want {want_ids} got {mt.prompt_token_ids(prompt)}"
                )
    # the rich copy really exercises what it is meant to
    rich = ModelTokenizer.from_dir(models["rich"])
    bos = rich.tokenizer.token_to_id(tm.BOS)
    assert rich.prompt_token_ids("x")[0] == bos
    assert rich.tokenizer.token_to_id("fox") in rich.prompt_token_ids("a fox")
    assert sum("error" in c for c in ref["rich"]["chats"]) == 0
    print(
        f"transformers: compared {compared} ({len(chats)} chats and {len(prompts)} prompts on "
        f"each of {len(models)} models), mismatches {mismatches}"
    )

    assert mismatches == 0, first


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Oslo", "unit": "C"}'},
}
SHAPES = [
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
        }
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "12 degrees", "tool_call_id": "call_1"},
        {"role": "user", "content": "and tomorrow?"},
    ],
    [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "developer", "content": "d"},
    ],
    [
        {"role": "system", "content": "x-anthropic-billing-header: cch=1\nreal system"},
        {"role": "user", "content": "u"},
    ],
    [{"role": "user", "content": "named", "name": "alice"}],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot"}]},
        {"role": "user", "content": [{"type": "text", "text": "why"}, "plain string part"]},
    ],
]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    (port,) = free_ports(1)
    with VllmServer.start(
        tmp_path_factory.mktemp("vllm-tok"),
        models["rich"],
        port=port,
        served_model_name=MODEL,
        extra=["--trust-request-chat-template"],  # for the parts template below
    ) as srv:
        yield srv


def _first_difference(mt: ModelTokenizer, want: list[int], got: list[int]) -> str:
    """Where two id lists part, with the text around it on both sides."""
    i = next(
        (k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
        min(len(want), len(got)),
    )

    def around(ids: list[int]) -> str:
        before = mt.tokenizer.decode(ids[max(0, i - 8) : i], skip_special_tokens=False)
        after = mt.tokenizer.decode(ids[i : i + 8], skip_special_tokens=False)
        return f"{before!r} | {after!r} (ids {ids[i : i + 8]})"

    return (
        f"  token {i} of {len(want)} (vLLM) / {len(got)} (ours)\n"
        f"  vLLM: {around(want)}\n  ours: {around(got)}"
    )


def test_equal_to_vllm_tokenize(models, server, tmp_path):
    mt = ModelTokenizer.from_dir(models["rich"])
    parts = ModelTokenizer.from_dir(
        _variant(models["rich"], tmp_path / "parts", config={}, jinja=PARTS_TEMPLATE)
    )
    assert parts.content_format == "openai"
    chats = [c for c in generated_chats(120, seed=99) if len(mt.chat_token_ids(c)) < 3000]
    chats += growing(chats[:10])
    prompts = [p for p in generated_prompts(40, seed=11) if len(mt.prompt_token_ids(p)) < 3000]
    chat = {"model": MODEL, "add_generation_prompt": True}
    # (what we compute, the request); the parts template goes with each request (vLLM is
    # started with --trust-request-chat-template), ours reads it from a copy of the served
    # model (same tokenizer) that ships it
    cases = [(lambda m=m: mt.chat_token_ids(m), {**chat, "messages": m}) for m in chats + SHAPES]
    cases += [
        (
            lambda m=m: parts.chat_token_ids(m),
            {**chat, "messages": m, "chat_template": PARTS_TEMPLATE},
        )
        for m in chats[:40] + SHAPES
    ]
    cases += [(lambda p=p: mt.prompt_token_ids(p), {"model": MODEL, "prompt": p}) for p in prompts]
    bad = []
    for ours, body in cases:
        want = _post(server.url + "/tokenize", body)["tokens"]
        got = ours()
        if got != want:
            bad.append(f"{body!r:.300}\n{_first_difference(mt, want, got)}")
    print(
        f"vLLM /tokenize: compared {len(cases)} requests ({len(cases) - len(prompts)} chats, "
        f"{len(prompts)} prompts), mismatches {len(bad)}"
    )
    for line in bad:
        print("MISMATCH", line)
    assert len(chats) >= 60
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"
