"""The C kernels (csrc/) as torch-level functions: each takes CPU tensors, calls the kernel of this process's
tier through ctypes on raw tensor memory, and returns None / False when the tier or the shape has no kernel (the
caller then runs torch). Which tier runs is decided once by ops/kernels.py."""

from __future__ import annotations

import ctypes

import torch

from inferd.ops.kernels import get_kernels


def _lib() -> ctypes.CDLL | None:
    return get_kernels().lib


def available() -> bool:
    return _lib() is not None


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           ctx_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                           window: int | None = None) -> torch.Tensor:
    """q: (B, H, D) contiguous; kv_cache: (2, num_blocks, bs, Hkv, D); block_tables: (B, max_blocks) int64;
    ctx_lens: (B,) int32 → (B, H, D), written into `out` (contiguous, like q) when given. `window`: a sliding-window
    layer's window (the query at p sees keys p - window < j <= p; only their blocks are read)."""
    lib = _lib()
    assert lib is not None
    B, H, D = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    out = torch.empty_like(q) if out is None else out
    rc = lib.paged_decode_attention(
        q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(), ctx_lens.data_ptr(),
        out.data_ptr(), B, H, hkv, D, bs, block_tables.shape[1], scale, int(q.dtype == torch.bfloat16), window or 0)
    if rc != 0:
        raise ValueError(f"paged_decode_attention does not support H={H}, Hkv={hkv}, D={D}, block_size={bs}")
    return out


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
                            q_starts: torch.Tensor, q_lens: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                            window: int | None = None) -> bool:
    """Causal attention of C prefill chunks, written into `out` (T, H, D) at their rows. q: (T, H, D)
    contiguous; kv_cache: (2, num_blocks, bs, Hkv, D) holding every chunk's K/V; block_tables (C, max_blocks)
    int64; q_starts / q_lens / ctx_lens (C,) int32 (a chunk covers the last q_len positions of its ctx_len);
    `window`: a sliding-window layer's window (row at p sees keys p - window < j <= p).
    False when the tier (AVX-512 only) or the shape (D or block_size not a multiple of 16) has no kernel."""
    lib = _lib()
    if lib is None or not get_kernels().prefill_attention:
        return False
    _, _, bs, hkv, d = kv_cache.shape
    rc = lib.paged_prefill_attention(
        q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(), q_starts.data_ptr(),
        q_lens.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(), block_tables.shape[0], q.shape[1], hkv, d, bs,
        block_tables.shape[1], scale, int(q.dtype == torch.bfloat16), window or 0)
    if rc == -2:
        raise MemoryError("paged_prefill_attention: out of memory")
    return rc == 0


def gemv_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """w: (N, K) bf16 contiguous, x: (K,) bf16 contiguous → (N,) bf16; None when the tier has no vector
    kernels or the shape (K a multiple of 32) is not supported."""
    k = get_kernels()
    lib = k.lib
    if lib is None or not k.dense_gemm:
        return None
    y = torch.empty(w.shape[0], dtype=torch.bfloat16)
    if lib.gemv_bf16(w.data_ptr(), x.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1]) != 0:
        return None
    return y


def gemm_bf16_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) bf16 contiguous · w (N, K) bf16 contiguous ᵀ → (M, N) float32: fp32 accumulation written as
    fp32 (logits that sampling can trust). None when the tier has no vector kernels or K % 32 != 0."""
    k = get_kernels()
    lib = k.lib
    if lib is None or not k.dense_gemm or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 \
            or not (x.is_contiguous() and w.is_contiguous()):
        return None
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    if lib.gemm_bf16(x.data_ptr(), x.shape[0], w.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], 1) != 0:
        return None
    return y


_FLOAT_TYPES = (torch.float32, torch.bfloat16)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x: (rows, dim) with unit inner stride, w: (dim,) of x's dtype → a new (rows, dim) tensor; None if the
    kernels are unavailable or the input is not a CPU fp32/bf16 tensor."""
    lib = _lib()
    if lib is None or x.dim() != 2 or x.stride(1) != 1 or x.dtype not in _FLOAT_TYPES or x.is_cuda \
            or w.dtype != x.dtype:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    lib.rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0), eps,
                 int(x.dtype == torch.bfloat16))
    return out


def rope_inplace(x: torch.Tensor, heads: int, head_dim: int, rot_dim: int, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor) -> bool:
    """x: (T, >= heads*head_dim) view with unit inner stride (e.g. the q or k slice of a fused qkv output),
    rotated in place. cos/sin: fp32 (max_pos, rot_dim/2) contiguous; positions: (T,) int64."""
    lib = _lib()
    if lib is None or x.stride(1) != 1 or x.dtype not in _FLOAT_TYPES or x.is_cuda:
        return False
    lib.rope_inplace(x.data_ptr(), x.shape[0], heads, head_dim, x.stride(0), rot_dim, cos.data_ptr(),
                     sin.data_ptr(), positions.data_ptr(), int(x.dtype == torch.bfloat16))
    return True


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """residual += x in place, returns RMSNorm(residual) · w; all (rows, dim) contiguous CPU tensors of one
    dtype (fp32/bf16). None when unavailable (nothing is modified then)."""
    lib = _lib()
    if (lib is None or x.dtype not in _FLOAT_TYPES or x.is_cuda or residual.dtype != x.dtype or w.dtype != x.dtype
            or not (x.is_contiguous() and residual.is_contiguous()) or x.dim() != 2):
        return None
    out = torch.empty_like(x)
    lib.add_rms_norm(x.data_ptr(), residual.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                     int(x.dtype == torch.bfloat16))
    return out


def silu_mul(gu: torch.Tensor) -> torch.Tensor | None:
    """gu: (rows, 2·inter) contiguous → silu(gu[:, :inter]) · gu[:, inter:]; None when unavailable."""
    lib = _lib()
    if lib is None or gu.dtype not in _FLOAT_TYPES or gu.is_cuda or not gu.is_contiguous() or gu.dim() != 2:
        return None
    inter = gu.shape[1] // 2
    out = torch.empty(gu.shape[0], inter, dtype=gu.dtype)
    lib.silu_mul(gu.data_ptr(), out.data_ptr(), gu.shape[0], inter, int(gu.dtype == torch.bfloat16))
    return out


def gelu_tanh_mul(gu: torch.Tensor) -> torch.Tensor | None:
    """gu: (rows, 2·inter) contiguous → gelu_tanh(gu[:, :inter]) · gu[:, inter:] (Gemma's GeGLU); None when
    unavailable."""
    lib = _lib()
    if lib is None or gu.dtype not in _FLOAT_TYPES or gu.is_cuda or not gu.is_contiguous() or gu.dim() != 2:
        return None
    inter = gu.shape[1] // 2
    out = torch.empty(gu.shape[0], inter, dtype=gu.dtype)
    lib.gelu_tanh_mul(gu.data_ptr(), out.data_ptr(), gu.shape[0], inter, int(gu.dtype == torch.bfloat16))
    return out


def has_quant_gemm() -> bool:
    """The row-interleaved int4/int8 kernels exist on this tier (VNNI or AVX2 bodies)."""
    return get_kernels().quant_gemm


def q4_gemm(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor, n: int, symmetric: bool = False) -> torch.Tensor | None:
    """x (M, K) fp32/bf16 → x · Wᵀ (M, n) for 4-bit weights packed by quant.linear.pack_q4_rows16; activations
    are quantized to int8 per group of 32 inside. symmetric: w = d·(q − 8) with `dm` holding d alone
    (pack_q4_rows16(..., symmetric=True), the C `q4s_gemm`). None when the kernel does not apply."""
    lib = _lib()
    if lib is None or x.dtype not in _FLOAT_TYPES or not x.is_contiguous():
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    fn = lib.q4s_gemm if symmetric else lib.q4_gemm
    if fn(x.data_ptr(), x.shape[0], w.data_ptr(), dm.data_ptr(), y.data_ptr(), n, x.shape[1],
                        int(x.dtype == torch.bfloat16)) != 0:
        return None
    return y


def q8_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor | None:
    """x (M, K) fp32/bf16 → x · Wᵀ (M, n) for int8 weights in the q8rows16 layout (quant.linear) with fp16 scales
    per group of 32; activations quantized to int8 per group of 32 inside (llama.cpp's Q8_0 dot product)."""
    lib = _lib()
    if lib is None or x.dtype not in _FLOAT_TYPES or not x.is_contiguous():
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    if lib.q8_gemm(x.data_ptr(), x.shape[0], w.data_ptr(), scales.data_ptr(), y.data_ptr(), n,
                        x.shape[1], int(x.dtype == torch.bfloat16)) != 0:
        return None
    return y


def qk_gemm(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor, n: int, bits: int, sub: int) -> torch.Tensor | None:
    """x (M, K) fp32/bf16 → x · Wᵀ (M, n) for 4/5/6-bit weights with a scale and min per `sub` (16 or 32), packed
    by quant.linear.pack_qk_rows16; activations quantized to int8 per group of 32 inside. None when the kernel
    does not apply."""
    lib = _lib()
    if lib is None or x.dtype not in _FLOAT_TYPES or not x.is_contiguous():
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    if lib.qk_gemm(x.data_ptr(), x.shape[0], w.data_ptr(), dm.data_ptr(), y.data_ptr(), n, x.shape[1],
                   int(x.dtype == torch.bfloat16), bits, sub) != 0:
        return None
    return y


def qk_gemm_ks(x: torch.Tensor, w: torch.Tensor, scm: torch.Tensor, sb: torch.Tensor, n: int, bits: int,
               sub: int, symmetric: bool = False) -> torch.Tensor | None:
    """qk_gemm with K-quant scales as the file stores them: int8 multipliers `scm` and fp16 super-block factors
    `sb` (quant.linear.QKLinear); exact scales. symmetric (Q6_K, sub 16): `scm` and `sb` hold the scales alone,
    the mins being −2^(bits−1) times them (the C `qk_gemm_kss`). None when the kernel does not apply."""
    lib = _lib()
    if lib is None or x.dtype not in _FLOAT_TYPES or not x.is_contiguous():
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    fn = lib.qk_gemm_kss if symmetric else lib.qk_gemm_ks
    if fn(x.data_ptr(), x.shape[0], w.data_ptr(), scm.data_ptr(), sb.data_ptr(), y.data_ptr(), n,
                      x.shape[1], int(x.dtype == torch.bfloat16), bits, sub) != 0:
        return None
    return y


def qk_rows(ids: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, sb: torch.Tensor | None, n: int, k: int,
            bits: int, sub: int, mode: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Rows `ids` (int64, 1-D) of 4/5/6-bit weights packed by quant.linear.pack_qk_rows16, dequantized to `dtype`
    (fp32 or bf16), bit-identical to QKLinear.dequantized_rows_torch. mode 0: `scales` fp16 dm; 1: int8 K-quant
    multipliers with fp16 super-block factors `sb`; 2: symmetric K-quant (Q6_K). None when the kernel does not
    apply (no C library, another dtype, an id out of range: the caller's torch path then runs or raises)."""
    lib = _lib()
    if (lib is None or dtype not in _FLOAT_TYPES or ids.dtype != torch.int64 or ids.dim() != 1
            or (mode > 0 and sb is None) or any(t.device.type != "cpu" for t in (ids, w, scales))):
        return None
    ids = ids.contiguous()
    out = torch.empty(ids.shape[0], k, dtype=dtype)
    rc = lib.qk_rows(w.data_ptr(), scales.data_ptr(), 0 if sb is None else sb.data_ptr(), ids.data_ptr(),
                     ids.shape[0], n, k, bits, sub, mode, out.data_ptr(), int(dtype == torch.bfloat16))
    return out if rc == 0 else None


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x (B, V) float32 on the CPU, unit inner stride (a column slice of wider logits is fine) → int64 (B,), what
    x.argmax(dim=-1) returns (the first maximum; a row's first NaN where it has one). None when unavailable."""
    lib = _lib()
    if lib is None or x.dtype != torch.float32 or x.is_cuda or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] < 1:
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    return out if lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr()) == 0 else None
