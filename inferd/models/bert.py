"""BERT-family encoder (post-LN transformer, GELU) over packed variable-length batches.

Linear layers and norms run on the packed tokens and attention runs per sequence: no padding anywhere. Names follow Hugging Face (`embeddings.*`, `encoder.layer.N.*`, `pooler.*`,
optional `bert.` prefix and `classifier.*` for sequence classification)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inferd.errors import ModelLoadError
from inferd.ops.encoder_attention import encoder_attention


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_labels: int = 0
    id2label: dict[int, str] | None = None

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> BertConfig:
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") not in ("bert", None) and not any(a.startswith("Bert") for a in archs):
            raise ModelLoadError(f"unsupported encoder architecture {archs or cfg.get('model_type')!r} "
                                 "(supported: BertModel, BertForSequenceClassification)")
        classify = any(a.endswith("ForSequenceClassification") for a in archs)
        id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()} if classify else None
        return BertConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"), num_labels=len(id2label) if id2label else 0, id2label=id2label,
        )


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        h = c.hidden_size
        self.heads, self.d = c.num_heads, h // c.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.inter = nn.Linear(h, c.intermediate_size)
        self.out = nn.Linear(c.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.act = c.hidden_act
        self.gelu_tanh = c.hidden_act in ("gelu_new", "gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        """x: (N, h) packed tokens; spans: (start, length) of each sequence in x.

        Attention runs per sequence on its own tokens: no padding, no mask. Measured on all-MiniLM-L6-v2
        (32 texts of 15–260 tokens, bf16): per-sequence SDPA 4× faster than one padded, masked SDPA call over the
        batch; the C kernel (ops/encoder_attention.py) runs every sequence in one parallel region."""
        N, h = x.shape
        o = encoder_attention(self.qkv(x).view(N, 3, self.heads, self.d), spans)  # (N, h)
        x = self.attn_norm(x + self.attn_out(o))
        inter = self.inter(x)
        if getattr(self.inter, "act", None) is None:  # a W8A8Linear may apply the GELU in its epilogue
            inter = F.gelu(inter, approximate="tanh" if self.gelu_tanh else "none")
        return self.out_norm(x + self.out(inter))


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.emb_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))
        if c.num_labels:
            self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, seqs: list[list[int]], type_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists → (packed hidden states (N, h), lengths (B,))."""
        dev = self.word.weight.device
        lens = torch.tensor([len(s) for s in seqs])
        ids = torch.tensor([t for s in seqs for t in s], device=dev)
        pos = torch.cat([torch.arange(n) for n in lens.tolist()]).to(dev)
        types = torch.tensor([t for s in type_ids for t in s], device=dev) if type_ids else torch.zeros_like(ids)
        starts = (torch.cumsum(lens, 0) - lens).tolist()
        spans = list(zip(starts, lens.tolist()))
        x = self.emb_norm(self.word(ids) + self.pos(pos) + self.token_type(types))
        for layer in self.layers:
            x = layer(x, spans)
        return x, lens

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """HF names → parameters (q/k/v fused); every name and shape checked."""
        w = {k.removeprefix("bert."): v for k, v in weights.items()}
        rename = {
            "embeddings.word_embeddings.weight": "word.weight",
            "embeddings.position_embeddings.weight": "pos.weight",
            "embeddings.token_type_embeddings.weight": "token_type.weight",
            "embeddings.LayerNorm.weight": "emb_norm.weight", "embeddings.LayerNorm.bias": "emb_norm.bias",
            "embeddings.LayerNorm.gamma": "emb_norm.weight", "embeddings.LayerNorm.beta": "emb_norm.bias",
        }
        out: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_layers):
            p = f"encoder.layer.{i}."
            for suffix in ("weight", "bias"):
                parts = [f"{p}attention.self.{n}.{suffix}" for n in ("query", "key", "value")]
                missing = [n for n in parts if n not in w]
                if missing:
                    raise ModelLoadError(f"missing tensor {missing[0]}")
                out[f"layers.{i}.qkv.{suffix}"] = torch.cat([w.pop(n) for n in parts])
                rename[f"{p}attention.output.dense.{suffix}"] = f"layers.{i}.attn_out.{suffix}"
                rename[f"{p}attention.output.LayerNorm.{suffix}"] = f"layers.{i}.attn_norm.{suffix}"
                rename[f"{p}intermediate.dense.{suffix}"] = f"layers.{i}.inter.{suffix}"
                rename[f"{p}output.dense.{suffix}"] = f"layers.{i}.out.{suffix}"
                rename[f"{p}output.LayerNorm.{suffix}"] = f"layers.{i}.out_norm.{suffix}"
        if self.config.num_labels:
            for suffix in ("weight", "bias"):
                rename[f"pooler.dense.{suffix}"] = f"pooler.{suffix}"
                rename[f"classifier.{suffix}"] = f"classifier.{suffix}"
        for name, t in w.items():
            if name in rename:
                out[rename[name]] = t
            elif not (name.startswith("pooler.") or name.endswith("position_ids")):
                raise ModelLoadError(f"unexpected tensor {name} (shape {tuple(t.shape)})")
        params = dict(self.named_parameters())
        for name, t in out.items():
            param = params.pop(name)
            if param.shape != t.shape:
                raise ModelLoadError(f"tensor for {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(t)
        if params:
            inv = {v: k for k, v in rename.items()}
            raise ModelLoadError(f"missing tensor {inv.get(sorted(params)[0], sorted(params)[0])}")
