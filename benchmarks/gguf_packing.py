"""What `--quantization gguf` keeps in memory for a GGUF file, per tensor type, checked tensor by tensor: every
matrix's blocks are unpacked (the dequantization must equal `gguf.quants.dequantize` bit for bit), packed the way
the loader packs them (attention q/k/v and feed-forward gate/up fused, as the model fuses them; the token
embedding as the int8 table), and each packed layer's matmul on random activations is compared with the fp32
matmul of the dequantized weights (error relative to the output's largest value): with the activations as
given (`worst_matmul_error`: int8 activations per 32, as llama.cpp, plus the layout's fp16 scales) and with the
same int8-quantized activations (`worst_layout_error`: what the packing itself changes). Independent of the model's
architecture, so it runs on files whose architecture inferd does not load (yet).

    python benchmarks/gguf_packing.py --model gemma3-270m          # a catalogued model, or a .gguf path
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time

import gguf
import numpy as np
import torch

from inferd.loader import hub
from inferd.loader.gguf import RawTensor
from inferd.quant import gguf_blocks
from inferd.quant.apply import QuantConfig, packed_from_blocks
from inferd.quant.linear import module_bytes, quantize_activations_q8

FUSED = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "ffn_gate": "ffn_gate_up",
         "ffn_up": "ffn_gate_up"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rows", type=int, default=4, help="activation rows per matmul check")
    args = ap.parse_args()
    path = hub.resolve(args.model)
    r = gguf.GGUFReader(str(path))
    file_bytes = path.stat().st_size
    groups: dict[str, list] = collections.defaultdict(list)
    other_bytes = 0
    emb = None
    for t in r.tensors:
        if t.name == "token_embd.weight":
            emb = t
            continue
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
        if m is None or len(t.shape) != 2:
            other_bytes += int(t.n_bytes)  # norms etc.: kept as stored (fp32)
            continue
        groups[f"blk.{m[1]}.{FUSED.get(m[2], m[2])}"].append(t)
    stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])  # type mix → [file, memory] bytes
    worst, worst_layout, exact, t0 = 0.0, 0.0, True, time.time()
    g = torch.Generator().manual_seed(0)
    for ts in groups.values():
        rts = []
        for t in ts:
            rows, cols = int(t.shape[1]), int(t.shape[0])
            data = np.asarray(t.data)
            rt = RawTensor(t.tensor_type.name, data, rows, cols)
            if rt.type_name in gguf_blocks.QK_TYPES:
                want = gguf.quants.dequantize(data, t.tensor_type).reshape(rows, cols).astype(np.float32)
                got = gguf_blocks.dequantize(gguf_blocks.unpack_blocks(data, rt.type_name, rows, cols))
                exact &= bool(np.array_equal(got.view(np.uint32), want.view(np.uint32)))
            rts.append(rt)
        layer = packed_from_blocks(rts, None, QuantConfig("gguf"), torch.device("cpu"))
        mix = "+".join(sorted({t.tensor_type.name for t in ts}))
        stats[mix][0] += sum(int(t.n_bytes) for t in ts)
        if layer is None:  # kept dequantized (bf16)
            stats[mix][1] += sum(int(t.n_elements) for t in ts) * 2
            continue
        stats[mix][1] += module_bytes(layer)
        w = torch.cat([torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
            int(t.shape[1]), int(t.shape[0])).astype(np.float32)) for t in ts])
        x = torch.randn(args.rows, w.shape[1], generator=g)
        ref, y = x @ w.T, layer(x).float()
        worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
        worst_layout = max(worst_layout, float((y - quantize_activations_q8(x) @ w.T).abs().max() / ref.abs().max()))
    if emb is not None:  # the embedding (and tied lm_head) becomes one int8 table with a scale per 32
        n, k = int(emb.shape[1]), int(emb.shape[0])
        exact_int8 = emb.tensor_type.name in gguf_blocks.SIGNED_INT8
        stats[f"token_embd {emb.tensor_type.name}"] = [int(emb.n_bytes), n * k + n * (k // 32) * 2]
        if not exact_int8:
            print(f"note: token_embd is {emb.tensor_type.name}: requantized to int8 per 32")
    packed = sum(m for _, m in stats.values()) + other_bytes
    table = {mix: {"file_MB": round(f / 1e6, 2), "memory_MB": round(m / 1e6, 2), "ratio": round(m / f, 3)}
             for mix, (f, m) in sorted(stats.items())}
    print(json.dumps({"file": path.name, "file_MB": round(file_bytes / 1e6, 2), "weights_in_memory_MB":
                      round(packed / 1e6, 2), "ratio_to_file": round(packed / file_bytes, 3),
                      "dequantization_bit_identical": exact, "worst_matmul_error": round(worst, 5),
                      "worst_layout_error": round(worst_layout, 6),
                      "seconds": round(time.time() - t0, 1), "by_type": table}, indent=1))


if __name__ == "__main__":
    main()
