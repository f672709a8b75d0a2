"""Load a generative model from a name, a .gguf file or an HF directory: config, weights, tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from inferd.config import ModelConfig, is_multimodal
from inferd.errors import ModelLoadError
from inferd.hardware import release_free_memory
from inferd.loader import hub, repack_cache
from inferd.loader.gguf import GGUFTensors, config_from_gguf, read_gguf
from inferd.loader.materialize import materialize, skip_init
from inferd.loader.safetensors import SafetensorsTensors, load_safetensors, read_hf_config
from inferd.loader.tokenizer import Tokenizer
from inferd.models.gemma3 import NORM_SUFFIXES, Gemma3ForCausalLM
from inferd.models.llama import LlamaForCausalLM
from inferd.quant.apply import QuantConfig, pack_gguf, quantize_streaming, resolve_auto
from inferd.quant.io import load_quantized_into

log = logging.getLogger(__name__)

# our architecture name (GGUF general.architecture; config.HF_ARCHITECTURES maps config.json's) → model class
ARCHITECTURES: dict[str, type[LlamaForCausalLM] | type[Gemma3ForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

MAX_MODEL_LEN_CAP = 8192


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    model: LlamaForCausalLM | Gemma3ForCausalLM
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    quantization: str = "none"  # the method after `auto` was resolved


def _stream(model: torch.nn.Module, src: GGUFTensors | SafetensorsTensors, quant: QuantConfig, dtype: torch.dtype,
            device: torch.device) -> None:
    """Fills a model skeleton tensor by tensor: packed layers straight from a GGUF's blocks (`gguf`), or each
    linear quantized as it is read (`int8`/`int4`), then the rest dense; never a dense copy of the model."""
    consumed: set[str] = set()
    if quant.method == "gguf":
        if not isinstance(src, GGUFTensors):
            raise ModelLoadError("--quantization gguf needs a .gguf model (use int8 or int4 for other formats)")
        key = None
        if device.type == "cpu" and os.environ.get("INFERD_REPACK_CACHE", "1") != "0":
            key = repack_cache.cache_key(src.file.path, {"method": quant.method, "dtype": str(dtype),
                                                         "dense_from_rows": quant.dense_from_rows})
        consumed = pack_gguf(model, src, quant, dtype, device, key)
    elif quant.method in ("int8", "int4"):
        consumed = quantize_streaming(model, src, quant, dtype, device)
    materialize(model, set(src.names()), lambda n: src.dense(n, dtype), dtype, device, consumed, src.release)


def load_model(
    spec: str, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None,
    quant: QuantConfig | None = None,
) -> LoadedModel:
    quant = quant or QuantConfig()
    path = hub.resolve(spec)
    src: GGUFTensors | SafetensorsTensors | None = None
    recipe = None
    if path.is_dir():
        quant = resolve_auto(quant, None, device)
        hf_cfg = read_hf_config(path)
        recipe = hf_cfg.get("quantization_config")
        if recipe is not None and recipe.get("quant_method") != "inferd":
            raise ModelLoadError(f"{path}: quantization {recipe.get('quant_method')!r} is not supported "
                                 "(inferd loads its own int8/int4 files, and GGUF)")
        cfg = ModelConfig.from_hf(hf_cfg)
        if recipe is not None:  # a model written by `inferd quantize`: packed tensors, read whole
            weights = load_safetensors(path, None)
        else:
            offset = NORM_SUFFIXES if cfg.architecture == "gemma3" else ()
            src = SafetensorsTensors(path, offset, tied=cfg.tie_word_embeddings, multimodal=is_multimodal(hf_cfg))
            if src.skipped:
                log.info("%s: a multimodal checkpoint; its text model is loaded, the vision tower and projector "
                         "(%.1fM parameters) are not", path.name, src.skipped / 1e6)
        tok = Tokenizer.from_hf_dir(path, cfg.eos_token_ids)
    elif path.suffix == ".gguf" or path.is_file():
        f = read_gguf(path)
        cfg = config_from_gguf(f)
        src = GGUFTensors(f, cfg)
        quant = resolve_auto(quant, src.linear_types(), device)
        tok = Tokenizer.from_gguf_metadata(f.metadata)
        del f  # src holds the file: dropping src unmaps it
    else:
        raise ModelLoadError(f"cannot load {path}: not a .gguf file or a model directory")
    if max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, MAX_MODEL_LEN_CAP)
    if src is not None:  # one tensor at a time (a GGUF from the file's mmap), never a whole dense copy
        with skip_init():  # a CPU skeleton whose uninitialised weights are replaced one by one
            model = ARCHITECTURES[cfg.architecture](cfg, max_model_len)
        _stream(model, src, quant, dtype, device)
        del src  # unmaps a GGUF file
    else:
        with torch.device("meta"):
            model = ARCHITECTURES[cfg.architecture](cfg, max_model_len)
        model = model.to_empty(device=device).to(dtype)
        assert recipe is not None
        if quant.method not in ("none", recipe.get("method")):
            raise ModelLoadError(f"{path} is already quantized ({recipe.get('method')}); drop --quantization")
        load_quantized_into(model, weights, recipe, dtype, quant.dense_from_rows)
    if quant.method != "none":
        log.info("quantized %s with %s", path.name, quant)
    model.make_rotary(max_model_len, device)
    model.eval().requires_grad_(False)
    release_free_memory()
    if cfg.eos_token_ids:  # the model's own end-of-turn ids too (Gemma: <end_of_turn> beside <eos>)
        tok.eos_token_ids = tuple(dict.fromkeys([*tok.eos_token_ids, *cfg.eos_token_ids]))
    name = spec if spec in hub.CATALOGUE else path.name
    log.info("loaded %s (%s, %d layers, %s) from %s", name, cfg.architecture, cfg.num_layers, dtype, path)
    return LoadedModel(name, path, cfg, model, tok, dtype, device, max_model_len, quant.method)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of all weights, of which bf16 copies kept beside packed layers), each storage counted once."""
    from inferd.ops import onednn
    from inferd.quant.linear import module_bytes

    copies = 0
    for mod in model.modules():
        packed = getattr(mod, "_dense_onednn", None)
        dense = getattr(mod, "dense", None) if hasattr(mod, "dense_from_rows") else None
        if packed is not None:
            copies += onednn.nbytes(packed)
        elif isinstance(dense, torch.Tensor):
            copies += dense.untyped_storage().nbytes()
    return module_bytes(model), copies
