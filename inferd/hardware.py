"""Device, dtype and memory facts about the machine we run on."""

from __future__ import annotations

import functools
import os
import platform

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        from inferd.ops.kernels import get_kernels  # (kernels imports this module)

        # a CPU with native bf16, unless its C kernels were forced to a tier without it (INFERD_ISA): then the
        # process runs as a CPU of that tier would, in fp32
        forced_down = get_kernels().tier in ("avx512", "avx2_fma")
        return torch.bfloat16 if cpu_has_bf16() and not forced_down else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32 or bfloat16")
    return DTYPES[dtype]


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def machine_info() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(ln.split(":", 1) for ln in f.read().split("\n\n", 1)[0].splitlines() if ":" in ln)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("model name", model)
        if "cpu family" in fields:  # x86: names such as "AMD EPYC" hide the generation (family 25: Zen 3/4, 26: Zen 5)
            model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"bf16={'yes' if cpu_has_bf16() else 'no'}")


def release_free_memory() -> None:
    """Hand the heap memory that loading freed (dequantized and repacked temporaries) back to the OS: glibc keeps
    freed small and medium blocks in the process otherwise, and RSS would carry them for the process's life."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
