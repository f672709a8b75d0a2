"""Pruning and distillation on tiny random models: the training forward matches the engine, pruning that
removes nothing is exact, pruned configs/shapes are consistent and the output loads and generates, one
distillation step lowers the KL on a fixed batch, a resumed run reproduces an uninterrupted one, bad input
fails with a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.cli import main
from inferd.compress import forward
from inferd.compress.distill import DistillConfig, distill_loss, make_optimizer, train
from inferd.compress.io import load_dense, save_model
from inferd.compress.prune import PruneConfig, calibration_batches, prune
from inferd.engine.llm_engine import prompt_logits
from tests.tiny_models import CORPUS, build_tokenizer, write_hf

TEXT = " ".join(CORPUS) * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # 3 layers, 4 query heads over 2 KV heads (GQA groups of 2), tied embeddings like SmolLM2
    return write_hf(tmp_path_factory.mktemp("compress") / "tiny", seed=3,
                    config={"num_hidden_layers": 3})


def _batches(lm):
    return calibration_batches(lm.tokenizer.encode(TEXT), 64, 512)


def test_training_forward_matches_engine(tiny):
    lm = load_dense(str(tiny))
    ids = lm.tokenizer.encode(TEXT)[:60]
    ours = forward.logits(lm.model, torch.tensor([ids]))[0]
    llm = LLM(str(tiny), dtype="float32", quantization="none", kv_cache_memory=0.05)
    ref = prompt_logits(llm.engine, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_prune_nothing_is_identity(tiny, tmp_path):
    lm = load_dense(str(tiny))
    small, report = prune(lm.model, PruneConfig(heads_keep=4, mlp_ratio=1.0), _batches(lm))
    assert report.dropped == [] and report.mlp_kept == 128
    save_model(small, lm.tokenizer, tmp_path / "same", None, torch.float32)
    again = load_dense(str(tmp_path / "same"))
    ids = torch.tensor([lm.tokenizer.encode(TEXT)[:50]])
    assert torch.equal(forward.logits(again.model, ids), forward.logits(lm.model, ids))


@pytest.mark.parametrize("importance", ["angular", "loss"])
def test_dropping_a_layer_equals_skipping_it(tiny, importance):
    lm = load_dense(str(tiny))
    small, report = prune(lm.model, PruneConfig(drop_layers=1, importance=importance), _batches(lm))
    (gone,) = report.dropped
    ids = torch.tensor([lm.tokenizer.encode(TEXT)[:50]])
    assert torch.equal(forward.logits(small, ids), forward.logits(lm.model, ids, forward.Probe(skip=gone)))
    assert report.layer_scores[gone] == min(report.layer_scores) and len(report.layer_scores) == 3
    if importance == "loss":  # the score is the calibration loss with the layer skipped minus the full model's
        ce = [float(torch.nn.functional.cross_entropy(forward.logits(lm.model, b, forward.Probe(skip=s))[0, :-1],
                                                      b[0, 1:], reduction="sum")) for s in (None, gone)
              for b in _batches(lm)]
        n = sum(b.shape[1] - 1 for b in _batches(lm))
        half = len(ce) // 2
        assert report.layer_scores[gone] == pytest.approx((sum(ce[half:]) - sum(ce[:half])) / n, rel=1e-4)


def test_pruned_directory_is_consistent_and_serves(tiny, tmp_path):
    out = tmp_path / "small"
    assert main(["prune", "--model", str(tiny), "--out", str(out), "--drop-layers", "1", "--mlp-ratio", "0.5",
                 "--heads-keep", "2", "--calib-tokens", "256"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 64, 2, 2, 16)
    assert cfg["inferd_compression"]["tool"] == "inferd prune" and len(cfg["inferd_compression"]["dropped"]) == 1
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert sorted({k.split(".")[2] for k in t if k.startswith("model.layers.")}) == ["0", "1"]  # renumbered
    assert t["model.layers.1.self_attn.q_proj.weight"].shape == (2 * 16, 64)
    assert t["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert t["model.layers.1.self_attn.o_proj.weight"].shape == (64, 2 * 16)
    assert t["model.layers.1.mlp.down_proj.weight"].shape == (64, 64)
    llm = LLM(str(out), kv_cache_memory=0.05)  # the normal loader, tokenizer and chat template
    assert llm.tokenizer.chat_template and llm.engine.lm.config.num_layers == 2
    o = llm.generate(llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}]),
                     SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(o.outputs[0].token_ids) == 5


def test_heads_kept_per_kv_group(tiny):
    lm = load_dense(str(tiny))
    small, report = prune(lm.model, PruneConfig(heads_keep=2), _batches(lm))
    for hs in report.kept_heads:  # 4 heads, groups {0, 1} and {2, 3}: one from each
        assert len(hs) == 2 and hs[0] in (0, 1) and hs[1] in (2, 3)
    assert small.model.layers[0].self_attn.h == 2


def _student(tiny):
    teacher = load_dense(str(tiny))
    student, _ = prune(teacher.model, PruneConfig(drop_layers=1, mlp_ratio=0.5), _batches(teacher))
    return teacher, student


def test_one_distill_step_reduces_kl(tiny):
    teacher, student = _student(tiny)
    torch.manual_seed(0)
    ids = torch.tensor([teacher.tokenizer.encode(TEXT)[:64]] * 2)
    cfg = DistillConfig(lr=3e-3, warmup_steps=0)
    with torch.no_grad():
        t_logits = forward.logits(teacher.model, ids)
    student.requires_grad_(True)
    opt = make_optimizer(student, cfg)
    loss, kl0, _ = distill_loss(forward.logits(student, ids), t_logits, ids, cfg)
    loss.backward()
    opt.step()
    with torch.no_grad():
        _, kl1, _ = distill_loss(forward.logits(student, ids), t_logits, ids, cfg)
    assert kl1 < kl0 * 0.98, (float(kl0), float(kl1))
    topk = DistillConfig(top_k=8)
    with torch.no_grad():  # top-k KL of the teacher against itself is zero
        assert float(distill_loss(t_logits, t_logits, ids, topk)[1]) == pytest.approx(0.0, abs=1e-5)


def test_resume_reproduces_the_same_loss(tiny, tmp_path):
    teacher = load_dense(str(tiny))
    rows = torch.tensor(teacher.tokenizer.encode(TEXT)[:32 * 12]).view(12, 32)
    cfg = DistillConfig(seq_len=32, batch_size=2, grad_accum=2, max_steps=4, warmup_steps=1, bf16=False)
    _, a = _student(tiny)
    full = train(teacher.model, a, rows, cfg, tmp_path / "a", progress=False)
    _, b = _student(tiny)
    part = train(teacher.model, b, rows, DistillConfig(**{**cfg.__dict__, "max_steps": 2}), tmp_path / "b",
                 progress=False)
    assert [r["step"] for r in part] == [1, 2]
    _, c = _student(tiny)  # a fresh process would start from the pruned weights again
    rest = train(teacher.model, c, rows, cfg, tmp_path / "b", resume=True, progress=False)
    assert [r["step"] for r in rest] == [3, 4]
    assert rest[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert full[-1]["loss"] < full[0]["loss"]


def test_distill_cli_writes_a_model_that_loads(tiny, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["prune", "--model", str(tiny), "--out", str(student), "--drop-layers", "1",
                 "--calib-tokens", "256"]) == 0
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 3)
    out = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(tiny), "--student", str(student), "--out", str(out), "--data",
                 str(data), "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "3",
                 "--checkpoint-every", "2", "--eval-every", "2", "--generate", "3", "--gen-tokens", "12"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "heldout_ppl" in log[0] and log[-1]["step"] == 3
    assert (out / "checkpoint.pt").is_file()
    gen = json.loads((out / "generated.json").read_text())  # the teacher's own replies joined the training data
    assert gen["key"]["n"] == 3 and len(gen["docs"]) == 3
    prompt_len = len(LLM(str(tiny), kv_cache_memory=0.05).tokenizer.encode_chat(
        [{"role": "user", "content": "x"}]))
    assert all(prompt_len < len(d) for d in gen["docs"])
    rec = json.loads((out / "config.json").read_text())["inferd_compression"]
    assert rec["tool"] == "inferd distill" and rec["steps"] == 3
    assert LLM(str(out), kv_cache_memory=0.05).generate("The capital", SamplingParams(max_tokens=3))


def _other_vocab(tiny: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    write_hf(dst, config={"num_hidden_layers": 1})
    tok = build_tokenizer(vocab_size=300)
    tok.save(str(dst / "tokenizer.json"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = tok.get_vocab_size()
    (dst / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(dst / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = t[k][:cfg["vocab_size"]].contiguous()
    save_file(t, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("argv, message", [
    (["prune", "--drop-layers", "3"], "at least one must stay"),
    (["prune", "--mlp-ratio", "0"], "--mlp-ratio 0.0 must be in (0, 1]"),
    (["prune", "--heads-keep", "3"], "multiple of the 2 KV heads"),
    (["prune", "--calib-file", "/nonexistent/calib.txt"], "data file not found"),
    (["distill", "--data", "/nonexistent/train.txt"], "data file not found"),
    (["distill", "--student", "OTHER"], "vocabulary"),
    (["distill", "--resume"], "no checkpoint"),
    (["distill", "--student", "QUANT"], "is a quantized model"),
    (["distill", "--max-steps", "0"], "--max-steps must be > 0"),
])
def test_bad_input_is_a_one_line_error(tiny, tmp_path, capsys, argv, message):
    out = ["--out", str(tmp_path / "out")]
    if argv[0] == "prune":
        argv = [*argv, "--model", str(tiny), *out]
    else:
        student = _other_vocab(tiny, tmp_path / "other") if "OTHER" in argv else tiny
        if "QUANT" in argv:
            assert main(["quantize", str(tiny), str(tmp_path / "q8"), "--method", "int8"]) == 0
            student = tmp_path / "q8"
            capsys.readouterr()  # the quantize progress bar
        argv = [a if a not in ("OTHER", "QUANT") else str(student) for a in argv]
        argv = [*argv, "--teacher", str(tiny), *(["--student", str(tiny)] if "--student" not in argv else []), *out]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
