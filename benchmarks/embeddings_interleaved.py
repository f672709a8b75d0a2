"""Embeddings A/B on a busy host: each batch goes through sentence-transformers (fp32), inferd `-q auto` and
inferd `-q none` in turn, in ONE process, so load swings hit all three alike (benchmarks/embeddings.py runs them
one after another). Needs a Python with both inferd's dependencies and sentence-transformers:

    M=$(python -c 'from inferd.loader.hub import resolve; print(resolve("all-minilm-l6-v2"))')  # project venv
    PYTHONPATH=. /tmp/peers/bin/python benchmarks/embeddings_interleaved.py --model $M --num-texts 128
    INFERD_ISA=avx2_fma ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=. ...  # AVX2-only CPU
    INFERD_ISA=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE PYTHONPATH=. ...  # AVX-512 without VNNI/BF16, both sides
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-texts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="all-minilm-l6-v2", help="catalogue name or the model directory")
    ap.add_argument("--ab-outliers", action="store_true",
                    help="add an arm: -q auto without the fp32 outlier channels (OUTLIER_CHANNELS = 0)")
    args = ap.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from embeddings import make_texts

    from inferd import Embedder
    from inferd.hardware import machine_info
    from inferd.loader.hub import resolve

    path = str(resolve(args.model))
    texts, bs = make_texts(args.num_texts), args.batch_size
    st = SentenceTransformer(path, device="cpu")
    runs = {"sentence-transformers": lambda b: st.encode(b, batch_size=bs),
            "inferd -q auto": Embedder(path, cache_size=0).embed,
            "inferd -q none": Embedder(path, cache_size=0, quantization="none").embed}
    if args.ab_outliers:
        from inferd import embedder

        keep, embedder.OUTLIER_CHANNELS = embedder.OUTLIER_CHANNELS, 0
        runs["inferd -q auto, no outlier channels"] = Embedder(path, cache_size=0).embed
        embedder.OUTLIER_CHANNELS = keep
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine_info()}, torch threads {torch.get_num_threads()}")
    for f in runs.values():
        f(texts[:bs])
    tot = dict.fromkeys(runs, 0.0)
    for i in range(0, len(texts), bs):
        for k, f in runs.items():
            t = time.perf_counter()
            f(texts[i : i + bs])
            tot[k] += time.perf_counter() - t
    r = {k: len(texts) / v for k, v in tot.items()}
    st_rate = r["sentence-transformers"]
    for k, v in r.items():
        print(f"{k}: {v:.1f} texts/s ({v / st_rate:.2f}x sentence-transformers)")


if __name__ == "__main__":
    main()
