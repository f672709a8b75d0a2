"""Fill a model built on the meta device one tensor at a time: each parameter still on `meta` is allocated in
its final dtype and filled from its source tensors (q/k/v and gate/up are fused by row blocks), so a load never
holds a second dense copy of the model. Every source name is used once and every shape is checked."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from inferd.errors import ModelLoadError

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def source_names(param: str) -> list[str]:
    """A model parameter → the HF tensors it is built from, in row order."""
    for fused, parts in FUSED.items():
        if f".{fused}." in param:
            return [param.replace(fused, p) for p in parts]
    return [param]


def materialize(model: nn.Module, names: set[str], get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                device: torch.device, consumed: set[str] | None = None,
                release: Callable[[str], None] | None = None) -> None:
    """Allocates and fills every meta parameter of `model` from `get(name)`; `names` are the tensors the file
    has, `consumed` the ones already used (by packed layers). Tied embeddings: lm_head shares embed_tokens."""
    used = set(consumed or ())
    tied = "lm_head.weight" not in names
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if p is None or not p.is_meta or (full == "lm_head.weight" and tied):
                continue
            out = torch.empty(p.shape, dtype=dtype, device=device)
            row = 0
            for src in source_names(full):
                if src not in names:
                    raise ModelLoadError(f"missing tensor {src}")
                t = get(src)
                if tuple(t.shape[1:]) != tuple(p.shape[1:]) or row + t.shape[0] > p.shape[0]:
                    raise ModelLoadError(f"tensor {src} has shape {tuple(t.shape)}, which does not fit {full} "
                                         f"{tuple(p.shape)}")
                out[row : row + t.shape[0]].copy_(t)
                row += t.shape[0]
                used.add(src)
                if release is not None:
                    release(src)
            if row != p.shape[0]:
                raise ModelLoadError(f"{full}: {row} rows from {source_names(full)}, expected {p.shape[0]}")
            module._parameters[pname] = nn.Parameter(out, requires_grad=False)
    head = getattr(model, "lm_head", None)
    if tied and isinstance(head, nn.Linear) and head.weight.is_meta:
        head.weight = model.model.embed_tokens.weight  # type: ignore[union-attr]
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelLoadError(f"missing tensor {left[0]}")
    extra = sorted(names - used)
    if extra:
        raise ModelLoadError(f"unexpected tensor {extra[0]}")
