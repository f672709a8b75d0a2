"""A differentiable forward over `LlamaForCausalLM`'s own parameters: full sequences, plain causal SDPA, no paged
KV cache and no C kernels (they have no autograd). Used for training, calibration statistics and perplexity.

Every op mirrors models/llama.py (fused qkv/gate_up weights, rotate-half rotary on the first `rope_dim` features,
RMSNorm in fp32), so on the same weights the logits match the inference engine's (tested)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inferd.models.blocks import rope_inv_freq
from inferd.models.llama import LlamaDecoderLayer, LlamaForCausalLM


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * w.float()).to(x.dtype)


def rotary_tables(model: LlamaForCausalLM, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for positions 0..T-1: (T, rope_dim / 2), fp32 — the engine's own tables (rope scaling included),
    extended past their length with the same frequencies."""
    rot = model.rotary
    if T <= rot.cos.shape[0]:
        return rot.cos[:T].to(device), rot.sin[:T].to(device)
    c = model.config
    inv, factor = rope_inv_freq(rot.dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv.float())
    return (freqs.cos() * factor).to(device), (freqs.sin() * factor).to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """x: (B, H, T, D); rotate-half on the first `dim` features (as blocks.Rotary.apply)."""
    half = dim // 2
    x1, x2 = x[..., :half].float(), x[..., half:dim].float()
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return rot if dim == x.shape[-1] else torch.cat([rot, x[..., dim:]], dim=-1)


@dataclass
class Probe:
    """What a calibration forward records (each optional, summed over batches)."""

    layer_io: bool = False  # angular distance between each block's input and output residual stream
    mlp_act: bool = False  # mean |silu(gate) * up| per MLP channel
    head_out: bool = False  # mean L2 norm of each head's attention output (before o_proj)
    skip: int | None = None  # run with this layer removed (loss-increase importance)
    angular: list[float] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0


def _acc(lst: list, i: int, value) -> None:
    if len(lst) <= i:
        lst.append(value)
    else:
        lst[i] = lst[i] + value


def _layer(layer: LlamaDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
           rope_dim: int, i: int, probe: Probe | None) -> torch.Tensor:
    att = layer.self_attn
    B, T, _ = x.shape
    h = _rms(x, layer.input_layernorm.weight, eps)
    qkv = F.linear(h, att.qkv_proj.weight, att.qkv_proj.bias)  # (B, T, (H + 2 Hkv) D)
    q, k, v = qkv.split([att.h * att.d, att.hkv * att.d, att.hkv * att.d], dim=-1)
    q = _rotate(q.view(B, T, att.h, att.d).transpose(1, 2), cos, sin, rope_dim)  # (B, H, T, D)
    k = _rotate(k.view(B, T, att.hkv, att.d).transpose(1, 2), cos, sin, rope_dim)  # (B, Hkv, T, D)
    v = v.view(B, T, att.hkv, att.d).transpose(1, 2)
    if att.hkv != att.h:  # GQA: each KV head serves h / hkv consecutive query heads
        k, v = k.repeat_interleave(att.h // att.hkv, dim=1), v.repeat_interleave(att.h // att.hkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=att.scale)  # (B, H, T, D)
    if probe is not None and probe.head_out:
        _acc(probe.heads, i, o.detach().float().norm(dim=-1).sum(dim=(0, 2)))  # (H,)
    x = x + F.linear(o.transpose(1, 2).reshape(B, T, att.h * att.d), att.o_proj.weight, att.o_proj.bias)
    h = _rms(x, layer.post_attention_layernorm.weight, eps)
    gate, up = F.linear(h, layer.mlp.gate_up_proj.weight).chunk(2, dim=-1)
    a = F.silu(gate) * up  # (B, T, I)
    if probe is not None and probe.mlp_act:
        _acc(probe.mlp, i, a.detach().float().abs().sum(dim=(0, 1)))  # (I,)
    return x + F.linear(a, layer.mlp.down_proj.weight)


def hidden_states(model: LlamaForCausalLM, ids: torch.Tensor, probe: Probe | None = None,
                  checkpoint: bool = False) -> torch.Tensor:
    """ids (B, T) → final normalised hidden states (B, T, hidden). `checkpoint` recomputes each block in the
    backward pass (activation memory of one block instead of all)."""
    c = model.config
    emb = model.model.embed_tokens.weight
    x = F.embedding(ids, emb)  # (B, T, hidden)
    cos, sin = rotary_tables(model, ids.shape[1], ids.device)
    rope_dim = c.rope_dim or c.head_dim
    for i, layer in enumerate(model.model.layers):
        if probe is not None and probe.skip == i:
            continue
        if checkpoint and torch.is_grad_enabled():
            y = torch.utils.checkpoint.checkpoint(_layer, layer, x, cos, sin, c.rms_norm_eps, rope_dim, i, None,
                                                  use_reentrant=False)
        else:
            y = _layer(layer, x, cos, sin, c.rms_norm_eps, rope_dim, i, probe)
        if probe is not None and probe.layer_io:
            cs = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1).clamp(-1, 1)  # (B, T)
            _acc(probe.angular, i, float((torch.arccos(cs) / torch.pi).sum()))
        x = y
    if probe is not None:
        probe.tokens += ids.numel()
    return _rms(x, model.model.norm.weight, c.rms_norm_eps)


def logits(model: LlamaForCausalLM, ids: torch.Tensor, probe: Probe | None = None,
           checkpoint: bool = False) -> torch.Tensor:
    """ids (B, T) → logits (B, T, V) in the compute dtype."""
    h = hidden_states(model, ids, probe, checkpoint)
    return F.linear(h, model.lm_head.weight, model.lm_head.bias)


def windows(ids: list[int], context: int, stride: int) -> list[tuple[list[int], int]]:
    """Sliding windows as in quant/perplexity.py: (window, index of its first scored target)."""
    out, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        first_new = max(prev_end - begin, 0)
        out.append((ids[begin:end], max(first_new - 1, 0) if begin else 0))
        prev_end = end
        if end == len(ids):
            break
    return out


@torch.no_grad()
def perplexity(fwd: Callable[[torch.Tensor], torch.Tensor], ids: list[int], context: int = 512,
               stride: int = 256) -> float:
    """Perplexity of `fwd` (ids (1, T) → logits (1, T, V)) with the same windows as `inferd eval perplexity`."""
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    nll, count = 0.0, 0
    for window, first in windows(ids, context, stride):
        lg = fwd(torch.tensor([window])).float()[0, :-1]  # (w - 1, V)
        lp = torch.log_softmax(lg, dim=-1).gather(1, torch.tensor(window[1:]).unsqueeze(1)).squeeze(1)
        nll -= float(lp[first:].sum())
        count += lp[first:].numel()
    return float(torch.exp(torch.tensor(nll / count)))
