"""ctypes mirrors of the C structs in csrc/kernels.h (the fused decode step's descriptors). Their sizes are
checked against the library's own `sizeof` when it loads (ops/kernels.py), so a field added on one side only
fails loudly instead of reading garbage."""

from __future__ import annotations

import ctypes

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class LinDesc(ctypes.Structure):
    _fields_ = [("kind", _i), ("N", _i), ("K", _i), ("w", _p), ("a1", _p), ("a2", _p)]


class LayerDesc(ctypes.Structure):
    _fields_ = [("in_norm", _p), ("post_norm", _p), ("qkv", LinDesc), ("o", LinDesc), ("gate_up", LinDesc),
                ("down", LinDesc), ("k_cache", _p), ("v_cache", _p), ("q_norm", _p), ("k_norm", _p),
                ("attn_out_norm", _p), ("mlp_out_norm", _p), ("cos", _p), ("sin", _p), ("window", _i)]


class StepDesc(ctypes.Structure):
    _fields_ = [(n, _i) for n in ("M", "H", "Hkv", "D", "hidden", "inter", "rot_dim", "bs", "max_blocks", "is_bf16",
                                  "first", "act_kind", "local_max_blocks")] + [("eps", _f), ("scale", _f)] + \
               [(n, _p) for n in ("positions", "slots", "block_tables", "ctx_lens", "cos", "sin", "x", "residual", "h",
                                  "qkv", "q", "attn", "gu", "act", "local_slots", "local_block_tables",
                                  "final_norm", "final_out")]
