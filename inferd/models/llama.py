"""Llama-family decoder over flat token batches and a paged KV cache. One implementation, configured by ModelConfig:
Llama / SmolLM (rope scaling linear, llama3, yarn), Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).
Gemma 3 (models/gemma3.py) reuses its attention."""

from __future__ import annotations

import torch
from torch import nn

from inferd.config import ModelConfig
from inferd.errors import ModelLoadError
from inferd.models.blocks import GatedMLP, Linear, RMSNorm, Rotary, logits_fp32
from inferd.ops import cpu_kernels
from inferd.ops.attention import AttnMetadata, paged_attention, write_kv
from inferd.ops.fused_decode import FusedDecoder


class LlamaAttention(nn.Module):
    """q/k/v projection (fused, optional bias), optional per-head q/k RMSNorm, rotary, paged attention (sliding-window
    when the layer has one), output projection."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.d**-0.5
        self.window = cfg.window(layer)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: torch.Tensor, rope: tuple[Rotary, torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
        meta: AttnMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2 Hkv) D)
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:  # per head, before the rotation
            q = self.q_norm(q.reshape(T * self.h, self.d)).reshape(T, self.h * self.d)
            k = self.k_norm(k.reshape(T * self.hkv, self.d)).reshape(T, self.hkv * self.d)
        rotary, cos, sin, positions = rope
        if cpu_kernels.rope_inplace(q, self.h, self.d, rotary.dim, rotary.cos, rotary.sin, positions) and \
                cpu_kernels.rope_inplace(k, self.hkv, self.d, rotary.dim, rotary.cos, rotary.sin, positions):
            q, k = q.reshape(T, self.h, self.d), k.reshape(T, self.hkv, self.d)
        else:
            if cos is None:
                cos, sin = rotary.cos_sin(positions)
            q = rotary.apply(q.reshape(T, self.h, self.d), cos, sin)  # (T, H, D)
            k = rotary.apply(k.reshape(T, self.hkv, self.d), cos, sin)  # (T, Hkv, D)
        v = v.reshape(T, self.hkv, self.d)
        if self.window is not None and meta.local is not None:  # a hybrid KV cache: this layer's own pool
            meta = meta.local
        write_kv(kv_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window)  # (T, H, D)
        return self.o_proj(o.reshape(T, self.h * self.d))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_act)

    def forward(self, x, residual, rope, kv_cache, meta):
        """x: the previous layer's output (or the embeddings when residual is None) → (output, residual);
        residual adds are fused into the following norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaInner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = LlamaInner(cfg)
        self.make_rotary(max_positions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._fused: FusedDecoder | None | bool = False  # built at the first forward (after quantization)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttnMetadata
    ) -> torch.Tensor:
        """input_ids, positions: (T,) → final hidden states (T, hidden)."""
        x = self.model.embed_tokens(input_ids)
        cos = sin = None  # the C rotary kernel reads the tables itself
        if x.is_cuda or not cpu_kernels.available():
            cos, sin = self.rotary.cos_sin(positions)
        if self._fused is False:
            self._fused = FusedDecoder.build(self) if not x.is_cuda else None
        fused = self._fused.run(x, positions, kv_caches, meta, final_norm=True) if self._fused else None
        if fused is not None:  # a decode step: all layers and the final norm in one C call
            return fused[0]
        rope = (self.rotary, cos, sin, positions)
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, rope, cache, meta)
        return self.model.norm.add_forward(x, residual)[0] if residual is not None else self.model.norm(x)

    def make_rotary(self, max_positions: int, device: torch.device | None = None) -> None:
        """(Re)builds the rotary tables for `max_positions` positions (on `device` when given)."""
        cfg = self.config
        self.rotary = Rotary(cfg.rope_dim or cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        if device is not None:
            self.rotary.to(device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_fp32(self.lm_head, hidden)

    # ---- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """HF-named tensors → parameters, fusing q/k/v and gate/up; every name and shape is checked."""
        cfg = self.config
        weights = dict(weights)
        if "lm_head.weight" not in weights:
            if not cfg.tie_word_embeddings and "model.embed_tokens.weight" not in weights:
                raise ModelLoadError("missing tensor lm_head.weight")
            weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")  # tied
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            for suffix in ("weight", "bias"):
                parts = [f"{p}.self_attn.{n}_proj.{suffix}" for n in "qkv"]
                if suffix == "bias" and not cfg.attention_bias:
                    continue
                missing = [n for n in parts if n not in weights]
                if missing:
                    raise ModelLoadError(f"missing tensor {missing[0]}")
                weights[f"{p}.self_attn.qkv_proj.{suffix}"] = torch.cat([weights.pop(n) for n in parts])
            parts = [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]
            missing = [n for n in parts if n not in weights]
            if missing:
                raise ModelLoadError(f"missing tensor {missing[0]}")
            weights[f"{p}.mlp.gate_up_proj.weight"] = torch.cat([weights.pop(n) for n in parts])
        params = dict(self.named_parameters())
        for name, tensor in weights.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in params:
                raise ModelLoadError(f"unexpected tensor {name} (shape {tuple(tensor.shape)})")
            param = params.pop(name)
            if param.shape != tensor.shape:
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
        if params:
            raise ModelLoadError(f"missing tensor {sorted(params)[0]}")
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
