"""W8A8 linear layers for encoders: int8 weights per output channel, int8 activations per row (token) with a zero
point, and SmoothQuant's per-input-channel scaling calibrated once at load.

    y = sx · sw · (xq·wqᵀ − zx · Σ_k wq) + b,   x · diag(1/s) ≈ sx (xq − zx),   W · diag(s) ≈ sw · wq

The s8·s8→s32 GEMM is torch._int_mm (oneDNN: VNNI on CPUs that have it, ~2x bf16 throughput); quantizing the
activations and the epilogue (scales, bias, optional GELU) are one C pass each (csrc/w8a8.c), or torch ops on
the `torch` tier. Activations are quantized in groups of `group` channels along K (each with its own scale and
zero point; one _int_mm per group) where one scale per row loses too much, e.g. the FFN down projection.

Why these choices (all-MiniLM-L6-v2, min cosine to fp32 over 120 texts): symmetric per-row int8 on every linear
0.9967; asymmetric 0.9984; + SmoothQuant α=0.5 0.9989; the FFN down projection is what remains — see
docs/benchmarks.md "Embeddings, int8" for the table and the chosen recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from inferd.ops.kernels import get_kernels

_ACTS = {None: 0, "gelu": 1, "gelu_tanh": 2}


@functools.cache
def int8_gemm_exact() -> bool:
    """Whether torch._int_mm computes s8·s8 exactly here. oneDNN's int8 GEMM on CPUs without VNNI (AVX-512
    without VNNI, AVX2; or capped by ONEDNN_MAX_CPU_ISA) multiplies with vpmaddubsw, whose int16 pair sums
    saturate: measured errors up to 85,908 on a 384-deep dot product (all-MiniLM-L6-v2's cosine to fp32 fell to
    0.9936). Checked once on a probe that saturates there; with weights within ±64 it is exact everywhere."""
    a = torch.full((32, 64), 127, dtype=torch.int8)  # every product 127 · 127: each u8·s8 pair sum overflows int16
    w = torch.full((64, 32), 127, dtype=torch.int8)
    want = a.long() @ w.long()
    try:
        return bool(torch.equal(torch._int_mm(a, w).long(), want))
    except (RuntimeError, NotImplementedError):  # a torch build without a CPU int8 GEMM: not exact, not usable
        return False


def weight_qmax() -> int:
    """The int8 weight range W8A8Linear uses: ±127 where the int8 GEMM is exact, else ±63 (no pair of u8·s8
    products can then exceed int16: 2 · 255 · 63 < 32767)."""
    return 127 if int8_gemm_exact() else 63


def quantize_rows(x: torch.Tensor, group: int, inv: torch.Tensor | None = None, keep: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (M, K) fp32/bf16 (times inv (K) when given) → xq (M, K) int8, sx (G, M) fp32, zx (G, M) int32 with
    x[:, g] · inv ≈ sx[g] (xq[:, g] − zx[g]) for each group g of `group` channels, and xo = x[:, keep] fp32
    (M, len(keep)), the outlier channels kept out of int8 (their inv is 0), or None."""
    M, K = x.shape
    G = K // group
    nkeep = 0 if keep is None else keep.numel()
    lib = get_kernels().lib
    if lib is not None and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu":
        x = x.contiguous()
        xq = torch.empty(M, K, dtype=torch.int8)
        sx = torch.empty(G, M, dtype=torch.float32)
        zx = torch.empty(G, M, dtype=torch.int32)
        xo = torch.empty(M, nkeep, dtype=torch.float32) if nkeep else None
        if lib.quantize_rows_asym(x.data_ptr(), M, K, group, int(x.dtype == torch.bfloat16),
                                  inv.data_ptr() if inv is not None else None, xq.data_ptr(), sx.data_ptr(),
                                  zx.data_ptr(), nkeep, keep.data_ptr() if nkeep else None,
                                  xo.data_ptr() if xo is not None else None) == 0:
            return xq, sx, zx, xo
    xo = x[:, keep.long()].float() if nkeep else None
    xf = x.float() * inv if inv is not None else x.float()
    xg = xf.view(M, G, group)
    lo = xg.amin(-1).clamp(max=0)
    hi = xg.amax(-1).clamp(min=0)
    s = (hi - lo) / 255
    inv_s = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    z = torch.where(s > 0, torch.round(-lo * inv_s) - 128, torch.zeros_like(s))
    q = (torch.round(xg * inv_s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(-128, 127)
    return q.to(torch.int8).view(M, K), s.t().contiguous(), z.t().to(torch.int32).contiguous(), xo


def dequantize_rows(acc: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, wsum: torch.Tensor, sw: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype, act: str | None, xo: torch.Tensor | None = None,
                    wo: torch.Tensor | None = None) -> torch.Tensor:
    """acc (G, M, N) int32 per group → y (M, N) = Σ_g sx[g] · sw · (acc[g] − zx[g] · wsum[g]) + xo · wo + bias,
    then act; xo (M, k) · wo (k, N) fp32 is the outlier channels' product (none when xo is None)."""
    G, M, N = acc.shape
    nkeep = 0 if xo is None else xo.shape[1]
    lib = get_kernels().lib
    if lib is not None and dtype in (torch.float32, torch.bfloat16) and acc.device.type == "cpu":
        y = torch.empty(M, N, dtype=dtype)
        if lib.dequant_rows(acc.data_ptr(), G, M, N, sx.data_ptr(), zx.data_ptr(), wsum.data_ptr(), sw.data_ptr(),
                            bias.data_ptr() if bias is not None else None, y.data_ptr(),
                            int(dtype == torch.bfloat16), _ACTS[act], nkeep, xo.data_ptr() if nkeep else None,
                            wo.data_ptr() if nkeep else None) == 0:
            return y
    corr = zx.unsqueeze(-1).double() * wsum.unsqueeze(1).double()  # (G, M, N): exact in fp64
    yf = ((acc.double() - corr) * sx.unsqueeze(-1).double()).sum(0).float() * sw
    if nkeep:
        yf = yf + xo @ wo
    if bias is not None:
        yf = yf + bias
    if act is not None:
        yf = torch.nn.functional.gelu(yf, approximate="tanh" if act == "gelu_tanh" else "none")
    return yf.to(dtype)


class W8A8Linear(nn.Module):
    """A Linear's int8 replacement (CPU). `act_absmax` (K): the calibrated max |x| per input channel, for
    SmoothQuant (None: no smoothing); `outliers`: how many of the channels with the largest calibrated |x| stay
    out of int8 (LLM.int8()-style decomposition: their product runs in fp32 inside the epilogue); `act`: a GELU
    fused into the epilogue (the caller then skips its own)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, act_absmax: torch.Tensor | None = None,
                 alpha: float = 0.5, group: int | None = None, act: str | None = None, outliers: int = 0):
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        self.group = group or K
        if K % self.group:
            raise ValueError(f"group {self.group} does not divide the input size {K}")
        if outliers and (act_absmax is None or not 0 < outliers < K):
            raise ValueError(f"outliers={outliers} needs act_absmax and fewer than {K} channels")
        self.out_features, self.in_features, self.act = N, K, act
        keep = None
        if outliers:  # the channels with the largest calibrated |x|: out of the int8 ranges and the smoothing
            keep = torch.topk(act_absmax.float(), outliers).indices.sort().values
            act_absmax = act_absmax.float().clone()
            act_absmax[keep] = 0
        self.register_buffer("keep", None if keep is None else keep.to(torch.int32), persistent=False)
        self.register_buffer("wo", None if keep is None else w[:, keep].t().contiguous(), persistent=False)  # (k, N)
        inv = None
        if act_absmax is not None:
            s = act_absmax.float().clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
            w = w * s
            inv = (1 / s)
            if keep is not None:
                w[:, keep] = 0  # the int8 part leaves these channels to the fp32 product: x·inv is 0 there
                inv[keep] = 0
            inv = inv.contiguous()
        qmax = weight_qmax()
        sw = (w.abs().amax(1) / qmax).clamp(min=1e-12)
        wq = torch.round(w / sw.unsqueeze(1)).clamp(-qmax, qmax).to(torch.int8)  # (N, K)
        self.register_buffer("wq_t", wq.t(), persistent=False)  # (K, N): a view of the (N, K) rows
        self.register_buffer("wsum", wq.view(N, K // self.group, self.group).sum(-1, dtype=torch.int32)
                             .t().contiguous(), persistent=False)  # (G, N)
        self.register_buffer("sw", sw.contiguous(), persistent=False)
        self.register_buffer("inv", inv, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (dequantized) weight, for inspection and tests."""
        w = self.wq_t.t().float() * self.sw.unsqueeze(1)
        w = w * self.inv if self.inv is not None else w
        if self.keep is not None:
            w[:, self.keep.long()] = self.wo.t()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, sx, zx, xo = quantize_rows(x2, self.group, self.inv, self.keep)
        G = self.in_features // self.group
        acc = torch.empty(G, x2.shape[0], self.out_features, dtype=torch.int32)
        for g in range(G):
            sl = slice(g * self.group, (g + 1) * self.group)
            torch._int_mm(xq[:, sl], self.wq_t[sl], out=acc[g])
        y = dequantize_rows(acc, sx, zx, self.wsum, self.sw, self.bias, x.dtype, self.act, xo, self.wo)
        return y.view(*shape[:-1], self.out_features)


def calibrate_absmax(model: nn.Module, run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of every nn.Linear in `model` while `run()` feeds it calibration data."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


def swap_linears(model: nn.Module, plan: dict[str, dict], fp32: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> int:
    """Replace each nn.Linear named in `plan` by a W8A8Linear built from its fp32 (weight, bias) in `fp32`, with the
    plan's keyword arguments (act_absmax, alpha, group, act). Returns how many were replaced."""
    for name, kwargs in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        w, b = fp32[name]
        setattr(parent, attr, W8A8Linear(w, b, **kwargs))
    return len(plan)
