"""Fill a model skeleton one tensor at a time: each parameter not built from already-consumed tensors (packed
layers) is allocated in its final dtype and filled from its source tensors (q/k/v and gate/up are fused by row
blocks), so a load never holds a second dense copy of the model. Every source name is used once and every
shape is checked. The skeleton's own parameters are uninitialised (`skip_init`): never written, their pages are
never backed, and they are dropped as they are replaced."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


@contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without their random initialisation (every weight is loaded from the file afterwards). On the
    CPU this is also much cheaper than the meta device, whose first op costs seconds of lazy torch imports."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def materialize(model: nn.Module, names: set[str], get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                device: torch.device, consumed: set[str] | None = None,
                release: Callable[[str], None] | None = None) -> None:
    """Allocates and fills every parameter of `model` from `get(name)`; `names` are the tensors the file has,
    `consumed` the ones already used (a parameter made only of those belongs to a packed layer and is kept).
    Tied embeddings: lm_head shares embed_tokens."""
    used = set(consumed or ())
    tied = "lm_head.weight" not in names
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            full = f"{mod_name}.{pname}" if mod_name else pname
            srcs = source_names(full)
            if p is None or (full == "lm_head.weight" and tied) or (consumed and set(srcs) <= consumed):
                continue
            out = torch.empty(p.shape, dtype=dtype, device=device)
            row = 0
            for src in srcs:
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
    if tied and isinstance(head, nn.Linear) and "model.embed_tokens.weight" not in (consumed or ()):
        head.weight = model.model.embed_tokens.weight  # type: ignore[union-attr]
    extra = sorted(names - used)
    if extra:
        raise ModelLoadError(f"unexpected tensor {extra[0]}")
