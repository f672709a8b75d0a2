"""bf16 (and fp32) GEMM through oneDNN with the weight reordered once, at load, into oneDNN's blocked layout.

`F.linear` on a plain (N, K) bf16 weight makes oneDNN repack the weight into its AMX/AVX-512 tile layout on
every call; for prefill-sized steps that repacking is a large part of the call (SmolLM2's four linear shapes,
2 threads, Sapphire Rapids: 1.3–1.4x faster prepacked at 16–128 rows, 1.2x at 256, even at 512). The packed
weight is an opaque mkldnn tensor: no storage, no state dict, no device moves — hold it beside the module's
real tensors, never instead of what must be saved.
"""

from __future__ import annotations

import torch
from torch import nn

_OK: bool | None = None


def available() -> bool:
    """oneDNN is built in and this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    global _OK
    if _OK is None:
        try:
            _OK = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _OK = False
    return _OK


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """(N, K) bf16 CPU weight → oneDNN's packed copy, or None where that is not possible here."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2 or not available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except (RuntimeError, AttributeError):
        return None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ packed (N, K)ᵀ (+ bias) → (..., N), in the packed weight's dtype (bf16 or fp32)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack_f32(weight: torch.Tensor) -> torch.Tensor | None:
    """(N, K) fp32 CPU weight → oneDNN's packed copy (any CPU: no bf16 needed), or None where not possible.

    Why: torch's fp32 `F.linear` runs MKL's sgemm, which on the AMD Zen 4 here reaches 13–16 GFLOP/s on one thread
    for an encoder's FFN (4000 × 1536 → 384); oneDNN prepacked 56 (3.5x), its int8 GEMM without VNNI 57."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except (RuntimeError, AttributeError):
        return None


_GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # our act names → oneDNN's GELU algorithm


class PackedLinear(nn.Module):
    """An fp32 nn.Linear whose weight is prepacked for oneDNN once (`from_linear` returns None where it cannot
    be), optionally with a GELU fused as oneDNN post-op (`act`: "gelu" erf or "gelu_tanh"; the caller then skips
    its own: an unfused fp32 GELU was 13% of an encoder batch). The packed weight is opaque: inference only."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int,
                 act: str | None = None):
        super().__init__()
        if act is not None and act not in _GELU:
            raise ValueError(f"act {act!r}: choose one of {', '.join(_GELU)}")
        self.packed = packed
        self.register_buffer("bias", bias, persistent=False)
        self.in_features, self.out_features, self.act = in_features, out_features, act

    @staticmethod
    def from_linear(lin: nn.Linear, act: str | None = None) -> PackedLinear | None:
        packed = prepack_f32(lin.weight.detach())
        if packed is None:
            return None
        bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
        return PackedLinear(packed, bias, lin.in_features, lin.out_features, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return linear(x, self.packed, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], _GELU[self.act])


def nbytes(packed: torch.Tensor) -> int:
    return packed.numel() * packed.element_size()
