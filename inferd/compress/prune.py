"""Structured pruning of a Llama-family model, Minitron-style: importance measured on calibration text, then
config and tensors edited consistently.

- depth (`drop_layers`): a block's importance is the mean angular distance arccos(cos(x_in, x_out)) / π between
  the residual stream entering and leaving it (ShortGPT's block influence), or the loss increase on the
  calibration text when it is skipped (`importance="loss"`); the least important blocks go, the rest are
  renumbered in order.
- MLP width (`mlp_ratio`): channel j of a layer scores mean |silu(gate_j) · up_j|; each layer keeps its top
  channels (rows of gate/up, columns of down), the same count in every layer.
- attention heads (`heads_keep`): a query head scores the mean L2 norm of its attention output; GQA is respected
  by keeping the same number of query heads in every KV group (K/V heads all stay, so the grouping holds).

Kept indices stay in their original order, so pruning that removes nothing reproduces the model exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from inferd.compress.forward import Probe, logits
from inferd.compress.io import hf_tensors
from inferd.errors import InferdError
from inferd.loader.materialize import skip_init
from inferd.models.llama import LlamaForCausalLM

IMPORTANCE = ("angular", "loss")


@dataclass(frozen=True)
class PruneConfig:
    drop_layers: int = 0
    mlp_ratio: float = 1.0  # fraction of MLP channels kept
    heads_keep: int | None = None  # query heads kept per layer (None: all)
    importance: str = "angular"  # depth score: angular | loss
    calib_tokens: int = 8192
    seq_len: int = 256


@dataclass
class PruneReport:
    layer_scores: list[float]  # per original layer, higher = more important
    dropped: list[int]
    mlp_kept: int
    heads_kept: int
    kept_heads: list[list[int]] = field(default_factory=list)  # per kept layer, original head indices

    def ranking(self, method: str) -> str:
        what = "angular distance in→out" if method == "angular" else "loss increase when skipped"
        order = sorted(range(len(self.layer_scores)), key=lambda i: self.layer_scores[i])
        lines = [f"layer importance ({what}; least important first):"]
        for i in order:
            mark = "  dropped" if i in self.dropped else ""
            lines.append(f"  layer {i:3d}  {self.layer_scores[i]:.4f}{mark}")
        return "\n".join(lines)


def mlp_channels_kept(inter: int, ratio: float) -> int:
    """Channels kept: ratio · I, rounded down to a multiple of 32 when at least 64 remain (int4 groups of 32
    along the down projection's input stay whole)."""
    n = int(round(ratio * inter))
    return n - n % 32 if n >= 64 else n


def validate(cfg: PruneConfig, model: LlamaForCausalLM) -> None:
    c = model.config
    if cfg.importance not in IMPORTANCE:
        raise InferdError(f"unknown importance {cfg.importance!r}; choose one of {', '.join(IMPORTANCE)}")
    if not 0 <= cfg.drop_layers < c.num_layers:
        raise InferdError(f"--drop-layers {cfg.drop_layers} must be between 0 and {c.num_layers - 1} "
                          f"(the model has {c.num_layers} layers; at least one must stay)")
    if not 0 < cfg.mlp_ratio <= 1 or mlp_channels_kept(c.intermediate_size, cfg.mlp_ratio) < 1:
        raise InferdError(f"--mlp-ratio {cfg.mlp_ratio} must be in (0, 1] and keep at least one of the "
                          f"{c.intermediate_size} MLP channels")
    if cfg.heads_keep is not None and not (1 <= cfg.heads_keep <= c.num_heads
                                           and cfg.heads_keep % c.num_kv_heads == 0):
        raise InferdError(f"--heads-keep {cfg.heads_keep} must be a multiple of the {c.num_kv_heads} KV heads "
                          f"between {c.num_kv_heads} and {c.num_heads} (GQA: each KV group keeps the same "
                          "number of query heads)")


def calibration_batches(ids: list[int], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Token ids → (1, seq_len) windows (the last may be shorter), at most max_tokens in all."""
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise InferdError("the calibration text is empty")
    return [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


@torch.no_grad()
def _calib_loss(model: LlamaForCausalLM, batches: list[torch.Tensor], skip: int | None = None) -> float:
    total, n = 0.0, 0
    for b in batches:
        lg = logits(model, b, Probe(skip=skip)).float()[0, :-1]
        total += float(F.cross_entropy(lg, b[0, 1:], reduction="sum"))
        n += b.shape[1] - 1
    return total / n


@torch.no_grad()
def measure(model: LlamaForCausalLM, batches: list[torch.Tensor], importance: str) -> tuple[list[float], Probe]:
    """(per-layer importance, the probe with MLP channel and head statistics)."""
    probe = Probe(layer_io=True, mlp_act=True, head_out=True)
    for b in batches:
        logits(model, b, probe)
    if importance == "angular":
        scores = [a / probe.tokens for a in probe.angular]
    else:
        base = _calib_loss(model, batches)
        scores = [_calib_loss(model, batches, skip=i) - base for i in range(model.config.num_layers)]
    return scores, probe


def _topk_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


def prune(model: LlamaForCausalLM, cfg: PruneConfig, batches: list[torch.Tensor]) -> tuple[LlamaForCausalLM,
                                                                                           PruneReport]:
    """Returns a new, smaller model (fp32) and what was removed. `model` is left as it was."""
    validate(cfg, model)
    c = model.config
    scores, probe = measure(model, batches, cfg.importance)
    dropped = sorted(sorted(range(c.num_layers), key=lambda i: scores[i])[:cfg.drop_layers])
    kept = [i for i in range(c.num_layers) if i not in dropped]
    inter = mlp_channels_kept(c.intermediate_size, cfg.mlp_ratio)
    heads = cfg.heads_keep or c.num_heads
    group, per_group = c.num_heads // c.num_kv_heads, heads // c.num_kv_heads
    old = hf_tensors(model, torch.float32)
    new: dict[str, torch.Tensor] = {k: v for k, v in old.items() if not k.startswith("model.layers.")}
    report = PruneReport(scores, dropped, inter, heads)
    d = c.head_dim
    for j, i in enumerate(kept):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        layer = {k[len(src):]: v for k, v in old.items() if k.startswith(src)}
        ch = _topk_sorted(probe.mlp[i], inter)
        layer["mlp.gate_proj.weight"] = layer["mlp.gate_proj.weight"][ch]
        layer["mlp.up_proj.weight"] = layer["mlp.up_proj.weight"][ch]
        layer["mlp.down_proj.weight"] = layer["mlp.down_proj.weight"][:, ch]
        hs = torch.cat([g * group + _topk_sorted(probe.heads[i][g * group:(g + 1) * group], per_group)
                        for g in range(c.num_kv_heads)])  # query heads kept, per KV group, in order
        report.kept_heads.append(hs.tolist())
        rows = (hs[:, None] * d + torch.arange(d)).reshape(-1)  # (heads · D,) feature indices
        layer["self_attn.q_proj.weight"] = layer["self_attn.q_proj.weight"][rows]
        if "self_attn.q_proj.bias" in layer:
            layer["self_attn.q_proj.bias"] = layer["self_attn.q_proj.bias"][rows]
        layer["self_attn.o_proj.weight"] = layer["self_attn.o_proj.weight"][:, rows]
        new.update({dst + k: v.contiguous() for k, v in layer.items()})
    new_cfg = replace(c, num_layers=len(kept), intermediate_size=inter, num_heads=heads)
    with skip_init():  # every weight is loaded below
        small = LlamaForCausalLM(new_cfg, model.rotary.cos.shape[0])
    small.load_weights(new)  # checks every name and shape
    small.requires_grad_(False)
    return small, report


def summary(cfg: PruneConfig, before: LlamaForCausalLM, after: LlamaForCausalLM, report: PruneReport) -> str:
    def n(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    a, b = before.config, after.config
    return (f"layers {a.num_layers} → {b.num_layers}, MLP channels {a.intermediate_size} → {b.intermediate_size}, "
            f"query heads {a.num_heads} → {b.num_heads} (KV heads {b.num_kv_heads}); parameters "
            f"{n(before) / 1e6:.1f}M → {n(after) / 1e6:.1f}M ({n(after) / n(before):.0%})")


def recipe(cfg: PruneConfig, source: str, report: PruneReport) -> dict:
    return {"tool": "inferd prune", "source": source, "drop_layers": cfg.drop_layers, "dropped": report.dropped,
            "importance": cfg.importance, "mlp_ratio": cfg.mlp_ratio, "mlp_kept": report.mlp_kept,
            "heads_keep": report.heads_kept, "calib_tokens": cfg.calib_tokens,
            "layer_scores": [round(s, 6) for s in report.layer_scores if math.isfinite(s)]}
