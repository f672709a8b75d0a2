"""The decoder stack of a Llama-family or Gemma 3 model for a decode step in one C call (`decode_layers` in csrc).

Single-stream decode of a small model is dominated by per-op overhead: the Python path makes ~10 module
calls and ~10 kernel calls per layer (each a few µs of Python + ctypes), ~4 ms per step for SmolLM2's 30
layers against ~2 ms of 4-bit matmuls. Here every layer's weights are described once (pointers in ctypes
structs) and a step is one call that runs the same kernels in the same order, so the result equals the Python
path's (tests/test_engine.py checks it for Llama, tests/test_fused_families.py for Gemma 3). Per layer the descriptor
carries what varies between the families: q/k RMSNorm (Qwen3, Gemma 3), Gemma's extra output norms, the rotary
tables (Gemma's local layers have their own base) and the sliding window.

Used for bf16 and fp32 models on CPU when every decoder linear has a C kernel for the step's rows (on the
kernel tier of ops/kernels.py): 4-bit `q4rows16`, 4/5/6-bit `qkrows16` and int8 `q8rows16` layers (and
ConcatLinear layers of them) (any number of decode rows; their kernels take fp32 or bf16 activations), bf16
dense layers in bf16 models (up to DENSE_ROWS rows: `gemm_bf16` loads each weight vector once for all of a tile's
rows, so the k + 1 rows of a verification cost little more than one), no biases.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from inferd.ops.attention import AttnMetadata
from inferd.ops.c_structs import LayerDesc, LinDesc, StepDesc
from inferd.ops.kernels import get_kernels

MAX_ROWS = 256  # decode rows per fused step (max_num_seqs is usually below)
# bf16 dense layers: most rows per fused step, by kernel tier. gemm_bf16 (3072×576, weights in cache, 2-core Zen 4)
# stays under torch's oneDNN GEMM up to 16 rows with vdpbf16ps (5 rows: 36 µs against 1 row's 20), up to ~8 rows
# widening bf16 to fp32; above that the step runs the layers in Python on torch's GEMMs.
DENSE_ROWS = {True: 16, False: 8}  # keyed by Kernels.bf16_dot
MAX_PARTS = 8  # parts of a ConcatLinear in one descriptor (csrc/fused_decode.c)
ACT_KINDS = {"silu": 0, "gelu_tanh": 1}  # the MLP activation → step_desc.act_kind
# decode_layers' phases, in the order of csrc/fused_decode.c's DP_* (what `profile` reports)
PROFILE_PHASES = ("norms", "qkv", "rotary", "kv_write", "attention", "o", "gate_up", "act", "down")


def profile(on: bool, cpu_time: bool = False) -> dict[str, float]:
    """Turn decode_layers' per-phase clock on (clearing it) or off; returns the seconds summed per phase since it
    was last turned on (over layers and steps). cpu_time: the calling thread's CPU time instead of the wall
    clock (at one thread, what a step costs whatever else the host runs). Empty without the C library."""
    lib = get_kernels().lib
    if lib is None or not hasattr(lib, "decode_profile"):
        return {}
    out = (ctypes.c_int64 * len(PROFILE_PHASES))()
    lib.decode_profile(2 if on and cpu_time else int(on), out, len(out))
    return {name: ns / 1e9 for name, ns in zip(PROFILE_PHASES, out)}


def _linear_desc(mod: nn.Module, dtype: torch.dtype) -> tuple[LinDesc, int] | None:
    """(descriptor, most rows it handles), or None when this layer has no C kernel here."""
    from inferd.models.blocks import Linear
    from inferd.quant.linear import ConcatLinear, Int4Linear, Int8Linear, QKLinear

    if isinstance(mod, ConcatLinear):  # kind 900 + parts: `w` an array of the parts' descriptors, kept alive here
        descs = [_linear_desc(p, dtype) for p in mod.parts]
        if any(d is None for d in descs) or len(descs) > MAX_PARTS:
            return None
        arr = (LinDesc * len(descs))(*(d[0] for d in descs))  # type: ignore[index]
        mod._c_parts = arr
        return LinDesc(900 + len(descs), mod.out_features, mod.in_features, ctypes.addressof(arr), None, None), \
            min(d[1] for d in descs)  # type: ignore[index]
    if getattr(mod, "bias", None) is not None:
        return None
    if isinstance(mod, (Int4Linear, Int8Linear, QKLinear)):  # packed: any rows, up to where a bf16 copy takes over
        rows = MAX_ROWS if not mod.has_dense else min(MAX_ROWS, mod.dense_from_rows - 1)
        if isinstance(mod, Int4Linear) and mod.layout == "q4rows16":
            return LinDesc(3 if mod.symmetric else 1, mod.out_features, mod.in_features, mod.packed.data_ptr(), mod.dm.data_ptr(), None), rows
        if isinstance(mod, Int8Linear) and mod.layout == "q8rows16":
            return LinDesc(2, mod.out_features, mod.in_features, mod.qweight.data_ptr(), mod.scales.data_ptr(),
                           None), rows
        if isinstance(mod, QKLinear) and mod.layout == "qkrows16":  # kind 10·bits + (sub == 16): see kernels.h
            kind = 10 * mod.bits + int(mod.sub == 16)
            if mod.kmode:  # + 100: K-quant scales (qk_gemm_ks); + 200: symmetric ones (qk_gemm_kss)
                assert mod.scm is not None and mod.sb is not None
                return LinDesc((200 if mod.ksym else 100) + kind, mod.out_features, mod.in_features, mod.packed.data_ptr(),
                               mod.scm.data_ptr(), mod.sb.data_ptr()), rows
            assert mod.dm is not None
            return LinDesc(kind, mod.out_features, mod.in_features, mod.packed.data_ptr(), mod.dm.data_ptr(),
                           None), rows
        return None
    if isinstance(mod, Linear) and dtype == torch.bfloat16 and mod.weight.dtype == torch.bfloat16 \
            and mod.weight.is_contiguous() \
            and mod.in_features % 32 == 0 and get_kernels().dense_gemm:
        return LinDesc(0, mod.out_features, mod.in_features, mod.weight.data_ptr(), None, None), \
            DENSE_ROWS[get_kernels().bf16_dot]
    return None


class FusedDecoder:
    def __init__(self, model: nn.Module, lib: ctypes.CDLL, linears: list[list[LinDesc]], max_rows: int):
        self.model, self.lib, self.linears, self.max_rows = model, lib, linears, max_rows
        self.layers: ctypes.Array | None = None
        self.cache_key: tuple[int, ...] = ()
        self.work: dict[int, list[torch.Tensor]] = {}
        self.steps = 0  # decode steps run here (tests check the path is taken)

    @staticmethod
    def build(model: nn.Module) -> FusedDecoder | None:
        lib = get_kernels().lib
        cfg = model.config
        dtype = model.model.norm.weight.dtype
        if lib is None or not hasattr(lib, "decode_layers") or model.model.norm.weight.device.type != "cpu" \
                or dtype not in (torch.bfloat16, torch.float32):
            return None
        if getattr(cfg, "architecture", "llama") not in ("llama", "mistral", "qwen2", "qwen3", "gemma3") \
                or cfg.mlp_act not in ACT_KINDS:
            return None
        linears, max_rows = [], 1 << 30
        for layer in model.model.layers:
            row = []
            for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                d = _linear_desc(mod, dtype)
                if d is None:
                    return None
                row.append(d[0])
                max_rows = min(max_rows, d[1])
            linears.append(row)
        if cfg.head_dim % 16 or max_rows < 1:
            return None
        return FusedDecoder(model, lib, linears, max_rows)

    def _rotary(self, i: int) -> nn.Module:
        """Layer i's rotary tables: Gemma 3's sliding-window layers have their own (rotary_local)."""
        local = getattr(self.model, "rotary_local", None)
        return local if local is not None and self.model.config.window(i) is not None else self.model.rotary

    def _layer_descs(self, kv_caches: list[torch.Tensor]) -> ctypes.Array:
        rots = [self._rotary(i) for i in range(len(kv_caches))]
        key = tuple(c.data_ptr() for c in kv_caches) + tuple(r.cos.data_ptr() for r in rots)  # tables may be rebuilt
        if self.layers is None or key != self.cache_key:
            arr = (LayerDesc * len(kv_caches))()
            for d, layer, lin, cache, rot in zip(arr, self.model.model.layers, self.linears, kv_caches, rots):
                attn = layer.self_attn
                d.in_norm = layer.input_layernorm.weight.data_ptr()
                d.qkv, d.o, d.gate_up, d.down = lin
                d.k_cache, d.v_cache = cache[0].data_ptr(), cache[1].data_ptr()
                d.cos, d.sin = rot.cos.data_ptr(), rot.sin.data_ptr()
                d.window = attn.window or 0
                if attn.q_norm is not None:
                    d.q_norm, d.k_norm = attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()
                if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: four norms
                    d.attn_out_norm = layer.post_attention_layernorm.weight.data_ptr()
                    d.post_norm = layer.pre_feedforward_layernorm.weight.data_ptr()
                    d.mlp_out_norm = layer.post_feedforward_layernorm.weight.data_ptr()
                else:
                    d.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            self.layers, self.cache_key = arr, key
        return self.layers

    def run(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
            meta: AttnMetadata, final_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x: (M, hidden) embeddings of a pure-decode step → (last layer's output, residual), or None when this
        step is not one the fused path takes (the caller then runs the layers in Python). The returned tensors
        are work buffers reused by the next step: the caller consumes them at once (the final norm).
        final_norm: the model's final norm runs in the same call, returning (a new tensor of the normalised
        hidden states, residual): what `model.norm.add_forward(*run(...))` returns, without another call."""
        M = x.shape[0]
        if meta.prefills or meta.num_decode != M or not meta.use_c_kernel or M > self.max_rows \
                or x.dtype != self.model.model.norm.weight.dtype:
            return None
        cfg = self.model.config
        attn = self.model.model.layers[0].self_attn
        if M not in self.work:
            qkv_dim = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            shapes = [cfg.hidden_size, cfg.hidden_size, cfg.hidden_size, qkv_dim, cfg.num_heads * cfg.head_dim,
                      cfg.num_heads * cfg.head_dim, 2 * cfg.intermediate_size, cfg.intermediate_size]
            self.work[M] = [torch.empty(M, n, dtype=x.dtype) for n in shapes]
        out, residual, h, qkv, q, att, gu, act = self.work[M]
        out.copy_(x)
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        assert tables is not None and lens is not None
        rot = self.model.rotary
        local = meta.local  # a hybrid KV cache: the window layers' own slots and tables
        local_tables = None if local is None else local.decode_block_tables
        norm = self.model.model.norm
        final = torch.empty(M, cfg.hidden_size, dtype=x.dtype) if final_norm else None
        assert not final_norm or norm.eps == cfg.rms_norm_eps, "the C step normalises with the config's eps"
        s = StepDesc(M, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size, rot.dim,
                     kv_caches[0].shape[2], tables.shape[1], int(x.dtype == torch.bfloat16), 1, ACT_KINDS[cfg.mlp_act],
                     0 if local_tables is None else local_tables.shape[1],
                     cfg.rms_norm_eps,
                     attn.scale,
                     positions.data_ptr(), meta.slot_mapping.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                     rot.cos.data_ptr(), rot.sin.data_ptr(), out.data_ptr(), residual.data_ptr(), h.data_ptr(),
                     qkv.data_ptr(), q.data_ptr(), att.data_ptr(), gu.data_ptr(), act.data_ptr(),
                     None if local is None else local.slot_mapping.data_ptr(),
                     None if local_tables is None else local_tables.data_ptr(),
                     None if final is None else norm.weight.data_ptr(), None if final is None else final.data_ptr())
        if self.lib.decode_layers(self._layer_descs(kv_caches), len(kv_caches), ctypes.byref(s)) != 0:
            return None
        self.steps += 1
        return (out if final is None else final), residual  # work buffers (but `final`): valid until the next step
