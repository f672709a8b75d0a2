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


class GGUFTensors:
    """The tensors of a GGUF file under their HF names, read one at a time from the file's mmap: `raw` gives the
    stored blocks (no copy), `dense` one dequantized tensor, `release` drops a consumed tensor's file pages from
    this process's resident memory (they stay in the page cache)."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig):
        self.file, self.cfg = f, cfg
        self.tensors: dict[str, Any] = {}
        for t in f.reader.tensors:
            name = gguf_to_hf_name(t.name)
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
        if self.cfg.architecture not in ("llama", "mistral"):
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
