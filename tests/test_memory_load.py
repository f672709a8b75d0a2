"""Load footprint on the real default model: peak RSS while loading stays near the steady state (no dense copy
of a quantized GGUF), the small memory profile keeps no bf16 copies and gives the default's greedy output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_smollm2

_LOAD_SCRIPT = r"""
import json, sys
import torch  # noqa: F401  (the runtime's own footprint is not the load's)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (peak RSS) to the current RSS
    f.write("5")
from inferd import LLM
llm = LLM(sys.argv[3], quantization=sys.argv[1], memory_profile=sys.argv[2], kv_cache_memory=0.25, dtype=sys.argv[4])
print(json.dumps({"peak": status("VmHWM"), "rss": status("VmRSS"), **llm.engine.stats()}))
"""


def _load(quantization: str, profile: str = "balanced", model: str = "smollm2-135m", dtype: str = "auto") -> dict:
    # the repack cache off: every run measures the same (cold) load, whatever earlier runs left in $INFERD_HOME
    env = {**os.environ, "INFERD_REPACK_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, quantization, profile, model, dtype], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1], env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_smollm2
@pytest.mark.parametrize("quantization", ["auto", "gguf", "none", "int8", "int4"])
def test_peak_rss_while_loading_stays_near_steady_state(quantization: str):
    m = _load(quantization)
    assert m["peak"] <= 1.2 * m["rss"], m
    if quantization == "gguf":  # 4-bit weights: the whole process stays far below a dense bf16 model's ~1 GB
        assert m["weight_bytes"] < 120e6 and m["rss"] < 700 * (1 << 20), m


# ~100M parameters in small matrices: 200 MB of bf16 weights, so a dense copy of the model (old loads: the
# whole file read, then the model) would put the peak ~1.5x over the steady state, while one layer's
# quantization temporaries stay ~40 MB
_BIG = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 12,
        "num_key_value_heads": 3, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from tests.tiny_models import random_weights, write_hf

    d = write_hf(tmp_path_factory.mktemp("big") / "big-llama")  # the tiny tokenizer, then a bigger model
    cfg = {**json.loads((d / "config.json").read_text()), **_BIG}
    (d / "config.json").write_text(json.dumps(cfg))
    torch_ = pytest.importorskip("torch")
    g = torch_.Generator().manual_seed(0)
    shapes = {k: tuple(v.shape) for k, v in random_weights({**cfg, "num_hidden_layers": 1}, cfg["vocab_size"]).items()}
    weights = {}
    for i in range(cfg["num_hidden_layers"]):
        for k, shape in shapes.items():
            name = k.replace("layers.0.", f"layers.{i}.")
            if name not in weights:
                weights[name] = (torch_.randn(*shape, generator=g) * 0.05).bfloat16()
    save_file(weights, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_safetensors_load_streams_tensor_by_tensor(big_hf: Path, quantization: str):
    m = _load(quantization, model=str(big_hf), dtype="bfloat16")
    assert m["peak"] <= 1.2 * m["rss"], m
    n = 100e6 * (2 if quantization == "none" else 1)  # bf16 / int8 bytes of ~100M parameters
    assert 0.9 * n < m["weight_bytes"] < 1.2 * n, m


@needs_smollm2
def test_small_profile_has_no_bf16_copies_and_same_greedy_output():
    from inferd import LLM, SamplingParams
    from inferd.models.registry import weight_bytes

    prompts = ["Explain in two sentences why the sky is blue, as you would to a curious ten year old child "
               "who keeps asking why", "The capital of France is"]
    params = SamplingParams(max_tokens=16, temperature=0)
    small = LLM("smollm2-135m", memory_profile="small")
    assert weight_bytes(small.engine.lm.model)[1] == 0
    assert small.engine.stats()["kv_bytes_max"] <= 0.5 * (1 << 30)
    ref = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
    del small
    default = LLM("smollm2-135m")
    assert [o.outputs[0].token_ids for o in default.generate(prompts, params)] == ref
