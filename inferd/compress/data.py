"""Text for pruning and distillation: the calibration and held-out texts shipped in the package, user files,
or text the teacher generates itself from seeded prompts (no data set download)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from inferd.errors import InferdError
from inferd.loader.tokenizer import Tokenizer

DATA = Path(__file__).with_name("data")
CALIBRATION = DATA / "calibration.txt"  # calibration for pruning, default training text for distillation
HELDOUT = DATA / "heldout.txt"  # never used for training: the perplexity reported at the end
PROMPTS = DATA / "prompts.txt"  # one instruction a line, the seeds of `--generate`


def read_texts(paths: list[str | Path]) -> list[str]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InferdError(f"data file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InferdError(f"cannot read {p}: {exc}") from exc
        if not text.strip():
            raise InferdError(f"data file {p} is empty")
        out.append(text)
    return out


def tokenize_docs(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


def pack(docs: list[list[int]], seq_len: int, sep: int | None) -> torch.Tensor:
    """Documents joined (separated by `sep`, e.g. EOS) and cut into (N, seq_len) rows; a short tail is dropped."""
    flat: list[int] = []
    for d in docs:
        flat.extend(d)
        if sep is not None:
            flat.append(sep)
    n = len(flat) // seq_len
    if n == 0:
        raise InferdError(f"the training text has {len(flat)} tokens, fewer than one sequence of {seq_len}; "
                          "give more text or a smaller --seq-len")
    return torch.tensor(flat[:n * seq_len]).view(n, seq_len)


def generate_docs(teacher_spec: str, n: int, max_tokens: int, seed: int, temperature: float = 0.8) -> list[list[int]]:
    """`n` chat transcripts (prompt + teacher's sampled reply, as token ids) from the shipped prompts, each
    request seeded (seed + i) so the data is reproducible. Runs on the inference engine (batched, packed
    weights), which is much faster than the training forward."""
    from inferd import LLM, SamplingParams

    prompts = [p.strip() for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    rng = random.Random(seed)
    styles = ["", " Answer in detail.", " Be brief.", " Use a list.", " Explain step by step."]
    llm = LLM(teacher_spec, max_num_seqs=32, max_model_len=max(1024, max_tokens + 128))
    chats = [[{"role": "user", "content": rng.choice(prompts) + rng.choice(styles)}] for _ in range(n)]
    ids = [llm.tokenizer.encode_chat(c) for c in chats]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed + i)
              for i in range(n)]
    outs = llm.generate(ids, params, use_tqdm=True)
    return [p + list(o.outputs[0].token_ids) for p, o in zip(ids, outs)]
