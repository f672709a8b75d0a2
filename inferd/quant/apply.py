"""Swap a loaded model's linear layers (and embedding) for quantized ones.

Methods: `int8` (per-channel), `int4` (group-wise, `group_size` 32/64/128), `gguf` (keep the file's own
blocks packed, see `packed_from_blocks`: Q4_0/Q4_1/Q4_K → int4 group-32; Q8_0 (and Q4_0/Q5_0 fused with it) →
int8 group-32; Q5_0/Q5_1/Q5_K/Q6_K → 5/6-bit `QKLinear`; any other type is kept dequantized, with one log line
naming the types and the memory they cost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from inferd.errors import ModelLoadError
from inferd.hardware import release_free_memory
from inferd.loader.gguf import GGUFTensors, RawTensor, llama_unpermute
from inferd.ops import onednn
from inferd.ops.kernels import get_kernels
from inferd.quant.gguf_blocks import (
    INT4_TYPES,
    K_TYPES,
    QK_TYPES,
    SIGNED_INT8,
    signed_int8,
    unpack_blocks,
    unpack_q4,
)
from inferd.quant.linear import (
    ConcatLinear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QKLinear,
    dequantize_int4,
    int8_group_size,
    qk_layout,
    quantize_int4,
    quantize_int8,
    tied_embedding,
)

log = logging.getLogger(__name__)
METHODS = ("none", "int8", "int4", "gguf", "auto")
PACKED_TYPES = QK_TYPES | {"Q8_0"}  # GGUF types whose blocks stay packed (mixes within a fused layer: see below)
AUTO_DENSE_ROWS = 32  # `auto` on a packed GGUF: bf16 copies for steps of ≥ 32 rows (prefill, big batches)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "none"
    group_size: int = 32
    dense_from_rows: int = 0  # keep a bf16 copy and use it for steps with at least this many rows (0: never)
    profile: str = "balanced"  # EngineConfig.memory_profile: which bf16 copies auto keeps (see resolve_auto)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ModelLoadError(f"unknown quantization {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.group_size not in (32, 64, 128, 256):
            raise ModelLoadError(f"group size must be 32, 64, 128 or 256, got {self.group_size}")


def resolve_auto(qc: QuantConfig, gguf_linear_types: set[str] | None, device: torch.device) -> QuantConfig:
    """`auto` (the CLI default): a GGUF with decoder linears of PACKED_TYPES keeps those blocks packed (others,
    e.g. Q3_K in a Q3_K_M file, are dequantized with one log line) on a
    CPU whose kernel tier has the quantized GEMMs (AVX2 and up: faster decode, 4-bit memory), with bf16 copies
    for steps of ≥ 32 rows where they pay (`fast`: native bf16; `balanced`: AMX; `small`: never) unless
    `quant_dense_rows` says otherwise; anything else loads as `none`."""
    if qc.method != "auto":
        return qc
    from inferd.ops import cpu_kernels

    packable = bool(gguf_linear_types and gguf_linear_types & PACKED_TYPES)
    if packable and device.type == "cpu" and cpu_kernels.has_quant_gemm():
        # bf16 copies for big steps only where they beat the packed kernels: `fast` wherever the CPU computes bf16
        # natively, `balanced` only with AMX's bf16 tiles. On AVX-512 BF16 without AMX the packed VNNI kernels are
        # faster at every row count (measured on Zen 4: prefill 1733 vs 976-1532 tok/s, 16 streams 823 vs 521-695,
        # docs/benchmarks.md), so the copies there would cost memory for nothing. (Asked of the kernel tier too, so
        # a forced lower tier behaves as a CPU of that tier would.)
        native_bf16 = onednn.available() and get_kernels().bf16_dot
        pays = qc.profile == "fast" or (qc.profile == "balanced" and get_kernels().tier == "avx512_amx")
        dense = qc.dense_from_rows or (AUTO_DENSE_ROWS if native_bf16 and pays else 0)
        return QuantConfig("gguf", 32, dense, qc.profile)
    return QuantConfig("none", qc.group_size, qc.dense_from_rows, qc.profile)


# fused layer → the HF tensors it was built from (row blocks, in order)
def _parts(i: int) -> dict[str, list[str]]:
    p = f"model.layers.{i}"
    return {
        f"{p}.self_attn.qkv_proj": [f"{p}.self_attn.{n}_proj.weight" for n in "qkv"],
        f"{p}.self_attn.o_proj": [f"{p}.self_attn.o_proj.weight"],
        f"{p}.mlp.gate_up_proj": [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"],
        f"{p}.mlp.down_proj": [f"{p}.mlp.down_proj.weight"],
    }


def _decoder_linears(model: nn.Module, src: Container[str] | None = None,
                     after_layer: Callable[[], None] | None = None) -> Iterator[tuple[str, list[str], nn.Module, str]]:
    """(fused name, the tensors it is built from, owning module, attribute) of every decoder linear, layer by layer.
    With `src`, a tensor the source lacks is a ModelLoadError; `after_layer` runs once each layer is done."""
    for i in range(model.config.num_layers):
        layer = model.model.layers[i]
        for fused, parts in _parts(i).items():
            if src is not None:
                missing = [p for p in parts if p not in src]
                if missing:
                    raise ModelLoadError(f"missing tensor {missing[0]}")
            yield fused, parts, layer.self_attn if "self_attn" in fused else layer.mlp, fused.rsplit(".", 1)[1]
        if after_layer is not None:
            after_layer()


def _from_gguf(raws: list[RawTensor | None], dense: nn.Linear, qc: QuantConfig, name: str) -> nn.Module:
    bias = dense.bias.data if dense.bias is not None else None
    if all(r is not None for r in raws):
        packed = packed_from_blocks(raws, bias, qc, dense.weight.device)  # type: ignore[arg-type]
        if packed is not None:
            return packed
    types = {r.type_name if r else "F32" for r in raws}
    log.info("%s: GGUF type(s) %s have no packed kernel here; kept dequantized", name, ",".join(sorted(types)))
    return dense


def _by_rows(fn: Callable[..., tuple[torch.Tensor, ...]], w: torch.Tensor, *args: Any,
             step: int = 512) -> tuple[torch.Tensor, ...]:
    """fn(w, *args) for a per-row quantizer, computed `step` rows at a time into preallocated outputs: its float
    temporaries (several times the weight) stay a chunk's size while a model streams in."""
    if w.shape[0] <= step:
        return fn(w, *args)
    first = fn(w[:step], *args)
    outs = tuple(torch.empty((w.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device) for t in first)
    for o, t in zip(outs, first):
        o[:step] = t
    del first
    for i in range(step, w.shape[0], step):
        for o, t in zip(outs, fn(w[i : i + step], *args)):
            o[i : i + step] = t
    return outs


def _quantized_weight(w: torch.Tensor, bias: torch.Tensor | None, qc: QuantConfig, name: str) -> nn.Module:
    """`int8`/`int4`: one dense (N, K) weight → its packed layer."""
    if qc.method == "int8":
        return Int8Linear(*_by_rows(quantize_int8, w, int8_group_size()), bias, qc.dense_from_rows)
    if w.shape[1] % qc.group_size:
        raise ModelLoadError(f"int4 group size {qc.group_size} does not divide {name}'s {w.shape[1]} "
                             "input features; choose a group size that does (e.g. 32 or 64)")
    return Int4Linear(*_by_rows(quantize_int4, w, qc.group_size), qc.group_size, bias, qc.dense_from_rows)


def _quantized(dense: nn.Linear, qc: QuantConfig, raws: list[RawTensor | None] | None, name: str) -> nn.Module:
    bias = dense.bias.data if dense.bias is not None else None
    if qc.method in ("int8", "int4"):
        return _quantized_weight(dense.weight.data, bias, qc, name)
    assert qc.method == "gguf"
    if raws is None:
        raise ValueError("--quantization gguf needs a GGUF model; use int8 or int4 for other formats")
    return _from_gguf(raws, dense, qc, name)


def quantize_model(model: nn.Module, qc: QuantConfig, raw: dict[str, RawTensor] | None = None) -> None:
    """In place: every decoder linear and the lm_head become packed layers; the embedding becomes int8."""
    if qc.method == "none":
        return
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for fused, parts, owner, attr in _decoder_linears(model):
        raws = [raw.get(p) for p in parts] if raw is not None else None
        setattr(owner, attr, _quantized(getattr(owner, attr), qc, raws, fused))
    # The embedding table becomes int8 per row, and the lm_head uses int8 too: the output projection is the
    # most quantization-sensitive matrix (a 4-bit lm_head cost +8% perplexity on SmolLM2), and when the
    # embeddings are tied the lm_head shares the embedding's int8 table, so it costs no extra memory.
    emb = model.model.embed_tokens
    gs = int8_group_size()
    q8, s8 = quantize_int8(emb.weight.data, gs)
    if tied:  # one int8 table for both, in the lm_head's layout
        model.lm_head = Int8Linear(q8, s8, None)  # no bf16 copy: logits use the int8 kernel (fp32 output)
        model.model.embed_tokens = Int8Embedding.tied(model.lm_head, emb.weight.dtype)
    else:
        model.model.embed_tokens = Int8Embedding(q8, s8, emb.weight.dtype)
        model.lm_head = Int8Linear(*quantize_int8(model.lm_head.weight.data, gs), None)


# ---- streaming: a GGUF's tensors straight into packed layers, one layer at a time ---------------------------
EMBED_CHUNK_ROWS = 8192  # rows dequantized at once when an embedding table is not Q8_0


class DenseSource(Protocol):
    """Tensors under their HF names, read one at a time (GGUFTensors, loader.safetensors.SafetensorsTensors)."""

    def __contains__(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dense(self, name: str, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor: ...
    def release(self, name: str) -> None: ...


def _int8_rows(src: DenseSource, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding-shaped table in `dtype` → int8 rows + scales, a chunk of rows at a time (quantize_int8 is per
    row: the numbers of quantize_model on the whole table)."""
    gs = int8_group_size()
    rows, cols = src.shape(name)
    q = torch.empty(rows, cols, dtype=torch.int8)
    s = torch.empty((rows, cols // gs) if gs else (rows,), dtype=torch.float32)
    step = STREAM_CHUNK_ROWS
    for i in range(0, rows, step):  # filled in place: no list of parts and a second table for the concatenation
        q[i : i + step], s[i : i + step] = quantize_int8(src.dense(name, dtype, slice(i, i + step)), gs)
    return q, s


STREAM_CHUNK_ROWS = 2048  # small chunks: their temporaries are reused from the heap rather than piled up


def quantize_streaming(model: nn.Module, src: DenseSource, qc: QuantConfig, dtype: torch.dtype,
                       device: torch.device) -> set[str]:
    """`int8`/`int4` on a model skeleton (weights not loaded yet): each decoder linear is read in `dtype`,
    quantized and put in place one at a time, the embedding and lm_head a chunk of rows at a time, so no dense
    model is ever made; gives quantize_model's numbers. Returns the tensor names used (the rest, norms, are
    loaded dense after)."""
    used: set[str] = set()
    emb = "model.embed_tokens.weight"
    if emb not in src:
        raise ModelLoadError(f"missing tensor {emb}")
    q8, s8 = _int8_rows(src, emb, dtype)
    used.add(emb)
    src.release(emb)
    if "lm_head.weight" not in src:  # tied: one int8 table for both, in the lm_head's layout
        model.lm_head = Int8Linear(q8.to(device), s8.to(device), None)
        model.model.embed_tokens = Int8Embedding.tied(model.lm_head, dtype)
    else:
        model.model.embed_tokens = Int8Embedding(q8.to(device), s8.to(device), dtype)
        model.lm_head = Int8Linear(*(t.to(device) for t in _int8_rows(src, "lm_head.weight", dtype)), None)
        used.add("lm_head.weight")
        src.release("lm_head.weight")
    del q8, s8
    release_free_memory()
    # after each layer, hand glibc's freed temporaries (up to 32 MB each) back to the system: otherwise they pile up
    for fused, parts, owner, attr in _decoder_linears(model, src, after_layer=release_free_memory):
        meta = getattr(owner, attr)
        names = list(parts)
        bias = None
        if meta.bias is not None:
            bias_parts = [p.replace(".weight", ".bias") for p in parts]
            bias = torch.cat([src.dense(b, dtype) for b in bias_parts]).to(device)
            names += bias_parts
        w = torch.cat([src.dense(p, dtype) for p in parts]).to(device)
        if tuple(w.shape) != (meta.out_features, meta.in_features):
            raise ModelLoadError(f"{parts}: shape {tuple(w.shape)} does not make "
                                 f"({meta.out_features}, {meta.in_features})")
        setattr(owner, attr, _quantized_weight(w, bias, qc, fused))
        del w
        for n in names:
            used.add(n)
            src.release(n)
    return used


def _unpermuted(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    return t if heads is None else torch.from_numpy(llama_unpermute(t.numpy(), heads))


REPACKS = 0  # layers repacked from a file's blocks in this process (tests count these to see the cache work)


def _packed_from_raws(src: GGUFTensors, parts: list[str], out_features: int, in_features: int,
                      bias: torch.Tensor | None, qc: QuantConfig, device: torch.device,
                      dense_out: list[torch.Tensor] | None = None) -> nn.Module | None:
    """One fused linear from the file's blocks, or None when its types have no packed layer here. `dense_out`
    (for the repack cache) receives the layer's plain bf16 copy when it keeps one."""
    global REPACKS
    raws = [src.raw(p) for p in parts]
    if any(r is None for r in raws):
        return None
    rs: list[RawTensor] = raws  # type: ignore[assignment]
    if sum(r.rows for r in rs) != out_features or any(r.cols != in_features for r in rs):
        raise ModelLoadError(f"{parts}: shapes {[(r.rows, r.cols) for r in rs]} do not make "
                             f"({out_features}, {in_features})")
    REPACKS += 1
    return packed_from_blocks(rs, bias, qc, device, dense_out)


def _rows(t: torch.Tensor | np.ndarray, r: RawTensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
    return _unpermuted(t, r.unpermute_heads)


def packed_from_blocks(rs: list[RawTensor], bias: torch.Tensor | None, qc: QuantConfig, device: torch.device,
                       dense_out: list[torch.Tensor] | None = None) -> nn.Module | None:
    """One layer from the row blocks `rs` (a fused layer's parts, in order), or None when their types have no
    packed layer together. Each type goes where it is exact: only K-quants (Q4_K/Q5_K/Q6_K) → QKLinear with their
    int8 scale multipliers and fp16 super-block factors as stored (several K types: a ConcatLinear of one such
    layer per type, see _k_parts_apart); Q4_0/Q4_1 (with Q4_K) → Int4Linear (group 32);
    Q8_0, with Q4_0/Q5_0 beside it → Int8Linear (signed int8, scale per 32); other mixes of QK_TYPES → QKLinear
    with fp16 scales. QKLinear takes the widest bits and the finest scale groups of the parts. Q8_0 with
    an asymmetric or K type has no common layout: None (kept dequantized)."""
    types = {r.type_name for r in rs}
    if types <= INT4_TYPES and not types <= K_TYPES:
        qs, ss, zs = [], [], []
        for r in rs:
            q, sc, z = unpack_q4(r.data, r.type_name, r.rows, r.cols)
            qs.append(_rows(q, r))
            ss.append(_rows(sc, r))
            zs.append(_rows(z, r))
        q, sc, z = torch.cat(qs).to(device), torch.cat(ss).to(device), torch.cat(zs).to(device)
        if dense_out is not None and qc.dense_from_rows:
            dense_out.append(dequantize_int4(q, sc, z, 32).bfloat16())
        return Int4Linear(q, sc, z, 32, bias, qc.dense_from_rows)
    if "Q8_0" in types and types <= SIGNED_INT8:
        pieces = [signed_int8(r.data, r.type_name, r.rows, r.cols) for r in rs]
        q8 = torch.cat([_rows(q, r) for (q, _), r in zip(pieces, rs)])
        s8 = torch.cat([_rows(d, r) for (_, d), r in zip(pieces, rs)])
        if int8_group_size() is None:  # per-channel scales (aten's int8 kernel): requantize the exact weights
            w = (q8.float().view(q8.shape[0], -1, 32) * s8.unsqueeze(-1)).view(q8.shape)
            q8, s8 = quantize_int8(w, None)
        layer8 = Int8Linear(q8.to(device), s8.to(device), bias, qc.dense_from_rows)
        if dense_out is not None and qc.dense_from_rows:
            dense_out.append(layer8.dequantized().bfloat16())
        return layer8
    if len(types) > 1 and types <= K_TYPES:
        split = _k_parts_apart(rs, bias, qc, device, dense_out)
        if split is not None:
            return split
    if types <= QK_TYPES:
        blocks = [unpack_blocks(r.data, r.type_name, r.rows, r.cols) for r in rs]
        bits, sub = max(b.bits for b in blocks), min(b.sub for b in blocks)
        qs, ds, ms = [], [], []
        ks: list[list[torch.Tensor]] = [[], [], [], []]  # K-quant scales as stored (every part a K-quant)
        for b, r in zip(blocks, rs):
            rep = b.sub // sub  # a scale per 32 repeated for both halves when a part has scales per 16
            qs.append(_rows(b.q, r))
            ds.append(_rows(np.repeat(b.d, rep, axis=1), r))
            ms.append(_rows(np.repeat(b.m, rep, axis=1), r))
            if b.kscales is not None:
                sc, mn, kd, kdmin = b.kscales
                for out, t in zip(ks, (np.repeat(sc, rep, axis=1), np.repeat(mn, rep, axis=1), kd, kdmin)):
                    out.append(_rows(t, r))
        kscales = tuple(torch.cat(t).to(device) for t in ks) if types <= K_TYPES else None
        try:
            layer = QKLinear(torch.cat(qs).to(device), torch.cat(ds).to(device), torch.cat(ms).to(device), bits, sub,
                             bias, qc.dense_from_rows, kscales=kscales)  # type: ignore[arg-type]
        except ValueError as exc:  # scales beyond fp16: kept dequantized
            log.info("%s: %s", ",".join(sorted(types)), exc)
            return None
        if dense_out is not None and qc.dense_from_rows:
            dense_out.append(layer.dequantized().bfloat16())
        return layer
    return None


def _k_parts_apart(rs: list[RawTensor], bias: torch.Tensor | None, qc: QuantConfig, device: torch.device,
                   dense_out: list[torch.Tensor] | None) -> nn.Module | None:
    """A fused layer of different K-quant types (Q4_K_M's qkv: Q4_K q, k and a Q6_K v) as a ConcatLinear of one
    layer per run of one type: each part keeps the file's bytes and its type's kernel (one layer in the widest type
    would read q and k as 6-bit with scales per 16: ~14 MB more per token on a 1B Q4_K_M). None where a run's rows
    are not whole row blocks of 16 (the caller then makes one layer of the widest type). `dense_out` receives one
    bf16 copy per part."""
    runs: list[list[RawTensor]] = []
    for r in rs:
        if runs and runs[-1][0].type_name == r.type_name:
            runs[-1].append(r)
        else:
            runs.append([r])
    if any(sum(r.rows for r in run) % 16 for run in runs):
        return None
    parts: list[nn.Module] = []
    row = 0
    for run in runs:
        n = sum(r.rows for r in run)
        part = packed_from_blocks(run, None if bias is None else bias[row:row + n], qc, device, dense_out)
        if part is None:
            return None
        parts.append(part)
        row += n
    return ConcatLinear(parts)


def _int8_table(src: GGUFTensors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding-shaped table as int8 rows + scales: a Q8_0 table as stored, anything else quantized a chunk
    of rows at a time (quantize_int8 is per row, so chunks give the same numbers as the whole table)."""
    gs = int8_group_size()
    raw = src.raw(name)
    if raw is not None and raw.type_name in SIGNED_INT8 and gs == 32:  # exactly int8 per 32 as stored
        return signed_int8(raw.data, raw.type_name, raw.rows, raw.cols)
    rows = src.shape(name)[0]
    parts = [quantize_int8(src.dense(name, torch.float32, slice(i, i + EMBED_CHUNK_ROWS)), gs)
             for i in range(0, rows, EMBED_CHUNK_ROWS)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def _tied_packed_head(src: GGUFTensors, name: str, meta: nn.Module, device: torch.device) -> QKLinear | None:
    """A tied table stored as Q4_K/Q5_K/Q6_K/Q5_0/Q5_1 kept packed as the lm_head (`QKLinear`, qkrows16 where the
    tier has the kernels): the logits read the file's bytes (e.g. Q6_K: 6.56 bits per weight, vs 8.5 for the int8
    table) with the file's own weights, and the embedding lookup dequantizes only the rows it reads. None for any
    other type (Q8_0 stays int8 as stored; F16/BF16/F32 and Q4_0/Q4_1 are quantized to int8 per 32, see
    quantize_model: a 4-bit requantized head costs perplexity)."""
    raw = src.raw(name)
    if raw is None or raw.type_name not in QK_TYPES or (raw.type_name in INT4_TYPES - K_TYPES):
        return None
    if device.type != "cpu" or qk_layout(raw.rows, raw.cols) != "qkrows16":  # no qk_gemm: int8 is faster
        return None
    if (raw.rows, raw.cols) != (meta.out_features, meta.in_features):
        raise ModelLoadError(f"{name}: shape {(raw.rows, raw.cols)} does not make "
                             f"({meta.out_features}, {meta.in_features})")
    layer = packed_from_blocks([raw], None, QuantConfig("gguf", 32, 0), device)  # no bf16 copy: fp32 logits
    return layer if isinstance(layer, QKLinear) else None


def _from_cache(model: nn.Module, src: GGUFTensors, cached: dict[str, nn.Module], dtype: torch.dtype,
                device: torch.device) -> set[str]:
    """Puts cached packed layers in place (those the cache has; the rest load as without it)."""
    used: set[str] = set()
    for fused, parts, owner, attr in _decoder_linears(model):
        if fused not in cached:
            continue
        packed = cached[fused]
        setattr(owner, attr, packed)
        used |= set(parts)
        if packed.bias is not None or any(q.bias is not None for q in getattr(packed, "parts", ())):  # ConcatLinear
            used |= {p.replace(".weight", ".bias") for p in parts}
    model.lm_head = cached["lm_head"]
    emb = "model.embed_tokens.weight"
    if "lm_head.weight" not in src:  # tied: the lm_head's table
        model.model.embed_tokens = tied_embedding(model.lm_head, dtype)
    else:  # an untied embedding is a plain int8 table: cheap to make again
        q8, s8 = _int8_table(src, emb)
        model.model.embed_tokens = Int8Embedding(q8.to(device), s8.to(device), dtype)
        used.add("lm_head.weight")
    used.add(emb)
    return used


def pack_gguf(model: nn.Module, src: GGUFTensors, qc: QuantConfig, dtype: torch.dtype,
              device: torch.device, cache_key: str | None = None) -> set[str]:
    """`--quantization gguf` on a model skeleton (weights not loaded yet): every decoder linear whose blocks have a
    packed layer, the embedding and the lm_head are built straight from the file, one at a time (no dense model
    is ever made). Returns the tensor names used; the rest (norms, unpackable linears) are loaded dense after."""
    from inferd.loader import repack_cache

    prepack = qc.profile == "fast"  # else bf16 copies shared from the cache's mapping (see repack_cache)
    if cache_key is not None:
        cached = repack_cache.load(cache_key, qc.dense_from_rows, prepack)
        if cached is not None and "lm_head" in cached:
            log.info("packed layers from the repack cache (%s)", cache_key)
            return _from_cache(model, src, cached, dtype, device)
    writer = None
    if cache_key is not None:
        try:
            writer = repack_cache.CacheWriter(cache_key)
        except OSError as exc:  # a read-only $INFERD_HOME: the cache is an optimisation only
            log.warning("no repack cache (%s)", exc)
    used: set[str] = set()
    kept: set[str] = set()
    kept_bytes = [0, 0]  # dequantized layers: bytes in memory, bytes in the file
    # the embedding first: its conversion's temporaries (~2.5x the int8 table) then sit on a small resident set
    emb = "model.embed_tokens.weight"
    tied = "lm_head.weight" not in src
    head = _tied_packed_head(src, emb, model.lm_head, device) if tied else None
    used.add(emb)
    if head is not None:  # the file's own K-quant/Q5 table, packed once for both (fewer bytes than int8)
        src.release(emb)
        model.lm_head = head
        model.model.embed_tokens = tied_embedding(head, dtype)
    else:
        q8, s8 = _int8_table(src, emb)
        src.release(emb)
        if tied:  # one int8 table for both, in the lm_head's layout
            model.lm_head = Int8Linear(q8.to(device), s8.to(device), None)  # no bf16 copy (as quantize_model)
            model.model.embed_tokens = Int8Embedding.tied(model.lm_head, dtype)
        else:
            model.model.embed_tokens = Int8Embedding(q8.to(device), s8.to(device), dtype)
            qh, sh = _int8_table(src, "lm_head.weight")
            model.lm_head = Int8Linear(qh.to(device), sh.to(device), None)
            used.add("lm_head.weight")
            src.release("lm_head.weight")
        del q8, s8
    release_free_memory()  # the table's conversion temporaries, before the layers' packing piles on top
    for fused, parts, owner, attr in _decoder_linears(model, src):
        meta = getattr(owner, attr)
        bias_parts = [p.replace(".weight", ".bias") for p in parts]
        bias = None
        if meta.bias is not None:
            bias = torch.cat([src.dense(b, dtype) for b in bias_parts]).to(device)
        copy: list[torch.Tensor] = []
        layer_q = _packed_from_raws(src, parts, meta.out_features, meta.in_features, bias, qc, device,
                                    copy if writer is not None else None)
        if layer_q is None:
            kept |= {src.type_name(p) for p in parts}
            kept_bytes[0] += meta.out_features * meta.in_features * dtype.itemsize
            kept_bytes[1] += sum(int(src.tensors[p].n_bytes) for p in parts)
            continue
        setattr(owner, attr, layer_q)
        if writer is not None:
            writer.add(fused, layer_q, copy if isinstance(layer_q, ConcatLinear) else (copy[0] if copy else None))
        for n in parts + (bias_parts if bias is not None else []):
            used.add(n)
            src.release(n)
    if kept:
        log.warning("GGUF type(s) %s: no packed kernel here for those linears; kept dequantized as %s: %.1f MB in "
                    "memory for %.1f MB in the file", ",".join(sorted(kept)), str(dtype).removeprefix("torch."),
                    kept_bytes[0] / 1e6, kept_bytes[1] / 1e6)
    if writer is not None:
        try:
            writer.add("lm_head", model.lm_head)
            writer.finish()
        except OSError as exc:  # a full $INFERD_HOME: the cache is an optimisation only
            writer.abort()
            log.warning("could not write the repack cache (%s)", exc)
        else:  # the layers just packed → the same ones mapped from the entry: this process shares them with
            # every later one (page cache) instead of keeping a private copy
            cached = repack_cache.load(cache_key, qc.dense_from_rows, prepack) if cache_key else None
            if cached is not None and "lm_head" in cached:
                _from_cache(model, src, cached, dtype, device)
                release_free_memory()
    return used
