"""`inferd quantize`: write a quantized model directory that loads with `--model DST`.

Layout: config.json (with `quantization_config` = the recipe), model.safetensors, tokenizer.json,
tokenizer_config.json (chat template, special tokens). Quantized tensors: `<layer>.qweight` int8 +
`<layer>.scales` (int8; fp16, per group of 32 along K where the VNNI kernel runs, else per channel), or `<layer>.qint4` uint8 (two 4-bit values per byte, low nibble first) +
`<layer>.scale` + `<layer>.zero` (int4, per group). The embedding and the lm_head are int8 in both methods
(`model.embed_tokens.qweight`, `lm_head.qweight`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from inferd.errors import ModelLoadError
from inferd.quant.apply import QuantConfig, _parts
from inferd.quant.linear import (
    FILE_INT8_GROUP,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    quantize_int4,
    quantize_int8,
)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.int32, device=p.device)
    out[:, 0::2] = (p & 0x0F).to(torch.int32)
    out[:, 1::2] = (p >> 4).to(torch.int32)
    return out


def linear_names(num_layers: int) -> list[str]:
    return [name for i in range(num_layers) for name in _parts(i)] + ["lm_head"]


def save_quantized(lm, dst: str | Path, qc: QuantConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    from safetensors.torch import save_file

    if qc.method not in ("int8", "int4"):
        raise ValueError("inferd quantize writes int8 or int4 models")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model, c = lm.model, lm.config
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    names = linear_names(c.num_layers)
    for k, name in enumerate(names):
        w = modules[name].weight.data.float()
        if qc.method == "int8" or name == "lm_head":  # the lm_head is int8 in every method (see quant/apply.py)
            q, s = quantize_int8(w, FILE_INT8_GROUP)
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q, s.half()  # fp16: exact when grouped
        else:
            q, s, z = quantize_int4(w, qc.group_size)
            tensors[f"{name}.qint4"] = _pack_nibbles(q)
            tensors[f"{name}.scale"], tensors[f"{name}.zero"] = s.half(), z.half()  # exact (see quantize_int4)
        if modules[name].bias is not None:
            tensors[f"{name}.bias"] = modules[name].bias.data.to(torch.bfloat16)
        if progress:
            progress(k + 1, len(names))
    q8, s8 = quantize_int8(model.model.embed_tokens.weight.data, FILE_INT8_GROUP)
    tensors["model.embed_tokens.qweight"], tensors["model.embed_tokens.scales"] = q8, s8
    for name, p in model.named_parameters():
        if "layernorm" in name or name == "model.norm.weight":
            tensors[name] = p.data.float()  # tiny: keep full precision
    recipe = {"quant_method": "inferd", "method": qc.method, "group_size": qc.group_size if qc.method == "int4"
              else None, "source": str(lm.path), "embedding": "int8 per-row", "created": time.strftime("%Y-%m-%d")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"quantization": json.dumps(recipe)})
    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[c.architecture]],
        "model_type": c.architecture, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
        "vocab_size": c.vocab_size, "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids),
        "quantization_config": recipe,
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = lm.tokenizer
    tok.hf.save(str(dst / "tokenizer.json"))
    tc = {"bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None, "chat_template": tok.chat_template,
          "add_bos_token": tok.add_bos}
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return dst


def load_quantized_into(model: nn.Module, weights: dict[str, torch.Tensor], recipe: dict, dtype: torch.dtype,
                        dense_from_rows: int = 0) -> None:
    """Build the packed layers of a saved quantized model and load the remaining (norm) weights."""
    method = recipe.get("method")
    modules = dict(model.named_modules())
    w = dict(weights)
    device = next(model.parameters()).device  # packed layouts are built on the device they run on

    def take(key: str) -> torch.Tensor:
        if key not in w:
            raise ModelLoadError(f"missing tensor {key}")
        return w.pop(key).to(device)

    for name in linear_names(model.config.num_layers):
        parent_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
        parent = modules[parent_name] if parent_name else model
        bias = w.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.to(device)
        if method == "int8" or name == "lm_head":
            layer: nn.Module = Int8Linear(take(f"{name}.qweight"), take(f"{name}.scales"), bias, dense_from_rows)
        elif method == "int4":
            layer = Int4Linear(_unpack_nibbles(take(f"{name}.qint4")), take(f"{name}.scale").float(),
                               take(f"{name}.zero").float(), int(recipe["group_size"]), bias, dense_from_rows)
        else:
            raise ModelLoadError(f"unknown quantization method {method!r} in config.json")
        setattr(parent, attr, layer)
    model.model.embed_tokens = Int8Embedding(take("model.embed_tokens.qweight"), take("model.embed_tokens.scales"),
                                             dtype)
    params = {n: p for n, p in model.named_parameters()}
    for name, t in w.items():
        if name not in params:
            raise ModelLoadError(f"unexpected tensor {name}")
        if params[name].shape != t.shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)}")
        with torch.no_grad():
            params.pop(name).copy_(t)
    if params:
        raise ModelLoadError(f"missing tensor {sorted(params)[0]}")
