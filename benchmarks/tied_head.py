"""A tied lm_head's logits GEMV for one decode row: the file's K-quant table kept packed (QKLinear, `qkrows16`)
against the same table requantized to int8 per 32 (Int8Linear, what inferd did before), built from one GGUF and
timed alternately in the same run.

    python benchmarks/tied_head.py /tmp/kq1b/llama1b-random-Q4_K_M.gguf --reps 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from inferd.loader.gguf import GGUFTensors, config_from_gguf, read_gguf
from inferd.quant.apply import _int8_table, _tied_packed_head
from inferd.quant.linear import Int8Linear, module_bytes

EMB = "model.embed_tokens.weight"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    f = read_gguf(a.gguf)
    cfg = config_from_gguf(f)
    src = GGUFTensors(f, cfg)
    meta = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
    packed = _tied_packed_head(src, EMB, meta, torch.device("cpu"))
    if packed is None:
        raise SystemExit(f"{a.gguf}: its table ({src.type_name(EMB)}) has no packed head on this CPU")
    int8 = Int8Linear(*_int8_table(src, EMB), None)
    heads = {f"packed {src.type_name(EMB)}": packed, "int8 per 32": int8}
    x = torch.randn(1, cfg.hidden_size)
    times: dict[str, list[float]] = {k: [] for k in heads}
    for _ in range(a.reps):  # alternating, so both see the same host load
        for name, head in heads.items():
            t = time.perf_counter()
            head.logits(x)
            times[name].append(time.perf_counter() - t)
    print(f"# {a.gguf.name}: table {cfg.vocab_size} x {cfg.hidden_size}, {a.threads} thread(s), {a.reps} reps")
    print("| head | MB | best ms | median ms | GB/s (best) |\n|---|---|---|---|---|")
    for name, head in heads.items():
        mb = module_bytes(head) / 1e6
        best, med = min(times[name]) * 1e3, statistics.median(times[name]) * 1e3
        print(f"| {name} | {mb:.1f} | {best:.2f} | {med:.2f} | {mb / best:.1f} |")


if __name__ == "__main__":
    main()
