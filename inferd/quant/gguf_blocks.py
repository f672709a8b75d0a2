"""GGUF quantized blocks unpacked to integer weights and per-group scales, for exact repacking into our layouts.

Every packable type becomes `Blocks(q, d, m, bits, sub)`: unsigned q (N, K) in [0, 2^bits), and fp32 d, m per
`sub` consecutive weights along K with w = d·q + m:

  Q4_0  w = d·(q − 8)            bits 4, sub 32, m = −8d          Q4_1  w = d·q + m      bits 4, sub 32
  Q5_0  w = d·(q − 16)           bits 5, sub 32, m = −16d         Q5_1  w = d·q + m      bits 5, sub 32
  Q4_K  w = (d·sc)·q − dmin·mn   bits 4, sub 32 (8 per super-block of 256; 6-bit sc, mn; fp16 d, dmin)
  Q5_K  as Q4_K with a fifth bit                                  bits 5, sub 32
  Q6_K  w = (d·sc)·(q − 32)      bits 6, sub 16 (16 per super-block; int8 sc; fp16 d)
  Q8_0  w = d·q (signed int8)    see `unpack_q8_0`

`dequantize` rebuilds the weights with the same float operations as `gguf.quants.dequantize` (bit-identical;
tested), so these are the file's own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK = 32
QK_K = 256
INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}  # → Int4Linear (q4rows16)
K_TYPES = {"Q4_K", "Q5_K", "Q6_K"}  # super-blocks of 256: scales kept as stored (QKLinear kscales)
QK_TYPES = {"Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}  # unpacked by `unpack_blocks`
SIGNED_INT8 = {"Q8_0", "Q4_0", "Q5_0"}  # w = d·(signed int) with one scale per 32: exactly int8 group-32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}


@dataclass
class Blocks:
    q: np.ndarray  # uint8 (N, K)
    d: np.ndarray  # float32 (N, K / sub)
    m: np.ndarray  # float32 (N, K / sub)
    bits: int
    sub: int
    offset: int = 0  # symmetric types: w = d·(q − offset) (m = −offset·d); 0: w = d·q + m
    # K-quants only, the scales as stored: d = ksc · kd and m = kmn · kdmin (per sub-group; kd, kdmin per 256),
    # exact in fp32 (int8 multipliers, fp16 factors)
    kscales: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # ksc, kmn int8; kd, kdmin fp32


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed 6-bit scales and mins of a Q4_K/Q5_K super-block → two (..., 8) uint8 arrays."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def unpack_blocks(raw: np.ndarray, type_name: str, n: int, k: int) -> Blocks:
    """raw: uint8 (n, bytes per row) of one of QK_TYPES → Blocks."""
    per = QK_K if type_name.endswith("_K") else QK
    nb = k // per
    b = np.ascontiguousarray(raw).reshape(n, nb, BLOCK_BYTES[type_name])
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        five = type_name.startswith("Q5")
        d = _f16(b[..., 0:2])
        asym = type_name.endswith("_1")
        at = 4 if asym else 2
        if five:
            qh = np.ascontiguousarray(b[..., at:at + 4]).view(np.uint32)  # (n, nb, 1)
            hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, nb, 32)
            at += 4
        qs = b[..., at:at + 16]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles first
        if five:
            q = q | (hi << 4)
        if asym:
            m = _f16(b[..., 2:4])
            return Blocks(q.reshape(n, k), d, m, 5 if five else 4, 32)
        off = 16 if five else 8
        return Blocks(q.reshape(n, k), d, -np.float32(off) * d, 5 if five else 4, 32, off)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scale_min(b[..., 4:16])
        ds = (d[..., None] * sc.astype(np.float32)).reshape(n, nb * 8)
        dm = (dmin[..., None] * mn.astype(np.float32)).reshape(n, nb * 8)
        if type_name == "Q4_K":
            qs = b[..., 16:144].reshape(n, nb, 4, 1, 32)
            q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
        else:
            qh = b[..., 16:48].reshape(n, nb, 1, 32)
            qs = b[..., 48:176].reshape(n, nb, 4, 1, 32)
            q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
            hi = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1  # (n, nb, 8 sub-blocks, 32)
            q = q.reshape(n, nb, 8, 32) | (hi << 4)
        ks = (sc.reshape(n, nb * 8).astype(np.int8), mn.reshape(n, nb * 8).astype(np.int8), d, -dmin)
        return Blocks(q.reshape(n, k).astype(np.uint8), ds, -dm, 4 if type_name == "Q4_K" else 5, 32, 0, ks)
    if type_name == "Q6_K":
        ql = b[..., 0:128].reshape(n, nb, 2, 1, 64)
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)  # (n, nb, 16)
        d = _f16(b[..., 208:210])
        lo = ((ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F).reshape(n, nb, 2, 4, 32)
        hi = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3).reshape(n, nb, 2, 4, 32)
        q = (lo | (hi << 4)).reshape(n, k)
        ds = (d[..., None] * sc).reshape(n, nb * 16)
        sc8 = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(n, nb * 16)
        return Blocks(q, ds, -32.0 * ds, 6, 16, 32, (sc8, sc8, d, -32.0 * d))  # m = (−32d)·sc, exactly −32·(d·sc)
    raise ValueError(f"no block unpacker for {type_name}")


def dequantize(bl: Blocks) -> np.ndarray:
    """float32 (N, K) with gguf.quants.dequantize's own arithmetic (bit-identical)."""
    n, k = bl.q.shape
    q = bl.q.reshape(n, -1, bl.sub).astype(np.float32)
    d = bl.d[..., None]
    if bl.offset:
        return (d * (q - np.float32(bl.offset))).reshape(n, k)
    return (d * q + bl.m[..., None]).reshape(n, k)


def unpack_q4(raw: np.ndarray, type_name: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit type (Q4_0, Q4_1, Q4_K) → q int32 (n, k) in [0, 15], scale and zero float32 (n, k / 32) of the int4
    layers (w = scale·(q − 8) + zero)."""
    bl = unpack_blocks(raw, type_name, n, k)
    assert bl.bits == 4 and bl.sub == 32
    return torch.from_numpy(bl.q.astype(np.int32)), torch.from_numpy(bl.d), torch.from_numpy(bl.m + 8.0 * bl.d)


def signed_int8(raw: np.ndarray, type_name: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric type with one scale per 32 (Q8_0, Q4_0, Q5_0) → signed int8 q (n, k) and d float32 (n, k / 32),
    w = q·d exactly (no second rounding)."""
    if type_name == "Q8_0":
        return unpack_q8_0(raw, n, k)
    bl = unpack_blocks(raw, type_name, n, k)
    q = (bl.q.astype(np.int16) - bl.offset).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(bl.d))


def unpack_q8_0(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw: uint8 (n, bytes per row) of Q8_0 blocks (fp16 d, 32 int8) → q int8 (n, k), d float32 (n, k / 32):
    exactly the int8 layers' grouped form (w = q · d), no second rounding."""
    nb = k // QK
    blocks = np.ascontiguousarray(raw).reshape(n, nb, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).reshape(n, k)
    return torch.from_numpy(q), torch.from_numpy(d)
