"""Seeded benchmark prompts: random token sequences of a given length, or prompts from a JSONL file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from inferd.bench.client import BenchRequest

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact model inference server token cache latency cost").split()


def load_tokenizer(spec: str | None):
    """The tokenizer of a local model (name, .gguf or HF dir), or None if it cannot be found locally."""
    if not spec:
        return None
    try:
        from inferd.loader import hub
        from inferd.loader.gguf import read_gguf
        from inferd.loader.tokenizer import Tokenizer

        path = hub.resolve(spec)
        if path.is_dir():
            return Tokenizer.from_hf_dir(path)
        return Tokenizer.from_gguf_metadata(read_gguf(path).metadata)
    except Exception:  # noqa: BLE001 - any failure: fall back to words
        return None


def _text_of_length(tokenizer, prefix: str, ids: list[int], n: int, rng: random.Random, lo: int, hi: int) -> str:
    """prefix + the text of random ids, adjusted so that it encodes back to n tokens: decoding random ids
    and encoding the text again merges and splits tokens (about +12% on SmolLM2's vocabulary), so without
    this a prompt of "40 tokens" is ~45 on the wire. A few rounds of trimming or extending the ids reach n
    (or the closest length seen)."""
    best, best_err = "", None
    for _ in range(16):
        text = prefix + tokenizer.decode(ids)
        got = len(tokenizer.encode(text, add_special_tokens=False))
        if best_err is None or abs(got - n) < best_err:
            best, best_err = text, abs(got - n)
        if got == n:
            break
        if got > n:
            ids = ids[: max(1, len(ids) - max(1, (got - n) // 2))]
        else:
            ids = ids + [rng.randint(lo, hi) for _ in range(max(1, (n - got) // 2))]
    return best


def random_requests(n: int, input_len: int, output_len: int, seed: int = 0, tokenizer=None,
                    token_ids: bool = False) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if tokenizer is not None:
            lo = 256 if tokenizer.vocab_size > 1000 else 3
            hi = min(tokenizer.vocab_size, 30000) - 1
            ids = [rng.randint(lo, hi) for _ in range(input_len)]
            if token_ids:
                out.append(BenchRequest(ids, input_len, output_len))
                continue
            out.append(BenchRequest(_text_of_length(tokenizer, f"{i}: ", ids, input_len, rng, lo, hi), input_len,
                                    output_len))
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(input_len))
            out.append(BenchRequest(f"{i}: {words}", input_len, output_len))
    return out


def jsonl_requests(path: str | Path, n: int, output_len: int, seed: int = 0, tokenizer=None) -> list[BenchRequest]:
    """Each line: {"prompt": str, "max_tokens"|"output_len": int (optional)}; sampled with replacement when
    the file has fewer than n lines, in a seeded order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    rng = random.Random(seed)
    picked = rng.sample(rows, n) if n <= len(rows) else [rng.choice(rows) for _ in range(n)]
    out = []
    for r in picked:
        prompt = r["prompt"]
        plen = len(tokenizer.encode(prompt)) if tokenizer is not None else len(prompt.split())
        out.append(BenchRequest(prompt, plen, int(r.get("max_tokens") or r.get("output_len") or output_len)))
    return out
