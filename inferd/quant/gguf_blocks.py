"""GGUF 4-bit blocks (Q4_0, Q4_1: 32 weights per block) unpacked to (q, scale, zero) for exact repacking into
int4 group-32 layers: Q4_0 w = d·(q − 8) → scale d, zero 0; Q4_1 w = d·q + m → scale d, zero m + 8d."""

from __future__ import annotations

import numpy as np
import torch

QK = 32
EXACT_INT4 = {"Q4_0", "Q4_1"}


def unpack_q4(raw: np.ndarray, type_name: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw: uint8 (n, bytes per row) → q int32 (n, k) in [0, 15], scale and zero float32 (n, k / 32)."""
    nb = k // QK
    size = {"Q4_0": 18, "Q4_1": 20}[type_name]
    blocks = np.ascontiguousarray(raw).reshape(n, nb, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (n, nb)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:20]
        zero = m + 8.0 * d
    else:
        qs = blocks[..., 2:18]
        zero = np.zeros_like(d)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32).reshape(n, k)  # low nibbles first
    return torch.from_numpy(q), torch.from_numpy(d.copy()), torch.from_numpy(zero)


def unpack_q8_0(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw: uint8 (n, bytes per row) of Q8_0 blocks (fp16 d, 32 int8) → q int8 (n, k), d float32 (n, k / 32):
    exactly the int8 layers' grouped form (w = q · d), no second rounding."""
    nb = k // QK
    blocks = np.ascontiguousarray(raw).reshape(n, nb, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).reshape(n, k)
    return torch.from_numpy(q), torch.from_numpy(d)
