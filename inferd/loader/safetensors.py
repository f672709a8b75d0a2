"""Hugging Face directory reader: config.json + *.safetensors (sharded or single)."""

from __future__ import annotations

import json
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
