"""The fused decoder's per-phase clock (ops/fused_decode.profile, `decode_profile` in csrc), which
benchmarks/decode_step_profile.py reads to split a decode step into its GEMMs, attention and row-wise ops."""

from __future__ import annotations

import pytest

from inferd import LLM, SamplingParams
from inferd.ops import cpu_kernels
from inferd.ops.fused_decode import PROFILE_PHASES, profile
from inferd.ops.kernels import get_kernels


@pytest.mark.parametrize("cpu_time", [False, True])
def test_profile_splits_fused_steps_into_phases(tiny_hf, cpu_time):
    if not cpu_kernels.has_quant_gemm():
        pytest.skip(f"kernel tier {get_kernels().tier} has no quantized GEMMs: no fused decode step to profile")
    llm = LLM(str(tiny_hf), dtype="float32", quantization="int8", kv_cache_memory=0.05, device="cpu")
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm.generate(["hello world", "the quick brown fox"], sp)  # warm: builds the fused decoder
    profile(True)  # clears whatever an earlier test in this process left in the sums
    profile(False)
    decoder = llm.engine.lm.model._fused
    steps = decoder.steps
    assert profile(True, cpu_time=cpu_time) == {p: 0.0 for p in PROFILE_PHASES}  # stopped clocks count nothing
    llm.generate(["hello world", "the quick brown fox"], sp)
    parts = profile(False)
    assert decoder.steps > steps
    assert list(parts) == list(PROFILE_PHASES)
    for phase in ("qkv", "o", "gate_up", "down", "attention", "norms"):  # every step runs each of them
        assert parts[phase] > 0, (phase, parts)
    assert all(v >= 0 for v in parts.values())
    llm.generate(["x"], sp)  # off: nothing more is counted
    assert profile(True) == parts
    profile(False)
