"""Router CPU per request for routing on vLLM's KV events with the model's own tokenizer:
growing chats up to ~20k-token prompts, each request's token ids, block keys and the match
against an engine's view, timed one by one in this process.

    python -m benchmarks.tokenize_cost                     # 8 chats x 10 rounds, to ~20k tokens
    python -m benchmarks.tokenize_cost --tokenizer-dir DIR  # another model's tokenizer files

Per request, side by side on the same chats: ``whole`` encodes the rendered chat from scratch
(the segment cache off), ``incremental`` with the segment cache (a round encodes only its new
messages), then ``block keys`` (content keys of the 16-token blocks) and ``match`` (the
leading blocks an engine's view holds, against a view that holds the previous round). Chats
are 8 users sharing a system prompt, each round adding ~2k tokens of user text; the answer
is short. CPU is ``time.process_time`` around each step (the router's thread; tokenizers may
use others for a batch, not for one prompt). The tokenizer is the tiny test model's unless
``--tokenizer-dir`` names another: a byte-level BPE like Llama 3's, but with a 2,048-token
vocabulary, so its tokens are shorter (more of them per character) than a real model's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from stackctl.kv_events import block_keys
from stackctl.model_tokenizer import ModelTokenizer
from stackctl.router.kv_index import KvEventView
from stackctl.router.policies import RouteRequest
from tests.helpers.kv_batches import prefix_stored

BLOCK = 16


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(n)
    )


def chats(users: int, rounds: int, words_per_round: int, seed: int = 0) -> list[list[dict]]:
    """Every request's messages, round by round (all users' round r before round r + 1)."""
    rng = random.Random(seed)
    system = {"role": "system", "content": words(rng, 300)}
    histories = [[system] for _ in range(users)]
    out = []
    for _ in range(rounds):
        for history in histories:
            history.append({"role": "user", "content": words(rng, words_per_round)})
            out.append(list(history))
            history.append({"role": "assistant", "content": words(rng, 40)})
    return out


def view_holding(ids: list[int]) -> KvEventView:
    view = KvEventView()
    n = len(ids) // BLOCK
    view.apply(0, prefix_stored(ids, n, BLOCK))
    return view


def cpu_ms(fn) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return (time.process_time() - start) * 1000, out


def measure(tokenizer_dir: Path, users: int, rounds: int, words_per_round: int) -> dict:
    whole = ModelTokenizer.from_dir(tokenizer_dir, cache_tokens=0)
    incremental = ModelTokenizer.from_dir(tokenizer_dir)
    rows = []
    previous: dict[int, list[int]] = {}
    requests = chats(users, rounds, words_per_round)
    for i, messages in enumerate(requests):
        body = {"messages": messages}
        user = i % users
        t_whole, ids = cpu_ms(lambda b=body: RouteRequest(b, {}, whole).token_ids)
        t_incr, ids_incr = cpu_ms(lambda b=body: RouteRequest(b, {}, incremental).token_ids)
        assert ids == ids_incr, "the segment cache changed the ids"
        t_keys, keys = cpu_ms(lambda ids=ids: block_keys(ids, BLOCK))
        view = view_holding(previous.get(user, []))
        t_match, _ = cpu_ms(lambda v=view, k=keys: v.match(k))
        previous[user] = ids
        rows.append(
            {
                "tokens": len(ids),
                "whole": t_whole,
                "incremental": t_incr,
                "keys": t_keys,
                "match": t_match,
            }  # fmt: skip
        )
    return {"rows": rows, "cache": incremental.segment_cache is not None}


def summary(rows: list[dict], low: int, high: int) -> dict:
    chosen = [r for r in rows if low <= r["tokens"] < high]
    if not chosen:
        return {}
    out = {"requests": len(chosen), "tokens": round(statistics.mean(r["tokens"] for r in chosen))}
    for key in ("whole", "incremental", "keys", "match"):
        out[key] = round(statistics.median(r[key] for r in chosen), 3)
    out["routing_ms"] = round(out["incremental"] + out["keys"] + out["match"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", type=Path, help="model dir (default: the tiny model)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--words-per-round", type=int, default=700, help="~2k tokens with the tiny tokenizer"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    tokenizer_dir = args.tokenizer_dir
    if tokenizer_dir is None:
        from tests.helpers.tiny_model import write_tokenizer_dir

        tokenizer_dir = write_tokenizer_dir(Path(tempfile.mkdtemp()) / "tiny")
    result = measure(tokenizer_dir, args.users, args.rounds, args.words_per_round)
    rows = result["rows"]
    print(f"tokenizer {tokenizer_dir}; segment cache {'on' if result['cache'] else 'not possible'}")
    print(
        "CPU ms per request, medians (whole = no segment cache; routing = incremental + keys + match)"
    )
    print(
        f"{'prompt tokens':>14} {'requests':>8} {'whole':>8} {'incremental':>11} {'keys':>7} {'match':>7} {'routing':>8}"
    )
    top = max(r["tokens"] for r in rows)
    edges = [0, 5000, 10000, 15000, 20000, top + 1]
    for low, high in zip(edges, edges[1:], strict=False):
        s = summary(rows, low, high)
        if s:
            print(f"{s['tokens']:>14} {s['requests']:>8} {s['whole']:>8} {s['incremental']:>11} "
                  f"{s['keys']:>7} {s['match']:>7} {s['routing_ms']:>8}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
