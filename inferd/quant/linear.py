"""Quantized linear and embedding layers computed with PyTorch's packed CPU kernels.

- Int8Linear: int8 weights with a scale per group of 32 (llama.cpp's Q8_0) in our row-interleaved layout where
  the tier has the quantized GEMMs (`q8rows16`: activations quantized to int8 as llama.cpp does), else one scale
  per output channel for `aten._weight_int8pack_mm` (bf16 activations).
- Int4Linear: 4-bit weights in groups of `group_size` along K with a scale and zero per group
  (w = (q - 8) · scale + zero). Three packed layouts, chosen when the layer is built, for the device its tensors
  are on:
  - `q4rows16` (a kernel tier with the quantized GEMMs: AVX512-VNNI or AVX2, see ops/kernels.py): our
    row-interleaved layout (ops/csrc/quant_gemm.c, `q4_gemm`): fp16 d and m per group of 32, activations
    quantized to int8 per group of 32 as llama.cpp does, 16 rows per vpdpbusd (two vpmaddubsw halves on AVX2);
    steps of more than 8 rows dequantize the layer to bf16 (a C kernel) and use a GEMM. ~2.5x faster than
    aten's int4 kernel for one row (it is compute-bound there: ~12 GB/s with the weights in cache).
  - `aten` (other CPUs): `aten._weight_int4pack_mm_for_cpu` after `_convert_weight_to_int4pack_for_cpu`.
  - `cuda`: the tinygemm kernel `aten._weight_int4pack_mm` after `_convert_weight_to_int4pack`.
- QKLinear: 4/5/6-bit weights with an fp16 scale and min per 16 or 32 along K (GGUF Q5_0/Q5_1/Q5_K/Q6_K), in
  our `qkrows16` layout for `qk_gemm` (the q4rows16 nibbles plus one or two bit planes) where the tier has the
  quantized GEMMs, else row-major bytes computed in torch.
- Int8Embedding: int8 rows with a scale per row (the lookup dequantizes only the rows it reads).

Packed kernels win when few rows are multiplied (decode of a few sequences: weights dominate the bytes); bf16
GEMM wins for large batches. `dense_from_rows` keeps a bf16 copy of the weight and uses it for steps with at
least that many rows (more memory, best of both); on CPUs with native bf16 that copy is prepacked for oneDNN
(ops/onednn.py) instead of kept as a plain tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.errors import ModelLoadError
from inferd.ops import cpu_kernels, onednn
from inferd.ops.kernels import get_kernels


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → int8 (N, K) and float32 scales, symmetric: one per output channel (N,), or with
    `group_size` one per group of K (N, K / group_size), fp16-representable (llama.cpp's Q8_0 for 32)."""
    w = w.float()
    if group_size is None:
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales
    n, k = w.shape
    wg = w.view(n, k // group_size, group_size)
    scales = (wg.abs().amax(dim=-1) / 127.0).clamp(min=2.0**-24).half().float()
    q = torch.round(wg / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(n, k)
    return q, scales


FILE_INT8_GROUP = 32  # `inferd quantize` files always hold int8 scales per group of 32: one format on every CPU


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) → the values our int4/int8 kernels multiply: x quantized to int8 per group of 32 along K (scale
    |x|max/127, round half to even) and scaled back, in fp32. The torch paths of grouped layers use it so every
    kernel tier computes the same model (a file's perplexity does not depend on the CPU)."""
    xg = x.float().reshape(x.shape[0], -1, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))  # the kernel multiplies by 127/amax
    return (torch.round(xg * inv).clamp(-128, 127) * (amax / 127)).view(x.shape)


def int8_group_size() -> int | None:
    """For in-memory quantization: scales per group of 32 where our int8 kernel runs (better quality: it also
    quantizes activations), else per channel (aten's int8 kernel takes one scale per channel)."""
    return 32 if cpu_kernels.has_quant_gemm() else None


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float → q int32 in [0, 15] (N, K), scale and zero (N, K / group) float32 (asymmetric, min/max).
    Scale and zero are fp16-representable (the precision the CPU kernel and `inferd quantize` files keep), so a
    model quantized in memory and one loaded from its quantized file compute with the same numbers."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    wg = w.float().view(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=2.0**-14).half().float()
    zero = (lo + 8.0 * scale).half().float()
    q = torch.round((wg - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8.0).clamp(0, 15).to(torch.int32).view(N, K)
    return q, scale, zero


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


def pack_q4_rows16(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q int (N, K) in [0, 15], scale/zero (N, K / group_size) → (uint8 weights, fp16 dm) in the layout of
    ops/csrc `q4_gemm`: bytes (N/16, K/32, 4, 16, 4), dm (N/16, K/32, 2, 16) with w = d·q + m. symmetric (zero
    all 0, w = d·(q − 8): GGUF Q4_0): dm holds d alone, (N/16, K/32, 1, 16), for `q4s_gemm` (the file's 18 bytes
    per 32 weights instead of 20)."""
    n, k = q.shape
    g = k // 32
    rep = group_size // 32
    d = scale.float().repeat_interleave(rep, dim=1)
    m = (zero.float() - 8.0 * scale.float()).repeat_interleave(rep, dim=1)
    qb = q.to(torch.uint8).reshape(n // 16, 16, g, 4, 2, 4)  # row block, row, group, chunk, low/high, byte
    packed = (qb[..., 0, :] | (qb[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).contiguous().view(-1)
    parts = [d] if symmetric else [d, m]
    dm = torch.stack([p.reshape(n // 16, 16, g) for p in parts], dim=2)  # (rb, row, 1 or 2, group)
    return packed, dm.permute(0, 3, 2, 1).to(torch.float16).contiguous()


def symmetric_dmin(kd: torch.Tensor, bits: int) -> torch.Tensor:
    """The super-block min factor of a symmetric K-quant (Q6_K: w = d·sc·(q − 2^(bits−1))): −2^(bits−1)·d."""
    return -float(1 << (bits - 1)) * kd


def q4_is_symmetric(zero: torch.Tensor) -> bool:
    """Whether int4 weights with these zeros are w = d·(q − 8) (every zero 0: GGUF Q4_0), so `q4s_gemm` computes
    them from d alone (the same fp16 numbers: −8·d is exact in fp16)."""
    return bool((zero == 0).all())


def int4_layout(q: torch.Tensor, group_size: int) -> str:
    if q.is_cuda:
        return "cuda"
    n, k = q.shape
    ok = n % 16 == 0 and k % 32 == 0 and group_size % 32 == 0
    return "q4rows16" if ok and cpu_kernels.has_quant_gemm() else "aten"


class _PackedLinear(nn.Module):
    """Shared forward: bf16 activations into the packed kernel (or the bf16 copy for big steps), bias, dtype."""

    dense: torch.Tensor | None
    bias: nn.Parameter | None
    dense_from_rows: int
    layout: str

    _dense_onednn: torch.Tensor | None = None
    _dense_pages: tuple | None = None  # (mapping, start, length) when `dense` is a view of the repack cache's file

    def _set_dense(self, dense: torch.Tensor | None, prepack: bool = True) -> None:
        """The bf16 copy for big steps: prepacked for oneDNN where possible and asked (then it is not a buffer:
        the packed copy, private to this process, replaces it), else a plain buffer (one mapped from the repack
        cache stays shared between processes)."""
        packed = onednn.prepack(dense) if dense is not None and prepack else None
        self._dense_onednn = packed
        self.register_buffer("dense", dense if packed is None else None)

    @property
    def has_dense(self) -> bool:
        return self.dense is not None or self._dense_onednn is not None

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self._dense_onednn is not None and x.shape[0] >= self.dense_from_rows:
            y = onednn.linear(x.to(torch.bfloat16), self._dense_onednn)
        elif self.dense is not None and x.shape[0] >= self.dense_from_rows:
            y = F.linear(x.to(torch.bfloat16), self.dense)
        elif self.layout in ("q4rows16", "q8rows16", "qkrows16", "rowmajor"):  # fp32 or bf16 activations
            y = self._packed(x.contiguous())
        else:
            y = self._packed(x.to(torch.bfloat16).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)


def int8_layout(q: torch.Tensor) -> str:
    if q.is_cuda:
        return "cuda"
    n, k = q.shape
    return "q8rows16" if n % 16 == 0 and k % 32 == 0 and cpu_kernels.has_quant_gemm() else "aten"


class Int8Linear(_PackedLinear):
    """int8 weights with scales per output channel (N,) or per group of 32 along K (N, K / 32).

    Layouts: `q8rows16` (a tier with the quantized GEMMs, N % 16 == 0, K % 32 == 0): q + 128 as unsigned bytes,
    rows interleaved by 16 as (N/16, K/4, 16, 4), fp16 scales (N/16, K/32, 16), for `q8_gemm` (activations
    quantized to int8 per group of 32: llama.cpp's Q8_0 dot product). `aten`: `aten._weight_int8pack_mm` on
    row-major weights (per-channel scales; grouped scales multiply a bf16 copy made per call). `cuda`: see
    `_int8_mm_cuda`."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 dense_from_rows: int = 0, layout: str | None = None):
        super().__init__()
        n, k = self.out_features, self.in_features = qweight.shape
        self.layout = layout or int8_layout(qweight)
        self.grouped = scales.dim() == 2 and scales.shape[1] > 1
        if self.grouped and scales.shape[1] * 32 != k:
            raise ValueError(f"grouped int8 scales must be per 32 along K, got {tuple(scales.shape)} for {n}×{k}")
        full = scales.float().view(n, -1)  # (N, 1) or (N, K / 32)
        q = qweight.contiguous()
        if self.layout == "q8rows16":
            # interleave (one copy), then q + 128 in place: q's two's-complement byte with the top bit flipped (no
            # int16 temporary: for a 49k-token embedding table that was 56 MB more at the load's peak)
            q = q.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(torch.uint8)
            q.bitwise_xor_(128)
            d = full.expand(n, k // 32).reshape(n // 16, 16, k // 32).permute(0, 2, 1)
            self.register_buffer("scales", d.to(torch.float16).contiguous())  # (N/16, K/32, 16)
        else:
            self.register_buffer("scales", (full if self.grouped else full[:, 0]).to(torch.bfloat16).contiguous())
        self.register_buffer("qweight", q)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self._set_dense(self.dequantized().bfloat16() if dense_from_rows else None)

    def rowmajor(self) -> torch.Tensor:
        """The int8 weights as (N, K) (a view, or a copy for the interleaved layout)."""
        if self.layout != "q8rows16":
            return self.qweight
        q = self.qweight.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)
        return (q.to(torch.int16) - 128).to(torch.int8)

    def scales_per_group(self) -> torch.Tensor:
        """float32 scales (N, K / 32) for grouped layers, (N, 1) per channel."""
        if self.layout == "q8rows16":
            return self.scales.float().permute(0, 2, 1).reshape(self.out_features, -1)
        return self.scales.float().view(self.out_features, -1)

    def dequantized(self) -> torch.Tensor:
        s = self.scales_per_group()
        return (self.rowmajor().float().view(self.out_features, s.shape[1], -1) * s.unsqueeze(-1)).view(
            self.out_features, self.in_features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """As the lm_head: float32 output from fp32 activations, never through the bf16 copy (sampling must not
        see bf16-rounded logits)."""
        x = x.float().contiguous()
        if self.layout == "q8rows16":
            return self._packed(x)
        if self.grouped:  # as the kernel: activations quantized per group of 32
            return F.linear(quantize_activations_q8(x), self.dequantized().to(x.device))
        if x.is_cuda:
            return F.linear(x, self.dequantized().to(x.device))
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales.float())

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "q8rows16":
            y = cpu_kernels.q8_gemm(x, self.qweight, self.scales, self.out_features)
            assert y is not None
            return y
        if self.grouped:  # aten's kernels take one scale per channel: the kernel's math in torch
            return F.linear(quantize_activations_q8(x), self.dequantized()).to(x.dtype)
        if x.is_cuda:
            return _int8_mm_cuda(x, self.qweight, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4Linear(_PackedLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, dense_from_rows: int = 0, layout: str | None = None):
        """q: int32 (N, K) in [0, 15]; scale, zero: (N, K / group_size). layout: see the module doc (default:
        the fastest one for q's device)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.layout = layout or int4_layout(q, group_size)
        self.symmetric = False  # q4rows16 with d alone (w = d·(q − 8)): see pack_q4_rows16
        if self.layout == "q4rows16":
            self.symmetric = q4_is_symmetric(zero)
            packed, dm = pack_q4_rows16(q, scale, zero, group_size, self.symmetric)
            if not torch.isfinite(dm).all():  # scales beyond fp16's range: use aten's bf16 scales
                self.layout, self.symmetric = "aten", False
        if self.layout == "q4rows16":
            self.register_buffer("packed", packed)
            self.register_buffer("dm", dm)
            self.scales_and_zeros = None
        else:
            self.register_buffer("packed", pack_int4(q))
            sz = torch.stack([scale.t(), zero.t()], dim=-1)  # (K / g, N, 2)
            self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self._set_dense(dequantize_int4(q, scale, zero, group_size).bfloat16() if dense_from_rows else None)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "q4rows16":
            y = cpu_kernels.q4_gemm(x, self.packed, self.dm, self.out_features, self.symmetric)
            assert y is not None
            return y
        if x.is_cuda:
            return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)


def qk_layout(n: int, k: int) -> str:
    kern = get_kernels()
    ok = n % 16 == 0 and k % 32 == 0 and k <= kern.max_quant_k
    return "qkrows16" if ok and kern.quant_gemm else "rowmajor"


def pack_qk_rows16(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int,
                   sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 (N, K) < 2^bits, d and m (N, K / sub) → (uint8 weights, fp16 dm) in the layout of ops/csrc `qk_gemm`:
    per (row block of 16, group of 32) the q4rows16 nibble bytes then (bits − 4) planes of 64 bytes (byte 4·row +
    b): at 5 bits, bit t = bit 4 of the weight at k = 4t + b; at 6 bits, plane p's bits 2u, 2u + 1 = bits 4-5 of
    the weight at k = 4(4p + u) + b (so the kernels place each with one shift and one masked or); dm
    (N/16, K/32, [d, m], 32/sub, 16)."""
    n, k = q.shape
    g, ns = k // 32, 32 // sub
    q = q.to(torch.uint8)
    qb = (q & 15).reshape(n // 16, 16, g, 4, 2, 4)  # row block, row, group, chunk, low/high, byte
    nib = (qb[..., 0, :] | (qb[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(n // 16, g, 256)
    parts = [nib]
    qt = q.reshape(n // 16, 16, g, 8, 4).to(torch.int32)  # (rb, row, group, t, byte): k = 4t + byte
    if bits == 5:
        weights = (1 << torch.arange(8, dtype=torch.int32)).view(1, 1, 1, 8, 1)
        planes = [(((qt >> 4) & 1) * weights).sum(3)]  # (rb, row, group, byte)
    elif bits == 6:
        hi2 = (qt >> 4) & 3
        shifts = (2 * torch.arange(4, dtype=torch.int32)).view(1, 1, 1, 4, 1)
        planes = [(hi2[:, :, :, 4 * p: 4 * p + 4] << shifts).sum(3) for p in range(2)]
    else:
        planes = []
    for plane in planes:
        parts.append(plane.to(torch.uint8).permute(0, 2, 1, 3).reshape(n // 16, g, 64))
    packed = torch.cat(parts, dim=2).contiguous().view(-1)
    dd = d.float().reshape(n // 16, 16, g, ns).permute(0, 2, 3, 1)
    mm = m.float().reshape(n // 16, 16, g, ns).permute(0, 2, 3, 1)
    return packed, torch.stack([dd, mm], dim=2).to(torch.float16).contiguous()


def _plane_high_bits(planes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """The high bits (q >> 4) from pack_qk_rows16's planes, each (..., 4 bytes) → (..., 8 vectors t, 4 bytes)."""
    if bits == 5:
        return (planes[0].unsqueeze(-2) >> torch.arange(8, dtype=planes[0].dtype).view(8, 1)) & 1
    shifts = (2 * torch.arange(4, dtype=planes[0].dtype)).view(4, 1)
    return torch.cat([(p.unsqueeze(-2) >> shifts) & 3 for p in planes], dim=-2)


def unpack_q_rows16(packed: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """The weights of pack_qk_rows16's layout back as uint8 q (N, K)."""
    g = k // 32
    b = packed.view(n // 16, g, 256 + 64 * (bits - 4))
    nib = b[..., :256].reshape(n // 16, g, 4, 16, 4)  # (rb, group, chunk, row, byte)
    q = torch.stack([nib & 15, nib >> 4], dim=3)  # (rb, g, chunk, lo/hi, row, byte): k = 8c + 4·hi + byte
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(n, k).clone()
    if bits > 4:
        planes = [b[..., 256 + 64 * p: 320 + 64 * p].reshape(n // 16, g, 16, 4).to(torch.int32)  # (rb, g, row, byte)
                  for p in range(bits - 4)]
        hi = _plane_high_bits(planes, bits)  # (rb, g, row, t, byte)
        q |= (hi.permute(0, 2, 1, 3, 4).reshape(n, k) << 4).to(torch.uint8)
    return q


def unpack_qk_rows16(packed: torch.Tensor, dm: torch.Tensor, n: int, k: int, bits: int,
                     sub: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_qk_rows16: q uint8 (N, K), d and m float32 (N, K / sub)."""
    g, ns = k // 32, 32 // sub
    dmf = dm.float().view(n // 16, g, 2, ns, 16).permute(2, 0, 4, 1, 3).reshape(2, n, g * ns)
    return unpack_q_rows16(packed, n, k, bits), dmf[0].contiguous(), dmf[1].contiguous()


def dequantize_qk(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, sub: int) -> torch.Tensor:
    n, k = q.shape
    return (q.float().view(n, k // sub, sub) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).view(n, k)


def _rows16(t: torch.Tensor, per: int) -> torch.Tensor:
    """(N, C) per-row values → (N/16, C/per, per, 16): row blocks of 16, rows last (the kernels' vector lanes)."""
    n, c = t.shape
    return t.reshape(n // 16, 16, c // per, per).permute(0, 2, 3, 1)


def _from_rows16(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _rows16 (after its last three dims are flattened per block)."""
    return t.permute(0, 3, 1, 2).reshape(n, -1)


class QKLinear(_PackedLinear):
    """4/5/6-bit weights with a scale and min per 16 or 32 along K, w = d·q + m (GGUF Q4_K/Q5_K/Q6_K, Q5_0, Q5_1
    and fused layers mixing them, see quant/gguf_blocks.py). Scales come one of two ways:
    - `kscales` (layers made only of K-quants): as the file stores them, int8 multipliers per sub-group (sc, mn)
      and fp16 factors per super-block of 256 (d, dmin): d = sc·d_sb, m = mn·dmin_sb, exact in fp32 — the file's
      own weights, 0.5-1 bit per weight of scales.
    - else fp16 d and m per sub-group (exact for Q5_0/Q5_1, whose scales are fp16), 1-2 bits per weight.

    Layouts: `qkrows16` (a tier with the quantized GEMMs, N % 16 == 0, K % 32 == 0) for `qk_gemm` / `qk_gemm_ks`
    (activations quantized to int8 per group of 32, as llama.cpp); `rowmajor` elsewhere: uint8 q (N, K) and the
    scales row-major, computed in torch with the same activation quantization (the slow reference path)."""

    dm: torch.Tensor | None
    scm: torch.Tensor | None
    sb: torch.Tensor | None

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int, sub: int,
                 bias: torch.Tensor | None = None, dense_from_rows: int = 0, layout: str | None = None,
                 kscales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if bits not in (4, 5, 6) or sub not in (16, 32):
            raise ValueError(f"QKLinear takes 4-6 bits with scales per 16 or 32, got {bits} bits per {sub}")
        self.out_features, self.in_features = n, k = q.shape
        self.bits, self.sub = bits, sub
        self.layout = layout or qk_layout(n, k)
        self.kmode = kscales is not None and k % 256 == 0
        ns = 32 // sub
        if self.layout == "qkrows16":
            packed, dm = pack_qk_rows16(q, d, m, bits, sub)
        else:
            packed, dm = q.to(torch.uint8).contiguous(), torch.stack([d.float(), m.float()]).to(torch.float16)
        scm = sb = None
        self.ksym = False  # symmetric K-quant (Q6_K) in qkrows16: sc and d alone, for qk_gemm_kss
        if self.kmode:
            assert kscales is not None
            sc, mn, kd, kdmin = kscales
            sbf = torch.stack([kd.float(), kdmin.float()]).to(torch.float16)  # (2, N, K / 256)
            if not torch.isfinite(sbf).all():
                raise ValueError("K-quant factors beyond fp16's range")
            # w = d·sc·(q − 2^(bits−1)): the mins are −2^(bits−1) times the scales, so they need not be stored
            # (the C kernels fold the offset for 6 bits, sub 16 only: Q6_K, the one symmetric K-quant GGUF has)
            self.ksym = self.layout == "qkrows16" and sub == 16 and bits == 6 \
                and torch.equal(sc.to(torch.int8), mn.to(torch.int8)) \
                and torch.equal(kdmin.float(), symmetric_dmin(kd.float(), bits))
            if self.ksym:  # (rb, g, s, 16) and (rb, K / 256, 16)
                scm = _rows16(sc.to(torch.int8), ns).contiguous().view(-1)
                sb = _rows16(sbf[0], 1).contiguous().view(-1)
            elif self.layout == "qkrows16":  # (rb, g, [sc, mn], s, 16) and (rb, K / 256, [d, dmin], 16)
                scm = torch.stack([_rows16(sc.to(torch.int8), ns), _rows16(mn.to(torch.int8), ns)], dim=2)
                sb = torch.stack([_rows16(sbf[0], 1), _rows16(sbf[1], 1)], dim=2)
                scm, sb = scm.contiguous().view(-1), sb.contiguous().view(-1)
            else:
                scm, sb = torch.stack([sc, mn]).to(torch.int8).contiguous(), sbf.contiguous()
            dm = None
        elif not torch.isfinite(dm).all():
            raise ValueError("scales beyond fp16's range")
        self.register_buffer("packed", packed)
        self.register_buffer("dm", dm)
        self.register_buffer("scm", scm)
        self.register_buffer("sb", sb)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self._set_dense(self.dequantized().bfloat16() if dense_from_rows else None)

    def unpacked(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q uint8 (N, K), d and m float32 (N, K / sub) as the kernel sees them; with `rows` (int64 indices into
        the N rows; in the qkrows16 layout row-block indices, each giving its 16 rows) only those rows."""
        n, k, sub = self.out_features, self.in_features, self.sub
        packed, dm, scm_all, sb_all = self.packed, self.dm, self.scm, self.sb
        if rows is not None:
            if self.layout == "qkrows16":  # every buffer is stored row block after row block
                packed, dm, scm_all, sb_all = (None if t is None else t.view(n // 16, -1)[rows].reshape(-1)
                                               for t in (packed, dm, scm_all, sb_all))
                n = 16 * rows.shape[0]
            else:  # q (N, K); scales (2, N, ·)
                packed = packed[rows]
                dm, scm_all, sb_all = (None if t is None else t[:, rows] for t in (dm, scm_all, sb_all))
                n = rows.shape[0]
        if not self.kmode:
            assert dm is not None
            if self.layout == "qkrows16":
                return unpack_qk_rows16(packed, dm, n, k, self.bits, sub)
            return packed, dm[0].float(), dm[1].float()
        assert scm_all is not None and sb_all is not None
        if self.layout == "qkrows16":
            ns, nk = 32 // sub, 1 if self.ksym else 2
            q = unpack_q_rows16(packed, n, k, self.bits)
            scm = scm_all.view(n // 16, k // 32, nk, ns, 16)
            sbv = sb_all.view(n // 16, k // 256, nk, 1, 16)
            sc, kd = _from_rows16(scm[:, :, 0], n), _from_rows16(sbv[:, :, 0], n)
            if self.ksym:
                mn, kdmin = sc, symmetric_dmin(kd.float(), self.bits)
            else:
                mn, kdmin = _from_rows16(scm[:, :, 1], n), _from_rows16(sbv[:, :, 1], n)
        else:
            q = packed
            sc, mn = scm_all[0], scm_all[1]
            kd, kdmin = sb_all[0], sb_all[1]
        rep = 256 // sub
        d = kd.float().repeat_interleave(rep, dim=1) * sc.float()
        m = kdmin.float().repeat_interleave(rep, dim=1) * mn.float()
        return q, d, m

    def dequantized(self) -> torch.Tensor:
        q, d, m = self.unpacked()
        return dequantize_qk(q, d, m, self.sub)

    def dequantized_rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows (len(ids), K) of the weight for int64 `ids` in `dtype`, unpacking only those rows (an embedding
        lookup in a tied lm_head's table): in the qkrows16 layout one C call (ops/csrc/qk_rows.c), bit-identical
        to dequantized_rows_torch, which runs where it does not apply."""
        if self.layout == "qkrows16":
            mode, scales = (0, self.dm) if not self.kmode else (2 if self.ksym else 1, self.scm)
            assert scales is not None
            y = cpu_kernels.qk_rows(ids, self.packed, scales, self.sb, self.out_features, self.in_features,
                                    self.bits, self.sub, mode, dtype)
            if y is not None:
                return y
        return self.dequantized_rows_torch(ids).to(dtype)

    def dequantized_rows_torch(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows (len(ids), K) of the weight for int64 `ids`, unpacking only those rows, in torch."""
        if self.layout != "qkrows16":
            q, d, m = self.unpacked(ids)
            return dequantize_qk(q, d, m, self.sub)
        # every qkrows16 buffer is (row block, ..., row of the block) with the row innermost: index the block and
        # the row first, so only the asked rows are unpacked (not the 16 rows of each block: 16x the work)
        n, k, sub, ns, g = self.out_features, self.in_features, self.sub, 32 // self.sub, self.in_features // 32
        R, rb, r = ids.shape[0], ids // 16, ids % 16
        sel = torch.arange(R)
        b = self.packed.view(n // 16, g, -1)[rb]  # (R, g, 256 + 64 · (bits - 4))
        nib = b[..., :256].reshape(R, g, 4, 16, 4)[sel, :, :, r]  # (R, g, chunk, byte)
        q = torch.stack([nib & 15, nib >> 4], dim=3).reshape(R, k)  # k = 32 group + 8 chunk + 4 hi + byte
        if self.bits > 4:  # high-bit planes: (R, g, byte) each → (R, g, t, byte), k = 32 group + 4 t + byte
            planes = [b[..., 256 + 64 * p : 320 + 64 * p].reshape(R, g, 16, 4)[sel, :, r] for p in range(self.bits - 4)]
            q = q | (_plane_high_bits(planes, self.bits).reshape(R, k) << 4)
        if self.kmode:
            assert self.scm is not None and self.sb is not None
            nk = 1 if self.ksym else 2  # symmetric: sc and d alone (mn = sc, dmin = −2^(bits−1)·d)
            scm = self.scm.view(n // 16, g, nk, ns, 16)[rb][sel, :, :, :, r].float()  # (R, g, [sc, mn], ns)
            sb = self.sb.view(n // 16, k // 256, nk, 1, 16)[rb][sel, :, :, 0, r].float()  # (R, K / 256, [d, dmin])
            rep = 256 // sub
            kd = sb[..., 0]
            kdmin = symmetric_dmin(kd, self.bits) if self.ksym else sb[..., 1]
            d = kd.repeat_interleave(rep, dim=1) * scm[:, :, 0].reshape(R, g * ns)
            m = kdmin.repeat_interleave(rep, dim=1) * scm[:, :, nk - 1].reshape(R, g * ns)
        else:
            assert self.dm is not None
            dm = self.dm.view(n // 16, g, 2, ns, 16)[rb][sel, :, :, :, r].float()
            d, m = dm[:, :, 0].reshape(R, g * ns), dm[:, :, 1].reshape(R, g * ns)
        return dequantize_qk(q, d, m, sub)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """As the lm_head: float32 output from fp32 activations, never through the bf16 copy (sampling must not
        see bf16-rounded logits)."""
        return self._packed(x.float().contiguous())

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "qkrows16":
            if self.kmode:
                y = cpu_kernels.qk_gemm_ks(x, self.packed, self.scm, self.sb, self.out_features, self.bits, self.sub,
                                           self.ksym)
            else:
                y = cpu_kernels.qk_gemm(x, self.packed, self.dm, self.out_features, self.bits, self.sub)
            if y is not None:
                return y
        return F.linear(quantize_activations_q8(x), self.dequantized().to(x.device)).to(x.dtype)


class ConcatLinear(nn.Module):
    """A fused linear kept as parts along N, each packed in its own type's layout: y = [part₀(x), part₁(x), ...].
    For a fused layer whose parts have different K-quant types (Q4_K_M's qkv with Q4_K q, k and a Q6_K v): one
    layer in the widest type would read and compute the 4-bit parts as 6-bit with scales per 16 (~1.6x their
    bytes); apart, each part keeps the file's bytes and its type's kernel. The fused C decoder runs the parts in
    one descriptor (kind 900 + parts, ops/csrc/fused_decode.c)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None  # each part holds its rows' bias

    @property
    def has_dense(self) -> bool:
        return any(getattr(p, "has_dense", False) for p in self.parts)

    @property
    def dense_from_rows(self) -> int:
        rows = [p.dense_from_rows for p in self.parts if getattr(p, "has_dense", False)]
        return min(rows) if rows else 0

    def dequantized(self) -> torch.Tensor:
        return torch.cat([p.dequantized() for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Int8Embedding(nn.Module):
    """int8 rows with a scale per row (V,) or per group of 32 (V, H / 32); or a tied lm_head's table
    (`Int8Embedding.tied(lm_head)`), read in its layout so the table is stored once."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 lm_head: Int8Linear | None = None):
        super().__init__()
        self.dtype = dtype
        self.lm_head = [lm_head]  # a list: not registered as a submodule (no double counting, no state dict)
        if lm_head is None:
            self.register_buffer("qweight", qweight.contiguous())
            self.register_buffer("scales", scales.float().view(qweight.shape[0], -1).contiguous())

    @staticmethod
    def tied(lm_head: Int8Linear, dtype: torch.dtype) -> Int8Embedding:
        return Int8Embedding(lm_head.qweight, lm_head.scales, dtype, lm_head)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.lm_head[0]
        if head is None:
            rows, scales = self.qweight[ids].float(), self.scales[ids]
        elif head.layout == "q8rows16":  # q + 128, rows interleaved by 16; fp16 scales (N/16, K/32, 16)
            rows = (head.qweight[ids // 16, :, ids % 16, :].reshape(*ids.shape, -1).to(torch.int16) - 128).float()
            scales = head.scales[ids // 16, :, ids % 16].float()
        else:
            rows, scales = head.qweight[ids].float(), head.scales.float().view(head.out_features, -1)[ids]
        k = rows.shape[-1]
        out = rows.view(*ids.shape, scales.shape[-1], -1) * scales.unsqueeze(-1)
        return out.view(*ids.shape, k).to(self.dtype)


class QKEmbedding(nn.Module):
    """The embedding of a tied lm_head kept packed as a QKLinear (the file's K-quant / Q5 table): the lookup
    dequantizes only the rows it reads, so the table is stored once, at its file size."""

    def __init__(self, lm_head: QKLinear, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.lm_head = [lm_head]  # a list: not registered as a submodule (no double counting, no state dict)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.lm_head[0]
        rows = head.dequantized_rows(ids.reshape(-1).long(), self.dtype)
        return rows.view(*ids.shape, head.in_features)


def tied_embedding(lm_head: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The embedding that reads a tied lm_head's packed table (Int8Linear or QKLinear)."""
    if isinstance(lm_head, QKLinear):
        return QKEmbedding(lm_head, dtype)
    assert isinstance(lm_head, Int8Linear)
    return Int8Embedding.tied(lm_head, dtype)


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
    for mod in m.modules():  # oneDNN-packed bf16 copies are not buffers
        packed = getattr(mod, "_dense_onednn", None)
        if packed is not None:
            total += onednn.nbytes(packed)
    return total
