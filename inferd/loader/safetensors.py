"""Hugging Face directory reader: config.json + *.safetensors (sharded or single)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from inferd.errors import ModelLoadError


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from exc


def safetensor_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors files")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{model_dir}: shards listed in the index are missing: {', '.join(missing)}")
    return files


def load_safetensors(model_dir: str | Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in safetensor_files(model_dir):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: cannot read safetensors file ({exc})") from exc
        for name, t in tensors.items():
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


# a multimodal checkpoint's text model under the names of a text-only one: the layout of the original checkpoints
# (and of transformers ≥ 5 save_pretrained), then that of transformers 4.52–4.57
TEXT_MODEL_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                       ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def text_model_name(name: str) -> str | None:
    """A multimodal checkpoint's tensor name → the text-only model's name, or None (vision tower, projector)."""
    for prefix, to in TEXT_MODEL_PREFIXES:
        if name.startswith(prefix):
            return to + name[len(prefix):]
    return None


class SafetensorsTensors:
    """The tensors of an HF directory read one at a time, for loading tensor by tensor like GGUFTensors. Each
    read opens its shard afresh: a handle kept open would leave every page read so far mapped into this process
    (the whole file resident by the end of a load); reopening costs a header parse per tensor. `norm_offset`
    names are returned with 1 added (Gemma stores its norm weights as w - 1). With `multimodal`, only the text
    model's tensors are seen, under text-only names (`skipped` counts the others' elements)."""

    def __init__(self, model_dir: str | Path, norm_offset: tuple[str, ...] = (), tied: bool = False,
                 multimodal: bool = False):
        from safetensors import SafetensorError, safe_open

        self.norm_offset = norm_offset
        self.files: dict[str, Path] = {}
        self.stored: dict[str, str] = {}  # our name → the name in the file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.skipped = 0
        for f in safetensor_files(model_dir):
            try:
                with safe_open(str(f), "pt") as h:
                    for stored in h.keys():
                        shape = tuple(h.get_slice(stored).get_shape())
                        name = text_model_name(stored) if multimodal else stored
                        if name is None:
                            self.skipped += math.prod(shape)
                            continue
                        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                            continue
                        self.files[name] = f
                        self.stored[name] = stored
                        self.shapes[name] = shape
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{f}: cannot read safetensors file ({exc})") from exc

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dense(self, name: str, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or a slice of its rows) in `dtype` (integer tensors as stored)."""
        from safetensors import SafetensorError, safe_open

        f = self.files[name]
        try:
            with safe_open(str(f), "pt") as h:
                stored = self.stored[name]
                t = h.get_tensor(stored) if rows is None else h.get_slice(stored)[rows]
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: cannot read tensor {name} ({exc})") from exc
        if t.is_floating_point():
            t = t.to(dtype)
            if name.endswith(self.norm_offset):
                t = t + 1
        return t.contiguous()

    def release(self, name: str) -> None:
        """Nothing is kept mapped between reads (see the class)."""
