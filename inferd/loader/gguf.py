"""GGUF reader: metadata → ModelConfig, tensors → HF-named torch tensors (dequantized for now)."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferd.config import ModelConfig
from inferd.errors import ModelLoadError

SUPPORTED_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma3"}  # GGUF general.architecture values

# GGUF tensor name (per layer with {i}) → HF name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms per layer (llama.cpp's names): ffn_norm is the one before the MLP there
_LAYER_NAMES_BY_ARCH = {
    "gemma3": {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# architectures whose Q/K rows llama.cpp's converter permutes (interleaved rotary pairs)
_PERMUTED_QK = {"llama", "mistral"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    names = _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return None


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    inv_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    if name in inv_global:
        return inv_global[name]
    inv = {v: k for k, v in _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES).items()}
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
    reader: Any  # loader.gguf_reader.GGUFIndex

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))


def read_gguf(path: str | Path) -> GGUFFile:
    from inferd.loader.gguf_reader import GGUFIndex

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = GGUFIndex(path)
    except Exception as exc:  # struct.error/ValueError/IndexError/... on damaged files
        raise ModelLoadError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})") from exc
    return GGUFFile(path=path, metadata=dict(reader.fields), reader=reader)


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
        layers = int(get("block_count"))
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = int(get("vocab_size") or (len(tokens) if tokens else 0))
        head_dim = int(get("attention.key_length") or hidden // heads)
        names = {t.name for t in f.reader.tensors}
        scaling = _rope_scaling(f, get)
        eos = md.get("tokenizer.ggml.eos_token_id")
        eot = md.get("tokenizer.ggml.eot_token_id")
        eos_ids = [int(x) for x in (eos, eot) if x is not None]
        gemma = arch == "gemma3"
        windows: tuple[int | None, ...] = ()
        if gemma:
            if tokens and "<end_of_turn>" in tokens:  # Gemma's chat turns end with it (generation_config's eos)
                eos_ids.append(tokens.index("<end_of_turn>"))
            windows = _gemma_windows(get("attention.sliding_window"), get("attention.sliding_window_pattern"),
                                     layers)
        elif get("attention.sliding_window"):
            windows = (int(get("attention.sliding_window")),) * layers
        return ModelConfig(
            architecture=arch,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv") or heads),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            vocab_size=vocab,
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 1_000_000.0 if gemma else 10000.0)),
            rope_dim=int(get("rope.dimension_count") or head_dim),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            qk_norm="blk.0.attn_q_norm.weight" in names,
            mlp_act="gelu_tanh" if gemma else "silu",
            # llama.cpp: Gemma 3 27B (62 layers) scales by hidden / heads, the others by head_dim (query_pre_attn_scalar)
            attn_scale=(hidden / heads if layers == 62 else head_dim) ** -0.5 if gemma else None,
            layer_windows=windows,
            rope_local_theta=float(get("rope.freq_base_swa", 10000.0)) if gemma else None,
            final_logit_softcap=float(get("final_logit_softcapping")) if get("final_logit_softcapping") else None,
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{f.path.name}: GGUF metadata is missing a required {arch}.* key ({exc})") from exc


def _rope_scaling(f: GGUFFile, get: Any) -> dict[str, Any] | None:
    """transformers-style scaling dict from the file: `linear`/`yarn` metadata, or llama.cpp's rope_freqs tensor
    (Llama 3.1+ writes its llama3 scaling as per-frequency divisors)."""
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind == "linear" and factor and float(factor) != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if get("rope.scaling.original_context_length"):
            out["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                          ("rope.scaling.attn_factor", "attention_factor")):
            if get(key) is not None:
                out[name] = float(get(key))
        return out
    if kind not in (None, "none", "linear", "yarn"):
        raise ModelLoadError(f"{f.path.name}: unsupported rope scaling {kind!r} (supported: linear, yarn, llama3 "
                             "as rope_freqs)")
    freqs = next((t for t in f.reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(freqs.data, np.float32)]}
    return None


def _gemma_windows(window: Any, pattern: Any, layers: int) -> tuple[int | None, ...]:
    """Gemma 3's local/global interleave: the file's sliding_window_pattern (a bool per layer, True = local) when it
    has one, else llama.cpp's rule for gemma3: every 6th layer is global."""
    if not window:
        return ()
    if isinstance(pattern, list) and len(pattern) == layers:
        local = [bool(x) for x in pattern]
    else:
        period = int(pattern) if isinstance(pattern, int) and pattern > 0 else 6
        local = [(i + 1) % period != 0 for i in range(layers)]
    return tuple(int(window) if lo else None for lo in local)


@dataclass
class RawTensor:
    """A GGUF tensor as stored: its type name, bytes (rows, bytes per row) and logical (rows, cols)."""

    type_name: str
    data: np.ndarray
    rows: int
    cols: int
    unpermute_heads: int | None = None  # Q/K rows still need llama_unpermute with this many heads


class GGUFTensors:
    """The tensors of a GGUF file under their HF names, read one at a time from the file's mmap: `raw` gives the
    stored blocks (no copy), `dense` one dequantized tensor, `release` drops a consumed tensor's file pages from
    this process's resident memory (they stay in the page cache)."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig):
        self.file, self.cfg = f, cfg
        self.tensors: dict[str, Any] = {}
        for t in f.reader.tensors:
            name = gguf_to_hf_name(t.name, cfg.architecture)
            if name is None:
                if t.name == "rope_freqs.weight":
                    continue
                raise ModelLoadError(f"{f.path.name}: unexpected tensor {t.name!r}")
            self.tensors[name] = t

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def type_name(self, name: str) -> str:
        return str(self.tensors[name].tensor_type.name)

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order: the reverse of ggml's ne[] ((rows=out_features, cols=in_features) for a matrix)."""
        return tuple(reversed([int(x) for x in self.tensors[name].shape]))

    def linear_types(self) -> set[str]:
        return {self.type_name(n) for n in self.tensors if n.startswith("model.layers.") and len(self.shape(n)) == 2}

    def _heads(self, name: str) -> int | None:
        if self.cfg.architecture not in _PERMUTED_QK:
            return None
        if ".self_attn.q_proj." in name:
            return self.cfg.num_heads
        if ".self_attn.k_proj." in name:
            return self.cfg.num_kv_heads
        return None

    def raw(self, name: str) -> RawTensor | None:
        """A quantized matrix as stored (a view of the mmap), or None for float and 1-D tensors."""
        t = self.tensors[name]
        shape = self.shape(name)
        if len(shape) != 2 or t.tensor_type.name in ("F32", "F16", "BF16"):
            return None
        return RawTensor(t.tensor_type.name, np.asarray(t.data), shape[0], shape[1], self._heads(name))

    def dense(self, name: str, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or a slice of a matrix's rows) dequantized to `dtype`, with Q/K rows un-permuted."""
        import gguf

        t = self.tensors[name]
        data = t.data if rows is None else t.data[rows]
        try:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{self.file.path.name}: tensor {t.name} has unsupported type "
                                 f"{t.tensor_type.name}") from exc
        shape = self.shape(name)
        if rows is not None:
            shape = (-1, *shape[1:])
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        heads = self._heads(name)
        if heads is not None:
            assert rows is None, "Q/K rows are un-permuted per head: slice them whole"
            arr = llama_unpermute(arr, heads)
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # a float tensor read in place from the read-only mmap
            arr = arr.copy()
        return torch.from_numpy(arr).to(dtype)

    def release(self, name: str) -> None:
        """Best effort: tell the kernel this process no longer needs the tensor's file pages."""
        t = self.tensors.get(name)
        mm = getattr(self.file.reader.data, "_mmap", None)
        if t is None or mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-int(t.data_offset) // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (int(t.data_offset) + int(t.n_bytes)) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass


def load_gguf_tensors(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype,
                      raw: dict[str, RawTensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to `dtype`, under its HF name, with Q/K rows un-permuted. When `raw` is given,
    quantized tensors are also recorded there as stored (for repacking without a second rounding). Loading a
    model streams through GGUFTensors instead; this builds the whole dense model at once."""
    src = GGUFTensors(f, cfg)
    out: dict[str, torch.Tensor] = {}
    for name in src.names():
        if raw is not None and (r := src.raw(name)) is not None:
            raw[name] = r
        out[name] = src.dense(name, dtype)
    return out
