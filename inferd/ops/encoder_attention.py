"""Encoder self-attention over packed variable-length sequences: the C kernel (csrc/encoder_attention.c, every
sequence and head in one parallel region, fp32 math) when this tier has one, else per-sequence SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.ops.kernels import get_kernels


def _sdpa(qkv: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    N, _, heads, d = qkv.shape
    outs = []
    for start, n in spans:
        t = qkv[start : start + n].permute(1, 2, 0, 3).unsqueeze(1)  # (3, 1, heads, n, d)
        o = F.scaled_dot_product_attention(t[0], t[1], t[2])  # (1, heads, n, d)
        outs.append(o[0].transpose(0, 1).reshape(n, heads * d))
    return torch.cat(outs) if len(outs) > 1 else outs[0]  # (N, heads·d)


def encoder_attention(qkv: torch.Tensor, spans: list[tuple[int, int]], use_c: bool = True) -> torch.Tensor:
    """qkv (N, 3, heads, d) packed tokens, spans (start, length) per sequence → (N, heads·d); no mask."""
    N, _, heads, d = qkv.shape
    lib = get_kernels().lib
    if use_c and lib is not None and qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.bfloat16):
        qkv = qkv.contiguous()
        starts = torch.tensor([s for s, _ in spans], dtype=torch.int32)
        lens = torch.tensor([n for _, n in spans], dtype=torch.int32)
        out = torch.empty(N, heads * d, dtype=qkv.dtype)
        if lib.encoder_attention(qkv.data_ptr(), starts.data_ptr(), lens.data_ptr(), len(spans), heads, d,
                                 out.data_ptr(), d ** -0.5, int(qkv.dtype == torch.bfloat16)) == 0:
            return out
    return _sdpa(qkv, spans)
