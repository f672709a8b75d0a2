"""Gemma 3 decoder (text) over flat token batches and a paged KV cache, built from the shared blocks.

Differences from Llama: embeddings scaled by sqrt(hidden); RMSNorm by (1 + weight) — the parameters here hold the
effective multiplier 1 + weight (as GGUF files store it; an HF checkpoint's norms get +1 at load), so the plain
RMSNorm and its C kernel apply; four norms per layer (before and after attention and the MLP); q/k RMSNorm per head;
a tanh-GELU gated MLP; interleaved sliding-window layers with their own rope base and global layers; softmax scale
query_pre_attn_scalar ** -0.5; tied embeddings; optional final logit soft-capping. On the CPU a decode step's layers
run as one C call (ops/fused_decode.py), as for Llama.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from inferd.config import ModelConfig
from inferd.errors import ModelLoadError
from inferd.models.blocks import GatedMLP, Linear, RMSNorm, Rotary, logits_fp32
from inferd.models.llama import LlamaAttention
from inferd.ops import cpu_kernels
from inferd.ops.attention import AttnMetadata
from inferd.ops.fused_decode import FusedDecoder

# the norms that are (1 + weight) in an HF checkpoint
NORM_SUFFIXES = ("layernorm.weight", "norm.weight")


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.mlp_act)

    def forward(self, x, residual, rope, kv_cache, meta):
        """As LlamaDecoderLayer: (previous output, residual) → (output, residual), adds fused into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, kv_cache, meta))
        h, residual = self.pre_feedforward_layernorm.add_forward(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Inner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Inner(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.hidden_size)
        self.make_rotary(max_positions)
        self._fused: FusedDecoder | None | bool = False  # built at the first forward (after quantization)

    def make_rotary(self, max_positions: int, device: torch.device | None = None) -> None:
        """Global layers rotate with rope_theta (+ scaling), sliding-window layers with their own base."""
        cfg = self.config
        dim = cfg.rope_dim or cfg.head_dim
        self.rotary = Rotary(dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        local = cfg.rope_local_theta
        self.rotary_local = self.rotary if local is None else Rotary(dim, max_positions, local, cfg.rope_local_scaling)
        if device is not None:
            self.rotary.to(device)
            self.rotary_local.to(device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttnMetadata
    ) -> torch.Tensor:
        """input_ids, positions: (T,) → final hidden states (T, hidden)."""
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # in the compute dtype, as transformers does
        if self._fused is False:
            self._fused = FusedDecoder.build(self) if not x.is_cuda else None
        fused = self._fused.run(x, positions, kv_caches, meta, final_norm=True) if self._fused else None
        if fused is not None:  # a decode step: all layers and the final norm in one C call
            return fused[0]
        tables = x.is_cuda or not cpu_kernels.available()  # else the C rotary kernel reads the tables itself
        ropes = {}
        for name, rot in (("global", self.rotary), ("local", self.rotary_local)):
            cos, sin = rot.cos_sin(positions) if tables else (None, None)
            ropes[name] = (rot, cos, sin, positions)
        residual = None
        for i, (layer, cache) in enumerate(zip(self.model.layers, kv_caches)):
            rope = ropes["local" if self.config.window(i) is not None else "global"]
            x, residual = layer(x, residual, rope, cache, meta)
        return self.model.norm.add_forward(x, residual)[0] if residual is not None else self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = logits_fp32(self.lm_head, hidden)
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """HF-named tensors (norms as 1 + weight is applied: +1 here) → parameters, fusing q/k/v and gate/up."""
        from inferd.models.llama import LlamaForCausalLM

        weights = {k: (v + 1 if k.endswith(NORM_SUFFIXES) else v) for k, v in weights.items()}
        if "lm_head.weight" not in weights and "model.embed_tokens.weight" not in weights:
            raise ModelLoadError("missing tensor model.embed_tokens.weight")
        LlamaForCausalLM.load_weights(self, weights)  # type: ignore[arg-type]  # same names, same checks
