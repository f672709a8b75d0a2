"""A built model's tensors cached under `$INFERD_HOME/repack` and mmap'd on later starts (used for encoders).

An encoder's load converts its fp32 safetensors to the compute dtype and quantizes its linears (W8A8): work
every start repeats, and memory every process keeps privately. The first load writes the finished model's tensors
to one file (safetensors layout, swapped-in layers described in its metadata); later loads map that file into a
skeleton of the model, so a second start does no conversion and N processes on one machine share the pages
(MAP_PRIVATE: shared until written, and weights are never written). The key covers the model directory's weight
and config files (size, mtime and sampled bytes), the load settings, the kernel tier, torch's version and the
sources that decide the layout. Only the CPU uses it; `INFERD_REPACK_CACHE=0` turns it off with the repack cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from inferd.loader import repack_cache
from inferd.quant import w8a8

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_LAYERS: dict[str, type[nn.Module]] = {"W8A8Linear": w8a8.W8A8Linear}
_DTYPES = repack_cache._DTYPES
_NAMES = {v: k for k, v in _DTYPES.items()}
LOADS = 0  # entries mapped into a model (tests count these, not wall time)


def enabled(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("INFERD_REPACK_CACHE", "1") != "0"


def cache_key(model_dir: Path, settings: dict, code: tuple[Path, ...] = ()) -> str:
    """Entry name for the model in `model_dir` built with `settings`; `code`: source files whose change must make
    a new entry (the model class, the loader)."""
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    src = hashlib.sha256()
    for f in (Path(__file__), Path(str(w8a8.__file__)), *code):
        src.update(f.read_bytes())
    ident = {"v": CACHE_VERSION, "kind": "module", "files": [repack_cache.fingerprint(f) for f in files if f.is_file()],
             "tier": repack_cache.kernel_tier(), "torch": torch.__version__, "code": src.hexdigest()[:16],
             **settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _entry(key: str) -> Path:
    return repack_cache.cache_dir() / f"{key}.safetensors"


def _transposed(t: torch.Tensor) -> bool:
    """A 2-D view whose transpose is the contiguous storage (W8A8Linear.wq_t): stored as that transpose."""
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def save(model: nn.Module, key: str) -> bool:
    """Write every parameter and buffer of `model` (and which modules are swapped-in layers) as one entry. False
    when it cannot be written (the caller goes on with the model it has)."""
    header: dict = {}
    layers: dict[str, dict] = {}
    transposed: list[str] = []
    blobs: list[torch.Tensor] = []
    off = 0
    for mod_name, m in model.named_modules():
        cls = type(m).__name__
        kinds: dict[str, str] = {}
        for kind, store in (("b", m._buffers), ("p", m._parameters)):
            for t_name, t in store.items():
                kinds[t_name] = kind if t is not None else "none"
                if t is None:
                    continue
                name = f"{mod_name}.{t_name}" if mod_name else t_name
                if _transposed(t):
                    t = t.t()
                    transposed.append(name)
                raw = t.detach().contiguous().view(torch.uint8).reshape(-1)
                header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + raw.numel()]}
                blobs.append(raw)
                off += raw.numel()
        if cls in _LAYERS:
            layers[mod_name] = {"cls": cls, "attrs": repack_cache.layer_attrs(m), "tensors": kinds}
    meta = {"layers": layers, "transposed": transposed}
    path = _entry(key)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(repack_cache.entry_header(header, meta))
            for raw in blobs:
                f.write(memoryview(raw.numpy()))
        os.replace(tmp, path)  # atomic: a concurrent reader sees no entry or the whole one
    except OSError as exc:  # a read-only or full $INFERD_HOME: the cache is an optimisation only
        log.warning("cannot write the model cache entry %s: %s", path, exc)
        with contextlib.suppress(OSError):  # no partial entry left behind (a full disk)
            tmp.unlink(missing_ok=True)
        return False
    log.info("model written to the cache (%s)", key)
    return True


def load(model: nn.Module, key: str) -> bool:
    """Map the entry's tensors into `model` (a skeleton of the same architecture, weights uninitialised): swapped-in
    layers are rebuilt around their mapped tensors, every other parameter and buffer is replaced by its mapped
    tensor. False when there is no usable entry; the caller then builds `model` afresh (it may be half-filled)."""
    global LOADS
    path = _entry(key)
    if not path.is_file():
        return False
    try:
        mm, header, meta, base = repack_cache.map_entry(path)
        transposed = set(meta["transposed"])

        def tensor(name: str) -> torch.Tensor:
            t = repack_cache.mapped_tensor(mm, header.pop(name), base)
            return t.t() if name in transposed else t

        for mod_name, spec in meta["layers"].items():
            layer = repack_cache.rebuild_layer(_LAYERS[spec["cls"]], spec["attrs"], {
                t_name: (kind, None if kind == "none" else tensor(f"{mod_name}.{t_name}"))
                for t_name, kind in spec["tensors"].items()}, persistent=False)
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        for mod_name, m in model.named_modules():
            if mod_name in meta["layers"]:
                continue
            for store, is_param in ((m._parameters, True), (m._buffers, False)):
                for t_name, old in list(store.items()):
                    if old is None:
                        continue
                    t = tensor(f"{mod_name}.{t_name}" if mod_name else t_name)
                    if t.shape != old.shape:
                        raise ValueError(f"{mod_name}.{t_name}: shape {tuple(t.shape)}, expected {tuple(old.shape)}")
                    store[t_name] = nn.Parameter(t, requires_grad=False) if is_param else t
        if header:
            raise ValueError(f"tensors the model does not have: {sorted(header)[:3]}")
    except Exception as exc:  # noqa: BLE001 - a stale or foreign entry: build afresh
        log.warning("model cache entry %s unusable (%s: %s); building the model", path.name, type(exc).__name__, exc)
        return False
    LOADS += 1
    log.info("model mapped from the cache (%s)", key)
    return True
