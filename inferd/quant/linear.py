"""Quantized linear and embedding layers computed with PyTorch's packed CPU kernels.

- Int8Linear: int8 weights with one scale per output channel; `aten._weight_int8pack_mm` (bf16 activations),
  and for a single row our AVX512-VNNI kernel (activations quantized to int8 as llama.cpp does; 2x faster).
- Int4Linear: 4-bit weights in groups of `group_size` along K with a scale and zero per group
  (w = (q - 8) · scale + zero); `aten._weight_int4pack_mm_for_cpu` after `_convert_weight_to_int4pack_for_cpu`,
  and on CUDA the tinygemm kernel `aten._weight_int4pack_mm` after `_convert_weight_to_int4pack` (the packed
  layout is device-specific: a layer is packed for the device its tensors are on when it is built).
- Int8Embedding: int8 rows with a scale per row (the lookup dequantizes only the rows it reads).

Packed kernels win when few rows are multiplied (decode of a few sequences: weights dominate the bytes); bf16
GEMM wins for large batches. `dense_from_rows` keeps a bf16 copy of the weight and uses it for steps with at
least that many rows (more memory, best of both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.errors import ModelLoadError
from inferd.ops import cpu_kernels


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → int8 (N, K), scales (N,) float32; symmetric per output channel."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float → q int32 in [0, 15] (N, K), scale and zero (N, K / group) float32 (asymmetric, min/max)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    wg = w.float().view(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.int32).view(N, K)
    return q, scale, lo + 8.0 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    qg = q.view(N, K // group_size, group_size).float()
    return ((qg - 8.0) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(N, K)


_CUDA_INT8PACK: bool | None = None  # does this torch build have aten._weight_int8pack_mm for CUDA?


def _int8_mm_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 on CUDA: aten's kernel where this torch build has one, else int8 → bf16 in the matmul."""
    global _CUDA_INT8PACK
    if _CUDA_INT8PACK is not False:
        try:
            y = torch.ops.aten._weight_int8pack_mm(x, qweight, scales)
            _CUDA_INT8PACK = True
            return y
        except (RuntimeError, NotImplementedError):
            _CUDA_INT8PACK = False
    return F.linear(x, qweight.to(x.dtype)) * scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int32 (N, K) in [0, 15] → aten's packed int4 layout for q's device."""
    if not q.is_cuda:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    n, k = q.shape
    tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    if tiles is None or n % 8:
        raise ModelLoadError(f"the CUDA int4 kernel needs out_features % 8 == 0 and in_features % 32 == 0, got {n}×{k}")
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    return torch._convert_weight_to_int4pack(u8, tiles)


class _PackedLinear(nn.Module):
    """Shared forward: bf16 activations into the packed kernel (or the bf16 copy for big steps), bias, dtype."""

    dense: torch.Tensor | None
    bias: nn.Parameter | None
    dense_from_rows: int

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.bfloat16)
        if self.dense is not None and x.shape[0] >= self.dense_from_rows:
            y = F.linear(x, self.dense)
        else:
            y = self._packed(x.contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)


class Int8Linear(_PackedLinear):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 dense_from_rows: int = 0):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        # for the single-row VNNI kernel: fp32 scales and row sums (4 + 4 bytes per output channel)
        self.register_buffer("scales_f32", scales.float().contiguous())
        self.register_buffer("row_sums", self.qweight.sum(dim=1, dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self.register_buffer("dense", (self.qweight.float() * self.scales.float()[:, None]).bfloat16()
                             if dense_from_rows else None)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return _int8_mm_cuda(x, self.qweight, self.scales)
        if x.shape[0] == 1:  # decode of one sequence: 2x faster than aten's int8 kernel
            y = cpu_kernels.qgemv_int8_vnni(x, self.qweight, self.scales_f32, self.row_sums)
            if y is not None:
                return y
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4Linear(_PackedLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, dense_from_rows: int = 0):
        """q: int32 (N, K) in [0, 15]; scale, zero: (N, K / group_size)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("packed", pack_int4(q))
        sz = torch.stack([scale.t(), zero.t()], dim=-1)  # (K / g, N, 2)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self.register_buffer("dense", dequantize_int4(q, scale, zero, group_size).bfloat16()
                             if dense_from_rows else None)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)


class Int8Embedding(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].float() * self.scales[ids].unsqueeze(-1)).to(self.dtype)


def module_bytes(m: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied weights are shared)."""
    seen: set[int] = set()
    total = 0
    for t in [*m.parameters(), *m.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total
