"""What the kernel says about this process's memory mappings (Linux /proc/self/smaps), for tests."""

from __future__ import annotations

from pathlib import Path

import torch


def vm_flags(t: torch.Tensor) -> set[str]:
    """The kernel's VmFlags for the mapping holding tensor t (e.g. "hg": advised MADV_HUGEPAGE, "nh": NOHUGEPAGE)."""
    addr, flags, inside = t.data_ptr(), set(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            flags = set(line.split()[1:])
    return flags
