"""Shared building blocks: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32 (as HF does), scale in the compute dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])  # type: ignore[index]
    elif kind == "llama3":
        s = scaling or {}
        factor, lo, hi = float(s["factor"]), float(s.get("low_freq_factor", 1)), float(s.get("high_freq_factor", 4))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    return inv_freq.float()


class Rotary(nn.Module):
    """Rotate-half (GPT-NeoX / HF) rotary embedding on the first `dim` features of each head."""

    def __init__(self, dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        self.dim = dim
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), rope_inv_freq(dim, theta, scaling))
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_pos, dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        """positions: (T,); each x: (T, heads, head_dim)."""
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, dim)
        sin = self.sin[positions].unsqueeze(1)
        out = []
        for x in xs:
            rot, rest = x[..., : self.dim], x[..., self.dim :]
            x1, x2 = rot.float().chunk(2, dim=-1)
            r = (rot.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
            out.append(torch.cat([r, rest], dim=-1) if rest.numel() else r)
        return out


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused in one matmul."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
