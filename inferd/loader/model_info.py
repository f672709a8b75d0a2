"""What a model file is, read from its header only (no weights loaded): architecture, parameter count, the file's
quantization and context length. `inferd models` prints it for each installed model."""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import ModelLoadError


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    parameters: int
    quantization: str  # GGUF file type (e.g. Q4_K_M), or the safetensors dtype(s)
    context_length: int | None


def model_info(path: Path) -> ModelInfo:
    """A .gguf file or an HF directory → ModelInfo; ModelLoadError when the header cannot be read."""
    if path.is_dir():
        return _hf_info(path)
    return _gguf_info(path)


def _gguf_info(path: Path) -> ModelInfo:
    from inferd.loader.gguf import read_gguf

    f = read_gguf(path)
    md = f.metadata
    arch = f.architecture
    params = 0
    types: Counter[str] = Counter()
    for t in f.reader.tensors:
        n = 1
        for d in t.shape:
            n *= int(d)
        params += n
        if len(t.shape) == 2:
            types[t.tensor_type.name] += n
    quant = _file_type_name(md.get("general.file_type"))
    if quant is None:
        quant = types.most_common(1)[0][0] if types else "?"
    ctx = md.get(f"{arch}.context_length")
    return ModelInfo(arch, params, quant, int(ctx) if ctx is not None else None)


def _file_type_name(ft: object) -> str | None:
    """general.file_type (llama.cpp's LLAMA_FTYPE) → its name, e.g. 15 → Q4_K_M."""
    if ft is None:
        return None
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(ft)).name  # type: ignore[arg-type]
    except (ValueError, TypeError, ImportError):
        return None
    name = name.removeprefix("MOSTLY_")
    return "F32" if name == "ALL_F32" else name


def _hf_info(path: Path) -> ModelInfo:
    from inferd.config import text_model_config
    from inferd.loader.safetensors import read_hf_config, safetensor_files

    cfg = read_hf_config(path)
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    params = 0
    dtypes: Counter[str] = Counter()
    try:
        files = safetensor_files(path)
    except ModelLoadError:
        files = []
    for f in files:
        with f.open("rb") as fh:  # the safetensors header: an 8-byte length, then JSON
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if t["dtype"] in ("I64", "I32", "BOOL"):  # buffers such as position_ids, not weights
                continue
            count = 1
            for d in t["shape"]:
                count *= int(d)
            params += count
            dtypes[t["dtype"]] += count
    recipe = cfg.get("quantization_config")
    if isinstance(recipe, dict) and recipe.get("quant_method") == "inferd":
        quant = f"inferd {recipe.get('method')}"
        params = 0  # packed tensors: their element counts are not the model's parameters
    else:
        quant = "/".join(d for d, _ in dtypes.most_common()) or "?"
    ctx = text_model_config(cfg).get("max_position_embeddings")
    return ModelInfo(str(archs[0]), params, quant, int(ctx) if ctx is not None else None)


def format_params(n: int) -> str:
    if n <= 0:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)
