"""The repack cache: the first load of a quantized GGUF writes its packed layers under $INFERD_HOME, the second
maps them (no layer repacked, same output), a changed file gets a new entry."""

from __future__ import annotations

import shutil

import pytest

from inferd import LLM, SamplingParams
from inferd.quant import apply
from tests.tiny_models import write_gguf, write_hf

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INFERD_REPACK_CACHE", raising=False)
    return tmp_path / "home"


def _run(path, dense_rows: int = 0) -> tuple[int, list[int]]:
    before = apply.REPACKS
    llm = LLM(str(path), quantization="gguf", dtype="float32", kv_cache_memory=0.02, quant_dense_rows=dense_rows)
    out = llm.generate([[5, 6, 7, 8, 9, 10, 11, 12]], GREEDY)[0].outputs[0].token_ids
    return apply.REPACKS - before, out


@pytest.mark.parametrize("dense_rows", [0, 4])
def test_second_load_uses_the_cache_and_a_changed_file_does_not(tmp_path, home, dense_rows):
    hf = write_hf(tmp_path / "m")
    gguf = write_gguf(tmp_path / "m.gguf", hf, quant="Q4_0")
    n_layers = 2 * 4  # 2 layers x (qkv, o, gate_up, down)
    repacked, ref = _run(gguf, dense_rows)
    assert repacked == n_layers and len(list((home / "repack").glob("*.safetensors"))) == 1
    repacked, again = _run(gguf, dense_rows)
    assert repacked == 0 and again == ref

    other = write_gguf(tmp_path / "other.gguf", write_hf(tmp_path / "m2", seed=1), quant="Q4_0")
    shutil.copyfile(other, gguf)  # same path, other weights
    repacked, changed = _run(gguf, dense_rows)
    assert repacked == n_layers and changed != ref
    assert len(list((home / "repack").glob("*.safetensors"))) == 2


def test_cache_can_be_turned_off(tmp_path, home, monkeypatch):
    monkeypatch.setenv("INFERD_REPACK_CACHE", "0")
    gguf = write_gguf(tmp_path / "m.gguf", write_hf(tmp_path / "m"), quant="Q4_0")
    assert _run(gguf)[0] == 8 and _run(gguf)[0] == 8
    assert not (home / "repack").exists()


def _mapped_from(t, folder) -> bool:
    """Does tensor t's memory lie in a file mapping of a file under `folder`?"""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith(str(folder)):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= ptr < end:
                return True
    return False


def test_packed_layers_and_bf16_copies_are_mapped_from_the_cache_from_the_first_load(tmp_path, home):
    """Right after writing the entry the process swaps its freshly packed layers for the mapped ones (shared with
    every later process); bf16 copies stay mapped too, except under `fast`, which prepacks them for oneDNN."""
    from inferd.ops import onednn

    gguf = write_gguf(tmp_path / "m.gguf", write_hf(tmp_path / "m"), quant="Q4_0")
    for profile in ("balanced", "fast"):
        llm = LLM(str(gguf), quantization="gguf", dtype="float32", kv_cache_memory=0.02, quant_dense_rows=4,
                  memory_profile=profile)
        layer = llm.engine.lm.model.model.layers[0].mlp.gate_up_proj
        assert _mapped_from(layer.packed, home / "repack"), profile
        if profile == "balanced":
            assert layer.dense is not None and _mapped_from(layer.dense, home / "repack")
        elif onednn.available():
            assert layer.dense is None and layer._dense_onednn is not None
        del llm
