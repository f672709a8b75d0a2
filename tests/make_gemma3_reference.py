"""Writes tests/data/gemma3_270m_reference.json: Hugging Face transformers' fp32 outputs for the Gemma 3 270M
Q4_K_M file (`inferd pull gemma3-270m`), loaded with `gguf_file=` (transformers dequantizes every tensor to fp32).

    python -m tests.make_gemma3_reference [path/to/gemma-3-270m-q4_k_m.gguf]

Records, for a 16-token prompt, the logits of every position at the top-64 token ids of each row plus 512 fixed
random ids (the full rows are 16 × 262,144 floats), the greedy 32 tokens of three chat prompts (no EOS stop), and
the chat template's rendering of those prompts. test_gemma3.py compares inferd against it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

PROMPT = "The history of the printing press begins in fifteenth-century Mainz, where Johannes Gutenberg combined"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam"},
     {"role": "user", "content": "Now one about mountains.  "}],
]
OUT = Path(__file__).resolve().parent / "data" / "gemma3_270m_reference.json"


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inferd.loader import hub
    from inferd.loader.chat_templates import GEMMA3

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else hub.resolve("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.chat_template = GEMMA3  # the file carries none; inferd uses Gemma 3's own for gemma3 files
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    ids = tok(PROMPT)["input_ids"][:16]
    assert len(ids) == 16, len(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    rng = np.random.default_rng(0)
    rand = rng.choice(logits.shape[1], 512, replace=False)
    rows = []
    for row in logits:
        cols = np.unique(np.concatenate([np.argsort(-row)[:64], rand]))
        rows.append({"ids": cols.tolist(), "logits": row[cols].tolist(), "argmax": int(row.argmax())})
    greedy = []
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        pids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([pids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, min_new_tokens=32)
        greedy.append({"messages": chat, "chat_text": text, "prompt_ids": pids, "new_ids": out[0, len(pids):].tolist()})
    import transformers

    OUT.write_text(json.dumps({"transformers": transformers.__version__, "prompt_ids": ids, "rows": rows,
                               "greedy": greedy}))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
