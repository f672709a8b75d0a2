"""The kernel capability layer: which CPU kernel tier this process runs, resolved once.

The C sources in csrc/ are compiled into one shared library per ISA tier (flags below, never -march=native, so
a library built on one machine runs on any CPU of its tier), cached under $INFERD_HOME/kernels. The tier is
the best the CPU supports, or the one named by INFERD_ISA (a lower tier, so one machine can test every tier;
`torch` = no C kernels, the pure-PyTorch path). Callers ask the `Kernels` object what to run (limits, whether
the quantized GEMMs or the bf16 dot instructions exist); they never probe CPU flags themselves.

Tiers, best first (each needs the CPU flags listed in TIER_FLAGS):
  avx512_amx        AVX-512 BF16/VNNI build; the CPU also has AMX (used by torch's oneDNN for big bf16 GEMMs)
  avx512_bf16_vnni  vdpbf16ps bf16 GEMV, vpdpbusd int4/int8 GEMMs, AVX-512 attention and row kernels
  avx512            AVX-512 attention and row kernels, AVX2 int4/int8 GEMMs, bf16 GEMV by widening to fp32
  avx2_fma          8-lane versions of the above (the C prefill attention over runs of 8 keys)
  scalar            portable C (no intrinsics: also ARM); no quantized GEMMs
  torch             no C library
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inferd.hardware import cpu_flags
from inferd.ops.c_structs import LayerDesc, LinDesc, StepDesc

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
TIERS = ("avx512_amx", "avx512_bf16_vnni", "avx512", "avx2_fma", "scalar", "torch")
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}
TIER_FLAGS: dict[str, set[str]] = {
    "avx512_amx": _AVX512 | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"},
    "avx512_bf16_vnni": _AVX512 | {"avx512_bf16", "avx512_vnni"},
    "avx512": _AVX512,
    "avx2_fma": {"avx2", "fma", "f16c"},
    "scalar": set(),
    "torch": set(),
}
_AVX512_CFLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
TIER_CFLAGS: dict[str, list[str]] = {
    "avx512_amx": _AVX512_CFLAGS + ["-mavx512bf16", "-mavx512vnni"],
    "avx512_bf16_vnni": _AVX512_CFLAGS + ["-mavx512bf16", "-mavx512vnni"],
    "avx512": _AVX512_CFLAGS,
    "avx2_fma": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}
BASE_CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]

# name → (argument codes, result): p pointer, i int, l int64, f float; the result is always int
SIGNATURES: dict[str, str] = {
    "paged_decode_attention": "ppppppiiiiiifii",
    "paged_prefill_attention": "ppppppppiiiiiifii",
    "gemm_bf16": "pippiii",
    "gemv_bf16": "pppii",
    "rms_norm": "pppiilfi",
    "add_rms_norm": "ppppiifi",
    "rope_inplace": "piiilipppi",
    "silu_mul": "ppiii",
    "gelu_tanh_mul": "ppiii",
    "q4_gemm": "pipppiii",
    "q4s_gemm": "pipppiii",
    "q8_gemm": "pipppiii",
    "qk_gemm": "pipppiiiii",
    "qk_gemm_ks": "pippppiiiii",
    "qk_gemm_kss": "pippppiiiii",
    "qk_rows": "ppppiiiiiipi",
    "argmax_rows": "piilp",
    "encoder_attention": "pppiiipfi",
    "quantize_rows_asym": "piiiippppipp",
    "dequant_rows": "piiippppppiiipp",
    "decode_layers": "pip",
    "decode_profile": "ipi",
    "inferd_info": "pi",
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64, "f": ctypes.c_float}


def is_x86(machine: str | None = None) -> bool:
    """Whether `machine` (platform.machine() style; default this one) is x86: only there are SIMD tiers built."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "x86")


def tiers_for(machine: str, flags: set[str]) -> list[str]:
    """The tiers a CPU of architecture `machine` with CPU `flags` can run, best first (`torch` always). Not x86
    (ARM64, ...): only `scalar` (portable C, no intrinsics) and `torch`."""
    x86 = is_x86(machine)
    return [t for t in TIERS if t in ("scalar", "torch") or (x86 and TIER_FLAGS[t] <= flags)]


def supported_tiers() -> list[str]:
    """The tiers this CPU can run, best first (`torch` always)."""
    return tiers_for(platform.machine(), cpu_flags())


def compile_command(tier: str, cc: str, out: Path) -> list[str]:
    """The compiler call that builds the kernel library of `tier` into `out`: every csrc/*.c, BASE_CFLAGS + the
    tier's -m flags (none for `scalar`, the build on ARM64 and other non-x86 machines)."""
    if tier not in TIER_CFLAGS:
        raise ValueError(f"tier {tier!r} has no C build (choose one of {', '.join(TIER_CFLAGS)})")
    sources = sorted(CSRC.glob("*.c"))
    return [cc, *BASE_CFLAGS, *TIER_CFLAGS[tier], *map(str, sources), "-o", str(out), "-lm"]


def runnable_tiers() -> list[str]:
    """Supported tiers that are distinct builds worth testing (the AMX tier shares the BF16/VNNI build)."""
    return [t for t in supported_tiers() if t != "avx512_amx"]


def _requested_tier() -> str:
    best = supported_tiers()[0]
    if os.environ.get("INFERD_DISABLE_C_KERNELS"):
        return "torch"
    want = os.environ.get("INFERD_ISA", "").strip().lower()
    if not want or want == "auto":
        return best
    aliases = {"avx2": "avx2_fma", "amx": "avx512_amx", "vnni": "avx512_bf16_vnni", "none": "torch"}
    want = aliases.get(want, want)
    if want not in TIERS:
        raise ValueError(f"INFERD_ISA={want!r}: choose one of {', '.join(TIERS)}")
    if want not in supported_tiers():
        raise ValueError(f"INFERD_ISA={want!r}: this CPU supports only {', '.join(supported_tiers())}")
    return want


def _cache_dir() -> Path:
    home = Path(os.environ.get("INFERD_HOME", Path.home() / ".cache" / "inferd"))
    return home / "kernels"


def _build(tier: str) -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC") or "gcc") or shutil.which("cc")
    if cc is None:
        log.warning("no C compiler found: using the slower pure-torch kernels")
        return None
    # the library's name covers the exact command (compiler, flags, source names; not where this checkout lives)
    # and every source and header's bytes
    command = " ".join(compile_command(tier, cc, Path("lib.so"))).replace(str(CSRC), "csrc")
    digest = hashlib.sha256(command.encode())
    for f in sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("*.h")):
        digest.update(f.name.encode() + f.read_bytes())
    so = _cache_dir() / f"inferd_kernels-{tier}-{digest.hexdigest()[:16]}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / so.name
            proc = subprocess.run(compile_command(tier, cc, out), capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("building the %s C kernels failed, using pure torch:\n%s", tier, proc.stderr[-2000:])
                return None
            os.replace(out, so)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(so))
    for name, codes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CTYPES[c] for c in codes]
        fn.restype = ctypes.c_int
    return lib


@dataclass(frozen=True)
class Kernels:
    """What this process's CPU kernels can do. `lib` is None for the torch tier (or when building failed)."""

    tier: str
    lib: ctypes.CDLL | None = None
    max_heads: int = 0
    max_head_dim: int = 0
    max_block_size: int = 0
    max_quant_k: int = 0
    vector_width: int = 1  # fp32 lanes of the row kernels (16 AVX-512, 8 AVX2, 1 scalar)
    bf16_dot: bool = False  # gemm_bf16 uses vdpbf16ps (AVX512-BF16)
    vnni: bool = False  # the int4/int8 GEMMs use vpdpbusd
    quant_gemm: bool = False  # q4_gemm / q8_gemm exist (VNNI or AVX2 bodies)

    @property
    def available(self) -> bool:
        return self.lib is not None

    @property
    def dense_gemm(self) -> bool:
        """gemm_bf16 exists (any vector tier): fp32-output bf16 GEMM for the logits, one-row bf16 GEMV."""
        return self.lib is not None and self.vector_width > 1

    @property
    def prefill_attention(self) -> bool:
        return self.lib is not None and self.vector_width in (8, 16)

    def attention_fits(self, num_heads: int, head_dim: int, block_size: int) -> bool:
        return (self.lib is not None and num_heads <= self.max_heads and head_dim <= self.max_head_dim
                and block_size <= self.max_block_size)

    def paths(self) -> dict[str, str]:
        """The implementation each op runs on this tier (for logs and docs)."""
        if self.lib is None:
            return {op: "torch" for op in ("attention", "norms", "bf16 gemv", "logits", "int4/int8 gemm")}
        vec = {16: "avx512", 8: "avx2"}.get(self.vector_width, "scalar C")
        return {
            "decode attention": vec,
            "prefill attention": vec if self.prefill_attention else "torch sdpa",
            "norms, silu, rotary": vec,
            "bf16 gemv / fp32 logits": "avx512_bf16" if self.bf16_dot else (vec if self.dense_gemm else "torch"),
            "int4/int8 gemm": "vnni" if self.vnni else ("avx2" if self.quant_gemm else "torch"),
        }


def _load(tier: str) -> Kernels:
    lib = None if tier == "torch" else _build(tier)
    if lib is None:  # the torch tier, or the build was not possible: no C kernels at all
        return Kernels("torch")
    info = (ctypes.c_int64 * 16)()
    n = lib.inferd_info(info, 16)
    v = list(info[:n])
    sizes = (ctypes.sizeof(LinDesc), ctypes.sizeof(LayerDesc), ctypes.sizeof(StepDesc))
    if tuple(v[4:7]) != sizes:
        raise RuntimeError(f"C struct sizes {tuple(v[4:7])} differ from ops/c_structs.py {sizes}: keep "
                           "csrc/kernels.h and c_structs.py in step")
    return Kernels(tier, lib, max_heads=v[0], max_head_dim=v[1], max_block_size=v[2], max_quant_k=v[3],
                   vector_width=v[7], bf16_dot=bool(v[8]), vnni=bool(v[9]), quant_gemm=bool(v[9] or v[10]))


_active: Kernels | None = None


def get_kernels() -> Kernels:
    global _active
    if _active is None:
        _active = _load_cached(_requested_tier())
        log.info("CPU kernels: tier %s (%s)", _active.tier,
                 ", ".join(f"{k}: {v}" for k, v in _active.paths().items()))
    return _active


@functools.cache
def _load_cached(tier: str) -> Kernels:
    return _load(tier)


def set_tier(tier: str | None) -> Kernels:
    """Switch this process to `tier` (None: back to the default resolution). For tests and benchmarks that
    compare tiers in one process; models built before keep the kernels they captured (e.g. a fused decoder)."""
    global _active
    if tier is not None and tier not in supported_tiers():
        raise ValueError(f"tier {tier!r} is not supported here ({', '.join(supported_tiers())})")
    _active = None if tier is None else _load_cached(tier)
    return get_kernels()


@contextlib.contextmanager
def use_tier(tier: str) -> Iterator[Kernels]:
    """Run a block under `tier` (build and run a model inside it), then restore the previous kernels."""
    global _active
    before = _active
    try:
        yield set_tier(tier)
    finally:
        _active = before


if __name__ == "__main__":  # `python -m inferd.ops.kernels`: the tiers this machine can test, best first
    print(" ".join(runnable_tiers()))
