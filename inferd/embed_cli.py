"""`inferd embed`: texts → vectors, printed as JSON lines or written to .npy / .jsonl."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inferd.errors import InferdError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed texts with an encoder model")
    p.add_argument("texts", nargs="*", help="texts to embed (or --file)")
    p.add_argument("--model", "-m", default="all-minilm-l6-v2", help="known name or a sentence-transformers dir")
    p.add_argument("--file", default=None, help="text file, one input per line")
    p.add_argument("--output", "-o", default=None, help="write vectors to a .npy or .jsonl file")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", "-q", default="auto", choices=["auto", "none", "int8"],
                   help="int8: W8A8 linears (auto: int8 on CPU with the C kernels, none on GPU)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per progress step")
    p.add_argument("--no-truncate", action="store_true", help="fail on inputs over the model's max length")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from inferd.embedder import Embedder

    texts = list(args.texts)
    if args.file:
        try:
            texts += [ln for ln in Path(args.file).read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise InferdError(f"cannot read {args.file}: {exc}") from exc
    if not texts:
        raise InferdError("nothing to embed: pass texts or --file")
    emb = Embedder(args.model, dtype=args.dtype, cache_size=0, quantization=args.quantization)
    chunks = []
    with tqdm(total=len(texts), desc="embed", file=sys.stderr, disable=len(texts) < args.batch_size) as bar:
        for i in range(0, len(texts), args.batch_size):
            part = texts[i : i + args.batch_size]
            chunks.append(emb.embed(part, truncate=not args.no_truncate))
            bar.update(len(part))
    vecs = np.concatenate(chunks)
    if args.output and args.output.endswith(".npy"):
        np.save(args.output, vecs)
    elif args.output:
        with open(args.output, "w") as f:
            for t, v in zip(texts, vecs):
                f.write(json.dumps({"text": t, "embedding": v.tolist()}) + "\n")
    else:
        for t, v in zip(texts, vecs):
            print(json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]}))
    if args.output:
        print(f"wrote {len(vecs)} vectors of {vecs.shape[1]} to {args.output}", file=sys.stderr)
    return 0
