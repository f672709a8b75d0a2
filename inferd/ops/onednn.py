"""bf16 GEMM through oneDNN with the weight reordered once, at load, into oneDNN's blocked layout.

`F.linear` on a plain (N, K) bf16 weight makes oneDNN repack the weight into its AMX/AVX-512 tile layout on
every call; for prefill-sized steps that repacking is a large part of the call (SmolLM2's four linear shapes,
2 threads, Sapphire Rapids: 1.3–1.4x faster prepacked at 16–128 rows, 1.2x at 256, even at 512). The packed
weight is an opaque mkldnn tensor: no storage, no state dict, no device moves — hold it beside the module's
real tensors, never instead of what must be saved.
"""

from __future__ import annotations

import torch

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
    """x (..., K) bf16 @ packed (N, K)ᵀ (+ bias) → (..., N) bf16."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def nbytes(packed: torch.Tensor) -> int:
    return packed.numel() * packed.element_size()
