"""ARM64: what inferd builds there, proven on x86 with a cross compiler and qemu (Debian: gcc-aarch64-linux-gnu,
qemu-user; scripts/setup.sh --test installs them as root). On a non-x86 machine the capability layer picks the
`scalar` tier: the kernel library compiled with no -m flags and no intrinsics. Here that exact compiler call is run
with aarch64-linux-gnu-gcc, must succeed without any x86 header, and a harness of the scalar kernels
(tests/csrc/scalar_harness.c) must print the same numbers under qemu-aarch64 as the x86 scalar build."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from inferd.ops.kernels import TIER_FLAGS, compile_command, tiers_for

CROSS_CC = "aarch64-linux-gnu-gcc"
SYSROOT = Path("/usr/aarch64-linux-gnu")
HARNESS = Path(__file__).with_name("csrc") / "scalar_harness.c"
needs_cross = pytest.mark.skipif(shutil.which(CROSS_CC) is None,
                                 reason=f"{CROSS_CC} not installed (Debian: apt-get install gcc-aarch64-linux-gnu)")


def test_non_x86_machines_get_the_scalar_tier_only():
    every_flag = set().union(*TIER_FLAGS.values())
    for machine in ("aarch64", "arm64", "ppc64le", "riscv64"):
        assert tiers_for(machine, every_flag) == ["scalar", "torch"], machine
    assert tiers_for("x86_64", every_flag)[0] == "avx512_amx"
    assert tiers_for("x86_64", TIER_FLAGS["avx2_fma"]) == ["avx2_fma", "scalar", "torch"]


def _build_lib(cc: str, out: Path) -> None:
    cmd = compile_command("scalar", cc, out)
    assert not any(a.startswith("-m") for a in cmd[1:]), cmd  # no ISA flags in the portable build
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def arm_lib(tmp_path_factory) -> Path:
    """The kernel library as inferd builds it on an aarch64 host (built once for this file)."""
    lib = tmp_path_factory.mktemp("arm") / "libinferd_kernels.so"
    _build_lib(CROSS_CC, lib)
    return lib


@needs_cross
def test_arm64_build_has_no_x86_intrinsics(arm_lib):
    lib = arm_lib
    assert lib.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
    # every header the ARM build reads: none may be an x86 one (immintrin.h and the *intrin.h it pulls in)
    cmd = compile_command("scalar", CROSS_CC, lib)
    deps = subprocess.run([CROSS_CC, "-M", *[a for a in cmd[1:-3] if a not in ("-shared", "-o")]],
                          capture_output=True, text=True, check=True).stdout
    headers = set(re.findall(r"\S+\.h\b", deps))
    assert any(h.endswith("common.h") for h in headers)
    leaked = sorted(h for h in headers if re.search(r"(intrin|x86|cpuid)[^/]*\.h$", h))
    assert not leaked, leaked


def _run_harness(cc: str, lib: Path, runner: list[str]) -> dict[str, tuple[int, np.ndarray]]:
    if not lib.is_file():
        _build_lib(cc, lib)
    exe = lib.with_name("harness")
    subprocess.run([cc, "-O2", str(HARNESS), f"-L{lib.parent}", "-linferd_kernels", "-Wl,-rpath,$ORIGIN", "-o",
                    str(exe), "-lm"], check=True, capture_output=True)
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, check=True, timeout=120).stdout
    rows = {}
    for line in out.splitlines():
        name, rc, *vals = line.split()
        rows[name] = (int(rc), np.array([float(v) for v in vals]))
    return rows


@needs_cross
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="qemu-aarch64 not installed (Debian: qemu-user)")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="no native gcc to build the x86 side")
def test_arm64_scalar_kernels_match_x86_under_qemu(arm_lib, tmp_path):
    arm = _run_harness(CROSS_CC, arm_lib, ["qemu-aarch64", "-L", str(SYSROOT)])
    x86 = _run_harness("gcc", tmp_path / "libinferd_kernels.so", [])
    assert arm.keys() == x86.keys() and len(arm) >= 14
    for name, (rc, got) in arm.items():
        want_rc, want = x86[name]
        assert rc == want_rc == (11 if name == "inferd_info" else 0), (name, rc, want_rc)
        assert got.shape == want.shape and got.size > 0, name
        if name == "inferd_info":  # limits and descriptor struct sizes: both LP64, the same
            assert np.array_equal(got, want), (got, want)
        elif name == "quantize_rows_asym.xq":  # a rounding tie may fall the other way after an fma contraction
            assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.05, (got, want)
        else:  # aarch64 gcc contracts a*b+c into fmadd, the x86 scalar build cannot: last-bit differences only
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)
