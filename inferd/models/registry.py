"""Load a generative model from a name, a .gguf file or an HF directory: config, weights, tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from inferd.config import ModelConfig
from inferd.errors import ModelLoadError
from inferd.loader import hub
from inferd.loader.gguf import config_from_gguf, load_gguf_tensors, read_gguf
from inferd.loader.safetensors import load_hf_causal_lm
from inferd.loader.tokenizer import Tokenizer
from inferd.models.blocks import Rotary
from inferd.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}

MAX_MODEL_LEN_CAP = 8192


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    max_model_len: int


def load_model(
    spec: str, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None
) -> LoadedModel:
    path = hub.resolve(spec)
    if path.is_dir():
        cfg, weights = load_hf_causal_lm(path, dtype)
        tok = Tokenizer.from_hf_dir(path, cfg.eos_token_ids)
    elif path.suffix == ".gguf" or path.is_file():
        f = read_gguf(path)
        cfg = config_from_gguf(f)
        weights = load_gguf_tensors(f, cfg, dtype)
        tok = Tokenizer.from_gguf_metadata(f.metadata)
    else:
        raise ModelLoadError(f"cannot load {path}: not a .gguf file or a model directory")
    if max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, MAX_MODEL_LEN_CAP)
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.architecture](cfg, max_model_len)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = Rotary(cfg.rope_dim or cfg.head_dim, max_model_len, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.load_weights({k: v.to(device) for k, v in weights.items()})
    model.eval().requires_grad_(False)
    if not tok.eos_token_ids and cfg.eos_token_ids:
        tok.eos_token_ids = cfg.eos_token_ids
    name = spec if spec in hub.CATALOGUE else path.name
    log.info("loaded %s (%s, %d layers, %s) from %s", name, cfg.architecture, cfg.num_layers, dtype, path)
    return LoadedModel(name, path, cfg, model, tok, dtype, device, max_model_len)
