"""A small K-quant encoder for tests (gguf-py dequantizes Q4_K/Q5_K/Q6_K but cannot quantize them): simple
min/max rounding, not llama.cpp's search, but valid blocks of the exact ggml layouts. `quantize` returns the raw
bytes (rows, bytes per row) that `gguf.quants.dequantize` reads."""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _scales12(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(nb, 8) 6-bit scales and mins → the (nb, 12) packing of Q4_K/Q5_K."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    return out


def _qk_asym(x: np.ndarray, bits: int) -> np.ndarray:
    nb = x.shape[0]
    nmax = (1 << bits) - 1
    sub = x.reshape(nb, 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    scale = (sub.max(-1) - lo) / nmax
    d = _f16(scale.max(-1) / 63)
    dmin = _f16((-lo).max(-1) / 63)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, np.round(scale / df[:, None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dminf[:, None] > 0, np.round(-lo / dminf[:, None]), 0).clip(0, 63).astype(np.uint8)
        es, em = df[:, None] * sc, dminf[:, None] * mn
        q = np.where(es[..., None] > 0, np.round((sub + em[..., None]) / es[..., None]), 0).clip(0, nmax)
    q = q.astype(np.uint8)  # (nb, 8, 32)
    parts = [d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), _scales12(sc, mn)]
    if bits == 5:
        parts.append(np.packbits((q >> 4).transpose(0, 2, 1), axis=-1, bitorder="little").reshape(nb, 32))
    qs = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)  # (nb, 4, 32): sub-blocks 2i (low), 2i + 1 (high)
    parts.append(qs.reshape(nb, 128))
    return np.concatenate(parts, axis=-1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb, 16, 16)
    scale = np.abs(sub).max(-1) / 31.5
    d = _f16(scale.max(-1) / 127)
    df = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, np.round(scale / df[:, None]), 0).clip(-128, 127).astype(np.int8)
        es = df[:, None] * sc
        q = np.where(es[..., None] != 0, np.round(sub / es[..., None]), 0).clip(-32, 31) + 32
    q = q.astype(np.uint8).reshape(nb, 2, 128)  # two halves of 128
    ql = (q[..., 0:64] & 15) | ((q[..., 64:128] & 15) << 4)  # (nb, 2, 64)
    h = (q >> 4).reshape(nb, 2, 4, 32)  # element 32s + l of a half: bits 2s, 2s + 1 of qh[l]
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)],
                          axis=-1)


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """(rows, K) float with K % 256 == 0 → raw blocks (rows, bytes per row) of Q4_K, Q5_K or Q6_K."""
    rows, k = w.shape
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, QK_K)
    blocks = {"Q4_K": lambda: _qk_asym(x, 4), "Q5_K": lambda: _qk_asym(x, 5), "Q6_K": lambda: _q6_k(x)}[type_name]()
    return np.ascontiguousarray(blocks).reshape(rows, -1)
