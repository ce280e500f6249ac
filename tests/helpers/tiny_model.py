"""A tiny, deterministic, random-weight Llama for running real vLLM on the CPU in tests.

``ensure_tiny_model()`` returns a directory that ``vllm`` can serve with
``--model <dir>``: ``config.json``, ``model.safetensors``, ``generation_config.json``
and a byte-level BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json``
with a Llama-3-style ``chat_template``).

Nothing is downloaded: the tokenizer is trained locally with ``tokenizers`` on
the fixed corpus below and the weights come from ``torch.manual_seed``.  The
result is cached under ``$STACKCTL_TEST_CACHE`` (default
``~/.cache/stackctl-tests``) in ``models/<MODEL_VERSION>``; bump
``MODEL_VERSION`` whenever the recipe changes.

Generation needs torch + transformers + tokenizers.  This module imports them
lazily; when the running interpreter lacks them (the usual case for the test
interpreter) it re-runs this file with the python of the vLLM test venv
(``tests.helpers.vllm_env.ensure_vllm_venv``).

CLI::

    python -m tests.helpers.tiny_model OUTDIR      # write the model into OUTDIR
    python -m tests.helpers.tiny_model             # ensure the cached model, print its path
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL_VERSION = "tiny-llama-v1"
SEED = 1234
VOCAB_SIZE = 2048
MAX_POSITION_EMBEDDINGS = 4096

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

# Llama-3 style; add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_BASE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A serving stack routes each request to the engine that already holds its prefix in the KV cache.",
    "stackctl deploys vLLM and LMCache onto GPU hosts over SSH and supervises them with supervisord.",
    "The router keeps a map from prefix hashes to engines and prefers cache hits over idle engines.",
    "Time to first token drops when the prompt prefix is served from the cache instead of recomputed.",
    "You are a helpful assistant. Answer the question briefly and precisely.",
    "What is the capital of France? Paris is the capital of France.",
    "def handler(request):\n    return {'status': 200, 'body': request.json()}\n",
    "for i in range(10):\n    print(i * i)\n",
    "SELECT id, name FROM users WHERE active = 1 ORDER BY name;",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 4096 65536.",
    "Punctuation and symbols: , . ; : ! ? ' \" ( ) [ ] { } < > / \\ | @ # $ % ^ & * - + = _ ~ `",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
    "user assistant system tool function message content role name",
    "Once upon a time there was a small model that lived inside a test suite and answered every prompt.",
]


def training_corpus() -> list[str]:
    """The fixed, built-in corpus the tokenizer is trained on."""
    lines: list[str] = []
    for i in range(20):
        for j, s in enumerate(_BASE_SENTENCES):
            lines.append(s if (i + j) % 3 else s.lower())
            lines.append(f"Request {i} for document {j}: {s}")
    return lines


def train_tokenizer():
    """The tiny model's tokenizer: byte-level BPE trained on the built-in corpus (needs only
    ``tokenizers``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok


def write_tokenizer_dir(outdir: Path, tokenizer_json: Path | None = None, **config) -> Path:
    """A model directory with only the tiny model's tokenizer files (tokenizer.json, from
    ``tokenizer_json`` or trained now, and a tokenizer_config.json whose keys ``config``
    overrides; None drops a key): what the router reads, without torch."""
    outdir.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        shutil.copy(tokenizer_json, outdir / "tokenizer.json")
    else:
        train_tokenizer().save(str(outdir / "tokenizer.json"))
    cfg = {
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "TokenizersBackend",
        **config,
    }
    (outdir / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if v is not None})
    )
    return outdir


def default_cache_root() -> Path:
    env = os.environ.get("STACKCTL_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stackctl-tests"


def _have_generation_deps() -> bool:
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the extra packages are not usable
        return False
    return True


def _write_model_here(outdir: Path) -> None:
    """Generate the model in this interpreter (needs torch, transformers, tokenizers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic tokenizer training

    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    outdir.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(outdir))
    # Keep the chat template inside tokenizer_config.json (newer transformers write it to
    # chat_template.jinja instead); one place, readable by every loader.
    cfg_path = outdir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    with contextlib.suppress(FileNotFoundError):
        (outdir / "chat_template.jinja").unlink()

    vocab = len(tok.get_vocab())
    bos_id = tok.token_to_id(BOS)
    eos_ids = [tok.token_to_id(EOT), tok.token_to_id(EOS)]
    pad_id = tok.token_to_id(PAD)

    # --- model: seeded random weights -------------------------------------------------------
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(str(outdir), safe_serialization=True)
    GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id
    ).save_pretrained(str(outdir))

    nparams = sum(p.numel() for p in model.parameters())
    (outdir / "stackctl-tiny-model.json").write_text(
        json.dumps(
            {"version": MODEL_VERSION, "seed": SEED, "parameters": nparams, "vocab_size": vocab},
            indent=2,
        )
        + "\n"
    )


def model_digest(model_dir: Path) -> str:
    """sha256 over the weight and tokenizer files (to check determinism)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        h.update(name.encode())
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()


def write_tiny_model(outdir: Path, python: str | os.PathLike | None = None) -> Path:
    """Write the tiny model into ``outdir`` (created).  Uses this interpreter if it has
    torch+transformers, else ``python`` (default: the vLLM test venv's python)."""
    outdir = Path(outdir).resolve()
    if python is None and _have_generation_deps():
        _write_model_here(outdir)
        return outdir
    if python is None:
        from tests.helpers.vllm_env import venv_python  # local import: avoids a cycle

        python = venv_python()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAYON_NUM_THREADS="1")
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--in-process", str(outdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"tiny model generation failed (rc={proc.returncode}) with {python}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return outdir


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the cached tiny model directory, generating it on first use.

    ``cache_dir`` defaults to ``$STACKCTL_TEST_CACHE`` or ``~/.cache/stackctl-tests``; the
    model lives in ``<cache_dir>/models/<MODEL_VERSION>``.  Safe against concurrent callers
    (file lock + atomic rename)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    models_dir = root / "models"
    final = models_dir / MODEL_VERSION
    marker = final / "stackctl-tiny-model.json"
    if marker.is_file():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{MODEL_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_VERSION}.", dir=models_dir))
        try:
            write_tiny_model(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--in-process":
        _write_model_here(Path(args[1]).resolve())
        return 0
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(write_tiny_model(Path(args[0])) if args else ensure_tiny_model())
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a plain script (the venv subprocess): make `tests.helpers` importable.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
