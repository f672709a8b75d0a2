"""Load a model as trainable fp32 tensors, and write a model back as an HF-style directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with the chat template) that `--model DIR` loads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from inferd.config import ModelConfig
from inferd.errors import InferdError
from inferd.loader.materialize import FUSED
from inferd.loader.tokenizer import Tokenizer
from inferd.models.llama import LlamaForCausalLM
from inferd.models.registry import LoadedModel, load_model
from inferd.quant.apply import QuantConfig

HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def load_dense(spec: str, max_len: int = 2048) -> LoadedModel:
    """Any model inferd loads (catalogue name, .gguf, HF or `inferd prune` directory), dequantized to fp32 dense
    tensors; a GGUF's 4-bit blocks are dequantized once. The caller decides what requires grad."""
    lm = load_model(spec, torch.float32, torch.device("cpu"), max_len, QuantConfig("none"))
    if not isinstance(lm.model, LlamaForCausalLM):
        raise InferdError(f"{spec}: compression supports Llama-family models, not {lm.config.architecture}")
    linears = [m for n, m in lm.model.named_modules() if n.endswith("_proj") or n == "lm_head"]
    if lm.quantization != "none" or not all(isinstance(m, torch.nn.Linear) for m in linears):
        raise InferdError(f"{spec} is a quantized model; prune/distill a dense model and quantize afterwards")
    return lm


def hf_tensors(model: LlamaForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Parameters under HF names: fused qkv / gate_up split back into q, k, v / gate, up."""
    c = model.config
    splits = {"self_attn.qkv_proj": [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                     c.num_kv_heads * c.head_dim],
              "mlp.gate_up_proj": [c.intermediate_size, c.intermediate_size]}
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        t = p.detach().to(dtype)
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = t.contiguous()
            continue
        for part, chunk in zip(FUSED[fused], t.split(splits[fused], dim=0)):
            out[name.replace(fused, part)] = chunk.contiguous()
    if c.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_config(c: ModelConfig, recipe: dict[str, Any] | None) -> dict[str, Any]:
    cfg = {
        "architectures": [HF_ARCH[c.architecture]], "model_type": c.architecture, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias, "vocab_size": c.vocab_size, "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids), "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    if recipe:
        cfg["inferd_compression"] = recipe  # the recipe travels in metadata, never in the file name
    return cfg


def save_model(model: LlamaForCausalLM, tok: Tokenizer, dst: str | Path, recipe: dict[str, Any] | None,
               dtype: torch.dtype = torch.bfloat16) -> Path:
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    recipe = {**(recipe or {}), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    save_file(hf_tensors(model, dtype), str(dst / "model.safetensors"),
              metadata={"inferd_compression": json.dumps(recipe)})
    cfg = hf_config(model.config, recipe)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.hf.save(str(dst / "tokenizer.json"))
    tc = {"bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None, "chat_template": tok.chat_template,
          "add_bos_token": tok.add_bos}
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return dst



def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
