"""GGUF reader: metadata → ModelConfig, tensors → HF-named torch tensors (dequantized for now)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferd.config import ModelConfig
from inferd.errors import ModelLoadError

SUPPORTED_ARCHS = {"llama", "qwen2", "mistral"}

# GGUF tensor name (per layer with {i}) → HF name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    inv_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    if name in inv_global:
        return inv_global[name]
    inv = {v: k for k, v in _LAYER_NAMES.items()}
    parts = name.split(".")  # model.layers.{i}.{a}.{b}.{weight|bias}
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{inv[module]}.{parts[-1]}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order → llama.cpp interleaved order (what convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama_permute: interleaved rotary pairs back to HF's rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    reader: Any  # gguf.GGUFReader

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))


def read_gguf(path: str | Path) -> GGUFFile:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        metadata: dict[str, Any] = {}
        for key, fld in reader.fields.items():
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
                metadata[key] = [bytes(fld.parts[i]).decode("utf-8", "replace") for i in fld.data]
            elif key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                metadata[key] = [fld.parts[i][0].item() for i in fld.data]
            else:
                metadata[key] = fld.contents()
    except ModelLoadError:
        raise
    except Exception as exc:  # gguf raises ValueError/IndexError/... on damaged files
        raise ModelLoadError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})") from exc
    return GGUFFile(path=path, metadata=metadata, reader=reader)


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    md = f.metadata
    arch = f.architecture
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{f.path.name}: unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}"
        )

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    try:
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = int(get("vocab_size") or (len(tokens) if tokens else 0))
        head_dim = int(get("attention.key_length") or hidden // heads)
        names = {t.name for t in f.reader.tensors}
        scaling = None
        if get("rope.scaling.type") in ("linear", "yarn") and get("rope.scaling.factor"):
            scaling = {"rope_type": get("rope.scaling.type"), "factor": float(get("rope.scaling.factor"))}
        eos = md.get("tokenizer.ggml.eos_token_id")
        eot = md.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
        return ModelConfig(
            architecture=arch,
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv") or heads),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            vocab_size=vocab,
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count") or head_dim),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except (TypeError, KeyError) as exc:
        raise ModelLoadError(f"{f.path.name}: GGUF metadata is missing a required {arch}.* key ({exc})") from exc


@dataclass
class RawTensor:
    """A GGUF tensor as stored: its type name, bytes (rows, bytes per row) and logical (rows, cols)."""

    type_name: str
    data: np.ndarray
    rows: int
    cols: int
    unpermute_heads: int | None = None  # Q/K rows still need llama_unpermute with this many heads


def load_gguf_tensors(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype,
                      raw: dict[str, RawTensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to `dtype`, under its HF name, with Q/K rows un-permuted. When `raw` is given,
    quantized tensors are also recorded there as stored (for repacking without a second rounding)."""
    import gguf

    out: dict[str, torch.Tensor] = {}
    for t in f.reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue
            raise ModelLoadError(f"{f.path.name}: unexpected tensor {t.name!r}")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{f.path.name}: tensor {t.name} has unsupported type {t.tensor_type.name}") from exc
        # numpy shape is the reverse of ggml's ne[]: (rows=out_features, cols=in_features)
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        heads = None
        if cfg.architecture in ("llama", "mistral"):
            if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
                heads = cfg.num_heads
            elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
                heads = cfg.num_kv_heads
            if heads is not None:
                arr = llama_unpermute(arr, heads)
        if raw is not None and arr.ndim == 2 and t.tensor_type.name not in ("F32", "F16", "BF16"):
            raw[name] = RawTensor(t.tensor_type.name, np.asarray(t.data), arr.shape[0], arr.shape[1], heads)
        out[name] = torch.from_numpy(np.array(arr, copy=True)).to(dtype)
    return out
