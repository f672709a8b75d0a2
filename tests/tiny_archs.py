"""Tiny random models of every supported architecture, built by Hugging Face transformers from a config (no
download), saved as an HF directory (save_pretrained) and written as GGUF the way llama.cpp's converter lays them
out (gguf.GGUFWriter): llama/mistral Q/K rows permuted, Gemma norms stored as 1 + weight, Llama 3 rope scaling as
the rope_freqs tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.tiny_models import CHAT_TEMPLATE, add_tiny_tokenizer, build_tokenizer

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

# name → (transformers config class name, model class name, GGUF architecture, config overrides)
ARCHS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", "llama",
               {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", "llama",
                     {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", "llama",
                   {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "llama", {"sliding_window": 8, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", {"head_dim": 32, "attention_bias": False}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3",
               {"num_hidden_layers": 4, "head_dim": 32, "num_key_value_heads": 1, "sliding_window": 8,
                "sliding_window_pattern": 2, "query_pre_attn_scalar": 32, "tie_word_embeddings": True,
                "final_logit_softcapping": 30.0, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
                "hidden_activation": "gelu_pytorch_tanh"}),
}


def build_hf(name: str, dirpath: Path, seed: int = 0, **overrides: Any):
    """Builds the transformers model (random weights, norms and biases randomised too) and saves it with a tokenizer;
    returns the transformers model (fp32, eval)."""
    import transformers

    cfg_cls, model_cls, _, extra = ARCHS[name]
    dirpath.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    kwargs = {**BASE, **extra, **overrides, "vocab_size": tok.get_vocab_size()}
    if name == "gemma3":
        period = kwargs.pop("sliding_window_pattern")
        kwargs["layer_types"] = ["sliding_attention" if (i + 1) % period else "full_attention"
                                 for i in range(kwargs["num_hidden_layers"])]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    cfg.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.0 if name == "gemma3" else 1.0))
            elif pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "embed" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name == "gemma3" else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    model.save_pretrained(str(dirpath))
    tok.save(str(dirpath / "tokenizer.json"))
    (dirpath / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    return model


def _llama3_factors(cfg: dict[str, Any], dim: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py for Llama 3.1 scaling: per-frequency divisors (rope_freqs.weight)."""
    s = cfg["rope_parameters"]
    base, factor = s["rope_theta"], s["factor"]
    lo, hi, old = s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(name: str, hf_dir: Path, path: Path, *, arch: str | None = None, drop: tuple[str, ...] = (),
               metadata: dict[str, int] | None = None, raw_types: dict[str, str] | None = None) -> Path:
    """`arch`, `drop` (GGUF tensor names), `metadata` (uint32 keys replaced) and `raw_types` (GGUF tensor name →
    a type whose blocks are written as zero bytes) make broken files for the bad-input tests."""
    import gguf
    from safetensors.torch import load_file

    from inferd.loader.gguf import hf_to_gguf_name, llama_permute

    real_arch = ARCHS[name][2]
    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch or real_arch)
    arch = real_arch
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        w.add_uint32(f"{w.arch}.{key}", value)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    if "feed_forward_length" not in metadata:
        w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    rope = cfg["rope_parameters"]
    if name == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg["sliding_window"])
        pattern = [t == "sliding_attention" for t in cfg["layer_types"]]
        w.add_array(f"{arch}.attention.sliding_window_pattern", pattern)
        if cfg.get("final_logit_softcapping"):
            w.add_float32(f"{arch}.final_logit_softcapping", cfg["final_logit_softcapping"])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
        if cfg.get("sliding_window"):  # Mistral: every layer
            w.add_sliding_window(cfg["sliding_window"])
    kind = rope.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(cfg, head_dim))
    add_tiny_tokenizer(w, hf_dir)
    for tname, t in load_file(str(hf_dir / "model.safetensors")).items():
        arr = t.float().numpy()
        if arch == "llama" and tname.endswith("q_proj.weight"):
            arr = llama_permute(arr, heads)
        elif arch == "llama" and tname.endswith("k_proj.weight"):
            arr = llama_permute(arr, kv_heads)
        if name == "gemma3" and tname.endswith("norm.weight"):
            arr = arr + 1  # llama.cpp stores Gemma's (1 + weight)
        if tname == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        gname = hf_to_gguf_name(tname, arch)
        if gname in drop:
            continue
        if raw_types and gname in raw_types:
            qt = getattr(gguf.GGMLQuantizationType, raw_types[gname])
            block, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(gname, np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8), raw_dtype=qt)
            continue
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_gemma3_multimodal(dirpath: Path, legacy: bool = False, seed: int = 0):
    """A tiny Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration: a SigLIP vision tower, a projector and
    the tiny Gemma 3 text model above), saved as transformers saves it; returns the transformers model.
    `legacy` rewrites it as older checkpoints are: the text model's tensors under `model.language_model.` (the
    layout of transformers 4.52–4.57) and a `text_config` holding only what differs from transformers' defaults."""
    import transformers
    from safetensors.torch import load_file, save_file

    dirpath.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    extra = dict(ARCHS["gemma3"][3])
    period = extra.pop("sliding_window_pattern")
    text = {**BASE, **extra, "num_hidden_layers": 4, "vocab_size": vocab,
            "layer_types": ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(4)]}
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**text), vision_config=vision,
                                    mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 3,
                                    eoi_token_index=vocab - 2, eos_token_id=[2, 5])
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "language_model" in pname:
                scale, shift = (0.1, 0.0) if "norm" in pname else (0.2 if "embed" in pname else 0.15, 0.0)
                p.copy_(torch.randn(p.shape, generator=g) * scale + shift)
    model.save_pretrained(str(dirpath))
    tok.save(str(dirpath / "tokenizer.json"))
    (dirpath / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (dirpath / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                               "eos_token": "<|im_end|>"}))
    if legacy:
        path = dirpath / "model.safetensors"
        tensors = load_file(str(path))
        save_file({("model.language_model." + k[len("language_model.model."):]
                    if k.startswith("language_model.model.") else
                    "model." + k if not k.startswith("lm_head") else k): v for k, v in tensors.items()}, str(path))
        full = json.loads((dirpath / "config.json").read_text())
        defaults = transformers.Gemma3TextConfig().to_dict()
        full["text_config"] = {k: v for k, v in full["text_config"].items() if defaults.get(k) != v}
        (dirpath / "config.json").write_text(json.dumps(full))
    return model
