"""Shared building blocks: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inferd.ops import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x, normalised; returns (normalised, new residual). One C call on CPU."""
        if not x.is_cuda:
            y = cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)  # updates residual in place
            if y is not None:
                return y, residual
        residual = residual + x
        return self(residual), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and not x.is_cuda:
            y = cpu_kernels.rms_norm(x, self.weight, self.eps)  # one call instead of ~8 small ops
            if y is not None:
                return y
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32 (as HF does), scale in the compute dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_positions: int = 2048) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor that scales cos/sin) for a scaling dict as transformers names them:
    `linear`, `llama3`, `yarn`, or `freq_factors` (llama.cpp's rope_freqs tensor: per-frequency divisors)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = scaling or {}
    kind = s.get("rope_type") or s.get("type")
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / float(s["factor"])
    elif kind == "llama3":
        factor, lo, hi = float(s["factor"]), float(s.get("low_freq_factor", 1)), float(s.get("high_freq_factor", 4))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(dim, theta, s, max_positions)
    elif kind == "freq_factors":
        factors = torch.tensor(s["factors"], dtype=torch.float64)
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope_freqs has {factors.numel()} factors for {inv_freq.numel()} frequencies")
        inv_freq = inv_freq / factors
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3, yarn)")
    return inv_freq.float(), attention_factor


def _yarn(dim: int, theta: float, s: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN (as transformers' _compute_yarn_parameters): interpolate the low frequencies, keep the high ones,
    a linear ramp between; cos/sin scaled by 0.1 ln(factor) + 1 unless the config gives the factor."""
    orig = float(s.get("original_max_position_embeddings") or max_positions)
    factor = float(s.get("factor") or max_positions / orig)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv.double(), float(attn)


class Rotary(nn.Module):
    """Rotate-half (GPT-NeoX / HF) rotary embedding on the first `dim` features of each head.

    `cos_sin(positions)` is computed once per forward; `apply` then costs a few fused ops per layer."""

    def __init__(self, dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        self.dim = dim
        inv_freq, attention_factor = rope_inv_freq(dim, theta, scaling, max_pos)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)  # (max_pos, dim / 2)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) → fp32 cos, sin of shape (T, 1, dim / 2)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, head_dim). The rotation runs in fp32 (bf16 rotation costs ~0.002 of logit cosine)."""
        half = self.dim // 2
        x1, x2 = x[..., :half].float(), x[..., half : self.dim].float()
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return rot if self.dim == x.shape[-1] else torch.cat([rot, x[..., self.dim :]], dim=-1)


class Linear(nn.Linear):
    """nn.Linear with a faster single-row bf16 path on CPU (decode of one sequence): the AVX512-BF16 GEMV
    kernel (~1.4× torch.mv), else torch.mv (~1.3× the GEMM path when weights stream from DRAM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x.dim() == 2 and x.dtype == torch.bfloat16 and not x.is_cuda:
            y = cpu_kernels.gemv_bf16(self.weight, x[0].contiguous()) if self.weight.is_contiguous() else None
            y = (torch.mv(self.weight, x[0]) if y is None else y).unsqueeze(0)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def logits_fp32(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (R, H) → float32 logits (R, V) accumulated in fp32 and never rounded to bf16: at |logit| ~25 a bf16
    step is 0.125, enough to turn a near-tie into an exact tie and change the greedy token."""
    if hidden.shape[0] == 0:  # a step whose chunks all end mid-prompt: no row needs logits
        return torch.empty(0, head.out_features, dtype=torch.float32, device=hidden.device)
    if hasattr(head, "logits"):  # a packed head (quant.linear.Int8Linear): its kernel with fp32 output
        return head.logits(hidden)
    if hidden.dtype == torch.float32:
        return head(hidden)
    w = head.weight
    if hidden.is_cuda:
        try:
            y = torch.mm(hidden, w.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=) for this device
            y = F.linear(hidden.float(), w.float())
    else:
        y = cpu_kernels.gemm_bf16_f32(hidden.contiguous(), w) if w.is_contiguous() else None
        if y is None:  # no vector kernels on this tier: fp32 matmul, a slice of the table at a time
            x = hidden.float()
            y = torch.cat([F.linear(x, w[i : i + 8192].float()) for i in range(0, w.shape[0], 8192)], dim=1)
    return y if head.bias is None else y + head.bias.float()


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused in one matmul; act is SiLU (SwiGLU) or tanh-GELU
    (GeGLU, Gemma)."""

    def __init__(self, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)
        gelu = self.act == "gelu_tanh"
        h = None if gu.is_cuda else (cpu_kernels.gelu_tanh_mul(gu) if gelu else cpu_kernels.silu_mul(gu))
        if h is None:
            gate, up = gu.chunk(2, dim=-1)
            h = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
        return self.down_proj(h)
