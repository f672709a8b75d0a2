"""Every supported architecture against Hugging Face transformers: a tiny random model built by transformers from a
config, saved as an HF directory and written as GGUF; inferd's fp32 logits within 1e-4 of transformers' forward and
greedy tokens identical for 32 tokens, from both files. The prompt (36 tokens) is prefilled in chunks of 16 over
KV blocks of 4, so sliding-window layers (Mistral window 8 on every layer, Gemma 3 window 8 on every other layer) are
checked in chunked prefill and in decode past 2× the window; a second run of the same prompt takes its prefix from
the prefix cache and must give the same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tiny_archs import ARCHS, build_hf, write_gguf

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

PROMPT = [1, *range(5, 40)]  # 36 tokens
GEN_PROMPT = PROMPT[:10]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_files(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    ref = build_hf(name, root / "hf")
    gguf_path = write_gguf(name, root / "hf", root / f"{name}.gguf")
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = ref.generate(torch.tensor([GEN_PROMPT]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(GEN_PROMPT):].tolist()
    return name, root / "hf", gguf_path, logits, greedy


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_matches_transformers(arch_files, fmt):
    from inferd import LLM, SamplingParams
    from inferd.engine.llm_engine import prompt_logits

    name, hf_dir, gguf_path, want_logits, want_greedy = arch_files
    llm = LLM(str(hf_dir if fmt == "hf" else gguf_path), dtype="float32", quantization="none", kv_cache_memory=0.01,
              block_size=4, max_num_batched_tokens=16)
    assert llm.engine.lm.config.architecture == ("llama" if name.startswith("llama") or
                                                 (name == "mistral" and fmt == "gguf") else name)
    got = prompt_logits(llm.engine, PROMPT).numpy()
    assert np.abs(got - want_logits).max() < 1e-4, name
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    first = llm.generate([GEN_PROMPT], params)[0]
    assert first.outputs[0].token_ids == want_greedy, name
    # the same prompt again: its full blocks come from the prefix cache
    again = llm.generate([GEN_PROMPT + want_greedy[:20]], SamplingParams(max_tokens=12, temperature=0,
                                                                          ignore_eos=True))[0]
    assert again.metrics.num_cached_tokens > 0
    assert again.outputs[0].token_ids == want_greedy[20:32], name


def test_sliding_window_config(arch_files):
    """The window and rope bases reach the model as transformers configured them."""
    from inferd.config import ModelConfig
    from inferd.loader.gguf import config_from_gguf, read_gguf

    name, hf_dir, gguf_path, _, _ = arch_files
    import json

    hf = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    gg = config_from_gguf(read_gguf(gguf_path))
    assert hf.layer_windows == gg.layer_windows
    if name == "gemma3":
        assert hf.layer_windows == (8, None, 8, None)
        assert hf.final_logit_softcap == gg.final_logit_softcap == 30.0
        assert hf.rope_local_theta == gg.rope_local_theta == 10000.0
    elif name == "mistral":
        assert hf.layer_windows == (8,) * 3
    else:
        assert hf.layer_windows == ()


@pytest.mark.parametrize("legacy", [False, True], ids=["transformers5-layout", "transformers4-layout"])
def test_gemma3_image_text_checkpoint_serves_its_text_model(tmp_path, legacy):
    """A Gemma 3 image-text directory (Gemma3ForConditionalGeneration, e.g. gemma-3-4b-it as downloaded): inferd
    loads the text model, skips the vision tower, and matches transformers' text-only forward; both tensor
    layouts, and a config.json whose text_config relies on transformers' defaults."""
    from inferd import LLM, SamplingParams
    from inferd.engine.llm_engine import prompt_logits
    from tests.tiny_archs import build_gemma3_multimodal

    ref = build_gemma3_multimodal(tmp_path / "mm", legacy=legacy)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
        greedy = ref.generate(torch.tensor([GEN_PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(GEN_PROMPT):].tolist()
    llm = LLM(str(tmp_path / "mm"), dtype="float32", quantization="none", kv_cache_memory=0.01, block_size=4,
              max_num_batched_tokens=16)
    cfg = llm.engine.lm.config
    assert cfg.architecture == "gemma3" and cfg.num_layers == 4 and cfg.layer_windows == (8, None, 8, None)
    assert set(llm.tokenizer.eos_token_ids) >= {2, 5}  # the outer config's end-of-turn ids are kept
    assert llm.tokenizer.chat_template is not None  # from the processor's chat_template.json
    assert np.abs(prompt_logits(llm.engine, PROMPT).numpy() - want).max() < 1e-4
    out = llm.generate([GEN_PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == greedy
