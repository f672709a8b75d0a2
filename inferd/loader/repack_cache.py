"""Repacked GGUF layers cached under `$INFERD_HOME/repack`, mmap'd on later starts.

Repacking a GGUF's blocks into the kernels' layouts (and making the bf16 copies for big steps) is most of a
quantized model's load time. The first load writes every packed layer's tensors to one file (safetensors
layout); later loads map that file and rebuild the layers around the mapped tensors, so a second start skips the
repack and N processes on one machine share the pages (MAP_PRIVATE: shared until written, and weights are never
written). The key covers the GGUF's content (size, mtime and sampled bytes), the quantization settings, the
kernel tier, torch's version and the packing code's source, so a changed file, another CPU or a new layout gets
its own entry. Only the CPU uses it.

oneDNN-prepacked bf16 copies are opaque: the cache keeps their plain bf16 source. The `fast` memory profile
prepacks it at load (a reorder, much cheaper than dequantizing; private to the process); the others use the
mapped copy as it is (shared between processes, resident only once a big step has used it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from pathlib import Path

import torch
from torch import nn

from inferd.quant import linear as qlinear

log = logging.getLogger(__name__)
CACHE_VERSION = 5  # 2: the bf16 copies in their own DENSE_ALIGN-aligned section after the packed data; 3: Q4_0 as d alone; 4: Q6_K symmetric, 6-bit planes of 2-bit fields
# 5: fused layers of several K-quant types as ConcatLinear parts
DENSE_ALIGN = 2 << 20  # a huge page / the largest page-cache folio on x86-64 and arm64 (4 KiB pages)
_SAMPLE = 1 << 16
_COPY_CHUNK = 1 << 24  # bytes per write when an entry's runs are joined (at least DENSE_ALIGN)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8, "U8": torch.uint8,
           "I32": torch.int32, "I64": torch.int64, "I16": torch.int16}
_NAMES = {v: k for k, v in _DTYPES.items()}
_CLASSES = {"Int4Linear": qlinear.Int4Linear, "Int8Linear": qlinear.Int8Linear, "QKLinear": qlinear.QKLinear}


def cache_dir() -> Path:
    return Path(os.environ.get("INFERD_HOME", Path.home() / ".cache" / "inferd")) / "repack"


def fingerprint(path: Path) -> str:
    """Content identity of a (possibly multi-GB) file without reading all of it: size, mtime and 64 KiB at the
    start, the end and 16 places between."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        for i in range(18):
            f.seek(max(0, min(st.st_size - _SAMPLE, i * st.st_size // 17)))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def kernel_tier() -> str:
    from inferd.ops.kernels import get_kernels

    return str(get_kernels().tier)


def code_version() -> str:
    """The sources that decide packed layouts: a change to any of them makes new entries (no stale layouts)."""
    from inferd.quant import apply, gguf_blocks

    h = hashlib.sha256()
    for mod in (qlinear, gguf_blocks, apply):
        h.update(Path(str(mod.__file__)).read_bytes())
    return h.hexdigest()[:16]


def cache_key(path: Path, settings: dict) -> str:
    ident = {"v": CACHE_VERSION, "file": fingerprint(path), "tier": kernel_tier(), "torch": torch.__version__,
             "code": code_version(), **settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _entry(key: str) -> Path:
    return cache_dir() / f"{key}.safetensors"


class _Section:
    """One run of an entry's tensor bytes, written to a side file as they come, with their header records
    (offsets within the run; `CacheWriter.finish` joins the runs behind the header)."""

    def __init__(self, path: Path):
        self.path, self.file, self.header, self.off = path, open(path, "wb"), {}, 0

    def put(self, key: str, t: torch.Tensor) -> None:
        raw = t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
        self.header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.off, self.off + raw.nbytes]}
        self.file.write(memoryview(raw))
        self.off += raw.nbytes


class CacheWriter:
    """Writes an entry as layers are packed: tensor bytes go to side files at once (nothing is held in memory),
    the header and the bytes are joined into the entry on `finish`."""

    def __init__(self, key: str):
        self.path = _entry(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.packed = _Section(self.path.with_suffix(f".data{os.getpid()}"))
        self.dense = _Section(self.path.with_suffix(f".dense{os.getpid()}"))  # moved behind the packed data on finish
        self.meta: dict[str, dict] = {}

    def add(self, name: str, m: nn.Module, dense: torch.Tensor | list[torch.Tensor] | None = None) -> None:
        """A packed layer (module path → layer) and its plain bf16 copy when it keeps one (a ConcatLinear: one copy
        per part, its parts stored as layers of their own)."""
        if isinstance(m, qlinear.ConcatLinear):
            copies = dense if isinstance(dense, list) else []
            names = [f"{name}.parts.{i}" for i in range(len(m.parts))]
            for i, (part_name, part) in enumerate(zip(names, m.parts)):
                self.add(part_name, part, copies[i] if i < len(copies) else None)
            self.meta[name] = {"cls": "ConcatLinear", "parts": names}
            return
        assert not isinstance(dense, list)
        kinds = {}
        for kind, store in (("b", m._buffers), ("p", m._parameters)):
            for t_name, t in store.items():
                if t_name == "dense":  # the bf16 copy travels as @dense, rebuilt by _set_dense
                    continue
                kinds[t_name] = kind if t is not None else "none"
                if t is not None:
                    self.packed.put(f"{name}/{t_name}", t)
        copy = dense if dense is not None else m._buffers.get("dense")
        if copy is not None:
            self.dense.put(f"{name}/@dense", copy)
        self.meta[name] = {"cls": type(m).__name__, "attrs": layer_attrs(m), "tensors": kinds}

    def _layout(self) -> tuple[bytes, int]:
        """The header with the bf16 copies placed after the packed data, starting on a DENSE_ALIGN boundary of
        the file, and the padding before them. Apart, the two never share a (huge) page or a page-cache folio,
        so releasing the copies' pages when idle leaves the packed layers' mapped, and mapping a packed page
        back never maps copy pages with it."""
        pad = 0
        for _ in range(4):  # the header's length depends on the offsets it holds: settles in one or two rounds
            start = self.packed.off + pad
            header = dict(self.packed.header)
            for k, rec in self.dense.header.items():
                a, b = rec["data_offsets"]
                header[k] = {**rec, "data_offsets": [start + a, start + b]}
            hb = entry_header(header, self.meta)
            want = -(len(hb) + self.packed.off) % DENSE_ALIGN if self.dense.header else 0
            if want == pad:
                return hb, pad
            pad = want
        raise RuntimeError("repack cache header layout did not settle")

    def finish(self) -> None:
        for part in (self.packed, self.dense):
            part.file.close()
        out = self.path.with_suffix(f".tmp{os.getpid()}")
        hb, pad = self._layout()
        with open(out, "wb") as f:
            f.write(hb)
            for part, gap in ((self.packed, pad), (self.dense, 0)):
                with open(part.path, "rb") as data:
                    # writes end on DENSE_ALIGN boundaries of the entry, so the page cache can hold every whole
                    # aligned 2 MiB range in one folio (mapped as a huge page, see map_entry)
                    while chunk := data.read(_COPY_CHUNK - f.tell() % DENSE_ALIGN):
                        f.write(chunk)
                f.write(b"\0" * gap)
        os.replace(out, self.path)  # atomic: a concurrent reader sees the old entry or the whole new one
        for part in (self.packed, self.dense):
            part.path.unlink()

    def abort(self) -> None:
        for part in (self.packed, self.dense):
            part.file.close()
            part.path.unlink(missing_ok=True)


def layer_attrs(m: nn.Module) -> dict:
    """A layer's plain attributes (numbers, strings, None): with its tensors, what rebuild_layer needs."""
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, type(None)))}


def rebuild_layer(cls: type[nn.Module], attrs: dict, tensors: dict[str, tuple[str, torch.Tensor | None]],
                  persistent: bool = True) -> nn.Module:
    """A layer of `cls` around existing tensors, without running its constructor: `attrs` set as attributes,
    `tensors` name → (kind, tensor): "p" a parameter, "b" a buffer, "none" a buffer that is None."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for k, v in attrs.items():
        setattr(layer, k, v)
    for t_name, (kind, t) in tensors.items():
        if kind == "p":
            layer._parameters[t_name] = nn.Parameter(t, requires_grad=False)
        else:
            layer.register_buffer(t_name, t, persistent=persistent)
    return layer


def entry_header(header: dict, meta: dict) -> bytes:
    """The start of an entry file: safetensors' length-prefixed JSON header (tensor records + inferd's metadata),
    padded so that the data that follows is 8-byte aligned."""
    hb = json.dumps({"__metadata__": {"inferd": json.dumps(meta)}, **header}).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb


def map_entry(path: Path) -> tuple[mmap.mmap, dict, dict, int]:
    """An entry file mapped copy-on-write: (the mapping, its tensor records, inferd's metadata, where data starts).

    The mapping asks for huge pages: the kernel maps 2 MiB folios of the page cache with one TLB entry each instead
    of 512. `CacheWriter.finish` writes the file in 2 MiB-aligned pieces so the page cache can hold it in such
    folios from the start; the advice makes the kernel read it back in them when it was evicted (without it, a
    re-read came back in small folios: 8 of 48 MiB huge against 48). Decode streams every weight once per step, so TLB misses cost bandwidth (benchmarks/huge_pages.py:
    the same Q4_0 GEMM from 2 MiB pages 1.11x faster at 1 row, 1.07x at 16, Zen 5). Where the kernel has no
    transparent huge pages for files, the advice changes nothing."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # no transparent huge pages in this kernel
            pass
    (n,) = struct.unpack_from("<Q", mm, 0)
    header = json.loads(bytes(mm[8 : 8 + n]))
    meta = json.loads(header.pop("__metadata__")["inferd"])
    return mm, header, meta, 8 + n


def mapped_tensor(mm: mmap.mmap, record: dict, base: int) -> torch.Tensor:
    """One tensor of a mapped entry, a view of the mapping (a fresh empty tensor when it has no elements)."""
    dt = _DTYPES[record["dtype"]]
    a, b = record["data_offsets"]
    count = (b - a) // dt.itemsize
    if count == 0:
        return torch.empty(record["shape"], dtype=dt)
    return torch.frombuffer(mm, dtype=dt, count=count, offset=base + a).view(record["shape"])


def _pages(mm: mmap.mmap, base: int, record: dict) -> tuple[mmap.mmap, int, int]:
    """The whole pages inside one tensor's bytes in a mapped entry: (mapping, start, length)."""
    a, b = record["data_offsets"]
    start = -(-(base + a) // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (base + b) // mmap.PAGESIZE * mmap.PAGESIZE
    return mm, start, max(0, end - start)


def _advise_dontneed(pages: tuple[mmap.mmap, int, int]) -> int:
    """MADV_DONTNEED on pages of an entry's mapping: they leave this process's RSS and stay in the page cache (the
    mapping is private and never written, so the next access maps the file's bytes again, a minor fault while the
    kernel keeps them cached). Returns the bytes advised (0 where the OS has no madvise)."""
    mm, start, length = pages
    if length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    mm.madvise(mmap.MADV_DONTNEED, start, length)
    return length


def release_dense_pages(model: nn.Module) -> int:
    """Take the pages of the bf16 copies used from the repack cache's mapping out of this process's RSS (the
    server's engine calls it each time it goes idle, see LLMEngine.release_idle_memory): big steps fault them
    back from the page cache (~230 minor faults, ~1.4 ms of CPU for SmolLM2's 212 MB: docs/benchmarks.md, so
    sequential requests that each go idle pay that once per request). Only copies mapped from an entry are
    touched (never private memory, whose contents MADV_DONTNEED would discard). Returns the bytes advised
    (resident or not)."""
    return sum(_advise_dontneed(m._dense_pages) for m in model.modules() if getattr(m, "_dense_pages", None))


def mapped_rss(path: Path, pid: int | str = "self") -> int:
    """Bytes of a process's RSS that are pages of the file at `path` (from /proc/PID/smaps; 0 elsewhere)."""
    total, inside, target = 0, False, str(Path(path).resolve())
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if head and "-" in head[0] and not head[0].endswith(":"):
                    inside = len(head) == 6 and head[5].strip() == target
                elif inside and head[0] == "Rss:":
                    total += int(head[1]) * 1024
    except OSError:
        return 0
    return total


def load(key: str, dense_from_rows: int, prepack: bool = True) -> dict[str, nn.Module] | None:
    """The cached layers around tensors mapped from the file, or None (no entry, or one this code cannot read).
    `prepack`: bf16 copies prepacked for oneDNN (private, faster big steps); else used from the mapping
    (shared by every process on the model, resident only once used)."""
    path = _entry(key)
    if not path.is_file():
        return None
    try:
        mm, header, meta, base = map_entry(path)

        def drop(k: str) -> None:  # pages of a tensor no longer used (a copy was made): out of our RSS
            _advise_dontneed(_pages(mm, base, header[k]))

        def tensor(k: str) -> torch.Tensor:
            return mapped_tensor(mm, header[k], base)

        out: dict[str, nn.Module] = {}
        for name, m in meta.items():
            if m["cls"] == "ConcatLinear":  # its parts come before it
                out[name] = qlinear.ConcatLinear([out.pop(p) for p in m["parts"]])
                continue
            layer = rebuild_layer(_CLASSES[m["cls"]], m["attrs"], {
                t_name: (kind, None if kind == "none" else tensor(f"{name}/{t_name}"))
                for t_name, kind in m["tensors"].items()})
            key_dense = f"{name}/@dense"
            has_dense = bool(dense_from_rows) and key_dense in header
            layer._set_dense(tensor(key_dense) if has_dense else None, prepack)
            if has_dense and layer._buffers.get("dense") is None:  # prepacked for oneDNN: the source is not kept
                drop(key_dense)
            elif has_dense:  # used from the mapping: its pages can leave our RSS when idle (release_dense_pages)
                layer._dense_pages = _pages(mm, base, header[key_dense])
            out[name] = layer
        return out
    except Exception as exc:  # noqa: BLE001 - a stale or foreign entry: repack instead
        log.warning("repack cache entry %s unusable (%s: %s); repacking", path.name, type(exc).__name__, exc)
        return None
